"""Dataset statistics for the manifest, computed in one streaming pass with bounded memory.

`DatasetStats` takes user and preference records one at a time (gen-data streams them from its files; the
importers feed their lists) and keeps only: counters, a few bounded samples, the vocabulary (which grows
with the square root of the text, Heaps' law, not with the number of preferences), and a SQLite table of
8-byte hashes for the exact distinct counts and for the user-user agreement groups — on disk when the
caller gives a path, so a dataset of millions of preferences does not need its texts in memory.

Samples are "bottom-k by hash": the k items whose content hash is smallest. That is a uniform sample,
independent of the order records arrive in, and the same for the same data: the statistics are byte-stable
for a given dataset. Numbers are rounded to 4 decimals.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
import sqlite3
from collections import Counter
from pathlib import Path

_WORD = re.compile(r"\w+")
SAMPLE = 1000  # texts in the TF-IDF samples


def _h(*parts: str) -> int:
    """A signed 64-bit content hash (SQLite's INTEGER), stable across processes."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _mix(*hashes: int) -> int:
    """A signed 64-bit combination of 64-bit hashes (order matters), without hashing the texts again."""
    x = 0x9E3779B97F4A7C15
    for h in hashes:
        x = ((x ^ (h & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x - (1 << 64) if x >= 1 << 63 else x


def _tfidf(texts: list[str]) -> list[dict[str, float]]:
    """L2-normalised TF-IDF vectors (smoothed idf, as in scikit-learn's default), sparse: word -> weight. A
    dense [texts, vocabulary] matrix of a thousand LLM answers can take gigabytes; these take the words."""
    docs = [Counter(_WORD.findall(t.lower())) for t in texts]
    df = Counter(w for d in docs for w in d)
    n = len(texts)
    out = []
    for d in docs:
        v = {w: c * (math.log((1 + n) / (1 + df[w])) + 1) for w, c in d.items()}
        norm = math.sqrt(math.fsum(x * x for x in v.values()))
        out.append({w: x / norm for w, x in v.items()} if norm > 0 else {})
    return out


def _dot(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return math.fsum(x * b.get(w, 0.0) for w, x in a.items())


def mean_pairwise_cosine(texts: list[str]) -> float:
    """The mean cosine over all pairs of distinct texts, without the n x n matrix: for unit vectors,
    sum over i != j of x_i . x_j = |sum_i x_i|^2 - sum_i |x_i|^2."""
    vectors = _tfidf(texts)
    total: dict[str, float] = {}
    for v in vectors:
        for w, x in v.items():
            total[w] = total.get(w, 0.0) + x
    squares = sum(1.0 for v in vectors if v)  # |x_i|^2 is 1, or 0 for a text without words
    n = len(vectors)
    return (math.fsum(x * x for x in total.values()) - squares) / (n * (n - 1))


class _BottomK:
    """The k items with the smallest keys (a max-heap of negated keys); an item seen twice is kept once."""

    def __init__(self, k: int):
        self.k, self.heap, self.keys = k, [], set()

    def add(self, key: int, item) -> None:
        if key in self.keys:
            return
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (-key, item))
        elif key < -self.heap[0][0]:
            evicted, _ = heapq.heapreplace(self.heap, (-key, item))
            self.keys.discard(-evicted)
        else:
            return
        self.keys.add(key)

    def items(self) -> list:
        return [item for _, item in sorted(self.heap, key=lambda e: -e[0])]


class DatasetStats:
    def __init__(self, db_path: str | Path | None = None):
        self.db = sqlite3.connect(str(db_path) if db_path is not None else ":memory:")
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        for table in ("responses", "questions", "personas"):
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {table} (h INTEGER PRIMARY KEY)")
        self.db.execute("CREATE TABLE IF NOT EXISTS pairs (g INTEGER, side INTEGER)")
        self.per_domain: dict[str, dict] = {}
        self.domain_of: dict[str, str] = {}
        self.words_n = self.words_sum = 0
        self.words_min = self.words_max = None
        self.vocab: set[str] = set()
        self.responses = _BottomK(SAMPLE)
        self.pair_sample = _BottomK(SAMPLE)
        self._pending: dict[str, list] = {"responses": [], "questions": [], "personas": [], "pairs": []}

    def add_user(self, user: dict) -> None:
        d = self.per_domain.setdefault(
            user["domain"], {"users": 0, "train_users": 0, "val_users": 0, "test_users": 0, "prefs": 0}
        )
        d["users"] += 1
        d[f"{user['split']}_users"] += 1
        self.domain_of[user["user_id"]] = user["domain"]
        self._queue("personas", (_h(user["description"]),))

    def add_pref(self, pref: dict) -> None:
        self.per_domain[self.domain_of[pref["user_id"]]]["prefs"] += 1
        question, chosen, rejected = pref["question"], pref["chosen"], pref["rejected"]
        self.vocab.update(_WORD.findall(question.lower()))
        hashes = []
        for text in (chosen, rejected):
            words = _WORD.findall(text.lower())
            self.vocab.update(words)
            n = len(words)
            self.words_n += 1
            self.words_sum += n
            self.words_min = n if self.words_min is None else min(self.words_min, n)
            self.words_max = n if self.words_max is None else max(self.words_max, n)
            h = _h(text)
            hashes.append(h)
            self._queue("responses", (h,))
            self.responses.add(h, text)
        hq = _h(question)
        self._queue("questions", (hq,))
        lo, hi = sorted(hashes)
        # The unordered pair's group (question and both responses) and which side this user chose.
        self._queue("pairs", (_mix(hq, lo, hi), int(hashes[0] == lo)))
        self.pair_sample.add(_mix(hashes[0], hashes[1], hq), (chosen, rejected))

    def _queue(self, table: str, row: tuple) -> None:
        rows = self._pending[table]
        rows.append(row)
        if len(rows) >= 10_000:
            self._flush(table)

    def _flush(self, table: str) -> None:
        rows, self._pending[table] = self._pending[table], []
        if table == "pairs":
            self.db.executemany("INSERT INTO pairs VALUES (?, ?)", rows)
        else:
            self.db.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?)", rows)

    def _count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def result(self) -> dict:
        for table in list(self._pending):
            self._flush(table)
        for d in self.per_domain.values():
            if not d["val_users"]:
                del d["val_users"]  # datasets without a validation split keep the key set they always had
        diversity = {
            "distinct_personas": self._count("personas"),
            "distinct_questions": self._count("questions"),
            "distinct_responses": self._count("responses"),
        }
        sample = self.responses.items()
        if len(sample) >= 2:
            diversity["mean_pairwise_tfidf_cosine"] = round(mean_pairwise_cosine(sample), 4)
        pairs = self.pair_sample.items()
        if pairs:
            vectors = _tfidf([c for c, _ in pairs] + [r for _, r in pairs])
            n = len(pairs)
            diversity["chosen_rejected_tfidf_cosine"] = round(
                math.fsum(_dot(vectors[i], vectors[n + i]) for i in range(n)) / n, 4
            )
        return {
            "per_domain": self.per_domain,
            "response_words": {
                "mean": round(self.words_sum / self.words_n, 4) if self.words_n else None,
                "min": self.words_min,
                "max": self.words_max,
            },
            "vocabulary_words": len(self.vocab),
            "diversity": diversity,
            "user_user": self._disagreement(),
        }

    def _disagreement(self) -> dict:
        """How often two users who saw the same (question, response pair) preferred different sides.

        For a group labelled by n users of whom a chose one side, the fraction of disagreeing user pairs is
        a(n - a) / C(n, 2). High values mean the label cannot be guessed from the pair alone: it lives in
        the user."""
        rates = [
            a * (n - a) / (n * (n - 1) / 2)
            for a, n in self.db.execute("SELECT SUM(side), COUNT(*) FROM pairs GROUP BY g HAVING COUNT(*) >= 2")
        ]
        return {
            "shared_pairs": len(rates),
            "disagreement": round(math.fsum(rates) / len(rates), 4) if rates else None,
        }

    def close(self) -> None:
        self.db.close()


def dataset_stats(users: list[dict], prefs: list[dict]) -> dict:
    """The statistics of records held in memory (importers)."""
    stats = DatasetStats()
    try:
        for u in users:
            stats.add_user(u)
        for p in prefs:
            stats.add_pref(p)
        return stats.result()
    finally:
        stats.close()


def mean_entropy(total: float, count: int) -> float | None:
    return round(total / count, 4) if count else None


def binary_entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None
