"""`fspo-engine score`: the output contract, agreement with transformers, and bad input handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import hf_model, hf_response_logprob, make_tiny_model_dir, synthetic_records, write_dataset

from fspo_engine.cli.main import cli

KEYS = ["episode_id", "user_id", "shots", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("score") / "model", vocab_size=400, tie=True, seed=3)


@pytest.fixture
def data_dir(tmp_path):
    users, prefs = synthetic_records(n_users=5, prefs_per_user=[4, 4, 4, 6, 2], seed=5, test_users=2)
    return write_dataset(tmp_path / "data", users, prefs)


def run(*args):
    return CliRunner().invoke(cli, ["score", *map(str, args)], catch_exceptions=False)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_score_writes_the_contract_and_matches_transformers(model_dir, data_dir, tmp_path):
    out = tmp_path / "scores.jsonl"
    res = run(
        "--model",
        model_dir,
        "--data",
        data_dir,
        "--out",
        out,
        "--shots",
        "2",
        "--with-tokens",
        "--max-tokens",
        "2048",
    )
    assert res.exit_code == 0, res.output
    recs = read_jsonl(out)
    assert [r["episode_id"] for r in recs] == [f"u003/e0/{k}" for k in range(6)] + ["u004/e0/0", "u004/e0/1"]
    oracle = hf_model(model_dir)
    for r in recs:
        assert list(r)[: len(KEYS)] == KEYS and set(r) == set(KEYS) | {
            "prompt_ids",
            "chosen_ids",
            "rejected_ids",
        }
        assert r["shots"] == (2 if r["user_id"] == "u003" else 1)
        assert (
            r["chosen_tokens"] == len(r["chosen_ids"]) and r["chosen_ids"][-1] == 2 == r["rejected_ids"][-1]
        )
        assert r["prompt_ids"][0] == 1
        for side in ("chosen", "rejected"):
            want = hf_response_logprob(oracle, r["prompt_ids"], r[f"{side}_ids"])
            assert abs(r[f"{side}_logp"] - want) <= 1e-4 * abs(want), (r["episode_id"], side)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_score_is_deterministic_and_packing_budget_does_not_change_numbers(model_dir, data_dir, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"

    def score_all(out, max_tokens, *extra):
        return run("--model", model_dir, "--data", data_dir, "--out", out, "--split", "all", "--shots", "1-3",
                   "--max-tokens", max_tokens, *extra)

    assert score_all(a, "2048").exit_code == 0
    assert score_all(b, "2048").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    # A smaller row budget packs differently (and may truncate); episodes that kept all shots score the same.
    assert score_all(c, "600", "--with-tokens").exit_code == 0
    ra, rc = read_jsonl(a), read_jsonl(c)
    assert len(ra) == len(rc) == 20
    same = [(x, y) for x, y in zip(ra, rc) if x["shots"] == y["shots"]]
    assert same
    for x, y in same:
        assert x["chosen_logp"] == pytest.approx(y["chosen_logp"], rel=1e-5)
        assert x["rejected_logp"] == pytest.approx(y["rejected_logp"], rel=1e-5)
    assert all(len(r["prompt_ids"]) + r["chosen_tokens"] + r["rejected_tokens"] <= 600 for r in rc)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "prefs.jsonl").write_text('{"pref_id": "x"\n'), "prefs.jsonl:1: malformed JSON"),
        (
            lambda d: (d / "users.jsonl").write_text('{"user_id": "u"}\n'),
            "users.jsonl:1: missing field 'domain'",
        ),
        (lambda d: (d / "prefs.jsonl").write_bytes(b""), "prefs.jsonl: empty file"),
        (
            lambda d: (d / "users.jsonl").write_bytes(
                (d / "users.jsonl").read_bytes() + b'{"user_id": "\xff"}\n'
            ),
            "users.jsonl:6: invalid UTF-8",
        ),
        (
            lambda d: (d / "prefs.jsonl").write_text(
                json.dumps({"pref_id": "p", "user_id": "zz", "question": "q", "chosen": "a", "rejected": "b"})
                + "\n"
            ),
            "prefs.jsonl:1: unknown user_id 'zz'",
        ),
        (
            lambda d: (d / "prefs.jsonl").write_text(
                json.dumps({"pref_id": "p", "user_id": "u000", "question": 1, "chosen": "a", "rejected": "b"})
                + "\n"
            ),
            "prefs.jsonl:1: field 'question' must be a string, got an integer",
        ),
    ],
)
def test_bad_data_exits_nonzero_with_path_line_and_writes_nothing(
    model_dir, data_dir, tmp_path, corrupt, message
):
    corrupt(data_dir)
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(
        cli, ["score", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out)]
    )
    assert res.exit_code == 1
    assert f"error: {data_dir / message.split(':')[0]}{message[len(message.split(':')[0]) :]}" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_bad_arguments_exit_nonzero(model_dir, data_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    for args, message in [
        (["--model", tmp_path / "missing"], "missing: not a model directory"),
        (["--shots", "3-1"], "--shots"),
        (["--max-tokens", "40"], "needs"),  # no episode fits: the error names one
    ]:
        full = ["--model", model_dir, "--data", data_dir, "--out", out, *args]
        res = CliRunner().invoke(cli, ["score", *map(str, full)])
        assert res.exit_code == 1 and message in res.output, res.output
        assert not out.exists()


def test_no_traceback_in_a_real_process(data_dir, tmp_path):
    (data_dir / "users.jsonl").write_text("not json\n")
    env = {k: v for k, v in os.environ.items() if k != "FSPO_DEBUG"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fspo_engine.cli.main",
            "score",
            "--model",
            str(tmp_path),
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"error: {data_dir / 'users.jsonl'}:1: malformed JSON")
    assert "Traceback" not in proc.stderr
