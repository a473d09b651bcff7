"""Producers: one unit of work (a domain's user) -> (user record or None, pref records, counters).

`TemplateProducer` writes a user's pairs from the domain's templates, offline and deterministic;
`LLMProducer` asks an LLM for view-conditioned or persona-steered responses and has them judged for the user,
with persona improvement (data_gen/labeler.py). Every random draw about a unit comes from RNGs seeded by
(seed, domain, user index), made before any await: a unit's output does not depend on scheduling.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fspo_engine.data_gen.backends import HFBackend, MalformedReply, OpenAIBackend
from fspo_engine.data_gen.config import GenConfig
from fspo_engine.data_gen.domains import TemplateDomain
from fspo_engine.data_gen.labeler import label_user
from fspo_engine.data_gen.personas import User, make_user, user_rng
from fspo_engine.data_gen.prompts import (
    persona_messages,
    response_messages,
    valid_response,
    valid_views,
    views_messages,
)


class TemplateProducer:
    def __init__(self, cfg: GenConfig, domains: dict[str, TemplateDomain]):
        self.cfg = cfg
        self.domains = domains

    async def unit(self, user: User):
        domain, cfg = self.domains[user.domain], self.cfg
        rng = user_rng(cfg.seed, user.domain, user.index, "prefs")
        prefs, flipped = [], 0
        for j in range(cfg.prefs_per_user):
            pair = domain.make_pair(user.traits, rng, cfg.label_noise)
            flipped += pair.flipped
            prefs.append(
                {
                    "pref_id": f"{user.user_id}-{j:04d}",
                    "user_id": user.user_id,
                    "question": pair.question,
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "domain": user.domain,
                    "axes": pair.axes,
                    "noise_flipped": pair.flipped,
                }
            )
        return user.record(), prefs, {"pairs": len(prefs), "noise_flipped": flipped}

    async def aclose(self):
        pass


class LLMProducer:
    """View-conditioned / persona-steered responses, judged per user with persona improvement."""

    def __init__(self, cfg: GenConfig, domains: dict[str, TemplateDomain], backend, heldout: dict):
        self.cfg = cfg
        self.domains = domains
        self.backend = backend
        self.heldout = heldout
        self._views: dict[str, asyncio.Future] = {}
        self.first_error: str | None = None

    def _note(self, exc: Exception) -> None:
        if self.first_error is None:
            self.first_error = str(exc)
            print(f"warning: {exc}", file=sys.stderr)

    async def _view_responses(self, question: str) -> list[str]:
        cfg, backend = self.cfg, self.backend
        models = cfg.gen_models or (cfg.model,)
        views = await backend.chat_json(
            views_messages(question, cfg.candidates),
            valid_views,
            what="views",
            model=models[0],
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
        )
        views = views[: cfg.candidates]
        replies = await asyncio.gather(
            *(
                backend.chat_json(
                    response_messages(question, view),
                    valid_response,
                    what="response",
                    model=models[i % len(models)],
                    temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens,
                )
                for i, view in enumerate(views)
            ),
            return_exceptions=True,
        )
        responses = []
        for r in replies:
            if isinstance(r, MalformedReply):
                self._note(r)
            elif isinstance(r, BaseException):
                raise r
            elif r not in responses:
                responses.append(r)
        if len(responses) < 2:
            raise MalformedReply(f"fewer than 2 usable responses for question {question[:60]!r}")
        return responses

    def view_responses(self, question: str):
        if question not in self._views:  # each question's views are generated once and shared
            self._views[question] = asyncio.ensure_future(self._view_responses(question))
        return asyncio.shield(self._views[question])

    async def persona_response(self, question: str, description: str) -> str:
        return await self.backend.chat_json(
            persona_messages(question, description),
            valid_response,
            what="persona response",
            model=(self.cfg.gen_models or (self.cfg.model,))[0],
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
        )

    async def _pair(self, user: User, question: str, draws: list[int]):
        cfg = self.cfg
        if cfg.response_mode == "persona":
            other_index = (user.index + 1 + draws[2] % (cfg.users - 1)) % cfg.users
            other = make_user(
                self.domains[user.domain], cfg.seed, other_index, "train", self.heldout[user.domain]
            )
            x, y = await asyncio.gather(
                self.persona_response(question, user.description),
                self.persona_response(question, other.description),
            )
            if x == y:
                return None
            return (question, x, y) if draws[0] % 2 else (question, y, x)
        cands = list(await self.view_responses(question))
        if cfg.response_mode == "both":
            own = await self.persona_response(question, user.description)
            cands += [own] if own not in cands else []
        i = draws[0] % len(cands)
        j = (i + 1 + draws[1] % (len(cands) - 1)) % len(cands)
        return question, cands[i], cands[j]

    async def unit(self, user: User):
        cfg = self.cfg
        rng = user_rng(cfg.seed, user.domain, user.index, "prefs")
        # All of this user's random draws happen before any await: order-independent under asyncio.
        plan = [
            (self.domains[user.domain].sample_question(rng).text, [rng.getrandbits(30) for _ in range(3)])
            for _ in range(cfg.prefs_per_user)
        ]
        built = await asyncio.gather(*(self._pair(user, q, d) for q, d in plan), return_exceptions=True)
        counters = {
            "pairs": 0,
            "questions_failed": 0,
            "dropped_flip": 0,
            "dropped_undecided": 0,
            "dropped_malformed": 0,
            "traits_added": 0,
            "users_skipped": 0,
            "entropy_before_sum": 0.0,
            "entropy_before_n": 0,
            "entropy_after_sum": 0.0,
            "entropy_after_n": 0,
        }
        pairs, slots = [], []
        for k, b in enumerate(built):
            if isinstance(b, MalformedReply):
                self._note(b)
                counters["questions_failed"] += 1
            elif isinstance(b, BaseException):
                raise b
            elif b is not None:
                pairs.append(b)
                slots.append(k)
        labels = await label_user(
            self.backend,
            user.description,
            pairs,
            improve=cfg.persona_improvement,
            max_traits=cfg.max_traits,
            model=cfg.judge_model or cfg.model,
        )
        prefs = []
        for k, (question, x, y), decision in zip(slots, pairs, labels.decisions):
            kind = decision.kind
            if kind in ("x", "y"):
                chosen, rejected = (x, y) if kind == "x" else (y, x)
                prefs.append(
                    {
                        "pref_id": f"{user.user_id}-{k:04d}",
                        "user_id": user.user_id,
                        "question": question,
                        "chosen": chosen,
                        "rejected": rejected,
                        "domain": user.domain,
                    }
                )
            else:
                counters[
                    {"flip": "dropped_flip", "tie": "dropped_undecided"}.get(kind, "dropped_malformed")
                ] += 1
        counters.update(
            pairs=len(pairs),
            traits_added=len(labels.added_traits),
            entropy_before_sum=sum(labels.entropy_before),
            entropy_before_n=len(labels.entropy_before),
            entropy_after_sum=sum(labels.entropy_after),
            entropy_after_n=len(labels.entropy_after),
        )
        if not prefs:
            counters["users_skipped"] = 1
            return None, [], counters
        record = user.record()
        record["description"] = labels.description  # the final, improved description
        record["traits"] = {**user.traits, **{f"added_{i + 1}": t for i, t in enumerate(labels.added_traits)}}
        return record, prefs, counters

    async def aclose(self):
        await self.backend.aclose()


def make_backend(cfg: GenConfig, out: Path):
    """The LLM backend of `cfg` (an OpenAI-compatible client, or a local HF model), replies cached under OUT."""
    cache_dir = cfg.cache_dir or str(out / ".llm-cache")
    if cfg.backend == "openai":
        return OpenAIBackend(
            model=cfg.model,
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
            cache_dir=cache_dir,
        )
    return HFBackend(cfg.model, cache_dir=cache_dir)
