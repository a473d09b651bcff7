"""`fspo-engine train` on the command line: bad arguments give one line and leave nothing behind; a warning
about the user's checkpoint is one `warning:` line."""

from __future__ import annotations

import json
import os

from helpers import SMALL, cli, make_tiny_model_dir, write_fixture


def test_cli_errors_are_one_line(tmp_path):
    data = write_fixture(tmp_path / "data")
    (tmp_path / "a_file").write_text("x")
    test_only = write_fixture(tmp_path / "test_only", users=4)  # every user held out: nothing to train on
    for args, needle in (
        (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r1")], "missing"),
        (["--data", str(test_only), "--out", str(tmp_path / "r5"), *SMALL], "no training episodes"),
        (["--data", str(data), "--out", str(tmp_path / "r6"), *SMALL, "--set", "data.max_tokens=20"], "do not fit"),
        (["--data", str(data), "--out", str(tmp_path / "r7"), "--device", "cuda:7"], "--device"),
        (["--data", str(data), "--out", str(tmp_path / "a_file" / "run")], "a_file"),
        (["--data", str(data), "--out", str(tmp_path / "r2"), "--set", "optim.lr=-1"], "optim.lr"),
        (["--data", str(data), "--out", str(tmp_path / "r3"), "--set", "optim.nope=1"], "unknown key optim.nope"),
        (["--data", str(data), "--out", str(tmp_path / "r4"), "--model", str(tmp_path)], "config.json"),
    ):
        res = cli("train", *args)
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        assert needle in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        out = args[args.index("--out") + 1]
        assert not os.path.exists(out), f"a failed start left {out} behind"


def test_a_warning_about_the_users_checkpoint_is_one_line_once(tmp_path):
    """A tied config whose files hold a different lm_head loads untied, with a warning. The DPO stage reads
    that directory twice (policy and reference): the user sees one `warning:` line, not a Python warning
    per load pointing into our code."""
    data = write_fixture(tmp_path / "data")
    hf_dir = make_tiny_model_dir(tmp_path / "hf", tie=False, init_std=0.02)
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    res = cli("train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", str(hf_dir), "--stage", "dpo",
              "--shots", "2", "--set", "batch.episodes=2", "--set", "pref.steps=1", "--set", "run.progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    warned = [ln for ln in res.stderr.splitlines() if "untied" in ln]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {hf_dir}: config.json ties"), res.stderr[-3000:]
    assert "UserWarning" not in res.stderr
