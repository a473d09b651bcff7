"""Dataset statistics for the manifest: counts, response diversity and user-user disagreement.

All numbers are computed from the written files with fixed sampling seeds and rounded to 4 decimals,
so they are byte-stable for a given dataset.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict

import numpy as np

_WORD = re.compile(r"\w+")


def _tfidf(texts: list[str]) -> np.ndarray:
    """[n, vocab] L2-normalised TF-IDF rows (smoothed idf, as in scikit-learn's default)."""
    docs = [Counter(_WORD.findall(t.lower())) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    x = np.zeros((len(texts), max(len(vocab), 1)))
    for r, d in enumerate(docs):
        for w, c in d.items():
            x[r, vocab[w]] = c
    df = (x > 0).sum(0)
    x *= np.log((1 + len(texts)) / (1 + df)) + 1
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def response_diversity(prefs: list[dict], max_responses: int = 1000) -> dict:
    """Mean TF-IDF cosine between distinct responses (lower = more diverse) and within pairs."""
    responses = sorted({p["chosen"] for p in prefs} | {p["rejected"] for p in prefs})
    out = {"distinct_responses": len(responses)}
    if len(responses) >= 2:
        sample = random.Random(0).sample(responses, min(max_responses, len(responses)))
        x = _tfidf(sample)
        sim = x @ x.T
        n = len(sample)
        out["mean_pairwise_tfidf_cosine"] = round(float((sim.sum() - np.trace(sim)) / (n * (n - 1))), 4)
    if prefs:
        pairs = random.Random(1).sample(prefs, min(max_responses, len(prefs)))
        x = _tfidf([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        n = len(pairs)
        out["chosen_rejected_tfidf_cosine"] = round(float((x[:n] * x[n:]).sum(1).mean()), 4)
    return out


def user_disagreement(prefs: list[dict]) -> dict:
    """How often two users who saw the same (question, response pair) preferred different sides.

    Groups prefs by question and unordered response pair; for a group labelled by n users of whom a
    chose one side and b the other, the fraction of disagreeing user pairs is a*b / C(n, 2). High
    values mean the label cannot be guessed from the pair alone: it lives in the user.
    """
    groups: dict[tuple, list[str]] = defaultdict(list)
    for p in prefs:
        key = (p["question"], *sorted((p["chosen"], p["rejected"])))
        groups[key].append(p["chosen"])
    rates = []
    for key, chosen in groups.items():
        n = len(chosen)
        if n >= 2:
            a = sum(c == key[1] for c in chosen)
            rates.append(a * (n - a) / (n * (n - 1) / 2))
    return {
        "shared_pairs": len(rates),
        "disagreement": round(sum(rates) / len(rates), 4) if rates else None,
    }


def mean_entropy(total: float, count: int) -> float | None:
    return round(total / count, 4) if count else None


def dataset_stats(users: list[dict], prefs: list[dict]) -> dict:
    per_domain: dict[str, dict] = {}
    domain_of = {u["user_id"]: u["domain"] for u in users}
    for u in users:
        d = per_domain.setdefault(u["domain"], {"users": 0, "train_users": 0, "test_users": 0, "prefs": 0})
        d["users"] += 1
        d[f"{u['split']}_users"] += 1
    for p in prefs:
        per_domain[domain_of[p["user_id"]]]["prefs"] += 1
    words = [len(_WORD.findall(t)) for p in prefs for t in (p["chosen"], p["rejected"])]
    vocab = {
        w
        for p in prefs
        for t in (p["question"], p["chosen"], p["rejected"])
        for w in _WORD.findall(t.lower())
    }
    return {
        "per_domain": per_domain,
        "response_words": {
            "mean": round(sum(words) / len(words), 4) if words else None,
            "min": min(words, default=None),
            "max": max(words, default=None),
        },
        "vocabulary_words": len(vocab),
        "diversity": response_diversity(prefs),
        "user_user": user_disagreement(prefs),
    }


def binary_entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
