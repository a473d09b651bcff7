"""What every template domain provides, and the one pair construction they all share.

A domain has *response axes* (what a response can carry: sentiment, reading level, a diet it
respects, ...). A user is a set of traits; the domain's `score(traits, attrs)` says how much that
user likes a response carrying `attrs`. A preference pair is two responses to one question composed
from attribute vectors that differ on one or two axes and nowhere else (same template, same filler
words), so the axis that decides the label is always visible in the pair.
"""

from __future__ import annotations

import itertools
import math
import random
import re
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


def contains(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words (case-insensitive): "cost" is not in "costume"."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE) is not None


def read_by_markers(text: str, markers: dict[str, dict[str, tuple[str, ...]]],
                    default: dict[str, str] | None = None) -> dict[str, str | None]:
    """For each axis, the one value whose marker phrases occur in `text`; `default[axis]` when none does
    (an axis marked only by its other value, e.g. "concise" is the absence of a verbose clause); None when
    none does and there is no default, or when markers of two values occur (a free generation may mix them).
    """
    default = default or {}
    out: dict[str, str | None] = {}
    for axis, by_value in markers.items():
        found = [v for v, phrases in by_value.items() if any(contains(text, p) for p in phrases)]
        out[axis] = found[0] if len(found) == 1 else (default.get(axis) if not found else None)
    return out


def phrase_stated(text: str, phrases: dict[str, str], value: str) -> bool:
    """A description states `value` when its phrase occurs and no other value's phrase does."""
    return contains(text, phrases[value]) and not any(contains(text, p) for v, p in phrases.items() if v != value)


class TemplateDomain(ABC):
    """Base class; subclasses fill the tables and the five domain methods."""

    name: str = ""
    axes: dict[str, tuple[str, ...]] = {}
    # True: chosen is the user's ideal response and rejected moves exactly one axis away from it
    # (the cleanest signal, used by the quickstart-easy preset). False: two random attribute vectors that
    # differ on 1-2 axes, labelled by the user's score (more diverse pairs).
    minimal_pairs: bool = False
    # How many axes a (non-minimal) pair changes: drawn uniformly from this tuple, so (1, 1, 2) changes
    # one axis two times in three. `pair_proposal` reads it: it is part of the generator's model.
    changed_axes: tuple[int, ...] = (1, 1, 2)

    # --- users -------------------------------------------------------------------------------
    def heldout_combos(self, seed: int, test_fraction: float) -> frozenset:
        """Trait combinations reserved for test users (empty: split by user only)."""
        return frozenset()

    def val_combos(self, seed: int, val_fraction: float, test: frozenset) -> frozenset:
        """Trait combinations reserved for validation users, disjoint from `test` (empty: split by user only)."""
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

    # --- reading texts back: the template judge and the Bayes references ----------------
    @abstractmethod
    def read_attrs(self, text: str) -> dict[str, str | None]:
        """The attribute vector a response carries, read back from its text: the inverse of `compose` on
        generated texts, and the template judge's reading of a model's free generation (None for an axis
        whose markers are missing or contradictory; `score` counts such an axis as a miss)."""

    @abstractmethod
    def trait_space(self) -> list[dict[str, str]]:
        """Every value of the traits that `score` reads, each equally likely: the prior over users that
        `sample_traits` draws from before any train/test split (data_gen/bayes.py)."""

    @abstractmethod
    def stated_traits(self, description: str, traits: dict[str, str]) -> dict[str, bool]:
        """For each of the user's traits that `describe` words, whether `description` states the true value
        (its phrase appears, no other value's does): the description accuracy of generated descriptions."""

    def attribute_space(self) -> list[dict[str, str]]:
        """Every attribute vector a response can carry (axes in sorted order)."""
        names = sorted(self.axes)
        return [dict(zip(names, values)) for values in itertools.product(*(self.axes[a] for a in names))]

    # --- the shared pair construction ---------------------------------------------------------
    def draw_attrs(self, traits: dict[str, str], rng: random.Random) -> tuple[dict, dict, list[str]]:
        """One draw of a pair's two attribute vectors, before a draw the user scores as a tie is redrawn,
        and the axes they differ on. `pair_proposal` is its exact distribution."""
        names = sorted(self.axes)
        if self.minimal_pairs:
            a = self.ideal(traits)
            changed = [rng.choice(names)]
        else:
            a = {axis: rng.choice(self.axes[axis]) for axis in names}
            changed = sorted(rng.sample(names, min(rng.choice(self.changed_axes), len(names))))
        b = dict(a)
        for axis in changed:
            b[axis] = rng.choice([v for v in self.axes[axis] if v != a[axis]])
        return a, b, changed

    # Whether `pair_proposal` depends on the user (minimal pairs start from the user's ideal vector).
    @property
    def proposal_uses_traits(self) -> bool:
        return self.minimal_pairs

    def pair_proposal(self, traits: dict[str, str] | None) -> list[tuple[dict, dict, float]]:
        """Every (a, b) that `draw_attrs` can return, with its probability (data_gen/bayes.py)."""
        names = sorted(self.axes)
        sizes = {n: len(self.axes[n]) for n in names}
        out = []
        if self.minimal_pairs:
            ideal = self.ideal(traits)
            for axis in names:  # one axis, uniform; one of its other values, uniform
                for v in self.axes[axis]:
                    if v != ideal[axis]:
                        out.append((ideal, {**ideal, axis: v}, 1.0 / len(names) / (sizes[axis] - 1)))
            return out
        draws = [min(k, len(names)) for k in self.changed_axes]
        space = self.attribute_space()
        for k in sorted(set(draws)):
            p_k = draws.count(k) / len(draws)
            for moved in itertools.combinations(names, k):
                p_moved = p_k / math.comb(len(names), k) / math.prod(sizes[n] - 1 for n in moved)
                for a in space:  # a uniform; each moved axis a uniform other value
                    for new in itertools.product(*([v for v in self.axes[n] if v != a[n]] for n in moved)):
                        out.append((a, {**a, **dict(zip(moved, new))}, p_moved / len(space)))
        return out

    def make_pair(self, traits: dict[str, str], rng: random.Random, label_noise: float) -> Pair:
        question = self.sample_question(rng)
        draws = [rng.getrandbits(30) for _ in range(N_DRAWS)]
        for _ in range(100):
            a, b, changed = self.draw_attrs(traits, rng)
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
