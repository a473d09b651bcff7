"""Where an LLM run's users and questions come from: the LLM itself, or the user's own files.

- `TraitSchema`: the domain-randomization schema (data_gen/domains/persona_schema.json, or
  `--persona-schema FILE.json`): per domain, traits with their values, topics for questions, and a line
  saying what the domain is about. A user draws one value of every trait.
- `PersonaBook`: one domain's users' personas in user order. LLM personas are written from the drawn traits;
  a description that duplicates (exactly or nearly, MinHash) one accepted before is redrawn (new traits, a
  new request). Acceptance happens in user order, whatever order the replies arrive in, so a run and its
  resume after a kill accept the same personas. It also hands each user the description of an earlier user
  for the persona-swap control.
- `question_pool`: LLM-written questions per domain from sampled topics, in batches, de-duplicated in
  batch order; or the questions of `--questions FILE`.
- `read_personas_file`, `read_questions_file`: the user's JSONL files, `path:line: reason` for bad records.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fspo_engine.data_gen import prompts
from fspo_engine.data_gen.client import MalformedReply
from fspo_engine.data_gen.dedup import NearDuplicateIndex
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.personas import derive_seed

PERSONA_DRAWS = 4  # tries at a persona that duplicates none accepted before; then the user is dropped
QUESTIONS_PER_REQUEST = 10
PAIRS_PER_QUESTION = 5  # the default pool is large enough that each question serves at most ~5 pairs
QUESTION_ROUNDS = 6  # rounds of batches to fill a pool that de-duplication thinned
SWAP_RING = 64  # recent accepted descriptions a user's swap-control persona is drawn from


# --- the trait schema ------------------------------------------------------------------------------------
@dataclass
class DomainSchema:
    about: str
    traits: dict[str, list[str]]
    topics: list[str]


class TraitSchema:
    def __init__(self, domains: dict[str, DomainSchema]):
        self.domains = domains

    @classmethod
    def load(cls, path: str | Path | None, names: tuple[str, ...]) -> TraitSchema:
        """The built-in schema, or `path`'s, for the domains `names`; every problem is one DataGenError."""
        if path is None:
            text = resources.files("fspo_engine.data_gen.domains").joinpath("persona_schema.json").read_text()
            where = "built-in persona_schema.json"
        else:
            where = str(path)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DataGenError(f"{path}: cannot read the persona schema ({exc})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataGenError(f"{where}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise DataGenError(f"{where}: expected a JSON object with \"traits\" and/or \"domains\"")
        shared = _traits(raw.get("traits", {}), where, "traits")
        per_domain = raw.get("domains", {})
        if not isinstance(per_domain, dict):
            raise DataGenError(f"{where}: \"domains\" must be an object")
        out = {}
        for name in names:
            d = per_domain.get(name, {})
            if not isinstance(d, dict):
                raise DataGenError(f"{where}: domains.{name} must be an object")
            traits = {**shared, **_traits(d.get("traits", {}), where, f"domains.{name}.traits")}
            if not traits:
                raise DataGenError(f"{where}: no traits for domain {name!r}")
            topics = d.get("topics", raw.get("topics", []))
            if not isinstance(topics, list) or not all(isinstance(t, str) and t.strip() for t in topics):
                raise DataGenError(f"{where}: topics of {name!r} must be a list of non-empty strings")
            about = d.get("about", raw.get("about", name)) if isinstance(d.get("about", ""), str) else name
            out[name] = DomainSchema(about, traits, list(topics) or [name])
        return cls(out)

    def sample(self, domain: str, rng: random.Random) -> dict[str, str]:
        """One value of every trait, in the schema's order (the users.jsonl `traits`)."""
        return {name: rng.choice(values) for name, values in self.domains[domain].traits.items()}


def _traits(obj, where: str, key: str) -> dict[str, list[str]]:
    if not isinstance(obj, dict):
        raise DataGenError(f"{where}: {key} must be an object of trait -> list of values")
    for name, values in obj.items():
        if not (isinstance(values, list) and values and all(isinstance(v, str) and v.strip() for v in values)):
            raise DataGenError(f"{where}: {key}.{name} must be a non-empty list of non-empty strings")
    return {name: list(values) for name, values in obj.items()}


# --- the user's files ------------------------------------------------------------------------------------
def _jsonl(path: str | Path, what: str):
    """(line number, object) of a JSONL file; a bad line is `path:line: reason`."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataGenError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataGenError(f"{path}:{line}: invalid UTF-8") from None
    found = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataGenError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataGenError(f"{path}:{lineno}: expected a JSON object")
        found = True
        yield lineno, obj
    if not found:
        raise DataGenError(f"{path}: no {what} in the file")


def _text_field(obj: dict, key: str, path, lineno: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataGenError(f"{path}:{lineno}: field {key!r} must be a non-empty string")
    return prompts.clean(value)


def read_personas_file(path: str | Path) -> list[tuple[str, dict[str, str]]]:
    """(description, traits) per line of a personas JSONL (`description`, optional `traits`)."""
    out = []
    for lineno, obj in _jsonl(path, "personas"):
        description = _text_field(obj, "description", path, lineno)
        traits = obj.get("traits", {})
        if not isinstance(traits, dict) or not all(isinstance(v, str) for v in traits.values()):
            raise DataGenError(f"{path}:{lineno}: field 'traits' must map strings to strings")
        out.append((description, dict(traits)))
    return out


def read_questions_file(path: str | Path, domains: tuple[str, ...]) -> dict[str, list[str]]:
    """Each domain's questions from a JSONL (`question`, optional `domain`: without one a question serves
    every domain); repeats are kept once."""
    pools: dict[str, list[str]] = {d: [] for d in domains}
    seen: dict[str, set[str]] = {d: set() for d in domains}
    for lineno, obj in _jsonl(path, "questions"):
        question = _text_field(obj, "question", path, lineno)
        domain = obj.get("domain")
        if domain is not None and domain not in domains:
            raise DataGenError(f"{path}:{lineno}: domain {domain!r} is not one of --domains {','.join(domains)}")
        for d in [domain] if domain is not None else domains:
            if question not in seen[d]:
                seen[d].add(question)
                pools[d].append(question)
    for d, pool in pools.items():
        if not pool:
            raise DataGenError(f"{path}: no question for domain {d!r}")
    return pools


# --- questions from the LLM ------------------------------------------------------------------------------
def pool_size(users: int, prefs_per_user: int, per_domain: int | None) -> int:
    return per_domain if per_domain is not None else max(prefs_per_user, math.ceil(users * prefs_per_user / PAIRS_PER_QUESTION))


async def question_pool(client, cfg, schema: TraitSchema, domain: str, need: int) -> tuple[list[str], dict]:
    """`need` distinct LLM-written questions for `domain` (fewer only if QUESTION_ROUNDS rounds of batches
    could not find them), and counters. Batch k asks for QUESTIONS_PER_REQUEST questions on a topic drawn by
    (seed, domain, k); batches are requested concurrently and de-duplicated in batch order, so the pool is
    the same however the replies arrive."""
    d = schema.domains[domain]
    index = NearDuplicateIndex(cfg.dedup_threshold)
    pool: list[str] = []
    counters = {"question_batches": 0, "questions_duplicate": 0, "question_batches_failed": 0}
    next_batch = 0
    for _ in range(QUESTION_ROUNDS):
        missing = need - len(pool)
        if missing <= 0:
            break
        # Ask for a little more than is missing: de-duplication thins every round.
        count = math.ceil(missing * 1.25 / QUESTIONS_PER_REQUEST)
        batches = range(next_batch, next_batch + count)
        next_batch += count

        async def ask(k: int):
            topic = random.Random(derive_seed(cfg.seed, domain, "questions", k)).choice(d.topics)
            try:
                return await client.chat_json(
                    prompts.messages(
                        "questions", domain_about=d.about, topic=topic, count=QUESTIONS_PER_REQUEST
                    ),
                    stage="questions",
                    schema=prompts.questions_schema(QUESTIONS_PER_REQUEST),
                    schema_name="questions",
                    check=prompts.check_list("questions"),
                    model=cfg.generator_models[0],
                    temperature=cfg.temperature,
                    max_tokens=max(cfg.max_tokens, 60 * QUESTIONS_PER_REQUEST),
                    priority=-1.0,
                )
            except MalformedReply as exc:
                print(f"warning: {exc} (a batch of questions dropped; more are asked for)", file=sys.stderr)
                return None

        for batch in await asyncio.gather(*(ask(k) for k in batches)):
            counters["question_batches"] += 1
            if batch is None:
                counters["question_batches_failed"] += 1
                continue
            for q in batch:
                if len(pool) >= need:
                    break
                if index.add(q) is None:
                    pool.append(q)
                else:
                    counters["questions_duplicate"] += 1
    return pool, counters


# --- personas ---------------------------------------------------------------------------------------------
@dataclass
class Persona:
    description: str
    traits: dict[str, str]
    swap_description: str | None  # an earlier user's description, for the persona-swap control
    draws: int = 1  # persona requests it took (LLM personas)


class PersonaBook:
    """One domain's personas, accepted in user order (see the module docstring).

    `accept(index, draw)` awaits `draw(attempt) -> (description, traits)` (the caller's request), then waits
    for its turn (every earlier user decided), de-duplicates, redraws while needed, and returns a Persona or
    None (no distinct persona after PERSONA_DRAWS tries, or the request failed). Every index from `start` on
    must be passed to `accept` exactly once, in any order: a user that will not ask for a persona calls
    `skip(index)` so later users do not wait for it."""

    def __init__(self, start: int, *, dedup_threshold: float | None, seed: int, domain: str):
        self.index = NearDuplicateIndex(dedup_threshold) if dedup_threshold is not None else None
        self.recent: deque[str] = deque(maxlen=SWAP_RING)
        self.seed, self.domain = seed, domain
        self._turn = start
        self._turns: dict[int, asyncio.Event] = {}

    def replay(self, description: str | None) -> None:
        """Re-accept a committed user's persona after a resume (None: that user got none)."""
        if description is not None:
            if self.index is not None:
                self.index.add(description)
            self.recent.append(description)
        self._turn += 1

    def _event(self, index: int) -> asyncio.Event:
        event = self._turns.setdefault(index, asyncio.Event())
        if index == self._turn:
            event.set()
        return event

    def _pass(self, index: int) -> None:
        self._turns.pop(index, None)
        self._turn = index + 1
        self._event(self._turn)

    async def skip(self, index: int) -> None:
        await self._event(index).wait()
        self._pass(index)

    async def accept(self, index: int, draw) -> Persona | None:
        first = None
        try:
            first = await draw(0)
        except MalformedReply:
            pass
        await self._event(index).wait()
        try:
            return await self._decide(index, first, draw)
        finally:
            self._pass(index)

    async def _decide(self, index: int, found, draw) -> Persona | None:
        attempt = 0
        while found is not None:
            description, traits = found
            if self.index is None or self.index.add(description) is None:
                rng = random.Random(derive_seed(self.seed, self.domain, index, "swap"))
                swap = self.recent[rng.randrange(len(self.recent))] if self.recent else None
                self.recent.append(description)
                return Persona(description, traits, swap, attempt + 1)
            attempt += 1
            if attempt >= PERSONA_DRAWS:
                return None
            try:
                found = await draw(attempt)
            except MalformedReply:
                found = None
        return None

