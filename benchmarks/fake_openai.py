"""A fake OpenAI-compatible server on 127.0.0.1: the test and benchmark stand-in for vLLM / SGLang.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models; plus GET /fake/stats,
POST /fake/reset and POST /fake/script for a server running in another process.

Replies are deterministic in the request (a sha256 of model, messages or prompt, and seed):
- a chat request with `response_format={"type": "json_schema", "json_schema": {"schema": ...}}` gets an
  instance of the schema (object/array/string/integer/number/boolean, enum, const, required, properties,
  items, min/maxItems, min/maxLength, minimum/maximum), its strings English-like words drawn from the
  request hash, so distinct requests give distinct strings;
- free-text chat and completions get words too, between max_tokens/2 and max_tokens of them (one word
  counts as one token in `usage`; prompt tokens are the prompt's words, or its length in token ids).
Hooks replace the built-in model: `answer(request) -> str` for chat (scripted judges), `complete(request)
-> str` for completions (a real model behind the server). A hook returning None falls back to the
built-in reply; `NULL` sends a null message content; a `Raw` sends any status/body. Hooks run one at a
time in a worker thread, so a slow hook (a model) does not stall the other connections.

Latency: a fixed `delay_s`, or the continuous-batching model `ttft_s + output_tokens / (throughput_tok_s
/ inflight)`: tokens/s shared by the requests in flight, as a vLLM server's decode throughput is (the
share is taken when the reply is computed, a good approximation once the in-flight level is steady).

What it counts (`stats()`): HTTP requests, replies by status, resets, per-kind counts (chat, chat_json,
completions, models), tokens, the maximum and the time-weighted mean number of requests in flight over
the busy span (first request arrival to last reply): the figure issue 23's contracts are stated in.

Failure injection: `script` is a queue of what the next POSTs get instead of an answer: an HTTP status
(429 carries `Retry-After: retry_after`), "reset" (the socket is closed with no reply), "hang" (no reply
until the client gives up) or a `Raw`. `kill()` closes the listener and every connection mid-reply.

asyncio, stdlib only, HTTP/1.1 with keep-alive: hundreds of concurrent connections cost one thread.

    with FakeOpenAI(delay_s=0.2) as fake:         # in a thread, for tests
        url = fake.base_url                         # http://127.0.0.1:PORT/v1
    proc = spawn(ttft_s=0.1, throughput_tok_s=5000) # in its own process, for the bench (client CPU apart)
    python -m fspo_engine.benchmarks.fake_openai --port 8000 --ttft 0.1 --throughput 5000
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

NULL = object()  # a hook's return value for "the message content is null"


@dataclass
class Raw:
    """Any reply: status, body bytes, headers (a proxy's HTML page, a 200 that is not a completion...)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ words
_ONSETS = "b c d f g h j k l m n p r s t v w br cl dr fl gr pl st tr sh ch th".split()
_VOWELS = "a e i o u ai ea ou ie".split()
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
_SMALL = "the a of and to in is for with on that as it by at from this".split()


def _make_vocabulary(size: int) -> list[str]:
    rng, seen = random.Random(0), set()
    while len(seen) < size:
        seen.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                         for _ in range(rng.choice((1, 2, 2, 3)))))
    return sorted(seen)


# A fixed vocabulary of the size of an LLM's everyday one, drawn with a skew towards its head (as word
# frequencies are): text statistics (tf-idf, MinHash) see realistic vocabulary sizes, and 4+ words
# still make collisions between requests vanishingly rare.
_VOCAB = _make_vocabulary(8000)


def _word(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(_SMALL)
    return _VOCAB[int(len(_VOCAB) * rng.random() ** 2)]


def words(rng: random.Random, n: int) -> str:
    """n pseudo-English words from an 8000-word vocabulary (plus function words)."""
    return " ".join(_word(rng) for _ in range(n))


def instance(schema: dict, rng: random.Random):
    """A random instance of `schema` (the subset that data_gen/schema.py validates)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: instance(sub, rng) for name, sub in props.items()}
    if kind == "array":
        lo = schema.get("minItems", 1)
        hi = schema.get("maxItems", lo + 3)
        return [instance(schema.get("items", {}), rng) for _ in range(rng.randint(lo, max(lo, hi)))]
    if kind == "string":
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        text = words(rng, rng.randint(4, 12))
        while len(text) < lo:
            text += " " + words(rng, 4)
        return text if hi is None else text[:hi]
    if kind == "integer":
        return rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 100)))
    if kind == "number":
        return round(rng.uniform(schema.get("minimum", 0.0), schema.get("maximum", 1.0)), 4)
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def request_rng(body: dict) -> random.Random:
    """The random stream of one request: model, messages or prompt, and seed decide the reply."""
    key = {"model": body.get("model"), "seed": body.get("seed"),
           "input": body.get("messages", body.get("prompt"))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _free_text(body: dict, rng: random.Random) -> str:
    max_tokens = max(1, int(body.get("max_tokens") or 16))
    return words(rng, rng.randint(max(1, max_tokens // 2), max_tokens))


def default_answer(body: dict) -> str:
    """The built-in chat model: a schema instance for json_schema requests, else words."""
    rng = request_rng(body)
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return json.dumps(instance(fmt.get("json_schema", {}).get("schema", {}), rng))
    if fmt.get("type") == "json_object":
        return json.dumps({"text": words(rng, 6)})
    return _free_text(body, rng)


def consistent_judge(body: dict) -> str | None:
    """A judge that decides from the user and the responses, not their order (the bench's default).

    For chat requests with "User description:", "Response A:" and "Response B:" lines (gen-data's judge
    prompt): prefers the response whose hash with the description is smaller, and says "tie" for ~10%
    of (description, question) pairs; the same pair in either order gets the same decision. Other
    requests: None (the built-in reply). The built-in random judge flips with the order half the time,
    which makes gen-data refine and drop pairs far more than a real judge would.
    """
    fmt = body.get("response_format") or {}
    text = str((body.get("messages") or [{}])[-1].get("content") or "")
    fields = dict(re.findall(r"^(User description|Question|Response A|Response B): (.*)$", text, re.M))
    if fmt.get("type") != "json_schema" or len(fields) < 4:
        return None

    def h(*parts: str) -> int:
        return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")

    desc = fields["User description"]
    if h(desc, fields["Question"]) % 10 == 0:
        verdict = "tie"
    else:
        verdict = "A" if h(desc, fields["Response A"]) < h(desc, fields["Response B"]) else "B"
    return json.dumps({"reason": words(request_rng(body), 8), "preferred": verdict})


def default_complete(body: dict) -> str:
    return _free_text(body, request_rng(body))


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return len(str(prompt).split())


# ------------------------------------------------------------------------------------------ server
class FakeOpenAI:
    """The server; `with FakeOpenAI(...) as fake:` runs it in a daemon thread (see the module docstring)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, delay_s: float | None = None,
                 ttft_s: float = 0.0, throughput_tok_s: float | None = None, models: list[str] | None = None,
                 answer: Callable[[dict], object] | None = None, complete: Callable[[dict], object] | None = None,
                 retry_after: float = 0.0, record: bool = True):
        self.host, self.port = host, port
        self.delay_s, self.ttft_s, self.throughput_tok_s = delay_s, ttft_s, throughput_tok_s
        self.models = models  # None: any model name is served; else others get 404 as vLLM answers
        self.answer, self.complete = answer, complete
        self.retry_after = retry_after
        self.record = record  # keep every request body in `seen` (tests); off for long benchmarks
        self.script: list = []  # what the next POSTs get instead of an answer (see the module docstring)
        self.error_message = lambda status, auth: f"scripted {status}"  # (status, Authorization) -> text
        self._hook_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fake-openai-hook")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self.reset_stats()

    # ---- counters
    def reset_stats(self) -> None:
        self.requests = 0  # HTTP POSTs received, failures included
        self.answered = 0  # 200 replies with a completion
        self.resets = 0
        self.statuses: Counter = Counter()
        self.kinds: Counter = Counter()
        self.tokens_in = self.tokens_out = 0
        self.inflight = self.max_inflight = 0
        self.seen: list[dict] = []
        self.auth_headers: set[str] = set()
        self._first = self._last = self._t = None
        self._area = 0.0  # integral of in-flight over time, over the busy span
        self._level_s: Counter = Counter()  # seconds spent at each in-flight level (for percentiles)

    def _track(self, delta: int) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = self._t = now
        self._area += self.inflight * (now - self._t)
        self._level_s[self.inflight] += now - self._t
        self._t = now
        self.inflight += delta
        self.max_inflight = max(self.max_inflight, self.inflight)
        if delta < 0:
            self._last = now

    @property
    def mean_inflight(self) -> float:
        """Time-weighted mean of requests in flight from the first arrival to the last reply."""
        if self._first is None or self._last is None or self._last <= self._first:
            return 0.0
        return self._area_until(self._last) / (self._last - self._first)

    def _area_until(self, t: float) -> float:
        return self._area + (self.inflight * (t - self._t) if t > self._t else 0.0)

    def inflight_quantile(self, q: float) -> int:
        """The in-flight level the server spent a share `q` of its busy span at or below."""
        total = sum(self._level_s.values())
        seen = 0.0
        for level in sorted(self._level_s):
            seen += self._level_s[level]
            if total and seen >= q * total:
                return level
        return 0

    def stats(self) -> dict:
        return {"requests": self.requests, "answered": self.answered, "resets": self.resets,
                "statuses": {str(k): v for k, v in self.statuses.items()}, "kinds": dict(self.kinds), "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out, "max_inflight": self.max_inflight,
                "mean_inflight": self.mean_inflight, "p50_inflight": self.inflight_quantile(0.5),
                "p95_inflight": self.inflight_quantile(0.95),
                "busy_s": (self._last - self._first) if self._first and self._last else 0.0}

    # ---- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        """Start listening on the running loop (use this when the caller owns the loop)."""
        self._loop = asyncio.get_running_loop()
        # A large backlog: 256+ clients connect at once, and the default (100) would make the kernel
        # drop SYNs, which the client sees as retries no real server causes.
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> FakeOpenAI:
        started = threading.Event()
        failure: list[BaseException] = []

        def serve():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            # stop(): finish the cancelled connection tasks so that nothing is left pending.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    async def close(self) -> None:
        """Close the listener and abort every connection (a server that dies mid-reply)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def stop(self) -> None:
        """kill(): from any thread; the port refuses connections afterwards, open replies are cut."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._thread is not None and threading.current_thread() is not self._thread:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=5)
            self._thread = None
        else:
            loop.create_task(self.close())
        self._hook_pool.shutdown(wait=False)

    kill = stop

    # ---- HTTP
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                keep = await self._handle(method, path.split("?")[0], headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _send(self, writer, status: int, body: bytes, content_type="application/json", headers=None):
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _send_json(self, writer, status: int, obj, headers=None):
        await self._send(writer, status, json.dumps(obj).encode(), headers=headers)

    async def _handle(self, method, path, headers, raw, writer) -> bool:
        """Answer one request; False closes the connection."""
        if method == "GET" and path.rstrip("/").endswith("/models"):
            self.kinds["models"] += 1
            names = self.models or ["fake"]
            await self._send_json(writer, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in names]})
            return True
        if path == "/fake/stats":
            await self._send_json(writer, 200, self.stats())
            return True
        if path == "/fake/reset":
            self.reset_stats()
            await self._send_json(writer, 200, {})
            return True
        if path == "/fake/script":
            self.script.extend(json.loads(raw or b"[]"))
            await self._send_json(writer, 200, {})
            return True
        if method != "POST" or not path.endswith(("/chat/completions", "/completions")):
            await self._send_json(writer, 404, {"error": {"message": f"no route {method} {path}", "code": 404}})
            return True

        self.requests += 1
        self._track(+1)
        try:
            return await self._completion(path, headers, raw, writer)
        finally:
            self._track(-1)

    async def _completion(self, path, headers, raw, writer) -> bool:
        auth = headers.get("authorization", "")
        self.auth_headers.add(auth)
        action = self.script.pop(0) if self.script else None
        if action == "reset":
            self.resets += 1
            writer.transport.abort()
            return False
        if action == "hang":
            await asyncio.sleep(3600)
            return False
        if isinstance(action, int):
            return await self._error(writer, action, self.error_message(action, auth))
        if isinstance(action, Raw):
            self.statuses[action.status] += 1
            await self._send(writer, action.status, action.body, action.content_type, action.headers)
            return True

        try:
            body = json.loads(raw)
        except ValueError:
            return await self._error(writer, 400, "the body is not JSON")
        if self.record:
            self.seen.append(body)
        chat = path.endswith("/chat/completions")
        if not isinstance(body.get("model"), str) or ("messages" if chat else "prompt") not in body:
            return await self._error(writer, 400, "model and " + ("messages" if chat else "prompt") + " are required")
        if self.models is not None and body["model"] not in self.models:
            return await self._error(writer, 404, f"The model `{body['model']}` does not exist.")
        fmt = body.get("response_format") or {}
        kind = "completions" if not chat else "chat_json" if fmt.get("type") == "json_schema" else "chat"
        self.kinds[kind] += 1

        hook = self.answer if chat else self.complete
        try:
            text = None
            if hook is not None:
                text = await asyncio.get_running_loop().run_in_executor(self._hook_pool, hook, body)
            if text is None:
                text = default_answer(body) if chat else default_complete(body)
        except Exception as exc:  # noqa: BLE001 - a broken test hook is a 500 with its message
            return await self._error(writer, 500, f"hook failed: {type(exc).__name__}: {exc}")
        if isinstance(text, Raw):
            self.statuses[text.status] += 1
            await self._send(writer, text.status, text.body, text.content_type, text.headers)
            return True
        if isinstance(text, dict):  # a completions hook may give {"text", "finish_reason", ...}
            extra, text = text, text.get("text", "")
        else:
            extra = {}
        content = None if text is NULL else str(text)
        if not chat and content is not None:
            for stop in body.get("stop") or []:
                content = content.split(stop, 1)[0] if stop else content
        n_in = int(extra.get("prompt_tokens", _prompt_tokens(body)))
        n_out = int(extra.get("completion_tokens", len((content or "").split())))

        await asyncio.sleep(self._latency(n_out))
        self.answered += 1
        self.statuses[200] += 1
        self.tokens_in += n_in
        self.tokens_out += n_out
        finish = extra.get("finish_reason", "length" if n_out >= int(body.get("max_tokens") or 16) else "stop")
        if chat:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None,
                      "message": {"role": "assistant", "content": content}}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None, "text": content}
            obj = "text_completion"
        await self._send_json(writer, 200, {
            "id": f"fake-{self.answered}", "object": obj, "created": 0, "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})
        return True

    def _latency(self, n_out: int) -> float:
        if self.delay_s is not None:
            return self.delay_s
        if self.throughput_tok_s:
            # Continuous batching: the server's decode throughput is shared by the requests in flight.
            return self.ttft_s + n_out * max(1, self.inflight) / self.throughput_tok_s
        return self.ttft_s

    async def _error(self, writer, status: int, message: str) -> bool:
        self.statuses[status] += 1
        headers = {"Retry-After": f"{self.retry_after:g}"} if status in (429, 503) else None
        await self._send_json(writer, status, {"error": {"message": message, "type": "fake", "code": status}},
                              headers)
        return True


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable"}


# ------------------------------------------------------------------------------------------ process
class Spawned:
    """A FakeOpenAI in its own Python process (its CPU is not the client's); see `spawn`."""

    def __init__(self, proc: subprocess.Popen, base_url: str):
        self.proc, self.base_url = proc, base_url

    def _call(self, path: str, data: bytes | None = None):
        root = self.base_url.rsplit("/v1", 1)[0]
        with urllib.request.urlopen(urllib.request.Request(root + path, data=data), timeout=10) as r:
            return json.loads(r.read() or b"null")

    def inflight_quantile(self, q: float) -> int:
        """The in-flight level the server spent a share `q` of its busy span at or below."""
        total = sum(self._level_s.values())
        seen = 0.0
        for level in sorted(self._level_s):
            seen += self._level_s[level]
            if total and seen >= q * total:
                return level
        return 0

    def stats(self) -> dict:
        return self._call("/fake/stats")

    def reset_stats(self) -> None:
        self._call("/fake/reset", b"")

    def push_script(self, actions: list) -> None:
        self._call("/fake/script", json.dumps(actions).encode())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    stop = kill

    def __enter__(self) -> Spawned:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def spawn(*, port: int = 0, delay_s: float | None = None, ttft_s: float = 0.0,
          throughput_tok_s: float | None = None, models: list[str] | None = None,
          judge: str = "random") -> Spawned:
    """Start `python -m fspo_engine.benchmarks.fake_openai` and wait for its URL."""
    cmd = [sys.executable, "-m", "fspo_engine.benchmarks.fake_openai", "--port", str(port), "--ttft", str(ttft_s)]
    if delay_s is not None:
        cmd += ["--delay", str(delay_s)]
    if throughput_tok_s:
        cmd += ["--throughput", str(throughput_tok_s)]
    if models:
        cmd += ["--models", ",".join(models)]
    cmd += ["--judge", judge]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("http"):
        proc.kill()
        raise RuntimeError(f"the fake server did not start (printed {line!r})")
    return Spawned(proc, line)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fspo_engine.benchmarks.fake_openai", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--delay", type=float, default=None, help="fixed seconds per request (overrides the model)")
    p.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token")
    p.add_argument("--throughput", type=float, default=None, help="server tokens/s shared by requests in flight")
    p.add_argument("--models", default=None, help="comma list of served model names (default: any)")
    p.add_argument("--record", action="store_true", help="keep request bodies in memory")
    p.add_argument("--judge", choices=["random", "consistent"], default="random",
                   help="consistent: judge requests get an order-independent verdict (see consistent_judge)")
    args = p.parse_args(argv)
    fake = FakeOpenAI(host=args.host, port=args.port, delay_s=args.delay, ttft_s=args.ttft,
                      throughput_tok_s=args.throughput, record=args.record,
                      models=args.models.split(",") if args.models else None,
                      answer=consistent_judge if args.judge == "consistent" else None)

    async def serve():
        await fake.start()
        print(fake.base_url, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await fake.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
