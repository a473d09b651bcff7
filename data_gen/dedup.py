"""Exact and near-duplicate detection for LLM-written texts (personas, questions): MinHash over word shingles.

A text's shingles are its overlapping runs of `shingle` words (lower-cased, punctuation dropped). Two texts'
Jaccard similarity |A ∩ B| / |A ∪ B| is estimated by the share of equal entries in their MinHash
signatures (`num_perm` salted 64-bit hashes, the minimum over the shingles of each). Candidates are found by
LSH banding (a candidate shares every row of at least one band) and confirmed when the estimated
similarity reaches `threshold`; texts with the same normalised words are exact duplicates.

Everything is deterministic (blake2b, no Python `hash`), so a run and its resume after a kill make the same
decisions. Memory: one signature (num_perm × 8 bytes) and `bands` bucket entries per kept text.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps mod 2^64, as the finaliser intends)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _bands_for(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands·rows = num_perm whose LSH S-curve midpoint (1/b)^(1/r) is nearest `threshold`
    from below, so pairs at the threshold are almost always candidates (false candidates are then confirmed
    or rejected on the full signature)."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        midpoint = (1 / bands) ** (1 / rows)
        if midpoint <= threshold * 0.85:
            best = (bands, rows)
    return best


class NearDuplicateIndex:
    """`add(text)` keeps `text` and returns None, or returns the kept text it duplicates (and keeps nothing)."""

    def __init__(self, threshold: float = 0.7, *, num_perm: int = 64, shingle: int = 3, seed: int = 0):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], not {threshold}")
        self.threshold, self.shingle = threshold, shingle
        # One salt per permutation: hash_k(g) = mix(h(g) xor salt_k), a different random ordering per k.
        self._salts = np.random.default_rng(seed).integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.bands, self.rows = _bands_for(threshold, num_perm)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []
        self._texts: list[str] = []  # kept for the message naming what a rejected text duplicates
        self._exact: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._texts)

    def signature(self, text: str) -> np.ndarray:
        tokens = words(text)
        grams = {" ".join(tokens[i : i + self.shingle]) for i in range(max(len(tokens) - self.shingle + 1, 1))}
        x = np.array([_hash64(g) for g in sorted(grams)], dtype=np.uint64)
        return _mix(x[None, :] ^ self._salts[:, None]).min(axis=1)

    def find(self, text: str) -> str | None:
        """The kept text that `text` duplicates (exactly, or at >= threshold similarity), or None."""
        key = " ".join(words(text))
        if key in self._exact:
            return self._texts[self._exact[key]]
        sig = self.signature(text)
        seen: set[int] = set()
        for band, bucket in enumerate(self._buckets):
            for i in bucket.get(self._band_key(sig, band), ()):
                if i not in seen:
                    seen.add(i)
                    if float(np.mean(self._signatures[i] == sig)) >= self.threshold:
                        return self._texts[i]
        return None

    def add(self, text: str) -> str | None:
        found = self.find(text)
        if found is not None:
            return found
        i = len(self._texts)
        sig = self.signature(text)
        self._texts.append(text)
        self._signatures.append(sig)
        self._exact[" ".join(words(text))] = i
        for band, bucket in enumerate(self._buckets):
            bucket.setdefault(self._band_key(sig, band), []).append(i)
        return None

    def _band_key(self, sig: np.ndarray, band: int) -> bytes:
        return sig[band * self.rows : (band + 1) * self.rows].tobytes()


def jaccard(a: str, b: str, shingle: int = 3) -> float:
    """The exact Jaccard similarity of two texts' word shingles (the oracle of the MinHash estimate)."""

    def grams(text: str) -> set[str]:
        t = words(text)
        return {" ".join(t[i : i + shingle]) for i in range(max(len(t) - shingle + 1, 1))}

    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y) if x | y else 1.0
