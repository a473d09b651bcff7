"""Users by domain randomization: traits, a natural-language description and a train/test split.

Every random choice about user `i` of a domain comes from `user_rng(seed, domain, i)`, a
`random.Random` seeded from a SHA-256 of `(seed, domain, i)` (never Python's salted `hash()`), so a
user is the same whichever order, chunking or resume point generates it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from fspo_engine.data_gen.domains import TemplateDomain


def derive_seed(*parts) -> int:
    """A 64-bit seed from any printable parts; stable across processes and Python versions."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def user_rng(seed: int, domain: str, index: int, stream: str = "user") -> random.Random:
    return random.Random(derive_seed(seed, domain, index, stream))


@dataclass(frozen=True)
class Holdout:
    """Trait combinations reserved for one split each: test users hold only `test` combinations, val users
    only `val` ones, and train users neither (empty sets: the split is by user only)."""

    test: frozenset = frozenset()
    val: frozenset = frozenset()


@dataclass
class User:
    user_id: str
    domain: str
    split: str  # "train" | "val" | "test"
    description: str
    traits: dict[str, str]
    index: int

    def record(self) -> dict:
        """The users.jsonl record (DESIGN.md contract)."""
        return {
            "user_id": self.user_id,
            "domain": self.domain,
            "split": self.split,
            "description": self.description,
            "traits": self.traits,
        }


def test_indices(seed: int, domain: str, n_users: int, test_fraction: float) -> frozenset[int]:
    """Exactly round(test_fraction * n_users) user indices, chosen by a seeded shuffle."""
    k = round(test_fraction * n_users)
    return frozenset(random.Random(derive_seed(seed, domain, "split")).sample(range(n_users), k))


def val_indices(seed: int, domain: str, n_users: int, val_fraction: float, test: frozenset[int]) -> frozenset[int]:
    """Exactly round(val_fraction * n_users) user indices among those not in `test` (a seeded draw of its own,
    so adding a validation split leaves the test users as they were)."""
    k = round(val_fraction * n_users)
    rest = [i for i in range(n_users) if i not in test]
    return frozenset(random.Random(derive_seed(seed, domain, "val-split")).sample(rest, min(k, len(rest))))


def make_user(domain: TemplateDomain, seed: int, index: int, split: str, heldout: Holdout) -> User:
    rng = user_rng(seed, domain.name, index, "persona")
    # Domains draw a test user inside the set they are given and a train user outside it: a val user is drawn
    # inside the val set, a train user outside both.
    if split == "train":
        traits = domain.sample_traits(rng, "train", heldout.test | heldout.val)
    else:
        traits = domain.sample_traits(rng, "test", heldout.val if split == "val" else heldout.test)
    return User(
        user_id=f"{domain.name}-{index:06d}",
        domain=domain.name,
        split=split,
        description=domain.describe(traits, rng),
        traits=traits,
        index=index,
    )
