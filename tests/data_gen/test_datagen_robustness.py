"""Regressions for the data generator's failure modes: broken servers, secrets, caches, locks, reruns.

Each test names the red-team finding it holds (numbers of the gen-data red-team report).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fake_llm import FakeLLMServer

from fspo_engine.data_gen import generate_dataset
from fspo_engine.data_gen.backends import MalformedReply, OpenAIBackend, Reply, ReplyCache
from fspo_engine.data_gen.config import MAX_USERS, GenConfig
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.outdir import locked_dir


@pytest.fixture
def server():
    with FakeLLMServer() as srv:
        yield srv


def msg(text):
    return [{"role": "user", "content": text}]


def chat_once(base_url, cache_dir=None, text="Task: echo hi", **kw):
    """One chat request through a fresh backend; returns (backend, reply or the exception raised)."""

    async def go():
        b = OpenAIBackend(model="m", base_url=base_url, backoff_s=0.0, cache_dir=cache_dir, **kw)
        try:
            return b, await b.chat(msg(text))
        except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
            return b, exc
        finally:
            await b.aclose()

    return asyncio.run(go())


def cached_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


LLM = dict(
    backend="openai", model="m", users=3, prefs_per_user=2, candidates=3, backoff_s=0.0, progress=False
)


# --- 1: the cache key holds the endpoint ------------------------------------------------------------
def test_reply_cache_is_per_server(tmp_path, monkeypatch):
    with FakeLLMServer() as a, FakeLLMServer() as b:
        chat_once(a.base_url, tmp_path / "cache")
        chat_once(b.base_url, tmp_path / "cache")  # same model name, another server: ask it
        assert a.answered == 1 and b.answered == 1
        chat_once(b.base_url, tmp_path / "cache")
        assert b.answered == 1  # its own reply is cached
        # No base_url: the SDK uses OPENAI_BASE_URL; the cache key and the manifest must name that server.
        monkeypatch.setenv("OPENAI_BASE_URL", a.base_url)
        backend, _ = chat_once(None, tmp_path / "cache")
        assert backend.endpoint == a.base_url and a.answered == 1
        result = generate_dataset(tmp_path / "env", **LLM)
        assert result.manifest["generator"]["base_url"] == a.base_url


# --- 2, 3: 200 replies without a usable message are transport failures ------------------------------
BAD_BODIES = [
    (b"{not json at all", "application/json"),
    (b"<html>oops</html>", "text/html"),
    (b"null", "application/json"),
    (b"[]", "application/json"),
    (b'"hi"', "application/json"),
    (b'{"error": {"message": "overloaded", "code": 503}}', "application/json"),
    (b'{"id": "x", "object": "chat.completion", "model": "m", "choices": []}', "application/json"),
    (
        b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [{"index": 0, '
        b'"finish_reason": "stop", "message": {"role": "assistant", "content": null}}]}',
        "application/json",
    ),
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=lambda b: b[0][:12].decode())
def test_bad_200_bodies_are_retried_and_never_cached(server, tmp_path, body):
    server.raw = [body]
    backend, reply = chat_once(server.base_url, tmp_path / "cache")
    assert isinstance(reply, Reply) and json.loads(reply.text) == {"echo": "Task: echo hi"}
    assert backend.usage.retries == 1
    server.raw = [body] * 3
    _, exc = chat_once(server.base_url, tmp_path / "c2", max_retries=2)
    assert isinstance(exc, DataGenError) and "\n" not in str(exc)
    assert str(exc).startswith(f"{server.base_url}: request failed after 3 tries (last: ")
    assert cached_files(tmp_path / "c2") == []


def test_a_run_against_a_broken_server_can_be_rerun_once_it_is_fixed(server, tmp_path):
    empty = (b'{"id": "x", "object": "chat.completion", "model": "m", "choices": []}', "application/json")
    server.raw = [empty] * 1000
    with pytest.raises(DataGenError, match="has no choices"):
        generate_dataset(tmp_path / "out", base_url=server.base_url, max_retries=0, **LLM)
    assert not (tmp_path / "out" / ".gen-state").exists()  # no unit was marked done
    assert cached_files(tmp_path / "out" / ".llm-cache") == []
    server.raw = []  # the server is fixed: the same command now works
    answered = server.answered
    result = generate_dataset(tmp_path / "out", base_url=server.base_url, max_retries=0, **LLM)
    assert server.answered > answered and result.manifest["counts"]["prefs"] > 0


# --- 4: the API key never reaches an error message ----------------------------------------------------
def test_the_api_key_is_redacted_from_errors(server, tmp_path, monkeypatch):
    key = "sk-SECRETKEY123456"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    server.error_message = lambda status, auth: f"Incorrect API key provided: {auth.split()[-1]}"
    server.script = [401]
    _, exc = chat_once(server.base_url)
    assert isinstance(exc, DataGenError) and "Incorrect API key provided: ***" in str(exc)
    assert key not in str(exc)
    server.reply = lambda messages: f"I cannot answer, {key}"  # a reply echoing the key
    _, reply = chat_once(server.base_url, tmp_path / "cache")
    assert reply.text == "I cannot answer, ***"  # so the key reaches neither the cache nor the data

    async def go():
        b = OpenAIBackend(model="m", base_url=server.base_url, malformed_retries=0)
        try:
            await b.chat_json(msg("Task: echo"), lambda o: o, what="views")
        finally:
            await b.aclose()

    with pytest.raises(MalformedReply) as info:
        asyncio.run(go())
    assert key not in str(info.value) and "***" in str(info.value)


# --- 5: lone surrogates are malformed, not cached; the cache leaves no temp files ----------------------
def test_a_lone_surrogate_reply_is_malformed_and_not_cached(server, tmp_path):
    server.reply = lambda messages: json.dumps({"response": "ok \ud800 bad"}, ensure_ascii=False)

    async def go():
        b = OpenAIBackend(
            model="m", base_url=server.base_url, cache_dir=tmp_path / "cache", malformed_retries=1
        )
        try:
            await b.chat_json(msg("Task: respond"), lambda o: o, what="response")
        finally:
            await b.aclose()

    with pytest.raises(MalformedReply, match="not valid Unicode"):
        asyncio.run(go())
    assert cached_files(tmp_path / "cache") == []
    # An escaped surrogate inside the JSON text is caught too.
    server.reply = lambda messages: '{"response": "ok \\ud800 bad"}'
    with pytest.raises(MalformedReply, match="not valid Unicode"):
        asyncio.run(go())
    cache = ReplyCache(tmp_path / "direct")
    with pytest.raises(UnicodeEncodeError):
        cache.put("ab" * 32, Reply("bad \ud800"))
    assert cached_files(tmp_path / "direct") == []  # no stale .tmp-* file


# --- 6: the manifest does not record run mechanics ---------------------------------------------------
def test_manifest_is_byte_identical_across_retries_and_warm_caches(server, tmp_path):
    generate_dataset(tmp_path / "a", base_url=server.base_url, **LLM)
    server.script = [429, 500]  # transient failures, retried
    generate_dataset(tmp_path / "b", base_url=server.base_url, **LLM)
    # A warm cache: every reply comes from a.
    generate_dataset(
        tmp_path / "c", base_url=server.base_url, cache_dir=str(tmp_path / "a" / ".llm-cache"), **LLM
    )
    for name in ("manifest.json", "users.jsonl", "prefs.jsonl"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    stats = {d: json.loads((tmp_path / d / "gen_stats.json").read_text())["usage"] for d in "abc"}
    assert stats["a"]["retries"] == 0 and stats["b"]["retries"] == 2 and stats["c"]["calls"] == 0


def test_the_fake_server_takes_64_connections_at_once(server):
    server.delay_s = 0.05

    async def go():
        b = OpenAIBackend(model="m", base_url=server.base_url, concurrency=64, max_retries=0)
        try:
            await asyncio.gather(*(b.chat(msg(f"Task: echo {i}")) for i in range(64)))
        finally:
            await b.aclose()
        return b

    assert asyncio.run(go()).usage.retries == 0


# --- 7, 10, 13: a run that fails before generating anything leaves nothing ------------------------------
def test_a_failed_start_leaves_no_state(server, tmp_path):
    with pytest.raises(DataGenError, match="not a Hugging Face model directory"):
        generate_dataset(tmp_path / "hf", backend="hf", model=str(tmp_path / "nonexistent"), progress=False)
    assert not (tmp_path / "hf").exists()
    server.script = [404] * 500  # a model-name typo: every request is refused
    with pytest.raises(DataGenError, match=r"refused the request \(404\)"):
        generate_dataset(tmp_path / "oa", base_url=server.base_url, **{**LLM, "model": "typo"})
    assert not (tmp_path / "oa").exists()
    (tmp_path / "oa").mkdir()  # an existing, empty --out stays, and stays empty
    server.script = [404] * 500
    with pytest.raises(DataGenError, match=r"refused the request \(404\)"):
        generate_dataset(tmp_path / "oa", base_url=server.base_url, **{**LLM, "model": "typo"})
    assert list((tmp_path / "oa").iterdir()) == []
    server.script = []
    generate_dataset(tmp_path / "oa", base_url=server.base_url, **LLM)  # the corrected command just runs
    with pytest.raises(DataGenError, match=f"--users must be <= {MAX_USERS:,}"):
        generate_dataset(tmp_path / "huge", users=99999999999999999999, progress=False)
    assert not (tmp_path / "huge").exists()


def test_no_base_url_names_the_server_the_sdk_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens on port 9
    with pytest.raises(DataGenError, match=r"^http://127.0.0.1:9/v1: request failed after 1 tries"):
        generate_dataset(tmp_path / "out", max_retries=0, timeout_s=3.0, **LLM)
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("OPENAI_BASE_URL")
    cfg = GenConfig(**LLM).resolved()  # the SDK's own default, recorded instead of null
    assert cfg.base_url == "https://api.openai.com/v1"


# --- 11, 14: one writer per directory; foreign files are not replaced ----------------------------------
def test_a_second_run_on_the_same_directory_fails_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with locked_dir(out):  # what a running gen-data holds
        with pytest.raises(DataGenError, match="another gen-data run is writing this directory"):
            generate_dataset(out, users=2, prefs_per_user=1, progress=False)
    assert list(out.iterdir()) == []
    generate_dataset(out, users=2, prefs_per_user=1, progress=False)  # the lock went with its holder


def test_foreign_dataset_files_are_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "prefs.jsonl").write_text('{"my": "hand-labelled data"}\n')
    with pytest.raises(DataGenError, match="holds prefs.jsonl without a gen-data manifest; pass --overwrite"):
        generate_dataset(out, users=2, prefs_per_user=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["prefs.jsonl"]
    generate_dataset(out, users=2, prefs_per_user=1, progress=False, overwrite=True)
    assert "hand-labelled" not in (out / "prefs.jsonl").read_text()
