"""eval --winrate: judges asked in both orders, position bias counted as ties, the template judge, the CLI
contract, bad inputs as one line each, a killed judge run that resumes from its cache, and users with fewer
preferences than the shots asked for."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import cli_in_process as cli
from helpers import closed_port, make_tiny_model_dir

from fspo_engine.benchmarks.fake_openai import FakeOpenAI
from fspo_engine.data_gen.domains import get_domain
from fspo_engine.data_gen.domains.base import N_DRAWS
from fspo_engine.data_gen.labeler import Decision
from fspo_engine.data_gen.pipeline import generate_dataset
from fspo_engine.engine.episodes import load_dataset
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.winrate import (
    ChatJudge,
    Side,
    TemplateJudge,
    judge_pairs,
    sample_items,
    side_answers,
    tally,
)


@pytest.fixture(scope="module")
def qs_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("winrate") / "data"
    generate_dataset(out, preset="quickstart", users=20, prefs_per_user=6, progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("winrate") / "model")


def _judge_texts(server) -> list[str]:
    """The user message of every chat request the fake server received: what the judge was shown."""
    return [b["messages"][-1]["content"] for b in server.seen if "messages" in b]


def _answers(texts):
    return [{"response": t} for t in texts]


def test_tally_counts_order_flips_and_one_sided_ties_as_ties():
    decisions = [Decision((1, 1)), Decision((-1, -1)), Decision((1, -1)), Decision((0, 1)), Decision((1, 1)),
                 Decision(None)]
    t = tally(decisions)
    assert (t["wins"], t["ties"], t["losses"], t["n"]) == (2, 2, 1, 5)
    assert t["winrate"] == pytest.approx(3 / 5)
    assert t["order_flips"] == 1 and t["malformed"] == 1
    lo, hi = t["ci95"]
    assert 0.0 <= lo < 0.6 < hi <= 1.0


def test_tally_resamples_users_not_answers():
    """Two users, each all wins or all losses: the answers are 10 identical pairs per user, so the interval
    must be that of 2 users (resamples: both winners, one each, both losers: [0, 1]), not of 20 answers."""
    decisions = [Decision((1, 1))] * 10 + [Decision((-1, -1))] * 10
    users = ["u1"] * 10 + ["u2"] * 10
    clustered = tally(decisions, users)
    assert clustered["winrate"] == 0.5 and clustered["users"] == 2
    assert clustered["ci95"] == [0.0, 1.0]
    unclustered = tally(decisions)  # every answer its own cluster: far narrower
    assert 0.2 < unclustered["ci95"][0] < 0.5 < unclustered["ci95"][1] < 0.8


def _items(data, n=6):
    dataset = load_dataset(data)
    return dataset, sample_items(dataset, "test", 2, seed=0)[:n]


def test_position_biased_judge_gives_only_ties_and_both_orders_are_asked(qs_data, tmp_path):
    dataset, items = _items(qs_data)
    ours = _answers([f"ours {i}" for i in range(len(items))])
    theirs = _answers([f"theirs {i}" for i in range(len(items))])
    with FakeOpenAI(answer=lambda body: json.dumps({"reason": "first", "preferred": "A"})) as server:
        judge = ChatJudge(server.base_url, "judge-m", "FSPO_TEST_NO_KEY", tmp_path / "cache")
        decisions = judge_pairs(judge, dataset, items, ours, theirs, progress=False)
        seen = _judge_texts(server)
        assert all(b["response_format"]["type"] == "json_schema" for b in server.seen)  # gen-data's judge request
    t = tally(decisions)
    assert t["winrate"] == 0.5 and t["ties"] == len(items) == t["order_flips"] and t["wins"] == t["losses"] == 0
    for i, ep in enumerate(items):
        first = [m for m in seen if f"Response A: ours {i}\n" in m and f"Response B: theirs {i}\n" in m]
        second = [m for m in seen if f"Response A: theirs {i}\n" in m and f"Response B: ours {i}\n" in m]
        assert len(first) == len(second) == 1
        # The judge sees the user's description and the question.
        assert dataset.users[ep.user_id].description in first[0] and ep.target.question in first[0]


def test_a_judge_that_prefers_a_marker_gives_the_expected_wins(qs_data, tmp_path):
    dataset, items = _items(qs_data, n=5)
    ours = _answers(["[good] a", "[good] b", "[good] c", "plain d", "plain e"])
    theirs = _answers(["plain a", "plain b", "[good] c", "[good] d", "plain e"])

    def reply(body):
        text = body["messages"][-1]["content"]
        a = re.search(r"Response A: (.*)", text).group(1)
        b = re.search(r"Response B: (.*)", text).group(1)
        verdict = "tie" if ("[good]" in a) == ("[good]" in b) else "A" if "[good]" in a else "B"
        return json.dumps({"reason": "marker", "preferred": verdict})

    with FakeOpenAI(answer=reply) as server:
        judge = ChatJudge(server.base_url, "judge-m", "FSPO_TEST_NO_KEY", None)
        t = tally(judge_pairs(judge, dataset, items, ours, theirs, progress=False))
    assert (t["wins"], t["ties"], t["losses"]) == (2, 2, 1) and t["winrate"] == pytest.approx(3 / 5)


def test_template_judge_scores_with_the_users_traits(qs_data):
    dataset, items = _items(qs_data)
    domain = get_domain("reviews", "quickstart")
    rng = random.Random(0)
    best, worst = [], []
    for ep in items:
        traits = dataset.users[ep.user_id].traits
        q = domain.sample_question(rng)
        draws = [rng.getrandbits(30) for _ in range(N_DRAWS)]
        flip = {a: next(v for v in vals if v != traits[a]) for a, vals in domain.axes.items()}
        best.append(domain.compose(q, {a: traits[a] for a in domain.axes}, draws))
        worst.append(domain.compose(q, flip, draws))
    judge = TemplateJudge(dataset)
    assert tally(judge_pairs(judge, dataset, items, _answers(best), _answers(worst), progress=False))["wins"] == len(items)
    assert tally(judge_pairs(judge, dataset, items, _answers(worst), _answers(best), progress=False))["losses"] == len(items)
    # Unreadable text carries no trait value: it loses to anything that carries one of the user's.
    assert tally(judge_pairs(judge, dataset, items, _answers(["???"] * len(items)), _answers(best),
                             progress=False))["losses"] == len(items)


def test_template_judge_refuses_data_the_template_generator_did_not_make(qs_data, tmp_path):
    import shutil

    other = tmp_path / "imported"
    shutil.copytree(qs_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["generator"] = {"name": "import"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FspoError, match="template generator"):
        TemplateJudge(load_dataset(other))


def test_eval_winrate_cli_contract_and_same_seed_same_result(qs_data, model_dir, tmp_path):
    out = tmp_path / "w" / "winrate.json"
    args = ["eval", "--model", model_dir, "--data", qs_data, "--winrate", "--baseline", "zero-shot", "--judge",
            "template", "--shots", "2", "--per-user", "2", "--max-new-tokens", "6", "--out", out]
    res = cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("winrate", "ci95", "wins", "ties", "losses", "n", "per_domain"):
        assert key in report, key
    assert report["n"] == report["wins"] + report["ties"] + report["losses"] == 4 * 2  # 4 test users x 2
    assert report["winrate"] == pytest.approx((report["wins"] + report["ties"] / 2) / report["n"])
    assert report["ci95"][0] <= report["winrate"] <= report["ci95"][1]
    assert set(report["per_domain"]) == {"reviews"} and report["description"] == "none"
    assert out.with_suffix(".png").stat().st_size > 0
    pairs = [json.loads(line) for line in out.with_suffix(".pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == report["n"] and all(set(p) >= {"model", "baseline", "verdict"} for p in pairs)
    first = out.read_text()
    out2 = tmp_path / "w2" / "winrate.json"
    assert cli(*args[:-1], out2).returncode == 0
    strip = lambda t: {k: v for k, v in json.loads(t).items() if k != "model"}
    assert strip(first) == strip(out2.read_text())


@pytest.mark.parametrize("case", ["unknown user", "empty prefs", "missing model", "server down", "garbage judge",
                                  "oracle baseline without descriptions", "two shot counts"])
def test_bad_inputs_are_one_line(case, qs_data, model_dir, tmp_path):
    data, model, extra, server = qs_data, model_dir, [], None
    judge = ["--judge", "template"]
    if case == "unknown user":
        extra = ["--users", "reviews-999999"]
    elif case == "empty prefs":
        import shutil

        data = tmp_path / "data"
        shutil.copytree(qs_data, data)
        (data / "prefs.jsonl").write_text("")
    elif case == "missing model":
        model = tmp_path / "no-such-model"
    elif case == "server down":
        judge = ["--judge", "openai", "--judge-model", "m", "--judge-url", f"http://127.0.0.1:{closed_port()}/v1",
                 "--judge-retries", "0"]
    elif case == "garbage judge":
        server = FakeOpenAI(answer=lambda body: "I refuse to answer in JSON.").__enter__()
        judge = ["--judge", "openai", "--judge-model", "m", "--judge-url", server.base_url]
    elif case == "oracle baseline without descriptions":
        extra = ["--baseline", "oracle-description"]
    elif case == "two shot counts":
        extra = ["--shots", "0,8"]
    try:
        res = cli("eval", "--model", model, "--data", data, "--winrate", *judge, "--per-user", "1",
                  "--max-new-tokens", "3", "--out", tmp_path / "w.json", *extra)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "w.json").exists()


@pytest.mark.slow
def test_killed_judge_run_resumes_from_its_cache(qs_data, model_dir, tmp_path):
    """kill -9 mid-judging; the re-run asks only the pairs the first run had no answer for."""
    out = tmp_path / "w.json"
    with FakeOpenAI(delay_s=0.15) as server:
        args = [sys.executable, "-m", "fspo_engine.cli.main", "eval", "--model", str(model_dir), "--data",
                str(qs_data), "--winrate", "--judge", "openai", "--judge-model", "m", "--judge-url", server.base_url,
                "--judge-concurrency", "1", "--shots", "2", "--per-user", "3", "--max-new-tokens", "4", "--out",
                str(out)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 240
        while server.answered < 6 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = _judge_texts(server)
        assert 6 <= len(first) < 2 * 12, len(first)  # killed part-way through 12 pairs x 2 orders
        res = subprocess.run(args, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        second = _judge_texts(server)[len(first):]
        # What an uncached run asks: a new --out has a new cache. Two orders of a pair whose answers are equal
        # read the same, so this set may hold fewer than 2 x 12 prompts.
        fresh_args = args[:-1] + [str(tmp_path / "fresh.json")]
        assert subprocess.run(fresh_args, capture_output=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode == 0
        everything = set(_judge_texts(server)[len(first) + len(second):])
    # Nothing answered before is asked again, but for the one request in flight (--judge-concurrency 1) that
    # the server may have answered as the client died; together the two runs asked exactly what a whole run asks.
    assert len(set(first) & set(second)) <= 1
    assert set(first) | set(second) == everything
    assert json.loads(out.read_text())["n"] == 12


def test_chat_judge_cancels_the_rest_when_the_server_refuses(qs_data, tmp_path):
    dataset, items = _items(qs_data)
    with FakeOpenAI() as server:
        server.script = [401] * 100
        judge = ChatJudge(server.base_url, "judge-m", "FSPO_TEST_NO_KEY", None, concurrency=2)
        with pytest.raises(FspoError, match="refused"):
            judge_pairs(judge, dataset, items, _answers(["a"] * len(items)), _answers(["b"] * len(items)),
                        progress=False)
        assert server.requests < 2 * len(items)  # the first refusal stops the run


def test_a_user_with_fewer_preferences_than_shots_keeps_all_of_them(qs_data, model_dir):
    """--shots 8 where each user has 5 other preferences: every answer is given after all 5 (the newest
    `side.shots` of them, counted from the end, must not go negative and drop some)."""
    dataset = load_dataset(qs_data)
    items = sample_items(dataset, "test", 8, seed=0, per_user=1)
    assert {len(ep.shots) for ep in items} == {5}
    out = side_answers(Side("model", model_dir, 8, "none"), items, None, device="cpu", progress=False,
                       max_new_tokens=2)
    assert [a["shots_used"] for a in out] == [5] * len(items)
    assert all(a["prompt"].startswith("# Example 1\n") and "# Example 5\n" in a["prompt"] and
               "# Example 6\n" not in a["prompt"] for a in out)
