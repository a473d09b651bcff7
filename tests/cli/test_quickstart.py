"""`fspo-engine quickstart` end to end, shortened: every stage runs and every artefact appears."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_short_run(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "fspo_engine.cli.main", "quickstart", "--out", str(out), "--users", "40",
           "--pref-ft-steps", "4", "--pref-steps", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| 8 |" in res.stdout and "Bayes, population prior" in res.stdout and "reference:" in res.stdout
    report = json.loads((out / "run" / "eval.json").read_text())
    assert report["method"] == "implicit_reward"
    assert [r["shots"] for r in report["results"]] == [0, 1, 2, 4, 8]
    assert report["split"] == "test" and all(
        0.0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1.0 and r["episodes"] > 0 for r in report["results"])
    assert all(0.5 <= r["bayes_optimal"] <= 1.0 for r in report["results"])
    # Beside the population-prior reference, the Bayes predictor that believes the training users' prior (their combinations).
    assert all(0.0 <= r["training_prior_accuracy"] <= 1.0 for r in report["results"])
    assert "training users' prior" in res.stdout
    # The optimal curve rises with shots: the preset reveals a user a few traits at a time.
    assert report["results"][0]["bayes_optimal"] == 0.5 < report["results"][-1]["bayes_optimal"]
    win = json.loads((out / "run" / "winrate.json").read_text())
    assert win["shots"] == 8 and win["baseline"] == "zero-shot" and win["judge"] == "template"
    assert win["n"] == win["wins"] + win["ties"] + win["losses"] > 0 and "winrate" in res.stdout
    assert win["ci95"][0] <= win["winrate"] <= win["ci95"][1] and "users" in win["ci95_method"]
    # The data keeps a val split whose trait combinations are in neither train nor test.
    users = [json.loads(ln) for ln in (out / "data" / "users.jsonl").read_text().splitlines()]
    combos = {s: {tuple(sorted(u["traits"].items())) for u in users if u["split"] == s} for s in ("train", "val", "test")}
    assert combos["val"] and not combos["val"] & (combos["train"] | combos["test"])
    for name in ("loss_curve.png", "eval.png", "winrate.png", "metrics.jsonl", "config.toml", "run.json"):
        assert (out / "run" / name).stat().st_size > 0, name
    stages = [json.loads(ln)["stage"] for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["pref-ft"] * 4 + ["ipo"] * 3
    # generate: one personalised answer for an unseen user, through the run directory.
    user = next(json.loads(ln)["user_id"] for ln in (out / "data" / "users.jsonl").read_text().splitlines()
                if json.loads(ln)["split"] == "test")
    gen = subprocess.run([sys.executable, "-m", "fspo_engine.cli.main", "generate", "--model", str(out / "run"),
                          "--data", str(out / "data"), "--user", user, "--max-new-tokens", "5"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]
    # Re-running finds everything done and only evaluates again.
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already complete" in res.stderr
    # A tuning run's numbers: the same run scored on the val users, without training again.
    res = subprocess.run(cmd + ["--split", "val"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "run" / "eval.json").read_text())["split"] == "val"
    assert json.loads((out / "run" / "winrate.json").read_text())["split"] == "val"
