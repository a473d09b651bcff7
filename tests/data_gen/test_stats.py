"""The manifest's streaming statistics against plain in-memory references, on random records."""

from __future__ import annotations

import random
import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from fspo_engine.data_gen.stats import DatasetStats, _dot, _tfidf, dataset_stats, mean_pairwise_cosine

_WORD = re.compile(r"\w+")


def dense_tfidf(texts):
    """The reference: the dense [n, vocabulary] TF-IDF matrix the sparse path must equal."""
    docs = [Counter(_WORD.findall(t.lower())) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    x = np.zeros((len(texts), max(len(vocab), 1)))
    for r, d in enumerate(docs):
        for w, c in d.items():
            x[r, vocab[w]] = c
    x *= np.log((1 + len(texts)) / (1 + (x > 0).sum(0))) + 1
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def random_texts(rng, n, vocab=60):
    return [" ".join(f"w{rng.randrange(vocab)}" for _ in range(rng.randint(0, 30))) for _ in range(n)]


def test_sparse_tfidf_equals_the_dense_reference():
    rng = random.Random(1)
    texts = random_texts(rng, 150)
    x = dense_tfidf(texts)
    sim = x @ x.T
    n = len(texts)
    assert mean_pairwise_cosine(texts) == pytest.approx(float((sim.sum() - np.trace(sim)) / (n * (n - 1))), rel=1e-12)
    v = _tfidf(texts)
    for i, j in [(0, 1), (3, 3), (10, 40), (149, 7)]:
        assert _dot(v[i], v[j]) == pytest.approx(sim[i, j], abs=1e-12)


def make_records(rng, n_users=40, per_user=6):
    users = [{"user_id": f"u{i}", "domain": rng.choice(["a", "b"]), "split": rng.choice(["train", "test", "val"]),
              "description": f"d{rng.randrange(25)}"} for i in range(n_users)]
    prefs = []
    for u in users:
        for j in range(per_user):
            q = f"q{rng.randrange(12)}"
            pair = [f"r{rng.randrange(8)} {q}", f"s{rng.randrange(8)} {q}"]
            rng.shuffle(pair)
            prefs.append({"pref_id": f"{u['user_id']}-{j}", "user_id": u["user_id"], "question": q,
                          "chosen": pair[0], "rejected": pair[1]})
    return users, prefs


def test_counts_and_disagreement_equal_a_brute_force():
    users, prefs = make_records(random.Random(2))
    stats = dataset_stats(users, prefs)
    div = stats["diversity"]
    assert div["distinct_personas"] == len({u["description"] for u in users})
    assert div["distinct_questions"] == len({p["question"] for p in prefs})
    assert div["distinct_responses"] == len({p[k] for p in prefs for k in ("chosen", "rejected")})
    groups = {}
    for p in prefs:
        groups.setdefault((p["question"], *sorted((p["chosen"], p["rejected"]))), []).append(p["chosen"])
    rates = []
    for chosen in groups.values():
        if len(chosen) >= 2:
            pairs = list(combinations(chosen, 2))
            rates.append(sum(a != b for a, b in pairs) / len(pairs))
    assert stats["user_user"] == {"shared_pairs": len(rates), "disagreement": round(sum(rates) / len(rates), 4)}
    per = stats["per_domain"]
    assert sum(d["prefs"] for d in per.values()) == len(prefs)
    assert sum(d["val_users"] for d in per.values()) == sum(u["split"] == "val" for u in users)


def test_statistics_do_not_depend_on_record_order_and_stream_from_disk(tmp_path):
    users, prefs = make_records(random.Random(3), n_users=300)
    reference = dataset_stats(users, prefs)
    rng = random.Random(4)
    shuffled = prefs[:]
    rng.shuffle(shuffled)
    streamed = DatasetStats(tmp_path / "stats.sqlite")
    for u in users:
        streamed.add_user(u)
    for p in shuffled:
        streamed.add_pref(p)
    assert streamed.result() == reference  # bottom-k samples and SQLite counts: the same for any order
    streamed.close()
