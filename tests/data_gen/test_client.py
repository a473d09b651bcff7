"""data_gen/client.py against the fake OpenAI server (benchmarks/fake_openai.py) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from fspo_engine.benchmarks.fake_openai import NULL, FakeOpenAI, Raw, consistent_judge, default_answer, spawn
from fspo_engine.data_gen.cache import FILENAME
from fspo_engine.data_gen.client import LLMClient, MalformedReply, Reply
from fspo_engine.data_gen.errors import DataGenError

VERDICT = {
    "type": "object",
    "properties": {"reason": {"type": "string"}, "preferred": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["reason", "preferred"],
    "additionalProperties": False,
}
STAGE_KEYS = {"requests", "cache_hits", "malformed", "retries", "tokens_in", "tokens_out", "latency_p50_s",
              "latency_p95_s", "mean_inflight", "wall_s", "req_per_s"}


def msg(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def client(urls, **kw) -> LLMClient:
    kw.setdefault("backoff_s", 0.01)
    return LLMClient(model="fake", base_urls=urls, **kw)


def run(fn):
    return asyncio.run(fn())


@pytest.fixture
def fake():
    with FakeOpenAI() as srv:
        yield srv


# ------------------------------------------------------------------------------------------ scheduling
def test_the_cap_is_kept_full():
    # The server (in its own process, so the client's CPU is apart) counts the time-weighted in-flight
    # level over its busy span, at issue 23's contract: 1 s per request, cap 64, >= 0.8 x 64. (At 0.2 s
    # the SDK's ~2 ms of CPU per request already costs a shared 2-core machine ~0.2 of the cap: replies
    # of fixed latency arrive in waves of 64 that the client parses before it sends the next 64.
    # `bench gen-data` measures that.)
    cap = 64
    with spawn(delay_s=1.0) as srv:
        async def go():
            c = client(srv.base_url, concurrency=cap)
            replies = await asyncio.gather(*(c.chat(msg(f"q{i}"), stage="s") for i in range(3 * cap)))
            await c.aclose()
            return c, replies

        c, replies = run(go)
        stats = srv.stats()
    assert len({r.text for r in replies}) == 3 * cap
    assert stats["answered"] == 3 * cap and stats["max_inflight"] == cap
    assert stats["mean_inflight"] >= 0.8 * cap, stats
    assert c.stats()["total"]["mean_inflight"] <= cap


def test_waiters_are_served_in_priority_order(fake):
    fake.delay_s = 0.02

    async def go():
        c = client(fake.base_url, concurrency=1)
        first = asyncio.create_task(c.chat(msg("first"), stage="s", priority=-5))
        await asyncio.sleep(0.01)  # `first` holds the only slot; the rest queue behind it
        order = [3, 1, 2, 1, 0, 3, 2]
        rest = [asyncio.create_task(c.chat(msg(f"p{p} #{i}"), stage="s", priority=p)) for i, p in enumerate(order)]
        await asyncio.sleep(0)
        assert c.inflight == 1 and c.waiting == len(order)
        await asyncio.gather(first, *rest)
        assert c.waiting == 0
        await c.aclose()
        return order

    order = run(go)
    seen = [b["messages"][0]["content"] for b in fake.seen]
    expected = ["first"] + [f"p{p} #{i}" for i, p in sorted(enumerate(order), key=lambda x: (x[1], x[0]))]
    assert seen == expected


def test_identical_concurrent_requests_share_one_call(fake):
    fake.delay_s = 0.05

    async def go():
        c = client(fake.base_url)
        replies = await asyncio.gather(*(c.chat(msg("same"), stage="s") for _ in range(5)))
        await c.aclose()
        return c, replies

    c, replies = run(go)
    assert fake.answered == 1 and len({r.text for r in replies}) == 1
    assert c.stats()["stages"]["s"]["cache_hits"] == 4


# ------------------------------------------------------------------------------------------ servers
def test_two_servers_one_killed_mid_run_nothing_lost(capsys):
    with FakeOpenAI(delay_s=0.05) as a, FakeOpenAI(delay_s=0.05) as b:
        async def go():
            c = client(f"{a.base_url}, {b.base_url}", concurrency=16, probe_after_s=60)
            tasks = [asyncio.create_task(c.chat(msg(f"q{i}"), stage="s")) for i in range(300)]
            while a.answered < 30:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(a.kill)  # mid-reply: a's open requests are cut
            replies = await asyncio.gather(*tasks)
            await c.aclose()
            return c, replies

        c, replies = run(go)
        answered_b = b.answered
    assert len(replies) == 300 and all(r.text for r in replies)
    assert len({r.text for r in replies}) == 300
    assert a.answered + answered_b <= 300 + 16  # at most the kill window's in-flight asked twice
    assert a.answered + answered_b >= 300 and a.answered < 300 and answered_b > 0
    stats = c.stats()
    assert stats["servers"][a.base_url]["down"] and not stats["servers"][b.base_url]["down"]
    assert stats["total"]["requests"] == 300 and stats["total"]["retries"] >= 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "server down" in line]
    assert len(warnings) == 1 and a.base_url in warnings[0]


def test_a_down_server_is_probed_again_and_used_when_back():
    with FakeOpenAI() as b:
        a = FakeOpenAI()
        with a:
            port = a.port
        a_url = f"http://127.0.0.1:{port}/v1"  # nothing listens there now

        async def go():
            c = client(f"{a_url},{b.base_url}", probe_after_s=0.2, down_after=1)
            await asyncio.gather(*(c.chat(msg(f"x{i}"), stage="s") for i in range(5)))
            assert c.stats()["servers"][a_url]["down"]
            with FakeOpenAI(port=port) as back:
                await asyncio.sleep(0.3)
                await asyncio.gather(*(c.chat(msg(f"y{i}"), stage="s") for i in range(20)))
                served = back.answered
            await c.aclose()
            return c, served

        c, served = run(go)
    assert served >= 1 and not c.stats()["servers"][a_url]["down"]


def test_all_servers_down_is_one_clear_error():
    urls = []
    for _ in range(2):
        with FakeOpenAI() as f:
            urls.append(f.base_url)

    async def go():
        c = client(",".join(urls), max_retries=2, probe_after_s=0.01)
        try:
            await c.chat(msg("x"), stage="s")
        finally:
            await c.aclose()

    with pytest.raises(DataGenError, match=r"^all 2 servers are failing .*request failed after \d+ tries") as info:
        run(go)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ failures
def test_429_bursts_honour_retry_after():
    with FakeOpenAI(retry_after=0.1) as fake:
        fake.script = [429] * 3

        async def go():
            c = client(fake.base_url)
            t0 = time.monotonic()
            reply = await c.chat(msg("x"), stage="s")
            waited = time.monotonic() - t0
            await c.aclose()
            return c, reply, waited

        c, reply, waited = run(go)
        assert reply.text and fake.statuses[429] == 3 and fake.answered == 1
        assert waited >= 0.3  # Retry-After: 0.1 s each, not the 0.01 s backoff
        assert c.stats()["stages"]["s"]["retries"] == 3

        fake.script = [429] * 40  # a burst over many concurrent requests

        async def burst():
            c = client(fake.base_url, concurrency=20)
            replies = await asyncio.gather(*(c.chat(msg(f"b{i}"), stage="s") for i in range(30)))
            await c.aclose()
            return c, replies

        c, replies = run(burst)
        assert len(replies) == 30 and c.stats()["total"]["retries"] == 40


def test_retry_after_is_bounded(fake):
    fake.retry_after = 1000.0
    fake.script = [429]

    async def go():
        c = client(fake.base_url, backoff_max_s=0.05)
        await c.chat(msg("x"), stage="s")
        await c.aclose()

    t0 = time.monotonic()
    run(go)
    assert time.monotonic() - t0 < 100


def test_connection_resets_5xx_timeouts_and_bad_bodies_are_retried_not_cached(fake, tmp_path):
    fake.script = ["reset", 500, 503, "reset", Raw(200, b"<html>busy</html>", "text/html"),
                   Raw(200, b'{"choices": []}'), Raw(200, b'{"error": {"message": "x"}}'), "hang"]

    async def go():
        c = client(fake.base_url, max_retries=8, backoff_max_s=0.02, timeout_s=0.5, cache_dir=tmp_path)
        reply = await c.chat(msg("x"), stage="s")
        await c.aclose()
        return c, reply

    c, reply = run(go)
    assert reply.text == default_answer({"model": "fake", "messages": msg("x"), "seed": fake.seen[-1]["seed"],
                                         "max_tokens": 256})
    assert fake.resets == 2 and c.stats()["stages"]["s"]["retries"] == 8
    assert c.stats()["stages"]["s"]["requests"] == 1


def test_persistent_5xx_exhausts_retries_with_one_line(fake):
    fake.script = [500] * 10

    async def go():
        c = client(fake.base_url, max_retries=2)
        try:
            await c.chat(msg("x"), stage="s")
        finally:
            await c.aclose()

    with pytest.raises(DataGenError, match=r"/v1: request failed after 3 tries \(last: HTTP 500\)$"):
        run(go)


def test_wrong_model_is_one_clear_error_at_once():
    with FakeOpenAI(models=["right"]) as fake:
        async def go():
            c = LLMClient(model="wrong", base_urls=fake.base_url)
            try:
                await c.chat(msg("x"), stage="s")
            finally:
                await c.aclose()

        with pytest.raises(DataGenError, match=r"refused the request \(404\): .*`wrong` does not exist") as info:
            run(go)
        assert fake.requests == 1 and "\n" not in str(info.value)


def test_the_api_key_is_redacted_everywhere(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-very-secret-123")
    fake.error_message = lambda status, auth: f"bad key {auth}"
    fake.answer = lambda body: "echo of my key: sk-very-secret-123"

    async def go():
        c = LLMClient(model="fake", base_urls=fake.base_url, api_key_env="MY_KEY", cache_dir=tmp_path)
        reply = await c.chat(msg("x"), stage="s")
        fake.script = [401]
        try:
            await c.chat(msg("y"), stage="s")
        finally:
            await c.aclose()
        return reply

    with pytest.raises(DataGenError, match=r"\(401\): bad key Bearer \*\*\*") as info:
        run(go)
    assert "sk-very-secret" not in str(info.value)
    assert fake.auth_headers == {"Bearer sk-very-secret-123"}  # the key is sent...
    for f in tmp_path.iterdir():  # ...but never stored
        assert b"sk-very-secret" not in f.read_bytes()
    assert "sk-very-secret" not in json.dumps(fake.seen)


# ------------------------------------------------------------------------------------------ replies
def test_chat_json_sends_the_schema_and_validates(fake):
    async def go():
        c = client(fake.base_url)
        value = await c.chat_json(msg("judge"), stage="judge", schema=VERDICT, schema_name="verdict",
                                  check=lambda o: o["preferred"])
        await c.aclose()
        return value

    assert run(go) in ("A", "B", "tie")
    assert fake.seen[-1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}


@pytest.mark.parametrize("bad, reason", [
    ("Sure! The first one.", "no JSON object"),
    ('{"reason": "x", "preferred": ', "no JSON object"),
    ('{"reason": "x", "preferred": "C"}', r"\$\.preferred: 'C' is not one of"),
    ('{"reason": "x"}', "missing required property 'preferred'"),
    ("", "empty reply"),
    (NULL, "empty reply"),
    ('{"reason": "\\ud800", "preferred": "A"}', "not valid Unicode"),
])
def test_malformed_replies_are_counted_and_raised_without_hurting_others(fake, tmp_path, bad, reason):
    fake.answer = lambda body: bad if body["messages"][0]["content"] == "bad" else None

    async def go():
        c = client(fake.base_url, malformed_retries=2, cache_dir=tmp_path)
        results = await asyncio.gather(
            c.chat_json(msg("bad"), stage="judge", schema=VERDICT, schema_name="v"),
            *(c.chat_json(msg(f"good {i}"), stage="judge", schema=VERDICT, schema_name="v") for i in range(5)),
            return_exceptions=True)
        await c.aclose()
        return c, results

    c, results = run(go)
    assert isinstance(results[0], MalformedReply)
    assert str(results[0]).startswith("judge: ") and "after 3 tries" in str(results[0])
    assert re.search(reason, str(results[0]))
    assert all(isinstance(r, dict) for r in results[1:])
    assert c.stats()["stages"]["judge"]["malformed"] == 3
    bad_bodies = [b for b in fake.seen if b["messages"][0]["content"] == "bad"]
    assert len({b["seed"] for b in bad_bodies}) == 3  # each retry is a new request with a new seed


def test_chat_text_asks_again_for_an_unusable_reply(fake):
    replies = iter([NULL, "", "a fine answer"])
    fake.answer = lambda body: next(replies)

    async def go():
        c = client(fake.base_url)
        reply = await c.chat_text(msg("x"), stage="respond")
        await c.aclose()
        return c, reply

    c, reply = run(go)
    assert reply.text == "a fine answer" and c.stats()["stages"]["respond"]["malformed"] == 2


def test_unusable_replies_are_never_cached(fake, tmp_path):
    fake.answer = lambda body: NULL

    async def go():
        c = client(fake.base_url, cache_dir=tmp_path)
        reply = await c.chat(msg("x"), stage="s")
        await c.aclose()
        return reply

    assert run(go) == Reply("", 1, 0) and not Reply("").usable
    assert run(go).cached is False and fake.answered == 2


# ------------------------------------------------------------------------------------------ seeds, cache
def test_seeds_are_sent_derived_from_content_and_stable(fake):
    async def go(run_seed):
        c = client(fake.base_url, run_seed=run_seed)
        await c.chat(msg("a"), stage="s")
        await c.chat(msg("b"), stage="s")
        await c.chat(msg("a"), stage="s", attempt=1)
        await c.complete("a", stage="g")
        await c.complete("a", stage="g", seed=7, max_tokens=3)
        await c.aclose()
        return [b["seed"] for b in fake.seen[-5:]]

    first = asyncio.run(go(0))
    again = asyncio.run(go(0))
    other = asyncio.run(go(1))
    assert first == again and first[:4] != other[:4] and first[4] == other[4] == 7
    assert len(set(first[:4])) == 4 and all(0 <= s < 2**63 for s in first)


def test_cache_hit_on_rerun_sends_nothing(fake, tmp_path):
    async def go():
        c = client(fake.base_url, cache_dir=tmp_path / "cache")
        replies = [await c.chat(msg(f"q{i}"), stage="s") for i in range(20)]
        await c.aclose()
        return c, replies

    c1, first = run(go)
    c2, second = run(go)
    assert fake.answered == 20 and [r.text for r in first] == [r.text for r in second]
    assert all(r.cached for r in second) and not any(r.cached for r in first)
    assert c2.stats()["stages"]["s"]["cache_hits"] == 20 and c2.stats()["stages"]["s"]["requests"] == 0
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [FILENAME]  # WAL folded in on close


def test_requests_asked_again_after_a_kill_are_counted(fake, tmp_path):
    fake.script = ["hang"]

    async def killed():
        c = client(fake.base_url, cache_dir=tmp_path, concurrency=1)
        tasks = [asyncio.create_task(c.chat(msg(text), stage="s")) for text in ("lost", "queued")]
        await asyncio.sleep(0.2)
        assert c.inflight == 1 and c.waiting == 1
        c.flush()  # the pipeline's commit: the sent log holds "lost", not "queued" (never on the wire)
        for task in tasks:  # the process dies without its reply; no aclose
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def rerun():
        c = client(fake.base_url, cache_dir=tmp_path)
        for text in ("lost", "queued", "new"):
            await c.chat(msg(text), stage="s")
        await c.aclose()
        return c

    run(killed)
    assert run(rerun).stats()["total"]["reasked"] == 1


def test_complete_sends_token_ids_and_stop(fake):
    fake.complete = lambda body: "one two STOP three" if isinstance(body["prompt"], list) else None

    async def go():
        c = client(fake.base_url)
        reply = await c.complete([5, 6, 7, 8], stage="generate", max_tokens=8, stop=["STOP"], temperature=0.0)
        await c.aclose()
        return reply

    reply = run(go)
    body = fake.seen[-1]
    assert body["prompt"] == [5, 6, 7, 8] and body["stop"] == ["STOP"] and body["temperature"] == 0.0
    assert reply.text == "one two " and reply.prompt_tokens == 4 and fake.kinds["completions"] == 1


def test_stats_keys_and_values_are_sane(fake):
    fake.delay_s = 0.05

    async def go():
        c = client(fake.base_url, concurrency=8)
        await asyncio.gather(*(c.chat(msg(f"q{i}"), stage="respond", max_tokens=10) for i in range(32)))
        await asyncio.gather(*(c.chat_json(msg(f"j{i}"), stage="judge", schema=VERDICT, schema_name="v")
                               for i in range(8)))
        assert c.inflight == 0
        await c.aclose()
        return c.stats()

    stats = run(go)
    assert set(stats["stages"]) == {"respond", "judge"}
    for st in [*stats["stages"].values(), stats["total"]]:
        assert STAGE_KEYS <= set(st)
    r = stats["stages"]["respond"]
    assert r["requests"] == 32 and r["tokens_in"] == 32 and 5 * 32 <= r["tokens_out"] <= 10 * 32
    assert 0.04 <= r["latency_p50_s"] <= r["latency_p95_s"] and 0 < r["mean_inflight"] <= 8
    assert r["wall_s"] > 0 and r["req_per_s"] > 0
    assert stats["total"]["requests"] == 40 and stats["total"]["reasked"] == 0
    assert list(stats["servers"].values()) == [{"requests": 40, "errors": 0, "down": False}]


# ------------------------------------------------------------------------------------------ local HF model
def test_hf_model_dir_transport(tmp_path):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "user", "assistant", ":"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(tmp_path / "m")

    async def go():
        c = LLMClient(model="local", hf_model_dir=tmp_path / "m")
        a = await c.chat(msg("w1 w2"), stage="s", max_tokens=4)
        b = await c.complete([3, 7, 8], stage="g", max_tokens=3, temperature=0.0)
        with pytest.raises(MalformedReply, match=r"^judge: "):
            await c.chat_json(msg("w3"), stage="judge", schema=VERDICT, schema_name="v", max_tokens=4)
        await c.aclose()
        return c, a, b

    c, a, b = run(go)
    assert a.completion_tokens == 4 and b.prompt_tokens == 3 and b.completion_tokens == 3
    assert c.stats()["stages"]["judge"]["malformed"] == 3
    with pytest.raises(DataGenError, match="not a Hugging Face model directory"):
        LLMClient(model="x", hf_model_dir=tmp_path)


def test_the_fakes_consistent_judge_ignores_the_order():
    def body(a, b):
        text = f"Task: judge\nUser description: likes cats\nQuestion: which pet?\nResponse A: {a}\nResponse B: {b}"
        return {"model": "m", "messages": msg(text), "response_format": {"type": "json_schema"}}

    for x, y in [("cats", "dogs"), ("fish", "birds"), ("one", "two"), ("red", "blue")]:
        first, second = (json.loads(consistent_judge(body(*p)))["preferred"] for p in ((x, y), (y, x)))
        assert {first, second} in ({"A", "B"}, {"tie"}) and (first == "tie" or first != second)
    assert consistent_judge({"model": "m", "messages": msg("Task: respond")}) is None


def test_a_reply_that_fails_its_schema_is_not_replayed_from_the_cache(fake, tmp_path):
    """A server that answered garbage and was fixed must be asked again, not read back from the cache."""
    fake.answer = lambda body: "not json at all"

    async def go():
        c = client(fake.base_url, cache_dir=tmp_path, malformed_retries=1)
        try:
            return await c.chat_json(msg("x"), stage="s", schema={"type": "object"}, schema_name="s")
        finally:
            await c.aclose()

    with pytest.raises(MalformedReply):
        run(go)
    assert fake.answered == 2
    fake.answer = None  # fixed: the built-in model answers with an instance of the schema
    assert isinstance(run(go), dict) and fake.answered == 3  # asked again
    assert isinstance(run(go), dict) and fake.answered == 3  # then read from the cache
