"""95% intervals for accuracies and winrates whose items are not independent.

A user contributes several episodes (or answers), and a model that reads one user wrong reads all of that
user's episodes wrong: treating them as independent trials makes an interval too narrow. The bootstrap here
resamples *users* with replacement and keeps each drawn user's items together (a cluster bootstrap), then
takes the 2.5th and 97.5th percentiles of the resampled means. The mean is a ratio: the drawn users' summed
scores over their summed item counts, so a user with more items weighs more, as in the point estimate.

It says how much the number would move with another draw of users from the same population. It does not
cover what another training seed would do (benchmarks/RESULTS.md reports that as the spread over seeds).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

RESAMPLES = 2000
CI95_METHOD = (f"percentile bootstrap over users: {RESAMPLES} resamples of the users with replacement, each "
               "drawn user's items kept together (clustered), fixed seed")


def cluster_sums(scores: Sequence[float], clusters: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """(summed score, item count) per cluster, in first-seen order."""
    if len(scores) != len(clusters):
        raise ValueError(f"{len(scores)} scores for {len(clusters)} cluster labels")
    index: dict[Hashable, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters], dtype=np.int64)
    sums = np.bincount(ids, weights=np.asarray(scores, dtype=np.float64), minlength=len(index))
    counts = np.bincount(ids, minlength=len(index)).astype(np.float64)
    return sums, counts


def bootstrap_ratios(sums: np.ndarray, counts: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """`resamples` bootstrap replicates of sum(sums) / sum(counts), each from a draw of the clusters with
    replacement (as many as there are), every drawn cluster's items together. (resamples,)"""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)  # (K,)
    if len(sums) == 0:
        raise ValueError("no clusters to bootstrap")
    idx = np.random.default_rng(seed).integers(len(sums), size=(resamples, len(sums)))  # (B, K)
    return sums[idx].sum(1) / counts[idx].sum(1)


def ci95_of_clusters(sums, counts, *, resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """The 95% percentile interval [low, high] of sum(sums) / sum(counts) under the cluster bootstrap (one
    cluster: the point itself, nothing to resample)."""
    low, high = np.percentile(bootstrap_ratios(sums, counts, resamples=resamples, seed=seed), [2.5, 97.5])
    return [float(low), float(high)]


def cluster_ci95(scores: Sequence[float], clusters: Sequence[Hashable], *, resamples: int = RESAMPLES,
                 seed: int = 0) -> list[float]:
    """The 95% interval of the mean of per-item `scores` when the `clusters` (one label per item: the user)
    are resampled; [0, 1] with no items."""
    if len(scores) == 0:
        return [0.0, 1.0]
    return ci95_of_clusters(*cluster_sums(scores, clusters), resamples=resamples, seed=seed)


__all__ = ["CI95_METHOD", "RESAMPLES", "bootstrap_ratios", "ci95_of_clusters", "cluster_ci95", "cluster_sums"]
