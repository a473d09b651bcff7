"""Chat backends for the LLM path: any OpenAI-compatible server, or a local Hugging Face causal LM.

Both expose `await backend.chat(messages, ...) -> Reply` and `await backend.chat_json(...)`. Shared
machinery lives in `ChatBackend`: an on-disk reply cache keyed by the endpoint and the request content
(server URL as resolved, model, messages, sampling settings, attempt number; never the API key): the
same model name on another server is another model. In-flight de-duplication of
identical concurrent requests, token accounting, and JSON reply validation (a reply that is not the
requested JSON is retried a few times with a new attempt number, then rejected with a message that
names the model, the request kind and the start of the reply).

A server reply without a usable message (no choices, null content, a body that is not a chat
completion) is a transport failure, retried like a 5xx and never cached: caching it would replay the
failure after the server is fixed. A reply that is not valid Unicode (a lone surrogate) is a malformed
reply: retried, never cached.

API keys are read from the environment by name and only handed to the client object; they never
enter the cache, the manifest or any log line, and `redact` removes the key's value from every error
message (servers echo a wrong key back in their 401 text).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fspo_engine.data_gen.client import MalformedReply  # noqa: F401 - one class for old and new callers
from fspo_engine.data_gen.errors import DataGenError


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Usage:
    """Token accounting for one run; `calls` are real requests, cache hits are counted apart."""

    calls: int = 0
    cached_calls: int = 0
    retries: int = 0  # transient failures (429, 5xx, timeouts) that were retried
    malformed: int = 0  # replies rejected by JSON validation
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def is_unicode(text: str) -> bool:
    """False for text holding a lone surrogate: valid in JSON ("\\ud800"), but no UTF-8 writer can write it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ReplyCache:
    """One small JSON file per request under `root/ab/<sha256>.json`, written atomically.

    A file per key makes concurrent writers and killed runs harmless: a reply is either fully there
    or absent, and re-running the same request content reads it instead of calling the model.
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None

    @staticmethod
    def key(request: dict) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Reply | None:
        if self.root is None:
            return None
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
            return Reply(
                data["text"], int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0))
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: call the model again

    def put(self, key: str, reply: Reply) -> None:
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(reply), f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # never leave a stale temp file in the cache
            raise


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


class ChatBackend(ABC):
    """Cache, de-duplication, accounting and JSON validation around a subclass's `_call`."""

    name = "chat"
    endpoint: str | None = None  # where replies come from (server URL); part of the cache key
    secret: str | None = None  # a value that must never appear in an error message (the API key)

    def __init__(self, default_model: str, cache_dir: str | Path | None, malformed_retries: int = 2):
        self.default_model = default_model
        self.cache = ReplyCache(cache_dir)
        self.malformed_retries = malformed_retries
        self.usage = Usage()
        self._inflight: dict[str, asyncio.Future] = {}

    def redact(self, text: str) -> str:
        """`text` with the API key's value replaced by "***": for every message that leaves the backend."""
        return text.replace(self.secret, "***") if self.secret else text

    @abstractmethod
    async def _call(self, request: dict) -> Reply:
        """Send one chat request to the server or model; the subclass's transport."""

    async def chat(
        self,
        messages: list[dict],
        *,
        model: str | None = None,
        temperature: float = 0.7,
        max_tokens: int = 256,
        attempt: int = 0,
    ) -> Reply:
        request = {
            "model": model or self.default_model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "attempt": attempt,  # a malformed-reply retry is a different request, cached apart
        }
        key = self.cache.key({**request, "endpoint": self.endpoint})
        cached = self.cache.get(key)
        if cached is not None:
            self.usage.cached_calls += 1
            return cached
        if key in self._inflight:  # an identical request is on the wire: share its reply
            self.usage.cached_calls += 1
            return await asyncio.shield(self._inflight[key])
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            reply = await self._call(request)
            self.usage.calls += 1
            self.usage.prompt_tokens += reply.prompt_tokens
            self.usage.completion_tokens += reply.completion_tokens
            # An empty or non-Unicode reply is rejected as malformed by chat_json; caching it would
            # replay the failure on every re-run, so only usable text is kept.
            if reply.text.strip() and is_unicode(reply.text):
                self.cache.put(key, reply)
            future.set_result(reply)
            return reply
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]

    async def chat_json(
        self,
        messages: list[dict],
        validate: Callable[[dict], object],
        *,
        what: str,
        model: str | None = None,
        temperature: float = 0.7,
        max_tokens: int = 256,
    ):
        """The validated value of a JSON reply; `validate` raises ValueError(reason) on a bad object."""
        for attempt in range(self.malformed_retries + 1):
            reply = await self.chat(
                messages, model=model, temperature=temperature, max_tokens=max_tokens, attempt=attempt
            )
            try:
                return validate(parse_json_reply(reply.text))
            except ValueError as exc:
                self.usage.malformed += 1
                reason = str(exc)
                text = reply.text
        raise MalformedReply(
            self.redact(
                f"malformed reply from {model or self.default_model} for {what}: {reason} "
                f"(after {self.malformed_retries + 1} tries; reply began {text[:80]!r})"
            )
        )

    async def aclose(self) -> None:  # noqa: B027 - optional hook: most transports hold nothing
        return None


_TRANSIENT_STATUS = {408, 409, 425, 429}


class OpenAIBackend(ChatBackend):
    """Any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, hosted APIs).

    Uses the official SDK's async client with its own retries off: we retry 429/5xx/timeouts here
    with exponential backoff and jitter (honouring Retry-After), so retries are counted and the
    concurrency semaphore is released while waiting.
    """

    name = "openai"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        cache_dir=None,
        malformed_retries: int = 2,
    ):
        super().__init__(model, cache_dir, malformed_retries)
        try:
            import openai
        except ImportError:  # pragma: no cover - openai is a dev dependency
            raise DataGenError(
                "the openai backend needs the openai package: pip install 'fspo-engine[llm]'"
            ) from None
        self._openai = openai
        # Local servers accept any key; the SDK refuses an empty one.
        api_key = os.environ.get(api_key_env) or "EMPTY"
        # Keys shorter than 4 characters are placeholders for local servers ("x", "no"); redacting them
        # would mangle every message instead of hiding a secret.
        self.secret = api_key if api_key != "EMPTY" and len(api_key) >= 4 else None
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
        # As resolved by the SDK (OPENAI_BASE_URL from the environment when base_url is None): the server
        # that really answers, for the cache key and the error messages.
        self.base_url = str(self.client.base_url).rstrip("/")
        self.endpoint = self.base_url
        self.semaphore = asyncio.Semaphore(concurrency)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._jitter = random.Random(0)  # jitter only spaces retries; it never reaches the data

    async def _call(self, request: dict) -> Reply:
        openai = self._openai
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                async with self.semaphore:
                    resp = await self.client.chat.completions.create(
                        model=request["model"],
                        messages=request["messages"],
                        temperature=request["temperature"],
                        max_tokens=request["max_tokens"],
                    )
                reply = _reply_of(resp)
                # A server that echoes the key into the reply must not get it into the cache or the data.
                reply.text = self.redact(reply.text)
                return reply
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status < 500 and status not in _TRANSIENT_STATUS:
                    raise DataGenError(
                        self.redact(
                            f"{self.base_url}: the server refused the request ({status}): {exc.message}"
                        )
                    ) from None
                error = f"HTTP {status}"
                retry_after = _retry_after(exc)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                error = type(exc).__name__
            except (ValueError, openai.APIResponseValidationError) as exc:
                # A 200 whose body is not JSON (JSONDecodeError is a ValueError), or is JSON but not a
                # chat completion with a message (_BadBody): a proxy or overloaded server, so retry.
                if isinstance(exc, _BadBody):
                    error = str(exc)
                elif isinstance(exc, json.JSONDecodeError):
                    error = f"the 200 body is not JSON ({exc.msg})"
                else:
                    error = "the 200 body is not a chat completion"
            if attempt == self.max_retries:
                raise DataGenError(
                    self.redact(f"{self.base_url}: request failed after {attempt + 1} tries (last: {error})")
                )
            self.usage.retries += 1
            delay = self.backoff_s * 2**attempt * (1 + 0.25 * self._jitter.random())
            await asyncio.sleep(min(retry_after if retry_after is not None else delay, 60.0))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.client.close()


class _BadBody(ValueError):
    """A 200 reply that holds no message text; the reason is the error message's last part."""


def _reply_of(resp) -> Reply:
    """The message of a chat completion, or _BadBody: an empty reply must never pass as a model's answer."""
    if isinstance(getattr(resp, "error", None), dict) or (isinstance(resp, dict) and "error" in resp):
        raise _BadBody("the server answered 200 with an error object")
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _BadBody(f"the reply has no choices ({type(resp).__name__} body)")
    message = getattr(choices[0], "message", None)
    text = getattr(message, "content", None)
    if not isinstance(text, str):
        raise _BadBody("the reply's message content is null")
    usage = getattr(resp, "usage", None)
    return Reply(
        text,
        int(getattr(usage, "prompt_tokens", 0) or 0),
        int(getattr(usage, "completion_tokens", 0) or 0),
    )


def _retry_after(exc) -> float | None:
    try:
        value = exc.response.headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


class HFBackend(ChatBackend):
    """A local Hugging Face causal LM directory, generating in a worker thread one request at a time."""

    name = "hf"

    def __init__(
        self, model_dir: str | Path, *, device: str | None = None, cache_dir=None, malformed_retries: int = 2
    ):
        super().__init__(str(model_dir), cache_dir, malformed_retries)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise DataGenError(f"{path}: not a Hugging Face model directory (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - transformers/safetensors raise many types for a bad dir
            # One line: transformers' messages run over several lines (a corrupt safetensors header, a
            # missing tokenizer), and the CLI prints DataGenError as a single line.
            text = " ".join(str(exc).split())
            text = text if len(text) <= 300 else text[:297] + "..."
            raise DataGenError(f"{path}: cannot load the model ({type(exc).__name__}: {text})") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self._torch = torch
        self._lock = asyncio.Lock()

    def _prompt_ids(self, messages: list[dict]):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            return ids if not hasattr(ids, "keys") else ids["input_ids"]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tok(text, return_tensors="pt")["input_ids"]

    def _generate(self, request: dict) -> Reply:
        torch = self._torch
        ids = self._prompt_ids(request["messages"]).to(self.device)
        # Sampling seeded by the request content: the same request gives the same reply.
        torch.manual_seed(int(ReplyCache.key(request)[:8], 16))
        sample = request["temperature"] > 0
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=request["max_tokens"],
                do_sample=sample,
                temperature=request["temperature"] if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
        new = out[0, ids.shape[1] :]
        return Reply(
            self.tokenizer.decode(new, skip_special_tokens=True), int(ids.shape[1]), int(new.numel())
        )

    async def _call(self, request: dict) -> Reply:
        async with self._lock:  # one generate at a time: the model is not shared across threads
            return await asyncio.to_thread(self._generate, request)
