"""What every template domain provides, and the one pair construction they all share.

A domain has *response axes* (what a response can carry: sentiment, reading level, a diet it
respects, ...). A user is a set of traits; the domain's `score(traits, attrs)` says how much that
user likes a response carrying `attrs`. A preference pair is two responses to one question composed
from attribute vectors that differ on one or two axes and nowhere else (same template, same filler
words), so the axis that decides the label is always visible in the pair.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

# How many random ints `compose` may draw. Drawing a fixed-size vector up front keeps the random
# stream identical for the chosen and the rejected response whatever their attribute values.
N_DRAWS = 12


@dataclass
class Question:
    text: str
    slots: dict[str, str] = field(default_factory=dict)  # e.g. {"item": "phone"} for compose


@dataclass
class Pair:
    question: str
    chosen: str
    rejected: str
    axes: list[str]  # the axes on which chosen and rejected differ
    flipped: bool  # label noise swapped chosen and rejected


def pick(words, r: int):
    """`words[r % len(words)]`: draws are value-independent when lists of one axis have equal length."""
    return words[r % len(words)]


class TemplateDomain(ABC):
    """Base class; subclasses fill the tables and the five domain methods."""

    name: str = ""
    axes: dict[str, tuple[str, ...]] = {}
    # True: chosen is the user's ideal response and rejected moves exactly one axis away from it
    # (the cleanest signal, used by the quickstart preset). False: two random attribute vectors that
    # differ on 1-2 axes, labelled by the user's score (more diverse pairs).
    minimal_pairs: bool = False

    # --- users -------------------------------------------------------------------------------
    def heldout_combos(self, seed: int, test_fraction: float) -> frozenset:
        """Trait combinations reserved for test users (empty: split by user only)."""
        return frozenset()

    @abstractmethod
    def sample_traits(self, rng: random.Random, split: str, heldout: frozenset) -> dict[str, str]:
        ...

    @abstractmethod
    def describe(self, traits: dict[str, str], rng: random.Random) -> str:
        ...

    # --- questions and responses --------------------------------------------------------------
    @abstractmethod
    def sample_question(self, rng: random.Random) -> Question:
        ...

    @abstractmethod
    def compose(self, question: Question, attrs: dict[str, str], draws: list[int]) -> str:
        """A response to `question` carrying `attrs`; all randomness comes from `draws`."""
        ...

    @abstractmethod
    def score(self, traits: dict[str, str], attrs: dict[str, str]) -> float:
        ...

    def ideal(self, traits: dict[str, str]) -> dict[str, str]:
        """The attribute vector this user likes best (needed only with `minimal_pairs`)."""
        return {axis: traits[axis] for axis in self.axes}

    # --- the shared pair construction ---------------------------------------------------------
    def make_pair(self, traits: dict[str, str], rng: random.Random, label_noise: float) -> Pair:
        question = self.sample_question(rng)
        draws = [rng.getrandbits(30) for _ in range(N_DRAWS)]
        names = sorted(self.axes)
        for _ in range(100):
            if self.minimal_pairs:
                a = self.ideal(traits)
                changed = [rng.choice(names)]
            else:
                a = {axis: rng.choice(self.axes[axis]) for axis in names}
                changed = sorted(rng.sample(names, rng.choice((1, 1, 2)) if len(names) > 1 else 1))
            b = dict(a)
            for axis in changed:
                b[axis] = rng.choice([v for v in self.axes[axis] if v != a[axis]])
            sa, sb = self.score(traits, a), self.score(traits, b)
            if sa != sb:
                break
        else:  # pragma: no cover - every domain's weights make ties rare
            raise RuntimeError(f"{self.name}: could not build an untied pair for {traits}")
        good, bad = (a, b) if sa > sb else (b, a)
        chosen, rejected = self.compose(question, good, draws), self.compose(question, bad, draws)
        # Always draw, so the label-noise rate does not change which pairs are generated.
        flipped = rng.random() < label_noise
        if flipped:
            chosen, rejected = rejected, chosen
        return Pair(question.text, chosen, rejected, changed, flipped)
