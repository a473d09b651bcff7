"""What eval.json's numbers mean: user-clustered 95% intervals (checked against a hand-computed bootstrap
distribution), exact ties counted half like the references' ties, the val split, and the references' names."""

from __future__ import annotations

import itertools
import json
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import cli_in_process as cli
from helpers import make_tiny_model_dir

from fspo_engine.data_gen.pipeline import generate_dataset
from fspo_engine.engine.evaluate import REFERENCES, episode_scores, evaluate
from fspo_engine.engine.intervals import bootstrap_ratios, cluster_ci95, cluster_sums

# ------------------------------------------------------------------------------------------- the clustered bootstrap

# Three users: A got 3 episodes right of 3, B 0 of 1, C 1 of 2. A bootstrap draw is 3 users with replacement
# (27 equally likely ordered draws); its accuracy is the drawn users' right episodes over their episodes.
# Worked out by hand, draw by draw:
HAND = {
    Fraction(9, 9): 1,  # AAA
    Fraction(0, 3): 1,  # BBB
    Fraction(3, 6): 1,  # CCC
    Fraction(6, 7): 3,  # AAB
    Fraction(7, 8): 3,  # AAC
    Fraction(3, 5): 3,  # ABB
    Fraction(1, 4): 3,  # BBC
    Fraction(5, 7): 3,  # ACC
    Fraction(2, 5): 3,  # BCC
    Fraction(4, 6): 6,  # ABC
}
SCORES = [1, 1, 1, 0, 1, 0]
USERS = ["A", "A", "A", "B", "C", "C"]


def test_the_hand_computed_distribution_is_the_enumerated_one():
    sums, counts = cluster_sums(SCORES, USERS)
    assert sums.tolist() == [3, 0, 1] and counts.tolist() == [3, 1, 2]
    exact = {}
    for draw in itertools.product(range(3), repeat=3):
        r = Fraction(int(sum(sums[list(draw)])), int(sum(counts[list(draw)])))
        exact[r] = exact.get(r, 0) + 1
    assert exact == HAND


def test_bootstrap_replicates_follow_the_clustered_distribution():
    reps = bootstrap_ratios(*cluster_sums(SCORES, USERS), resamples=40_000, seed=3)
    for value, ways in HAND.items():
        freq = np.mean(np.isclose(reps, float(value)))
        assert freq == pytest.approx(ways / 27, abs=0.01), value
    # P(0) = P(1) = 1/27 > 2.5%: the interval's ends are the extreme draws.
    assert cluster_ci95(SCORES, USERS) == [0.0, 1.0]


def test_resampling_episodes_instead_of_users_would_be_narrower():
    """Ten users, each right on all or none of 8 episodes: clustered by user the interval is that of 10 coin
    users; with each episode its own cluster it is that of 80 trials, far too narrow."""
    rng = np.random.default_rng(0)
    user_right = rng.integers(0, 2, size=10)
    scores = np.repeat(user_right, 8)
    users = np.repeat(np.arange(10), 8)
    lo, hi = cluster_ci95(scores, users)
    nlo, nhi = cluster_ci95(scores, np.arange(80))
    assert lo <= scores.mean() <= hi and nlo <= scores.mean() <= nhi
    assert (hi - lo) > 1.8 * (nhi - nlo)
    with pytest.raises(ValueError, match="cluster labels"):
        cluster_sums([1, 0], ["a"])


def test_exact_ties_score_half():
    assert episode_scores(torch.tensor([2.0, 0.0, -0.5, -0.0, 1e-30])).tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]


# --------------------------------------------------------------------------------------------------- eval end to end


@pytest.fixture(scope="module")
def data_with_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate") / "data"
    generate_dataset(root, preset="quickstart", users=60, prefs_per_user=4, progress=False, val_fraction=0.2)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("evaluate") / "model")


def test_eval_val_split_contract(data_with_val, model_dir, tmp_path):
    """The issue's contract, as written: eval --split val writes "split": "val" and a ci95 in every result."""
    out = tmp_path / "F.json"
    res = cli("eval", "--model", model_dir, "--data", data_with_val, "--split", "val", "--shots", "0,2", "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["split"] == "val" and "users" in report["ci95_method"]
    users = [json.loads(line) for line in (data_with_val / "users.jsonl").read_text().splitlines()]
    val_users = {u["user_id"] for u in users if u["split"] == "val"}
    assert val_users
    for r in report["results"]:
        lo, hi = r["ci95"]
        assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
        assert r["users"] == len(val_users)
        for key in ("bayes_optimal", "training_prior_accuracy"):
            assert r[f"{key}_ci95"][0] <= r[key] <= r[f"{key}_ci95"][1]
    assert set(report["references"]) == set(REFERENCES)
    assert "not a ceiling" in report["references"]["bayes_optimal"]
    assert (tmp_path / "F.png").stat().st_size > 0
    # Another split scores other users.
    test = evaluate(str(model_dir), str(data_with_val), [2], split="test", progress=False)
    assert test["split"] == "test" and test["results"][0]["users"] != 0


def test_a_policy_equal_to_its_reference_scores_half(data_with_val, model_dir, tmp_path):
    """Every margin h = (π_c − π_r) − (ref_c − ref_r) is exactly 0 when the policy is its reference: each
    episode is a tie and scores 1/2 (counting only h > 0 gave 0)."""
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "policy")
    (run / "run.json").write_text(json.dumps({
        "data": str(data_with_val), "stages": {"ipo": {"final": "policy", "steps": 1}},
        "stage_order": ["ipo"], "reference": str(model_dir)}))
    report = evaluate(str(run), str(data_with_val), [0, 2], progress=False)
    assert report["method"] == "implicit_reward"
    for r in report["results"]:
        assert r["mean_margin"] == 0.0
        assert r["accuracy"] == 0.5 and r["ci95"] == [0.5, 0.5]


def test_eval_split_val_without_val_users_says_how_to_make_them(model_dir, tmp_path):
    data = tmp_path / "no-val"
    generate_dataset(data, preset="quickstart", users=20, prefs_per_user=3, progress=False)
    res = cli("eval", "--model", model_dir, "--data", data, "--split", "val", "--shots", "0", "--out",
              tmp_path / "F.json")
    assert res.returncode != 0 and "no val users" in res.stderr and "--val-fraction" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "F.json").exists()
