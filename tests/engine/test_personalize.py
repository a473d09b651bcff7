"""User descriptions at evaluation time: inferred from the shots by default, the true one only as "oracle";
`generate --out` writes every (user, question); the Bayes reference columns on template data."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import cli_in_process as cli
from helpers import make_tiny_model_dir

from fspo_engine.data_gen.pipeline import generate_dataset
from fspo_engine.engine.evaluate import evaluate


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same template data twice, but for the users' true descriptions."""
    root = tmp_path_factory.mktemp("personalize")
    a = root / "a"
    generate_dataset(a, preset="quickstart", users=15, prefs_per_user=5, progress=False)
    b = root / "b"
    shutil.copytree(a, b)
    users = [json.loads(line) for line in (b / "users.jsonl").read_text().splitlines()]
    for i, u in enumerate(users):
        u["description"] = f"CANARY {i} this user adores awful reviews about the quality."
    (b / "users.jsonl").write_text("".join(json.dumps(u) + "\n" for u in users))
    return a, b


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("personalize") / "model")


def _run(model_dir, data, description):
    return evaluate(str(model_dir), str(data), [0, 2], description=description, progress=False,
                    max_description_tokens=12)


def test_true_descriptions_reach_only_oracle_evaluations(datasets, model_dir):
    a, b = datasets
    for mode in ("generated", "none"):
        ra, rb = _run(model_dir, a, mode), _run(model_dir, b, mode)
        assert ra["description"] == mode
        strip = lambda r: [{k: v for k, v in e.items()} for e in r["results"]]
        assert strip(ra) == strip(rb), mode  # what the true description says cannot change the numbers
    oa, ob = _run(model_dir, a, "oracle"), _run(model_dir, b, "oracle")
    assert oa["description"] == "oracle"
    assert [e["mean_margin"] for e in oa["results"]] != [e["mean_margin"] for e in ob["results"]]


def test_eval_reports_bayes_optimal_and_description_accuracy(datasets, model_dir):
    a, _ = datasets
    report = _run(model_dir, a, "generated")
    for entry in report["results"]:
        assert 0.5 <= entry["bayes_optimal"] <= 1.0
        assert 0.0 <= entry["bayes_predictor_accuracy"] <= 1.0
        assert 0.0 <= entry["description_accuracy"] <= 1.0  # a random model rarely states a trait
        lo, hi = entry["description_accuracy_ci95"]
        assert lo <= entry["description_accuracy"] <= hi
    assert report["results"][0]["bayes_optimal"] == 0.5  # without shots the label is a coin flip
    assert "description_accuracy" not in _run(model_dir, a, "none")["results"][0]


def test_eval_cli_description_flag_and_json(datasets, model_dir, tmp_path):
    a, _ = datasets
    out = tmp_path / "eval.json"
    res = cli("eval", "--model", model_dir, "--data", a, "--shots", "0,1", "--description", "oracle",
              "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["description"] == "oracle" and [r["shots"] for r in report["results"]] == [0, 1]
    assert "Bayes, population prior" in res.stdout and "description: oracle" in res.stdout
    res = cli("eval", "--model", model_dir, "--data", a, "--shots", "1", "--out", out)
    assert res.returncode == 0 and json.loads(out.read_text())["description"] == "none"
    res = cli("eval", "--model", model_dir, "--data", a, "--description", "sometimes", "--out", out)
    assert res.returncode != 0 and "Traceback" not in res.stderr


def test_generate_out_writes_every_user_and_question(datasets, model_dir, tmp_path):
    a, b = datasets
    outs = []
    for data in (a, b):
        out = tmp_path / f"{data.name}.jsonl"
        res = cli("generate", "--model", model_dir, "--data", data, "--split", "test", "--shots", "2", "--out", out,
                  "--max-new-tokens", "5", "--description", "generated", "--max-description-tokens", "6")
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    lines = outs[0]
    users = [json.loads(u) for u in (a / "users.jsonl").read_text().splitlines()]
    test_users = {u["user_id"] for u in users if u["split"] == "test"}
    assert {r["user_id"] for r in lines} == test_users and len(lines) == 5 * len(test_users)
    for r in lines:
        assert set(r) >= {"user_id", "pref_id", "question", "shots", "description", "response", "finish_reason"}
        assert len(r["shots"]) == 2 and r["description_mode"] == "generated" and isinstance(r["description"], str)
        assert "CANARY" not in json.dumps(r)
    assert outs[0] == outs[1]  # the true description never reached the generated one

    res = cli("generate", "--model", model_dir, "--data", a, "--split", "test", "--shots", "1", "--out",
              tmp_path / "u.jsonl", "--users", sorted(test_users)[0], "--per-user", "2", "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    one = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert len(one) == 2 and {r["user_id"] for r in one} == {sorted(test_users)[0]} and one[0]["description"] is None


def test_generate_single_user_form_and_bad_inputs(datasets, model_dir, tmp_path):
    a, _ = datasets
    user = next(json.loads(u)["user_id"] for u in (a / "users.jsonl").read_text().splitlines())
    res = cli("generate", "--model", model_dir, "--data", a, "--user", user, "--question", "how is the lamp?",
              "--max-new-tokens", "4", "--show-prompt")
    assert res.returncode == 0 and "how is the lamp?" in res.stdout, res.stderr[-2000:]
    for args, why in ((["--user", "nobody"], "nobody"), ([], "--out"), (["--users", "nobody", "--out", tmp_path / "x"],
                                                                         "nobody")):
        res = cli("generate", "--model", model_dir, "--data", a, *args)
        assert res.returncode != 0 and why in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = cli("generate", "--model", tmp_path / "missing", "--data", a, "--user", user)
    assert res.returncode != 0 and "Traceback" not in res.stderr
