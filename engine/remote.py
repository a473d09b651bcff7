"""Generation on an OpenAI-compatible completions server (vLLM, SGLang, llama.cpp) instead of in this process:
`generate --generator openai` and `eval --winrate --generator openai`.

Only the decoding moves. Episodes, shots, the token budget, the description-then-answer order and the
prompts are `personalize.Generator`'s own (`RemoteGenerator` is a Generator whose `_run` sends its prompts
away), so a row is the same row whichever side decoded it. Requests go to /v1/completions, never chat (a
chat template would change the text the model was trained on), through the project's one LLM client
(data_gen/client.py: `concurrency` requests in flight, retries, several servers, a SQLite reply cache).

Prompts are sent as the exact token ids the local model is fed ([bos] + tok(few-shot prompt) + tok(header)),
which vLLM, SGLang and llama.cpp take. A server that refuses a list prompt (400 or 422 on the first request
of a run) gets `Prompt.text` instead, with a warning: it then tokenizes the text itself and adds bos its own
way, so its ids can differ from ours where its tokenizer splits the joined text differently. The choice is
made once, on the first request, before the others are sent.

Settings map one to one: max_new_tokens -> max_tokens, temperature, top_p, the seed (prompt i gets seed + i,
as the local sampler seeds prompt i), the stop ids -> stop_token_ids (vLLM's and SGLang's extension, sent with
id prompts), the description's stop string -> stop. Greedy decoding gives the local tokens when the server
runs the same weights at the same precision; sampled text is the server's own draw.

finish_reason: the reply cache keeps text and token counts, not the server's finish_reason, so it is derived:
"length" when the server generated max_new_tokens tokens, else "eos" (an eos that is exactly the last token
allowed reads "length").

Resume: each reply is committed to the cache (`cache_dir`) as it arrives, keyed by prompt, model name and
settings, not by URL; a killed run re-asks only what was in flight. The cache cannot see the weights: after
serving other weights under the same name, use a new --out or delete its cache directory. An empty reply
(a model that ends at once) is never cached, so it is asked again on a resume.
"""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.generate import Generation, turn_stop_ids
from fspo_engine.engine.model import read_config
from fspo_engine.engine.personalize import Generator, Prompt
from fspo_engine.engine.tokenizer import check_ids_fit, load_tokenizer

# A refusal of the request's shape (FastAPI/pydantic servers answer 422), not of the model or the key.
_SHAPE_REFUSED = (400, 422)


@dataclass(frozen=True)
class Server:
    """Where one side's answers are generated: an OpenAI-compatible server and its name for the model."""

    url: str | None  # e.g. http://127.0.0.1:8000/v1; None: the client reads OPENAI_BASE_URL
    model: str  # the served model name (vllm serve DIR serves it as DIR unless --served-model-name)
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the variable holding the key (local servers need none)
    concurrency: int = 64  # requests in flight; a continuous-batching server batches them
    max_retries: int = 5  # per request: connection errors, timeouts, 5xx, 429 (data_gen/client.py)
    timeout_s: float = 600.0  # one request; a long answer on a loaded server takes minutes
    flag: str = "--generator"  # the option family, for error messages ("--baseline-generator")


@dataclass
class RemoteGenerator(Generator):
    """A Generator that decodes on `server`: same prompts, same rows (see the module docstring)."""

    server: Server | None = None
    cache_dir: Path | None = None
    prompt_kind: str | None = None  # "ids" | "text", decided by the first request of the run

    def _run(self, prompts: list[Prompt], max_new: int, stop_strings=(), on_done=None) -> list[Generation]:
        from fspo_engine.data_gen.errors import DataGenError

        if not prompts:
            return []
        try:
            return asyncio.run(self._complete_all(prompts, max_new, list(stop_strings), on_done))
        except DataGenError as exc:  # refused, down, retries spent: the client's one line, with our flag
            raise FspoError(f"{self.server.flag}-url: {exc}") from None

    async def _complete_all(self, prompts: list[Prompt], max_new: int, stop: list[str], on_done) -> list[Generation]:
        from fspo_engine.data_gen.client import LLMClient

        s = self.server
        client = LLMClient(model=s.model, base_urls=s.url, api_key_env=s.api_key_env, concurrency=s.concurrency,
                           max_retries=s.max_retries, timeout_s=s.timeout_s, cache_dir=self.cache_dir)

        async def one(i: int) -> Generation:
            reply = await self._complete(client, prompts[i], i, max_new, stop)
            client.flush()  # committed as it arrives: a kill loses only the requests in flight
            if on_done is not None:
                on_done(1)
            return self._generation(reply, max_new)

        try:
            first = await one(0)  # alone: it decides ids or text for the rest
            tasks = [asyncio.ensure_future(one(i)) for i in range(1, len(prompts))]
            try:
                return [first, *await asyncio.gather(*tasks)]
            except BaseException:
                for t in tasks:  # the first failure (a refusal, a dead server) stops the others
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            await client.aclose()

    async def _complete(self, client, prompt: Prompt, i: int, max_new: int, stop: list[str]):
        from fspo_engine.data_gen.errors import DataGenError

        settings = dict(stage="generate", max_tokens=max_new, temperature=self.temperature, top_p=self.top_p,
                        seed=self.seed + i, stop=stop or None, priority=i)  # early rows first
        if self.prompt_kind != "text":
            try:
                reply = await client.complete(prompt.ids, stop_token_ids=list(self.stop_ids), **settings)
            except DataGenError as exc:
                if self.prompt_kind == "ids" or _refused_status(exc) not in _SHAPE_REFUSED:
                    raise
                print(f"warning: {self.server.flag}-url: the server refused a token-id prompt ({exc}); sending "
                      "the prompts as text, which the server tokenizes itself", file=sys.stderr, flush=True)
                self.prompt_kind = "text"
            else:
                self.prompt_kind = "ids"
                return reply
        return await client.complete(prompt.text, **settings)

    def _generation(self, reply, max_new: int) -> Generation:
        if not reply.text and not reply.completion_tokens:
            s = self.server
            raise FspoError(f"{s.flag}-url {s.url or '(OPENAI_BASE_URL)'}: a reply without text (model {s.model}): "
                            "the /v1/completions reply has no choices[0].text and no completion tokens")
        # Servers leave a matched stop string out of the text, as the local path cuts it off. The ids stay
        # empty: the server does not return them (callers read text and finish_reason).
        n = reply.completion_tokens or len(self.tokenizer.encode(reply.text))
        return Generation(ids=[], text=reply.text, finish_reason="length" if n >= max_new else "eos")


def _refused_status(exc) -> int | None:
    """The HTTP status of the client's "the server refused the request (404): ..." line, else None."""
    m = re.search(r"refused the request \((\d{3})\)", str(exc))
    return int(m.group(1)) if m else None


def load_remote_generator(model_dir, server: Server, cache_dir: Path | None = None, split_special_tokens: bool = True,
                          **settings) -> RemoteGenerator:
    """A RemoteGenerator for the model in `model_dir` served by `server`: only the tokenizer and config.json are
    read here (the server holds the weights)."""
    try:
        import openai  # noqa: F401
    except ImportError:
        raise FspoError(f"{server.flag} openai needs the openai package: pip install 'fspo-engine[llm]'") from None
    tokenizer = load_tokenizer(model_dir, split_special_tokens=split_special_tokens)
    config = read_config(model_dir)
    check_ids_fit(tokenizer, config.vocab_size, str(model_dir))
    return RemoteGenerator(None, tokenizer, turn_stop_ids(model_dir, tokenizer.eos_id, config.eos_token_id),
                           where=str(model_dir), server=server, cache_dir=cache_dir, **settings)


__all__ = ["RemoteGenerator", "Server", "load_remote_generator"]
