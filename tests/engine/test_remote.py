"""`generate --generator openai` and `eval --winrate --generator openai` (engine/remote.py): a completions server
on 127.0.0.1 that runs fspo-engine's own model greedily on the ids it receives gives the local rows exactly,
with and without user descriptions; bad servers are one line; a killed run resumes without re-asking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from helpers import cli_in_process as cli
from helpers import closed_port, make_tiny_model_dir, synthetic_records, write_dataset

from fspo_engine.benchmarks.fake_openai import NULL, FakeOpenAI, Raw

MAX_NEW = 6
SHOTS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A dataset (3 test users, one with fewer preferences than --shots + 1) and two runs on one sharp random
    model (a near-tie between two logits cannot then flip a greedy token between batched and one-by-one
    decoding): `plain` (a model directory) and `described` (a run trained with user descriptions)."""
    root = tmp_path_factory.mktemp("remote")
    users, prefs = synthetic_records(n_users=5, prefs_per_user=[5, 5, 5, 5, 2], test_users=3, n_words=(2, 8))
    data = write_dataset(root / "data", users, prefs)
    plain = make_tiny_model_dir(root / "model", init_std=0.15)
    described = root / "run"
    described.mkdir()
    os.symlink(plain, described / "pref-ft")
    (described / "config.toml").write_text("[data]\nuser_description = true\n")
    (described / "run.json").write_text(json.dumps({"stage_order": ["pref-ft"],
                                                    "stages": {"pref-ft": {"final": "pref-ft"}}}))
    return SimpleNamespace(data=data, plain=plain, described=described)


class OwnModel:
    """The `complete` hook of a FakeOpenAI: fspo-engine's model decodes greedily the token ids it receives, with
    the request's max_tokens, stop_token_ids and stop strings, one request at a time (no batching)."""

    def __init__(self, model_dir):
        from fspo_engine.engine.model import load_model
        from fspo_engine.engine.tokenizer import load_tokenizer

        self.model = load_model(model_dir).eval()
        self.tok = load_tokenizer(model_dir)
        self.decoded: dict[tuple, list[int]] = {}  # prompt ids -> generated ids (a stop id included)
        self.lock = threading.Lock()

    def decode(self, ids):
        return self.tok.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def __call__(self, body):
        from fspo_engine.engine.generate import generate_batch

        prompt = body["prompt"]
        if not isinstance(prompt, list):
            prompt = [self.tok.bos_id] + self.tok.encode(prompt)  # a text prompt: tokenized as a server would
        assert body["temperature"] == 0
        (g,) = generate_batch(self.model, [prompt], max_new_tokens=body["max_tokens"],
                              stop_ids=body.get("stop_token_ids") or (self.tok.eos_id,),
                              stop_strings=body.get("stop") or (), decode=self.decode)
        n = len(g.ids) + (g.finish_reason == "eos")  # vLLM counts the eos it stopped at
        with self.lock:
            self.decoded[tuple(prompt)] = g.ids
        return {"text": g.text, "completion_tokens": n, "finish_reason": "length" if n >= body["max_tokens"] else "stop"}


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _generate(model, data, out, *extra):
    return cli("generate", "--model", model, "--data", data, "--split", "test", "--shots", SHOTS,
               "--max-new-tokens", MAX_NEW, "--max-description-tokens", 5, "--out", out, *extra)


@pytest.mark.parametrize("run", ["plain", "described"])
def test_remote_rows_equal_local_rows_token_for_token(files, tmp_path, run):
    """The contract: the same rows, each with the same "prompt", in the same order; the server received those
    prompts as the exact ids (bos first) on /v1/completions, and decoded the local greedy tokens."""
    from fspo_engine.engine.generate import generate_batch

    model = getattr(files, run)
    res = _generate(model, files.data, tmp_path / "local.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    local = _rows(tmp_path / "local.jsonl")
    hook = OwnModel(files.plain)
    with FakeOpenAI(complete=hook, models=["fspo"]) as server:
        res = _generate(model, files.data, tmp_path / "remote.jsonl", "--generator", "openai", "--generator-url",
                        server.base_url, "--generator-model", "fspo")
        seen = list(server.seen)
        kinds = dict(server.kinds)
    assert res.returncode == 0, res.stderr[-3000:]
    remote = _rows(tmp_path / "remote.jsonl")
    assert remote == local and len(local) == 3 * 5 - 3  # every (test user, question), in order
    assert kinds == {"completions": len(seen)}  # /v1/completions only, never chat
    described = run == "described"
    assert len(seen) == len(local) * (2 if described else 1)  # description, then the answer after it
    assert all(r["description_mode"] == ("generated" if described else "none") for r in local)
    assert all(isinstance(b["prompt"], list) and b["prompt"][0] == hook.tok.bos_id for b in seen)
    answers = [b for b in seen if not b.get("stop")]
    # Each row's prompt is the text of the ids the server got for its answer.
    assert sorted(hook.decode(b["prompt"]) for b in answers) == sorted(r["prompt"] for r in local)
    if described:
        assert all(r["prompt"].endswith(f"## User Description\n{r['description']}\n## Preferred Response \n")
                   for r in local)
        assert {tuple(b["stop"]) for b in seen if b.get("stop")} == {("## Preferred Response",)}
    else:
        assert all(r["prompt"].endswith("# Task\nGiven the examples above, generate a preferred response to the "
                                        f"following question.\n## Question \n{r['question'].strip()}\n"
                                        "## Preferred Response \n") for r in local if r["shots"])
    assert {b["max_tokens"] for b in answers} == {MAX_NEW} and all(b["stop_token_ids"] for b in seen)
    # Token for token: what the server decoded one prompt at a time is what local batched decoding gives.
    for group in (answers, [b for b in seen if b.get("stop")]):
        if group:
            batched = generate_batch(hook.model, [b["prompt"] for b in group], max_new_tokens=group[0]["max_tokens"],
                                     stop_ids=group[0]["stop_token_ids"], stop_strings=group[0].get("stop") or (),
                                     decode=hook.decode)
            assert [hook.decoded[tuple(b["prompt"])] for b in group] == [g.ids for g in batched]
    # The user with 1 other preference gets 1 shot, the others SHOTS.
    assert sorted({len(r["shots"]) for r in local}) == [1, SHOTS]


def test_a_server_that_refuses_token_ids_gets_the_text(files, tmp_path):
    hook = OwnModel(files.plain)

    def text_only(body):
        return Raw(400, b'{"error": {"message": "prompt must be a string"}}') if isinstance(body["prompt"], list) \
            else hook(body)

    with FakeOpenAI(complete=text_only) as server:
        res = _generate(files.plain, files.data, tmp_path / "remote.jsonl", "--generator", "openai",
                        "--generator-url", server.base_url, "--generator-model", "m")
        texts = [b["prompt"] for b in server.seen if isinstance(b["prompt"], str)]
        lists = [b for b in server.seen if isinstance(b["prompt"], list)]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "refused a token-id prompt" in res.stderr and len(lists) == 1  # tried once, then text
    rows = _rows(tmp_path / "remote.jsonl")
    assert sorted(texts) == sorted(r["prompt"] for r in rows)  # the exact text of each row's prompt
    assert _generate(files.plain, files.data, tmp_path / "local.jsonl").returncode == 0
    assert rows == _rows(tmp_path / "local.jsonl")  # this tokenizer splits the joined text the same way


@pytest.mark.parametrize("case", ["server down", "wrong model name", "reply without text", "no model name",
                                  "url without openai"])
def test_bad_servers_are_one_line(files, tmp_path, case):
    server = None
    if case == "server down":
        url, model = f"http://127.0.0.1:{closed_port()}/v1", "m"
    else:
        server = FakeOpenAI(models=["served"], complete=lambda body: NULL).__enter__()
        url, model = server.base_url, "served" if case == "reply without text" else "other"
    args = {"no model name": ["--generator", "openai", "--generator-url", url],
            "url without openai": ["--generator-url", url, "--generator-model", model]}.get(
        case, ["--generator", "openai", "--generator-url", url, "--generator-model", model])
    try:
        res = _generate(files.plain, files.data, tmp_path / "out.jsonl", *args, "--generator-retries", 0)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    expect = {"server down": "request failed after 1 tries", "wrong model name": "does not exist",
              "reply without text": "a reply without text", "no model name": "--generator-model",
              "url without openai": "go with --generator openai"}[case]
    assert expect in lines[0] and lines[0].startswith("error: "), lines[0]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_killed_remote_generation_resumes_without_re_asking(files, tmp_path):
    """kill -9 part-way; the rerun asks only what had no reply, and writes what an uninterrupted run writes."""
    out = tmp_path / "answers.jsonl"
    hook = OwnModel(files.plain)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with FakeOpenAI(complete=hook, delay_s=0.3) as server:
        args = [sys.executable, "-m", "fspo_engine.cli.main", "generate", "--model", str(files.plain), "--data",
                str(files.data), "--split", "test", "--shots", str(SHOTS), "--max-new-tokens", str(MAX_NEW),
                "--generator", "openai", "--generator-url", server.base_url, "--generator-model", "m",
                "--generator-concurrency", "1", "--out", str(out)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 240
        while server.answered < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = [tuple(b["prompt"]) for b in server.seen]
        assert 4 <= len(first) < 12 and not out.exists(), len(first)
        res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        second = [tuple(b["prompt"]) for b in server.seen][len(first):]
    # At most the one request in flight at the kill (--generator-concurrency 1) is asked again.
    assert len(set(first) & set(second)) <= 1
    assert len(set(first) | set(second)) == len(first + second) - len(set(first) & set(second)) == 12
    assert _generate(files.plain, files.data, tmp_path / "local.jsonl").returncode == 0
    assert _rows(out) == _rows(tmp_path / "local.jsonl")


def test_eval_winrate_with_both_sides_on_servers(files, tmp_path):
    """eval --winrate --generator openai: the model's and the baseline's answers come from their servers (here
    zero-shot on the model's server, then a baseline directory on its own), judged as the local answers are."""
    hook = OwnModel(files.plain)
    base = ["eval", "--model", files.plain, "--data", files.data, "--winrate", "--judge", "openai",
            "--judge-model", "j", "--shots", 2, "--max-new-tokens", MAX_NEW]
    with FakeOpenAI(complete=hook) as server, FakeOpenAI(complete=hook) as other:
        gen = ["--generator", "openai", "--generator-url", server.base_url, "--generator-model", "m"]
        res = cli(*base, "--judge-url", server.base_url, "--out", tmp_path / "local.json")
        assert res.returncode == 0, res.stderr[-3000:]
        asked_locally = server.kinds["completions"]
        res = cli(*base, "--judge-url", server.base_url, *gen, "--out", tmp_path / "remote.json")
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.kinds["completions"] - asked_locally == 2 * 12  # both sides' answers, on this server
        res = cli(*base, "--judge-url", server.base_url, *gen, "--baseline", files.plain, "--baseline-generator-url",
                  other.base_url, "--baseline-generator-model", "b", "--out", tmp_path / "dir.json")
        assert res.returncode == 0, res.stderr[-3000:]
        assert other.kinds["completions"] == 12 and {b["model"] for b in other.seen} == {"b"}
    assert asked_locally == 0
    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert (remote["generator"], remote["baseline_generator"]) == ("openai:m", "openai:m")
    assert local["generator"] == "local"
    same = ("winrate", "wins", "ties", "losses", "n", "per_domain")
    assert {k: local[k] for k in same} == {k: remote[k] for k in same}
    pairs = lambda n: [(p["model"]["response"], p["baseline"]["response"])  # noqa: E731
                       for p in map(json.loads, (tmp_path / f"{n}.pairs.jsonl").read_text().splitlines())]
    assert pairs("local") == pairs("remote")
