"""The one async LLM client: gen-data's stages, the judges and remote generation all send through it.

    client = LLMClient(model="Qwen2.5-7B", base_urls="http://a:8000/v1,http://b:8000/v1", cache_dir=out / ".llm-cache")
    reply = await client.chat(messages, stage="respond")                      # free text
    verdict = await client.chat_json(messages, stage="judge", schema=S, schema_name="verdict", check=parse_verdict)
    answer = await client.complete(token_ids, stage="generate", max_tokens=64) # /v1/completions, exact prompt
    client.flush(); await client.aclose()

Scheduling. At most `concurrency` requests are on the wire; waiting requests are served by `priority`
(lower first, FIFO among equals: the pipeline passes the user index, so early users finish first and
the in-order commit advances). A request holds its slot only while on the wire, not while backing off.

Servers. `base_urls` lists OpenAI-compatible servers (vLLM, SGLang, llama.cpp, hosted APIs); each
request goes to the healthy server with the fewest requests in flight. A connection error, timeout,
5xx or a 200 that is not a completion is retried at once on another healthy server (with backoff when
there is none); a server failing `down_after` times in a row is marked down, reported once on stderr,
and probed with one request every `probe_after_s`. Only when every server is down do a request's
retries run out: DataGenError, one line. 429 and 408/409/425 are retried after `Retry-After` (bounded
by `backoff_max_s`) or exponential backoff. Other 4xx (a wrong model name, a bad key) stop the run at
once: DataGenError("URL: the server refused the request (404): ...").

Requests. Each request carries a `seed` derived from `run_seed` and its content (attempt included), so a
cold rerun on a server that honours seeds samples the same text. The cache key is the sha256 of the
canonical request (endpoint kind, model, messages or prompt, sampling settings, response_format, seed,
attempt): not the server URL, since any of the run's servers may answer, and never the API key. A
cache hit sends nothing; identical concurrent requests share one call. Only usable text (non-empty,
valid Unicode) is cached: a bad reply replayed from the cache would survive fixing the server.

Replies. A 200 without choices, with an error object, or not JSON is a transport failure (retried on
a server, never cached). A null or empty message content, or text with a lone surrogate, is the
model's bad reply: `chat` returns it with `usable` False, `chat_json`/`chat_text` count it as
malformed and ask again with `attempt + 1` (a new request, new seed, cached apart), then raise
MalformedReply. `chat_json` sends `response_format` json_schema (strict), parses the reply (``` fences
and prose around one object are tolerated), validates it (data_gen/schema.py), then applies `check`.

The API key is read from the environment by name, sent only in the Authorization header, removed from
every error message and from reply text (servers echo a wrong key back), and never cached or logged.

Cost (measured by `fspo-engine bench gen-data`, 2 CPUs, fake server in its own process): ~1.8 ms of
client CPU per request through the openai SDK (which DESIGN.md requires) at caps 64 and 256; 1.2-1.3 ms
for the same loop on bare httpx, so a lighter path would save ~30%. Two choices cut the SDK's overhead
over httpx from ~1.4 to ~0.5 ms: requests go through its generic `post` (no TypedDict transform of the
messages, no pydantic reply; `chat.completions.create` cost 2.1-2.7 ms in all), and connections are
split over SDK clients of 32 (httpcore scans its whole pool for every request). One process sustains ~340 req/s at cap 256.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fspo_engine.data_gen import schema as json_schema
from fspo_engine.data_gen.cache import ReplyCache, request_key
from fspo_engine.data_gen.errors import DataGenError


class MalformedReply(DataGenError):
    """The model's reply was not the text or JSON the stage asked for (after the allowed retries)."""


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    key: str | None = field(default=None, compare=False)  # the request's cache key

    @property
    def usable(self) -> bool:
        """Non-empty valid Unicode: the only replies that are cached or accepted as text."""
        return bool(self.text.strip()) and is_unicode(self.text)


def is_unicode(text: str) -> bool:
    """False for text holding a lone surrogate: valid in JSON ("\\ud800"), but no UTF-8 writer can write it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json_reply(text: str) -> dict:
    """The JSON object in a model reply: tolerates ```json fences and prose around one object."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty reply")
    if not is_unicode(text):
        raise ValueError("the reply is not valid Unicode (lone surrogate)")
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the reply")
    try:
        obj = json.loads(body[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("the JSON is not an object")
    if not is_unicode(json.dumps(obj, ensure_ascii=False)):  # an escaped "\\ud800" inside the JSON
        raise ValueError("the reply is not valid Unicode (lone surrogate)")
    return obj


def derive_seed(run_seed: int, request: dict) -> int:
    """A 63-bit seed from the run seed and the request content (fits every server's int64 seed)."""
    digest = hashlib.sha256(f"{run_seed}:{request_key(request)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ------------------------------------------------------------------------------------------ scheduling
class _PriorityGate:
    """A semaphore whose waiters are served lowest priority first, FIFO among equals.

    Invariant: a free slot exists only when nobody live is waiting, so a new arrival never jumps the queue.
    """

    def __init__(self, slots: int):
        self.free = slots
        self.waiting = 0  # requests queued for a slot (cancelled ones excluded)
        self._heap: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()

    async def acquire(self, priority: float) -> None:
        if self.free > 0:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._order), fut))
        self.waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed the slot, then cancelled: pass it on
                self.release()
            raise
        finally:
            self.waiting -= 1

    def release(self) -> None:
        while self._heap:
            fut = heapq.heappop(self._heap)[2]
            if not fut.done():  # cancelled waiters stay in the heap until popped here
                fut.set_result(None)
                return
        self.free += 1


class _Histogram:
    """Latency percentiles in bounded memory: log-spaced buckets 5% wide from 0.1 ms to ~3 days."""

    BASE, LO, N = math.log(1.05), 1e-4, 512

    def __init__(self):
        self.counts = [0] * self.N
        self.n = 0

    def add(self, seconds: float) -> None:
        i = 0 if seconds <= self.LO else min(self.N - 1, int(math.log(seconds / self.LO) / self.BASE) + 1)
        self.counts[i] += 1
        self.n += 1

    def quantile(self, q: float) -> float:
        if self.n == 0:
            return 0.0
        rank, seen = q * self.n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                # The bucket's geometric middle: within 2.5% of any value in it.
                return self.LO * math.exp(self.BASE * (i - 0.5)) if i else self.LO
        return self.LO * math.exp(self.BASE * (self.N - 1))


class _StageStats:
    """Counters of one stage (or of all: `total`), including the time-weighted in-flight level."""

    def __init__(self):
        self.requests = self.cache_hits = self.malformed = self.retries = 0
        self.tokens_in = self.tokens_out = 0
        self.latency = _Histogram()
        self.inflight = 0
        self._area = 0.0  # integral of in-flight requests over time
        self._first = self._last = self._t = None

    def wire(self, delta: int, now: float) -> None:
        """A request of this stage goes on (+1) or off (-1) the wire at `now`."""
        if self._first is None:
            self._first = self._t = now
        self._area += self.inflight * (now - self._t)
        self._t = now
        self.inflight += delta
        if delta < 0:
            self._last = now

    def as_dict(self) -> dict:
        wall = (self._last - self._first) if self._first is not None and self._last is not None else 0.0
        return {
            "requests": self.requests, "cache_hits": self.cache_hits, "malformed": self.malformed,
            "retries": self.retries, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
            "latency_p50_s": round(self.latency.quantile(0.5), 4),
            "latency_p95_s": round(self.latency.quantile(0.95), 4),
            # Over the busy span, first request sent to last reply: the level a server sees.
            "mean_inflight": round(self._area / wall, 2) if wall > 0 else 0.0,
            "wall_s": round(wall, 3),
            "req_per_s": round(self.requests / wall, 2) if wall > 0 else 0.0,
        }


# ------------------------------------------------------------------------------------------ transports
class _Refused(Exception):
    """A 4xx that retrying cannot fix; carries the one-line message."""


class _Failed(Exception):
    """A failure worth retrying. `server_fault`: counts toward marking the server down (not a 429)."""

    def __init__(self, error: str, *, server_fault: bool = True, retry_after: float | None = None):
        super().__init__(error)
        self.error, self.server_fault, self.retry_after = error, server_fault, retry_after


_TRANSIENT_STATUS = {408, 409, 425, 429}


class _Server:
    """One OpenAI-compatible server: its SDK clients, load and health."""

    SHARD = 32  # connections per SDK client (see __init__)

    def __init__(self, url: str | None, api_key: str, concurrency: int, timeout_s: float):
        import openai

        try:  # the openai SDK 3.x ships its own fork, httpx2; 1.x/2.x use httpx
            import httpx2 as httpx
        except ImportError:
            import httpx
        # Connections: as many as the concurrency, since every request may land on this one server. They
        # are split over several SDK clients of at most SHARD connections each: httpcore scans its whole
        # pool for every request, so one pool of 256 costs ~0.4 ms of CPU per request more than 8 of 32.
        n_shards = -(-concurrency // self.SHARD)
        per = -(-concurrency // n_shards)
        self.clients = [
            openai.AsyncOpenAI(
                base_url=url, api_key=api_key, max_retries=0, timeout=timeout_s,
                http_client=openai.DefaultAsyncHttpxClient(
                    limits=httpx.Limits(max_connections=per, max_keepalive_connections=per), timeout=timeout_s))
            for _ in range(n_shards)]
        self.shard_load = [0] * n_shards
        # As resolved by the SDK (OPENAI_BASE_URL when url is None): the server that really answers.
        self.url = str(self.clients[0].base_url).rstrip("/")
        self._openai = openai
        self.inflight = self.requests = self.errors = 0
        self.failures_in_a_row = 0
        self.down = False
        self.reported = False
        self.probe_at = 0.0

    async def call(self, kind: str, request: dict) -> Reply:
        openai = self._openai
        params = {k: v for k, v in request.items() if k not in ("kind", "attempt") and v is not None}
        try:
            # The SDK's generic post (documented for endpoints it does not type) with cast_to=object: the
            # same auth, errors and timeouts as chat.completions.create, without its per-request TypedDict
            # transform of the messages and pydantic construction of the reply (~half the client CPU).
            shard = min(range(len(self.clients)), key=self.shard_load.__getitem__)
            self.shard_load[shard] += 1
            try:
                resp = await self.clients[shard].post(
                    "/chat/completions" if kind == "chat" else "/completions", body=params, cast_to=object)
            finally:
                self.shard_load[shard] -= 1
            return _reply_of(resp, kind)
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status < 500 and status not in _TRANSIENT_STATUS:
                raise _Refused(f"{self.url}: the server refused the request ({status}): {_message(exc)}") from None
            raise _Failed(f"HTTP {status}", server_fault=status >= 500, retry_after=_retry_after(exc)) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise _Failed(type(exc).__name__) from None
        except (ValueError, openai.APIResponseValidationError) as exc:
            # A 200 whose body is not JSON (JSONDecodeError is a ValueError) or not a completion
            # (_BadBody): a proxy or an overloaded server, so retry.
            if isinstance(exc, _BadBody):
                raise _Failed(str(exc)) from None
            if isinstance(exc, json.JSONDecodeError):
                raise _Failed(f"the 200 body is not JSON ({exc.msg})") from None
            raise _Failed("the 200 body is not a completion") from None

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()


class _BadBody(ValueError):
    """A 200 reply that is not a completion; the reason is the error message's last part."""


def _reply_of(resp, kind: str) -> Reply:
    """The text of a completion body (a dict). Null content is the model's (empty) reply, not a bad body."""
    if not isinstance(resp, dict):
        raise _BadBody(f"the 200 body is not a completion ({type(resp).__name__} body)")
    if "error" in resp:
        raise _BadBody("the server answered 200 with an error object")
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _BadBody("the reply has no choices")
    if kind == "chat":
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise _BadBody("the reply's choice has no message")
        text = message.get("content")
    else:
        text = choices[0].get("text")
    usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
    return Reply(text if isinstance(text, str) else "", _int(usage.get("prompt_tokens")),
                 _int(usage.get("completion_tokens")))


def _int(value) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _message(exc) -> str:
    """The server's own error text (vLLM/OpenAI: {"error": {"message": ...}}), on one line."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    text = body.get("message") if isinstance(body, dict) else None
    text = " ".join(str(text or exc.message).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _retry_after(exc) -> float | None:
    try:
        value = exc.response.headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


class _HFTransport:
    """A local Hugging Face causal LM directory, generating in a worker thread one request at a time."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise DataGenError(f"{path}: not a Hugging Face model directory (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - transformers/safetensors raise many types for a bad dir
            # One line: transformers' messages run over several lines, and the CLI prints one.
            text = " ".join(str(exc).split())
            text = text if len(text) <= 300 else text[:297] + "..."
            raise DataGenError(f"{path}: cannot load the model ({type(exc).__name__}: {text})") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.url = str(path)
        self._torch = torch
        self._lock = asyncio.Lock()
        self.inflight = self.requests = self.errors = self.failures_in_a_row = 0
        self.down = self.reported = False
        self.probe_at = 0.0

    def _prompt_ids(self, request: dict):
        tok, torch = self.tokenizer, self._torch
        if "prompt" in request:
            prompt = request["prompt"]
            if isinstance(prompt, list):
                return torch.tensor([prompt])
            return tok(prompt, return_tensors="pt")["input_ids"]
        messages = request["messages"]
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            return ids if not hasattr(ids, "keys") else ids["input_ids"]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tok(text, return_tensors="pt")["input_ids"]

    def _generate(self, request: dict) -> Reply:
        torch = self._torch
        ids = self._prompt_ids(request).to(self.device)
        torch.manual_seed(request["seed"])  # the request's seed: the same request samples the same reply
        sample = request["temperature"] > 0
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=request["max_tokens"],
                do_sample=sample, temperature=request["temperature"] if sample else None,
                top_p=request.get("top_p") if sample else None, top_k=None, pad_token_id=pad)
        new = out[0, ids.shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        for stop in request.get("stop") or []:
            text = text.split(stop, 1)[0] if stop else text
        return Reply(text, int(ids.shape[1]), int(new.numel()))

    async def call(self, kind: str, request: dict) -> Reply:
        async with self._lock:  # one generate at a time: the model is not shared across threads
            return await asyncio.to_thread(self._generate, request)

    async def aclose(self) -> None:
        return None


# ------------------------------------------------------------------------------------------ the client
class LLMClient:
    """Async client over one or several OpenAI-compatible servers (or a local HF model); see the module doc."""

    def __init__(
        self,
        *,
        model: str,
        base_urls: str | Sequence[str] | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 256,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        malformed_retries: int = 2,
        cache_dir: str | Path | None = None,
        run_seed: int = 0,
        hf_model_dir: str | Path | None = None,
        down_after: int = 3,
        probe_after_s: float = 30.0,
    ):
        if concurrency < 1:
            raise DataGenError(f"concurrency must be at least 1, got {concurrency}")
        self.model = model
        self.concurrency = concurrency
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self.malformed_retries = malformed_retries
        self.run_seed = run_seed
        self.down_after, self.probe_after_s = down_after, probe_after_s
        self.secret: str | None = None
        if hf_model_dir is not None:
            self.servers = [_HFTransport(hf_model_dir)]
        else:
            try:
                import openai  # noqa: F401
            except ImportError:  # pragma: no cover - openai is a dev dependency
                raise DataGenError(
                    "LLM requests need the openai package: pip install 'fspo-engine[llm]'") from None
            api_key = os.environ.get(api_key_env) or "EMPTY"  # local servers take any key; the SDK wants one
            # Keys under 4 characters are placeholders for local servers ("x"): redacting them would mangle
            # every message instead of hiding a secret.
            self.secret = api_key if api_key != "EMPTY" and len(api_key) >= 4 else None
            urls = base_urls.split(",") if isinstance(base_urls, str) else list(base_urls or [None])
            urls = [u.strip() if u else None for u in urls if u is None or u.strip()]
            self.servers = [_Server(u, api_key, concurrency, timeout_s) for u in urls or [None]]
        self.cache = ReplyCache(cache_dir)
        self._gate = _PriorityGate(concurrency)
        self._sharing: dict[str, asyncio.Future] = {}
        self._stages: dict[str, _StageStats] = {}
        self._total = _StageStats()
        self.reasked = 0
        self._jitter = random.Random(run_seed)  # spaces retries only; never reaches the data

    def redact(self, text: str) -> str:
        """`text` with the API key's value replaced by "***": for every message that leaves the client."""
        return text.replace(self.secret, "***") if self.secret else text

    @property
    def inflight(self) -> int:
        """Requests on the wire now."""
        return self._total.inflight

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now (the pipeline starts new work while this is below the cap)."""
        return self._gate.waiting

    # ---- public requests
    async def chat(self, messages: list[dict], *, stage: str, model: str | None = None,
                   temperature: float = 0.7, max_tokens: int = 256, top_p: float | None = None,
                   priority: float = 0.0, attempt: int = 0, response_format: dict | None = None) -> Reply:
        """One chat completion. The reply may be unusable (empty, null, lone surrogate): see `Reply.usable`."""
        request = {"kind": "chat", "model": model or self.model, "messages": messages,
                   "temperature": temperature, "max_tokens": max_tokens, "top_p": top_p,
                   "response_format": response_format, "attempt": attempt}
        request["seed"] = derive_seed(self.run_seed, request)
        return await self._request(request, stage, priority)

    async def complete(self, prompt: str | list[int], *, stage: str, model: str | None = None,
                       temperature: float = 0.0, top_p: float | None = None, max_tokens: int = 256,
                       stop: list[str] | None = None, seed: int | None = None, priority: float = 0.0,
                       stop_token_ids: list[int] | None = None) -> Reply:
        """One /v1/completions request: the prompt is sent exactly (text, or token ids where the server takes them).
        `stop_token_ids` (vLLM's and SGLang's extension) goes in the body, and in the cache key, only when given."""
        request = {"kind": "completions", "model": model or self.model, "prompt": prompt,
                   "temperature": temperature, "max_tokens": max_tokens, "top_p": top_p,
                   "stop": list(stop) if stop else None, "attempt": 0}
        if stop_token_ids:
            request["stop_token_ids"] = [int(t) for t in stop_token_ids]
        request["seed"] = derive_seed(self.run_seed, request) if seed is None else int(seed)
        return await self._request(request, stage, priority)

    async def chat_json(self, messages: list[dict], *, stage: str, schema: dict, schema_name: str,
                        check: Callable[[dict], object] | None = None, model: str | None = None,
                        temperature: float = 0.7, max_tokens: int = 256, priority: float = 0.0):
        """The checked value of a JSON reply that matches `schema` (see the module doc); else MalformedReply."""
        fmt = {"type": "json_schema", "json_schema": {"name": schema_name, "schema": schema, "strict": True}}

        def parse(text: str):
            obj = parse_json_reply(text)
            json_schema.validate(obj, schema)
            return check(obj) if check is not None else obj

        return await self._checked(messages, parse, stage=stage, model=model, temperature=temperature,
                                   max_tokens=max_tokens, priority=priority, response_format=fmt)

    async def chat_text(self, messages: list[dict], *, stage: str, model: str | None = None,
                        temperature: float = 0.7, max_tokens: int = 256, top_p: float | None = None,
                        priority: float = 0.0) -> Reply:
        """A free-text reply that is usable (non-empty, valid Unicode), asked again if not; else MalformedReply."""

        def parse(text: str) -> str:
            if not text.strip():
                raise ValueError("empty reply")
            if not is_unicode(text):
                raise ValueError("the reply is not valid Unicode (lone surrogate)")
            return text

        replies: list[Reply] = []
        await self._checked(messages, parse, stage=stage, model=model, temperature=temperature,
                            max_tokens=max_tokens, priority=priority, top_p=top_p, keep=replies)
        return replies[-1]

    async def _checked(self, messages, parse, *, stage, model, temperature, max_tokens, priority,
                       response_format=None, top_p=None, keep=None):
        for attempt in range(self.malformed_retries + 1):
            reply = await self.chat(messages, stage=stage, model=model, temperature=temperature,
                                    max_tokens=max_tokens, top_p=top_p, priority=priority, attempt=attempt,
                                    response_format=response_format)
            try:
                value = parse(reply.text)
            except ValueError as exc:
                self._stage(stage).malformed += 1
                self._total.malformed += 1
                reason, text = str(exc), reply.text
                # A reply that fails its schema is not kept: a re-run asks the (maybe fixed) server again
                # instead of replaying the failure from the cache.
                self.cache.discard(reply.key)
                continue
            if keep is not None:
                keep.append(reply)
            return value
        raise MalformedReply(self.redact(
            f"{stage}: {reason} (model {model or self.model}, after {self.malformed_retries + 1} tries; "
            f"reply began {text[:80]!r})"))

    # ---- the request path
    def _stage(self, stage: str) -> _StageStats:
        if stage not in self._stages:
            self._stages[stage] = _StageStats()
        return self._stages[stage]

    async def _request(self, request: dict, stage: str, priority: float) -> Reply:
        key = request_key(request)
        st = self._stage(stage)
        hit = self.cache.get(key)
        if hit is not None:
            st.cache_hits += 1
            self._total.cache_hits += 1
            return Reply(*hit, cached=True, key=key)
        if key in self._sharing:  # an identical request is on the wire: share its reply
            st.cache_hits += 1
            self._total.cache_hits += 1
            reply = await asyncio.shield(self._sharing[key])
            return Reply(reply.text, reply.prompt_tokens, reply.completion_tokens, cached=True, key=key)
        future = asyncio.get_running_loop().create_future()
        self._sharing[key] = future
        try:
            st.requests += 1
            self._total.requests += 1
            reply = await self._send(request, st, priority, key)
            for s in (st, self._total):
                s.tokens_in += reply.prompt_tokens
                s.tokens_out += reply.completion_tokens
            if reply.usable:
                self.cache.put(key, reply.text, reply.prompt_tokens, reply.completion_tokens)
            reply.key = key
            future.set_result(reply)
            return reply
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._sharing[key]

    def _pick(self, avoid=None):
        """The healthy server with the least in flight (a down one is due a probe: it gets one request)."""
        now = time.monotonic()
        up = [s for s in self.servers if not s.down or now >= s.probe_at]
        pool = [s for s in up if s is not avoid] or up
        if not pool:  # all down: try the one due back first (the request's retries are counting)
            return min(self.servers, key=lambda s: s.probe_at)
        server = min(pool, key=lambda s: s.inflight)
        if server.down:
            server.probe_at = now + self.probe_after_s  # one probe at a time
        return server

    async def _send(self, request: dict, st: _StageStats, priority: float, key: str) -> Reply:
        kind = request["kind"]
        budget = self.max_retries  # tries that failed with no other healthy server to turn to
        # A request that fails on every server while others' requests succeed (one that crashes the
        # server's handler) would bounce between healthy servers forever: cap its tries.
        tries_left = (self.max_retries + 1) * len(self.servers)
        sleeps = 0
        server = None
        while True:
            tries_left -= 1
            await self._gate.acquire(priority)
            if server is None and self.cache.mark_sent(key):  # logged when it first goes on the wire
                self.reasked += 1
            server = self._pick(avoid=server)
            server.inflight += 1
            server.requests += 1
            now = time.monotonic()
            st.wire(+1, now)
            self._total.wire(+1, now)
            try:
                reply = await server.call(kind, request)
                failure = None
            except _Refused as exc:
                server.errors += 1
                raise DataGenError(self.redact(str(exc))) from None
            except _Failed as exc:
                failure = exc
            finally:
                now2 = time.monotonic()
                server.inflight -= 1
                st.wire(-1, now2)
                self._total.wire(-1, now2)
                self._gate.release()
            if failure is None:
                st.latency.add(now2 - now)
                self._total.latency.add(now2 - now)
                server.down, server.failures_in_a_row = False, 0
                # A server that echoes the key must not get it into the cache or the data.
                reply.text = self.redact(reply.text)
                return reply

            server.errors += 1
            st.retries += 1
            self._total.retries += 1
            if failure.server_fault:
                server.failures_in_a_row += 1
                if server.failures_in_a_row >= self.down_after and not server.down:
                    server.down = True
                    server.probe_at = time.monotonic() + self.probe_after_s
                    if not server.reported and len(self.servers) > 1:
                        server.reported = True
                        self._note(f"{server.url}: server down after {server.failures_in_a_row} failures in a "
                                   f"row (last: {failure.error}); the run goes on with the other servers, "
                                   f"probing it every {self.probe_after_s:g} s")
                elif server.down:
                    server.probe_at = time.monotonic() + self.probe_after_s
            elsewhere = failure.server_fault and any(
                s is not server and (not s.down or time.monotonic() >= s.probe_at) for s in self.servers)
            if elsewhere and tries_left > 0:
                continue  # retried at once on another healthy server; the request's budget is kept
            if budget == 0 or tries_left <= 0:
                tries = (self.max_retries + 1) * len(self.servers) - tries_left
                raise DataGenError(self.redact(self._exhausted(server, failure, tries)))
            budget -= 1
            delay = min(self.backoff_max_s, self.backoff_s * 2**sleeps) * (1 + 0.25 * self._jitter.random())
            if failure.retry_after is not None:
                delay = min(failure.retry_after, self.backoff_max_s)
            sleeps += 1
            await asyncio.sleep(delay)

    def _exhausted(self, server, failure: _Failed, tries: int) -> str:
        if len(self.servers) == 1:
            return f"{server.url}: request failed after {tries} tries (last: {failure.error})"
        names = ", ".join(s.url for s in self.servers)
        return (f"all {len(self.servers)} servers are failing ({names}): request failed after {tries} tries "
                f"with no healthy server left (last: {server.url}: {failure.error})")

    def _note(self, line: str) -> None:
        print(f"warning: {self.redact(line)}", file=sys.stderr, flush=True)

    # ---- accounting and shutdown
    def stats(self) -> dict:
        total = self._total.as_dict()
        total["reasked"] = self.reasked
        return {
            "stages": {name: s.as_dict() for name, s in sorted(self._stages.items())},
            "total": total,
            "servers": {s.url: {"requests": s.requests, "errors": s.errors, "down": s.down} for s in self.servers},
        }

    def flush(self) -> None:
        """Write pending cache entries now (call before committing anything that relies on them)."""
        self.cache.flush()

    async def aclose(self) -> None:
        try:
            self.cache.close()
        finally:
            for server in self.servers:
                await server.aclose()
