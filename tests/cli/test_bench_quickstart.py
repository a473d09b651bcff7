"""`fspo-engine bench quickstart --aggregate-only`: the seeds' mean and spread, from their eval/winrate files."""

from __future__ import annotations

import json

import pytest
from helpers import cli_in_process as cli


def _seed(root, seed, accs, win, split="test"):
    run = root / f"seed-{seed}" / "run"
    run.mkdir(parents=True)
    results = [{"shots": n, "accuracy": a, "ci95": [a - 0.05, a + 0.05], "bayes_optimal": 0.5 + n / 20}
               for n, a in zip((0, 2, 8), accs)]
    (run / "eval.json").write_text(json.dumps({"split": split, "results": results, "ci95_method": "users"}))
    (run / "winrate.json").write_text(json.dumps({"split": split, "winrate": win, "ci95": [win - 0.1, win + 0.1]}))


def test_aggregate_seeds(tmp_path):
    _seed(tmp_path, 0, (0.50, 0.60, 0.90), 0.70)
    _seed(tmp_path, 1, (0.54, 0.70, 0.96), 0.90)
    res = cli("bench", "quickstart", "--seeds", "0,1", "--out", str(tmp_path), "--aggregate-only")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "seeds.json").read_text())
    acc = summary["accuracy"]["2"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.65) and acc["std"] == pytest.approx(0.0707107, abs=1e-6)
    assert (acc["min"], acc["max"]) == (0.6, 0.7)
    assert summary["winrate"]["mean"] == pytest.approx(0.8)
    table = (tmp_path / "seeds.md").read_text()
    assert "0.650 ± 0.071" in table and "0.600 – 0.700" in table and "mean 0.800" in table
    assert (tmp_path / "seeds.png").stat().st_size > 0
    # Seeds scored on another split are refused, not mixed in.
    _seed(tmp_path, 2, (0.5, 0.6, 0.9), 0.7, split="val")
    res = cli("bench", "quickstart", "--seeds", "0,2", "--out", str(tmp_path), "--aggregate-only")
    assert res.returncode != 0
