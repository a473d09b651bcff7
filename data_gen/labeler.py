"""The AI judge and iterative persona improvement (FSPO paper, synthetic-data recipe).

The judge sees the user description, the question and two responses, and answers A, B or tie. Every
pair is judged in both orders: a pair whose verdict follows the position rather than the content
(A both times) is dropped as an *order flip*. A pair the description cannot decide (tie, or a tie in
one order) triggers persona improvement: the model adds one trait to the description that decides
that pair; after at most `max_traits` additions, all of the user's pairs are relabelled with the
final description, so every label comes from one self-consistent persona.

Label entropy of a pair is the binary entropy of the judge's two votes (a tie is half a vote each
way): 0 bits when both orders agree, 1 bit for tie/tie or a flip. Its mean over a user's pairs,
before and after improvement, is what persona improvement lowers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fspo_engine.data_gen.backends import ChatBackend, MalformedReply

JUDGE_SYSTEM = "You are a careful annotator. You reply with one JSON object and nothing else."


def judge_messages(description: str, question: str, a: str, b: str) -> list[dict]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": (
                "Task: judge\n"
                f"User description: {description}\n"
                f"Question: {question}\n"
                f"Response A: {a}\n"
                f"Response B: {b}\n"
                "Which response would this user prefer? Decide only from the user description. If the "
                'description gives no basis to prefer either, answer "tie". Reply with JSON: '
                '{"reason": "<one sentence>", "preferred": "A" | "B" | "tie"}'
            ),
        },
    ]


def improve_messages(description: str, question: str, a: str, b: str) -> list[dict]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": (
                "Task: improve persona\n"
                f"User description: {description}\n"
                f"Question: {question}\n"
                f"Response A: {a}\n"
                f"Response B: {b}\n"
                "The description cannot decide which response this user prefers. Invent ONE new trait of "
                "this user, consistent with the description, that makes one of the two responses clearly "
                'preferred. Reply with JSON: {"trait": "<one sentence about the user>"}'
            ),
        },
    ]


def parse_verdict(obj: dict) -> str:
    value = obj.get("preferred")
    if not isinstance(value, str) or value.strip().upper() not in ("A", "B", "TIE"):
        raise ValueError('"preferred" must be "A", "B" or "tie"')
    value = value.strip().upper()
    return "tie" if value == "TIE" else value


def _trait(obj: dict) -> str:
    value = obj.get("trait")
    if not isinstance(value, str) or not value.strip():
        raise ValueError('"trait" must be a non-empty string')
    value = " ".join(value.split())
    if len(value) > 300:
        raise ValueError('"trait" is longer than 300 characters')
    return value if value.endswith((".", "!", "?")) else value + "."


@dataclass
class Decision:
    """The judge's two votes on a pair (x, y): +1 for x, -1 for y, 0 for tie; None if malformed."""

    votes: tuple[int, int] | None

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
    def entropy(self) -> float:
        p = (self.votes[0] + self.votes[1] + 2) / 4  # P(x preferred); a tie is half a vote each way
        return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


async def judge_both_orders(verdict: Callable[[str, str], Awaitable[str]], x: str, y: str) -> Decision:
    """Ask `verdict(a, b)` -> "A" | "B" | "tie" about (x, y) and then (y, x): the one place where a pair's
    two orders are asked and turned into votes (gen-data's labels and eval's winrates both come here). A
    malformed reply (after the backend's retries) is a malformed decision, reported, never hidden."""
    try:
        first = await verdict(x, y)
        second = await verdict(y, x)
    except MalformedReply:
        return Decision(None)
    v1 = {"A": 1, "B": -1, "tie": 0}[first]
    v2 = {"A": -1, "B": 1, "tie": 0}[second]
    return Decision((v1, v2))


async def judge_pair(
    backend: ChatBackend, description: str, question: str, x: str, y: str, model: str | None = None
) -> Decision:
    """Judge (x, y) and (y, x) for the user `description`; position-biased or malformed verdicts are
    reported, not hidden."""

    async def verdict(a: str, b: str) -> str:
        return await backend.chat_json(
            judge_messages(description, question, a, b),
            parse_verdict,
            what="judge",
            model=model,
            temperature=0.0,
            max_tokens=200,
        )

    return await judge_both_orders(verdict, x, y)


@dataclass
class UserLabels:
    description: str  # final description (with the added traits)
    added_traits: list[str]
    decisions: list[Decision]  # final decision per pair
    entropy_before: list[float] = field(default_factory=list)  # per judged pair
    entropy_after: list[float] = field(default_factory=list)


async def label_user(
    backend: ChatBackend,
    description: str,
    pairs: list[tuple[str, str, str]],
    *,
    improve: bool = True,
    max_traits: int = 3,
    model: str | None = None,
) -> UserLabels:
    """Label one user's pairs (question, x, y) with the judge, improving the persona where needed."""

    async def judge_all(desc, indices):
        found = await asyncio.gather(*(judge_pair(backend, desc, *pairs[i], model=model) for i in indices))
        return dict(zip(indices, found))

    decisions = await judge_all(description, list(range(len(pairs))))
    before = [d.entropy for d in decisions.values() if d.votes is not None]
    added: list[str] = []
    if improve:
        undecided = [i for i, d in sorted(decisions.items()) if d.kind == "tie"]
        while undecided and len(added) < max_traits:
            i = undecided[0]
            try:
                trait = await backend.chat_json(
                    improve_messages(description, *pairs[i]),
                    _trait,
                    what="persona improvement",
                    model=model,
                    temperature=0.7,
                )
            except MalformedReply:
                undecided = undecided[1:]
                continue
            description = f"{description} {trait}"
            added.append(trait)
            rejudged = await judge_all(description, undecided)
            undecided = [j for j in undecided if rejudged[j].kind == "tie"]
        if added:  # relabel every pair with the final description, not just the ambiguous ones
            decisions = await judge_all(description, list(range(len(pairs))))
    final = [decisions[i] for i in range(len(pairs))]
    after = [d.entropy for d in final if d.votes is not None]
    return UserLabels(description, added, final, before, after)
