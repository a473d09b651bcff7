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


@dataclass
class User:
    user_id: str
    domain: str
    split: str  # "train" | "test"
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


def make_user(domain: TemplateDomain, seed: int, index: int, split: str, heldout: frozenset) -> User:
    rng = user_rng(seed, domain.name, index, "persona")
    traits = domain.sample_traits(rng, split, heldout)
    return User(
        user_id=f"{domain.name}-{index:06d}",
        domain=domain.name,
        split=split,
        description=domain.describe(traits, rng),
        traits=traits,
        index=index,
    )
