"""Producers: one unit of work (a domain's user) -> `Made` (user record or None, pref records, counters).

`TemplateProducer` writes a user's pairs from the domain's templates, offline and deterministic.
`LLMProducer` makes a user end to end on an LLM: persona (data_gen/sources.py `PersonaBook`), one pair per
question (by default two views written for this user — one it would likely prefer, one a different person
would — and a free-text response for each), the judge in both orders with persona improvement
(data_gen/labeler.py), then the persona-swap control on a sample of the kept pairs.

Every random draw about a unit comes from RNGs seeded by (seed, domain, user index, purpose), and every
reply is a function of its request (the client's cache and per-request seeds): a unit's output does not
depend on scheduling, concurrency or resume point. Requests carry the unit's number as priority, so the
client serves earlier users first and the finished prefix that the pipeline commits keeps moving.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections import Counter
from dataclasses import dataclass, field

from fspo_engine.data_gen import prompts
from fspo_engine.data_gen.client import MalformedReply
from fspo_engine.data_gen.config import GenConfig
from fspo_engine.data_gen.domains import TemplateDomain
from fspo_engine.data_gen.labeler import Decision, Judge, label_user
from fspo_engine.data_gen.personas import make_user, user_rng
from fspo_engine.data_gen.sources import Persona, PersonaBook, TraitSchema


@dataclass
class Unit:
    domain: str
    index: int  # the user's index in its domain
    split: str
    order: int  # the unit's place in the run (its priority)

    @property
    def user_id(self) -> str:
        return f"{self.domain}-{self.index:06d}"


@dataclass
class Made:
    record: dict | None  # the users.jsonl record; None: the user was dropped
    prefs: list[dict]
    counters: dict = field(default_factory=dict)  # summed into the manifest's statistics
    persona: str | None = None  # the accepted persona (LLM producers), replayed into PersonaBook on resume


def coin_labels(cfg: GenConfig, unit: Unit, n: int) -> list[bool]:
    """The random-labels ablation: per pair, whether to swap chosen and rejected (a fair seeded coin that
    knows nothing of the user's taste)."""
    rng = user_rng(cfg.seed, unit.domain, unit.index, "ablation")
    return [rng.random() < 0.5 for _ in range(n)]


class TemplateProducer:
    def __init__(self, cfg: GenConfig, domains: dict[str, TemplateDomain], heldout: dict):
        self.cfg, self.domains, self.heldout = cfg, domains, heldout

    async def unit(self, unit: Unit) -> Made:
        domain, cfg = self.domains[unit.domain], self.cfg
        user = make_user(domain, cfg.seed, unit.index, unit.split, self.heldout[unit.domain])
        rng = user_rng(cfg.seed, user.domain, user.index, "prefs")
        pairs = [domain.make_pair(user.traits, rng, cfg.label_noise) for _ in range(cfg.prefs_per_user)]
        swaps = coin_labels(cfg, unit, len(pairs)) if cfg.ablation == "random-labels" else [False] * len(pairs)
        prefs = []
        for j, (pair, swap) in enumerate(zip(pairs, swaps)):
            chosen, rejected = (pair.rejected, pair.chosen) if swap else (pair.chosen, pair.rejected)
            record = {
                "pref_id": f"{user.user_id}-{j:04d}",
                "user_id": user.user_id,
                "question": pair.question,
                "chosen": chosen,
                "rejected": rejected,
                "domain": user.domain,
                "axes": pair.axes,
                "noise_flipped": pair.flipped,
            }
            if cfg.ablation == "random-labels":
                record["label"] = "random"
            prefs.append(record)
        counters = {"pairs": len(prefs), "noise_flipped": sum(p.flipped for p in pairs), "kept": len(prefs)}
        return Made(user.record(), prefs, counters)

    async def aclose(self):
        pass


def _bullets(traits: dict[str, str]) -> str:
    return "\n".join(f"- {name.replace('_', ' ')}: {value}" for name, value in traits.items())


class LLMProducer:
    """A user made on an LLM: persona, pairs written for the user, judged labels, swap control."""

    def __init__(
        self,
        cfg: GenConfig,
        domains: dict[str, TemplateDomain],
        client,
        *,
        heldout: dict,
        books: dict[str, PersonaBook],
        schema: TraitSchema | None,
        questions: dict[str, list[str]] | None,
        persona_file: list[tuple[str, dict]] | None,
    ):
        self.cfg, self.domains, self.client = cfg, domains, client
        self.heldout, self.books, self.schema = heldout, books, schema
        self.questions, self.persona_file = questions, persona_file
        self._views: dict[str, asyncio.Future] = {}  # views mode: each question's views, shared by every user
        self.first_error: str | None = None

    def _note(self, exc: Exception) -> None:
        if self.first_error is None:
            self.first_error = str(exc)
            print(f"warning: {exc} (further malformed replies are counted in the summary)", file=sys.stderr)

    # --- requests ---------------------------------------------------------------------------------------
    def _gen_model(self, k: int) -> str:
        models = self.cfg.generator_models
        return models[k % len(models)]

    async def _json(self, stage: str, messages: list[dict], schema: dict, check, unit: Unit, model=None):
        return await self.client.chat_json(
            messages,
            stage=stage,
            schema=schema,
            schema_name=stage,
            check=check,
            model=model or self._gen_model(0),
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
            priority=unit.order,
        )

    async def _text(self, stage: str, messages: list[dict], unit: Unit, model: str) -> str:
        """A free-text reply (no schema); a blank one is asked again under a new attempt, then dropped."""
        reply = await self.client.chat_text(
            messages, stage=stage, model=model, temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens, priority=unit.order,
        )
        return reply.text.strip()

    # --- the persona --------------------------------------------------------------------------------------
    async def _persona(self, unit: Unit) -> Persona | None:
        cfg, book = self.cfg, self.books[unit.domain]
        if cfg.personas == "template":

            async def draw(attempt: int):
                user = make_user(self.domains[unit.domain], cfg.seed, unit.index, unit.split, self.heldout[unit.domain])
                return user.description, user.traits

        elif cfg.personas == "llm":
            d = self.schema.domains[unit.domain]

            async def draw(attempt: int):
                stream = "persona" if attempt == 0 else f"persona-{attempt}"
                traits = self.schema.sample(unit.domain, user_rng(cfg.seed, unit.domain, unit.index, stream))
                try:
                    text = await self._json(
                        "personas",
                        prompts.messages("persona", domain_about=d.about, traits=_bullets(traits)),
                        prompts.PERSONA_SCHEMA,
                        prompts.check_persona,
                        unit,
                    )
                except MalformedReply as exc:
                    self._note(exc)
                    raise
                return text, traits

        else:

            async def draw(attempt: int):
                return self.persona_file[unit.index]

        return await book.accept(unit.index, draw)

    # --- one pair's texts ---------------------------------------------------------------------------------
    async def _user_views(self, unit: Unit, persona: Persona, question: str):
        fits, contrast = await self._json(
            "views",
            prompts.messages("views", description=persona.description, question=question),
            prompts.VIEWS_SCHEMA,
            prompts.check_views,
            unit,
        )
        return await asyncio.gather(
            self._text("responses", prompts.messages("respond", question=question, view=fits), unit, self._gen_model(0)),
            self._text("responses", prompts.messages("respond", question=question, view=contrast), unit, self._gen_model(1)),
        )

    async def _shared_views(self, question: str, unit: Unit) -> list[str]:
        cfg = self.cfg
        views = await self._json(
            "views",
            prompts.messages("shared_views", question=question, count=cfg.candidates),
            prompts.shared_views_schema(cfg.candidates),
            prompts.check_list("views"),
            unit,
        )
        replies = await asyncio.gather(
            *(
                self._text("responses", prompts.messages("respond", question=question, view=v), unit, self._gen_model(i))
                for i, v in enumerate(views)
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
            raise MalformedReply(f"views: fewer than 2 usable responses for question {question[:60]!r}")
        return responses

    def shared_views(self, question: str, unit: Unit):
        if question not in self._views:  # each question's views are generated once and shared by every user
            self._views[question] = asyncio.ensure_future(self._shared_views(question, unit))
        return asyncio.shield(self._views[question])

    async def _for_persona(self, question: str, description: str, unit: Unit, model: int = 0) -> str:
        return await self._text(
            "responses", prompts.messages("persona_respond", question=question, description=description), unit,
            self._gen_model(model),
        )

    async def _pair(self, unit: Unit, persona: Persona, question: str, draws: list[int]):
        """(question, x, y, view of x) in a seeded order, or None when the two responses are the same text."""
        mode = self.cfg.response_mode
        if mode == "user-views":
            fits, contrast = await self._user_views(unit, persona, question)
            texts = [(fits, "fits"), (contrast, "contrast")]
        elif mode == "persona":
            if persona.swap_description is None:
                raise MalformedReply("persona: no earlier user's persona to contrast with (the domain's first user)")
            own, other = await asyncio.gather(
                self._for_persona(question, persona.description, unit),
                self._for_persona(question, persona.swap_description, unit, model=1),
            )
            texts = [(own, "own persona"), (other, "other persona")]
        else:
            cands = [(t, "view") for t in await self.shared_views(question, unit)]
            if mode == "both":
                cands.append((await self._for_persona(question, persona.description, unit), "own persona"))
            i = draws[1] % len(cands)
            j = (i + 1 + draws[2] % (len(cands) - 1)) % len(cands)
            texts = [cands[i], cands[j]]
        if texts[0][0] == texts[1][0]:
            return None
        (x, view), (y, _) = texts if draws[0] % 2 == 0 else texts[::-1]
        return question, x, y, view

    def _questions(self, unit: Unit, rng) -> list[str]:
        k = self.cfg.prefs_per_user
        if self.questions is None:  # --questions template: the domain's fixed tables
            return [self.domains[unit.domain].sample_question(rng).text for _ in range(k)]
        pool = self.questions[unit.domain]
        # Consecutive slots of one shuffled pool: a user's questions are distinct (when the pool holds K),
        # and every question serves at most ceil(users * K / pool size) pairs.
        return [pool[(unit.index * k + j) % len(pool)] for j in range(k)]

    # --- the unit ---------------------------------------------------------------------------------------------
    async def unit(self, unit: Unit) -> Made:
        cfg = self.cfg
        c: Counter = Counter()
        rng = user_rng(cfg.seed, unit.domain, unit.index, "prefs")
        # All of this user's random draws happen before any await: order-independent under asyncio.
        plan = [(q, [rng.getrandbits(30) for _ in range(3)]) for q in self._questions(unit, rng)]
        persona = await self._persona(unit)
        if persona is None:
            c["users_dropped_persona"] += 1
            return Made(None, [], dict(c))
        c["persona_draws"] += persona.draws
        built = await asyncio.gather(*(self._pair(unit, persona, q, d) for q, d in plan), return_exceptions=True)
        pairs, slots = [], []
        for k, b in enumerate(built):
            if isinstance(b, MalformedReply):
                self._note(b)
                c["pairs_failed"] += 1
            elif isinstance(b, BaseException):
                raise b
            elif b is None:
                c["dropped_same_responses"] += 1
            else:
                pairs.append(b)
                slots.append(k)
        c["pairs"] += len(pairs)
        judge = Judge(self.client, cfg.judge_model or cfg.model, priority=unit.order)
        description, added = persona.description, []
        if cfg.ablation == "random-labels":
            decisions = [Decision((-1, -1) if s else (1, 1)) for s in coin_labels(cfg, unit, len(pairs))]
        else:
            labels = await label_user(
                judge, persona.description, [p[:3] for p in pairs],
                improve=cfg.persona_improvement, max_traits=cfg.max_traits,
            )
            decisions, description, added = labels.decisions, labels.description, labels.added_traits
            first = labels.first
            c["judged"] += sum(d.votes is not None for d in first)
            c["first_flip"] += sum(d.kind == "flip" for d in first)
            c["first_tie"] += sum(d.kind == "tie" for d in first)
            c["decided_after_refinement"] += labels.decided_after_refinement
            c["traits_added"] += len(added)
            c["users_refined"] += bool(added)
            c["entropy_before_sum"] += sum(labels.entropy_before)
            c["entropy_before_n"] += len(labels.entropy_before)
            c["entropy_after_sum"] += sum(labels.entropy_after)
            c["entropy_after_n"] += len(labels.entropy_after)
        prefs, kept_pairs = [], []
        for k, (question, x, y, view), decision in zip(slots, pairs, decisions):
            kind = decision.kind
            if kind not in ("x", "y"):
                c[{"flip": "dropped_flip", "tie": "dropped_undecided"}.get(kind, "dropped_malformed")] += 1
                continue
            chosen, rejected = (x, y) if kind == "x" else (y, x)
            verdicts = None
            if decision.verdicts is not None:
                v = decision.verdicts if kind == "x" else decision.verdicts[::-1]
                verdicts = {"chosen_first": v[0], "rejected_first": v[1]}
            record = {
                "pref_id": f"{unit.user_id}-{k:04d}",
                "user_id": unit.user_id,
                "question": question,
                "chosen": chosen,
                "rejected": rejected,
                "domain": unit.domain,
                "generator_model": list(cfg.generator_models) if len(cfg.generator_models) > 1 else cfg.model,
                "judge_model": None if cfg.ablation else (cfg.judge_model or cfg.model),
                "verdicts": verdicts,
                "label": "random" if cfg.ablation else "judge",
            }
            if cfg.response_mode == "user-views":
                record["chosen_view"] = view if kind == "x" else {"fits": "contrast", "contrast": "fits"}[view]
                c["chosen_fits"] += record["chosen_view"] == "fits"
            c["chosen_longer"] += len(chosen) > len(rejected)
            prefs.append(record)
            kept_pairs.append((question, chosen, rejected))
        c["labelled"] += len(prefs)
        c[f"kept_hist_{len(prefs)}"] += 1
        if cfg.ablation is None:
            await self._swap_control(unit, persona, judge, kept_pairs, c)
        if len(prefs) < max(cfg.min_prefs_per_user, 1):
            c["users_dropped_few_prefs"] += 1
            return Made(None, [], dict(c), persona.description)
        c["kept"] += len(prefs)
        record = {
            "user_id": unit.user_id,
            "domain": unit.domain,
            "split": unit.split,
            "description": description,  # the final description: persona plus the traits refinement added
            "traits": persona.traits,  # the sampled attribute vector
            "persona": persona.description,  # the persona before refinement
            "added_traits": added,
        }
        return Made(record, prefs, dict(c), persona.description)

    async def _swap_control(self, unit: Unit, persona: Persona, judge: Judge, kept, c: Counter) -> None:
        """Judge a sample of the kept pairs again under an earlier user's persona; count verdict changes."""
        frac = self.cfg.swap_control_fraction
        if not kept or persona.swap_description is None or frac <= 0:
            return
        rng = user_rng(self.cfg.seed, unit.domain, unit.index, "swap-sample")
        picked = [k for k in range(len(kept)) if rng.random() < frac]
        # Each domain's first ~1/f users check at least one pair: a small run still gets a number.
        if not picked and unit.index < math.ceil(1 / frac):
            picked = [rng.randrange(len(kept))]
        found = await asyncio.gather(
            *(judge.pair(persona.swap_description, *kept[k], stage="swap_control") for k in picked)
        )
        for d in found:
            if d.votes is None:
                continue
            c["swap_n"] += 1
            c["swap_changed"] += d.kind != "x"  # x is the chosen side here: any other outcome is a change
            c["swap_reversed"] += d.kind == "y"

    async def aclose(self):
        await self.client.aclose()
