"""The openai backend against a scripted chat-completions server on 127.0.0.1 (tests/fake_llm.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fake_llm import FakeLLMServer

from fspo_engine.data_gen import generate_dataset
from fspo_engine.data_gen.backends import MalformedReply, OpenAIBackend, parse_json_reply
from fspo_engine.data_gen.errors import DataGenError


@pytest.fixture
def server():
    with FakeLLMServer() as srv:
        yield srv


def backend(srv, tmp_path=None, **kw):
    return OpenAIBackend(
        model="fake",
        base_url=srv.base_url,
        backoff_s=0.01,
        cache_dir=None if tmp_path is None else tmp_path / "cache",
        **kw,
    )


def run(coro_fn):
    """Run `coro_fn(backend...)` and close the client inside the same event loop."""
    return asyncio.run(coro_fn())


def msg(text):
    return [{"role": "user", "content": text}]


def test_concurrency_reaches_the_limit_and_never_exceeds_it(server):
    server.delay_s = 0.1

    async def go():
        b = backend(server, concurrency=6)
        replies = await asyncio.gather(*(b.chat(msg(f"Task: echo {i}")) for i in range(30)))
        await b.aclose()
        return b, replies

    b, replies = run(go)
    assert server.max_inflight == 6
    assert len({r.text for r in replies}) == 30
    assert b.usage.calls == 30 and b.usage.prompt_tokens == 300 and b.usage.completion_tokens == 150


def test_429_and_5xx_are_retried_with_backoff(server):
    server.script = [429, 500, 503]

    async def go():
        b = backend(server)
        reply = await b.chat(msg("Task: echo once"))
        await b.aclose()
        return b, reply

    b, reply = run(go)
    assert json.loads(reply.text) == {"echo": "Task: echo once"}
    assert server.requests == 4 and b.usage.retries == 3 and b.usage.calls == 1


def test_persistent_failure_and_client_errors_are_clear(server):
    server.script = [500] * 10

    async def go(retries):
        b = backend(server, max_retries=retries)
        try:
            await b.chat(msg("Task: echo"))
        finally:
            await b.aclose()

    with pytest.raises(DataGenError, match=r"request failed after 3 tries \(last: HTTP 500\)"):
        asyncio.run(go(2))
    server.script = [401]
    with pytest.raises(DataGenError, match=r"refused the request \(401\)"):
        asyncio.run(go(5))


def test_malformed_replies_are_retried_then_rejected_with_a_clear_message(server):
    server.reply = lambda messages: "Sure! Here is my answer: the first one."

    async def go():
        b = backend(server, malformed_retries=2)
        try:
            await b.chat_json(msg("Task: judge"), lambda o: o, what="judge")
        finally:
            await b.aclose()
        return b

    with pytest.raises(
        MalformedReply, match=r"malformed reply from fake for judge: no JSON object .*3 tries.*Sure!"
    ):
        run(go)
    assert server.answered == 3  # each retry is a new request (attempt number in the cache key)

    server.reply = lambda messages: json.dumps({"preferred": "C"})

    async def go_bad_value():
        b = backend(server, malformed_retries=0)
        from fspo_engine.data_gen.labeler import parse_verdict

        try:
            await b.chat_json(msg("Task: judge 2"), parse_verdict, what="judge")
        finally:
            await b.aclose()

    with pytest.raises(MalformedReply, match='"preferred" must be "A", "B" or "tie"'):
        run(go_bad_value)


def test_parse_json_reply_accepts_fences_and_rejects_non_objects():
    assert parse_json_reply('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_reply('Here you go: {"a": [1, 2]} hope it helps') == {"a": [1, 2]}
    for bad, reason in [("", "empty"), ("[1, 2]", "no JSON object"), ('{"a": }', "invalid JSON")]:
        with pytest.raises(ValueError, match=reason):
            parse_json_reply(bad)


def test_the_cache_avoids_repeated_calls(server, tmp_path):
    async def go():
        b = backend(server, tmp_path)
        same = await asyncio.gather(
            *(b.chat(msg("Task: echo same")) for _ in range(5))
        )  # de-duplicated in flight
        again = await b.chat(msg("Task: echo same"))
        await b.aclose()
        return b, same, again

    b, same, again = run(go)
    assert server.answered == 1 and b.usage.calls == 1 and b.usage.cached_calls == 5
    assert {r.text for r in same} == {again.text}
    b2, _, _ = run(go)  # a new process-like backend reads the on-disk cache
    assert server.answered == 1 and b2.usage.calls == 0


def test_pipeline_with_persona_improvement_and_order_flip_dropping(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SECRET_KEY", "sk-test-secret-4242")
    args = dict(
        backend="openai",
        model="fake",
        base_url=server.base_url,
        api_key_env="FAKE_SECRET_KEY",
        users=8,
        prefs_per_user=4,
        candidates=3,
        concurrency=4,
        backoff_s=0.01,
        progress=False,
    )
    result = generate_dataset(tmp_path / "out", **args)
    labels = result.manifest["stats"]["labels"]
    # Every initial description is silent on brevity: all pairs tie or flip (1 bit each). The added
    # trait decides brief-vs-lengthy pairs; pairs with the position-biased response are dropped.
    assert labels["label_entropy_before"] == 1.0
    assert labels["label_entropy_after"] < 0.9
    assert labels["traits_added"] >= 1 and labels["dropped_flip"] >= 1
    prefs = [json.loads(line) for line in (tmp_path / "out" / "prefs.jsonl").read_text().splitlines()]
    assert prefs and all(
        p["chosen"].startswith("[brief]") and p["rejected"].startswith("[lengthy]") for p in prefs
    )
    users = [json.loads(line) for line in (tmp_path / "out" / "users.jsonl").read_text().splitlines()]
    assert all("They prefer brief answers." in u["description"] for u in users)
    assert server.kinds["Task: improve persona"] == labels["traits_added"]
    assert result.usage["calls"] == server.answered
    # The key was sent to the server and written nowhere.
    assert "Bearer sk-test-secret-4242" in server.auth_headers
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"sk-test-secret" not in path.read_bytes(), path
    assert "sk-test-secret" not in capsys.readouterr().err

    # A second run over the same cache makes no new requests and writes the same dataset.
    answered = server.answered
    again = generate_dataset(tmp_path / "again", cache_dir=str(tmp_path / "out" / ".llm-cache"), **args)
    assert server.answered == answered and again.usage["calls"] == 0
    for name in ("users.jsonl", "prefs.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_pipeline_reports_when_every_reply_is_malformed(server, tmp_path):
    server.reply = lambda messages: "no json here"
    with pytest.raises(DataGenError, match="no preferences were generated; first problem: malformed reply"):
        generate_dataset(
            tmp_path,
            backend="openai",
            model="fake",
            base_url=server.base_url,
            users=2,
            prefs_per_user=1,
            progress=False,
            backoff_s=0.01,
        )
    assert not Path(tmp_path / "manifest.json").exists()


def test_timeouts_are_retried_then_reported(server):
    server.delay_s = 0.5

    async def go():
        b = backend(server, timeout_s=0.1, max_retries=1)
        try:
            await b.chat(msg("Task: echo slow"))
        finally:
            await b.aclose()
        return b

    with pytest.raises(DataGenError, match=r"request failed after 2 tries \(last: APITimeoutError\)"):
        run(go)
    assert server.requests == 2


def test_views_plus_persona_steered_responses(server, tmp_path):
    result = generate_dataset(
        tmp_path,
        backend="openai",
        model="fake",
        base_url=server.base_url,
        users=3,
        prefs_per_user=3,
        candidates=2,
        response_mode="both",
        gen_models=("g1", "g2"),
        judge_model="judge",
        progress=False,
    )
    assert result.manifest["generator"]["gen_models"] == ["g1", "g2"]
    by_model = {}
    for model, content in server.seen:
        by_model.setdefault(model, []).append(content.splitlines()[0])
    # Views come from the first generator, view-conditioned responses round-robin over both, persona-
    # steered responses from the first, every verdict from the judge model.
    assert set(by_model) == {"g1", "g2", "judge"}
    assert set(by_model["g2"]) == {"Task: respond"} and set(by_model["judge"]) <= {
        "Task: judge",
        "Task: improve persona",
    }
    persona = [c for _, c in server.seen if "would like best" in c]
    assert len(persona) == 9  # one per (user, question)
