"""A tiny end-to-end run checked against its stored loss curve (a regression guard for numerics).

The curve was recorded with torch 2.13 on CPU. Regenerate it deliberately, after a change that is meant to
alter training numerics, with `FSPO_UPDATE_CURVES=1 pytest tests/engine/test_loss_curve.py`, and say why in
the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import SMALL, cli, read_metrics, write_fixture

CURVE = Path(__file__).resolve().parents[1] / "data" / "loss_curve_tiny.json"
KEYS = ("loss", "grad_norm", "rewards/margin")  # not accuracy: a discrete count can flip on float noise


@pytest.mark.slow
def test_tiny_run_matches_stored_loss_curve(tmp_path):
    data = write_fixture(tmp_path / "data")
    run = tmp_path / "run"
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--set", "pref_ft.steps=6",
              "--set", "pref.steps=6", "--set", "optim.lr=2e-3", "--set", "pref.beta=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    got = [{k: r[k] for k in ("stage", "step", *KEYS) if k in r} for r in read_metrics(run)]
    if os.environ.get("FSPO_UPDATE_CURVES"):
        CURVE.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"rewrote {CURVE}")
    want = json.loads(CURVE.read_text())
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    for g, w in zip(got, want):
        for k in KEYS:
            if k in w:
                # Float noise across CPUs/BLAS builds is ~1e-6; a real change moves these by far more.
                assert abs(g[k] - w[k]) <= 1e-4 * max(1.0, abs(w[k])), (g["stage"], g["step"], k, g[k], w[k])
