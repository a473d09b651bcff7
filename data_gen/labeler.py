"""The AI judge, iterative persona improvement and the persona-swap control (FSPO paper, synthetic data).

The judge sees the user description, the question and two responses, and answers A, B or tie (a
json_schema reply). Every pair is judged in both orders, concurrently. A pair the judge cannot decide
consistently — a tie in either order, or a verdict that follows the position (A both times: an *order
flip*) — triggers persona improvement: the LLM adds one specific trait to the description that would
decide that pair, and the undecided pairs are judged again; after at most `max_traits` additions every
pair of the user is judged again under the final description, so all of the user's labels come from one
self-consistent persona.

Label entropy of a pair is the binary entropy of its two votes (a tie is half a vote each way): 0 bits when
both orders agree, 1 bit for tie/tie or a flip; its mean before and after improvement is what persona
improvement lowers.

The swap control asks whether a label carries personal signal at all: a kept pair judged again under
*another* user's description changes its verdict only if the judge reads the persona. A rate near 0 means
labels that any user would share.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fspo_engine.data_gen import prompts
from fspo_engine.data_gen.client import MalformedReply


def judge_messages(description: str, question: str, a: str, b: str) -> list[dict]:
    """The judge's messages: the description first, so a user's judge requests share one prompt prefix
    (a server's prefix cache then serves all of them)."""
    return prompts.messages("judge", description=description, question=question, a=a, b=b)


def parse_verdict(obj: dict) -> str:
    """"A" | "B" | "tie" from a judge reply object (any case), or ValueError."""
    value = obj.get("preferred")
    if not isinstance(value, str) or value.strip().upper() not in ("A", "B", "TIE"):
        raise ValueError('"preferred" must be "A", "B" or "tie"')
    value = value.strip().upper()
    return "tie" if value == "TIE" else value


@dataclass
class Decision:
    """The judge's two votes on a pair (x, y): +1 for x, -1 for y, 0 for tie; None if malformed.
    `verdicts` keeps the raw answers: (the verdict with x shown first, the verdict with y shown first)."""

    votes: tuple[int, int] | None
    verdicts: tuple[str, str] | None = None

    @property
    def kind(self) -> str:
        """ "x" | "y" (both orders agree), "tie" (a tie in either order), "flip", "malformed"."""
        if self.votes is None:
            return "malformed"
        v1, v2 = self.votes
        if v1 * v2 < 0:
            return "flip"
        total = v1 + v2
        # One order decides and the other ties is not consistent enough to label.
        if abs(total) == 2:
            return "x" if total > 0 else "y"
        return "tie"

    @property
    def decided(self) -> bool:
        return self.kind in ("x", "y")

    @property
    def entropy(self) -> float:
        p = (self.votes[0] + self.votes[1] + 2) / 4  # P(x preferred); a tie is half a vote each way
        return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


async def judge_both_orders(verdict: Callable[[str, str], Awaitable[str]], x: str, y: str) -> Decision:
    """Ask `verdict(a, b)` -> "A" | "B" | "tie" about (x, y) and (y, x), concurrently: the one place where a
    pair's two orders are asked and turned into votes (gen-data's labels and eval's winrates both come here).
    A malformed reply (after the client's retries) is a malformed decision, reported, never hidden."""
    try:
        first, second = await asyncio.gather(verdict(x, y), verdict(y, x))
    except MalformedReply:
        return Decision(None)
    v1 = {"A": 1, "B": -1, "tie": 0}[first]
    v2 = {"A": -1, "B": 1, "tie": 0}[second]
    return Decision((v1, v2), (first, second))


class Judge:
    """The gen-data judge on one client: `pair(description, question, x, y)` -> Decision."""

    def __init__(self, client, model: str | None, priority: float = 0.0):
        self.client, self.model, self.priority = client, model, priority

    async def pair(self, description: str, question: str, x: str, y: str, stage: str = "judge") -> Decision:
        async def verdict(a: str, b: str) -> str:
            return await self.client.chat_json(
                judge_messages(description, question, a, b),
                stage=stage,
                schema=prompts.JUDGE_SCHEMA,
                schema_name="judge_verdict",
                check=parse_verdict,
                model=self.model,
                temperature=0.0,
                max_tokens=200,
                priority=self.priority,
            )

        return await judge_both_orders(verdict, x, y)

    async def trait(self, description: str, question: str, a: str, b: str) -> str:
        return await self.client.chat_json(
            prompts.messages("improve", description=description, question=question, a=a, b=b),
            stage="refine",
            schema=prompts.IMPROVE_SCHEMA,
            schema_name="persona_trait",
            check=prompts.check_trait,
            model=self.model,
            temperature=0.7,
            max_tokens=200,
            priority=self.priority,
        )


@dataclass
class UserLabels:
    description: str  # final description (with the added traits)
    added_traits: list[str]
    decisions: list[Decision]  # final decision per pair
    first: list[Decision] = field(default_factory=list)  # the first judgement of each pair (original persona)
    entropy_before: list[float] = field(default_factory=list)  # per judged pair
    entropy_after: list[float] = field(default_factory=list)

    @property
    def decided_after_refinement(self) -> int:
        """Pairs the original persona left undecided that the final one decides."""
        return sum(not f.decided and d.decided for f, d in zip(self.first, self.decisions))


async def label_user(
    judge: Judge,
    description: str,
    pairs: list[tuple[str, str, str]],
    *,
    improve: bool = True,
    max_traits: int = 3,
) -> UserLabels:
    """Label one user's pairs (question, x, y) with the judge, improving the persona where needed."""

    async def judge_all(desc: str, indices: list[int]) -> dict[int, Decision]:
        found = await asyncio.gather(*(judge.pair(desc, *pairs[i]) for i in indices))
        return dict(zip(indices, found))

    decisions = await judge_all(description, list(range(len(pairs))))
    first = [decisions[i] for i in range(len(pairs))]
    before = [d.entropy for d in first if d.votes is not None]
    added: list[str] = []
    if improve:
        undecided = [i for i, d in sorted(decisions.items()) if d.kind in ("tie", "flip")]
        while undecided and len(added) < max_traits:
            i = undecided[0]
            try:
                trait = await judge.trait(description, *pairs[i])
            except MalformedReply:
                undecided = undecided[1:]
                continue
            if trait in description:  # the model repeated a trait the persona already has: it decides nothing
                undecided = undecided[1:]
                continue
            description = f"{description} {trait}"
            added.append(trait)
            rejudged = await judge_all(description, undecided)
            decisions.update(rejudged)
            undecided = [j for j in undecided if not rejudged[j].decided]
        if added:
            # Relabel every pair under the final description; the pairs just re-judged under it are the same
            # requests, so the client answers them from its cache.
            decisions = await judge_all(description, list(range(len(pairs))))
    final = [decisions[i] for i in range(len(pairs))]
    after = [d.entropy for d in final if d.votes is not None]
    return UserLabels(description, added, final, first, before, after)
