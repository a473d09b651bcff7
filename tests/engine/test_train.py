"""The training loop (engine/train.py): learning, exact resume after kill -9, fine-tuning an HF checkpoint,
stages and their losses, divergence, model shape overrides."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import SMALL, cli, make_tiny_model_dir, read_metrics, write_fixture
from safetensors.torch import load_file, save_file

from fspo_engine.engine import checkpoint as ckpt


@pytest.mark.slow
def test_pref_ft_learns_and_ipo_accuracy_rises(tmp_path):
    data = write_fixture(tmp_path / "data", users=20, prefs_per_user=10, everyone_upbeat=True)
    run = tmp_path / "run"
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--set", "pref_ft.steps=40",
              "--set", "pref.steps=40", "--set", "optim.lr=3e-3", "--set", "pref.beta=0.5",
              "--set", "optim.warmup_steps=5")
    assert res.returncode == 0, res.stderr
    recs = read_metrics(run)
    sft = [r["loss"] for r in recs if r["stage"] == "pref-ft"]
    ipo = [r for r in recs if r["stage"] == "ipo"]
    assert len(sft) == 40 and len(ipo) == 40
    assert sum(sft[-5:]) / 5 < 0.6 * sum(sft[:5]) / 5
    # Step 1 runs the policy at its initialisation, which is the reference: the cached reference
    # log-probs must agree with it, so every implicit reward starts at zero.
    assert abs(ipo[0]["rewards/margin"]) < 1e-4 and abs(ipo[0]["rewards/chosen"]) < 1e-4
    last_acc = sum(r["rewards/accuracy"] for r in ipo[-5:]) / 5
    last_margin = sum(r["rewards/margin"] for r in ipo[-5:]) / 5
    # IPO pulls beta * h towards beta / (2 beta) = 0.5.
    assert last_acc > 0.9 and 0.25 < last_margin < 1.0, (last_acc, last_margin)
    for key in ("lr", "grad_norm", "tokens_per_s", "episodes_per_s", "rewards/chosen", "rewards/margin"):
        assert key in ipo[-1]
    assert (run / "loss_curve.png").stat().st_size > 1000
    info = json.loads((run / "run.json").read_text())
    assert info["reference"] == "pref-ft"
    # The reference was scored once per planned epoch and cached.
    assert len(list((run / "reference").glob("ref-*.pt"))) >= 1


@pytest.mark.slow
def test_kill9_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    kill9_and_resume(tmp_path, [*SMALL, "--set", "pref_ft.steps=8", "--set", "pref.steps=8", "--save-every", "2",
                                "--set", "optim.lr=2e-3", "--set", "pref.beta=0.5"])


@pytest.mark.slow
def test_kill9_and_resume_with_the_released_recipes_rmsprop_and_data(tmp_path):
    """RMSprop's state (its squared-gradient averages) resumes exactly like AdamW's, and so do the released
    recipe's episodes (official windows, keep_start, no bos) and its Pref-FT (both responses, summed)."""
    kill9_and_resume(tmp_path, ["--config", str(Path(__file__).resolve().parents[2] / "configs" / "official.toml"),
                                *SMALL, "--shots", "2", "--set", "pref_ft.epochs=0", "--set", "pref.epochs=0",
                                "--set", "pref_ft.steps=8", "--set", "pref.steps=8", "--save-every", "2",
                                "--set", "optim.lr=2e-3", "--set", "pref_ft.lr=2e-3", "--set", "pref.lr=1e-3",
                                "--set", "optim.warmup_steps=2"])


def kill9_and_resume(tmp_path, args):
    """A run killed with SIGKILL mid Pref-FT and mid IPO, resumed each time, logs the uninterrupted run's
    losses."""
    data = write_fixture(tmp_path / "data")
    whole = tmp_path / "whole"
    res = cli("train", "--data", str(data), "--out", str(whole), *args)
    assert res.returncode == 0, res.stderr

    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "fspo_engine.cli.main", "train", "--data", str(data), "--out", str(cut), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Kill -9 twice: once mid pref-ft, once mid ipo (after its first checkpoint), resuming each time.
    for marker in (cut / "checkpoints" / "pref-ft" / "step-000000004", cut / "checkpoints" / "ipo" / "step-000000002"):
        proc = subprocess.Popen(cmd + (["--resume"] if cut.exists() else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # A half-written newer checkpoint (no COMPLETE marker) must be ignored.
    torn = cut / "checkpoints" / "ipo" / "step-000000006"
    if not torn.exists():
        torn.mkdir(parents=True)
        (torn / "train_state.pt").write_bytes(b"\x00" * 10)
    res = cli("train", "--data", str(data), "--out", str(cut), *args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "[pref-ft] already complete" in res.stderr and "[ipo] resuming from" in res.stderr, res.stderr

    a, b = read_metrics(whole), read_metrics(cut)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 * max(1.0, abs(ra["loss"])), (ra, rb)


def test_finetune_a_transformers_checkpoint_and_dpo_stage(tmp_path):
    """The real-user path: --model HF_DIR (bf16 weights, its own tokenizer, tied embeddings), Pref-FT then
    DPO; with model.save_dtype=source the finals come back in bf16 (checkpoints keep fp32 master weights)
    and load in transformers; eval uses the run's reference."""
    from safetensors import safe_open

    data = write_fixture(tmp_path / "data")
    hf_dir = make_tiny_model_dir(tmp_path / "hf", tie=True, init_std=0.02, dtype=torch.bfloat16)
    run = tmp_path / "run"
    res = cli("train", "--data", str(data), "--out", str(run), "--model", str(hf_dir), "--shots", "2",
              "--set", "pref.loss=dpo", "--set", "pref.label_smoothing=0.1", "--set", "batch.episodes=4",
              "--set", "pref_ft.steps=2", "--set", "pref.steps=2", "--set", "run.progress=false",
              "--set", "model.save_dtype=source")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_metrics(run)
    assert [r["stage"] for r in recs] == ["pref-ft", "pref-ft", "dpo", "dpo"]
    assert not (run / "tokenizer").exists()  # the checkpoint's own tokenizer is used, not a new one
    final = run / "dpo"
    assert (final / "tokenizer.json").is_file() or (final / "tokenizer.model").is_file()
    assert json.loads((final / "config.json").read_text())["tie_word_embeddings"] is True
    transformers.AutoModelForCausalLM.from_pretrained(final)

    def dtypes(model_dir):
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            return {f.get_slice(name).get_dtype() for name in f.keys()}

    assert dtypes(final) == dtypes(run / "pref-ft") == {"BF16"}
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert ckpt.verify(final) is None  # sealed after the cast
    assert dtypes(ckpt.latest_valid(run / "checkpoints" / "dpo") / "model") == {"F32"}
    res = cli("eval", "--model", str(run), "--data", str(data), "--shots", "0,2")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((run / "eval.json").read_text())
    # Finals are cast (save_dtype=source): DPO started from, and scored its reference with, Pref-FT's master
    # weights (its last checkpoint), not the bf16 final; at DPO's first step policy and reference agree.
    assert report["method"] == "implicit_reward" and report["reference"].endswith("checkpoints/pref-ft/step-000000002/model")
    assert abs(recs[2]["rewards/margin"]) < 1e-5 and recs[2]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert report["length_normalized"] is False  # as the run trained (pref.length_normalize = false)
    res = cli("eval", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "report.png"))
    assert res.returncode == 1 and "PNG" in res.stderr and not (tmp_path / "report.png").exists(), res.stderr
    res = cli("eval", "--model", str(run), "--data", str(data), "--shots", "1_0")
    assert res.returncode == 1 and "--shots" in res.stderr, res.stderr
    # A question of the user's own choosing: every one of their 8 preferences can be a shot.
    res = cli("generate", "--model", str(run), "--data", str(data), "--user", "u00", "--question", "how was it?",
              "--shots", "8", "--max-new-tokens", "2", "--show-prompt")
    assert res.returncode == 0 and res.stdout.count("# Example") == 8, res.stdout[-2000:] + res.stderr[-2000:]


def test_divergence_stops_with_a_clear_message_and_keeps_checkpoints(tmp_path):
    data = write_fixture(tmp_path / "data")
    run = tmp_path / "run"
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--stage", "pref-ft", "--max-steps", "6",
              "--save-every", "1", "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "loss is nan" in res.stderr or "gradient norm is" in res.stderr, res.stderr
    kept = ckpt.list_checkpoints(run / "checkpoints" / "pref-ft")
    assert kept and all(ckpt.verify(c) is None for c in kept)
    assert str(kept[-1]) in res.stderr


def test_stage_names_its_loss_and_a_too_small_vocab_fails_before_writing(tmp_path):
    """`--stage dpo` runs DPO and `--stage ipo` IPO whatever pref.loss says: at step 1 the policy is its own
    reference (margin 0), so DPO's loss is ln 2 and IPO's (1/(2β))². A model whose embedding is smaller than
    the ids its tokenizer emits is refused before the run directory exists."""
    data = write_fixture(tmp_path / "data")
    hf_dir = make_tiny_model_dir(tmp_path / "hf")
    common = ["--data", str(data), "--model", str(hf_dir), "--shots", "2", "--max-steps", "1",
              "--set", "batch.episodes=4", "--set", "run.progress=false"]
    for stage, loss_setting, want in (("dpo", "ipo", math.log(2)), ("ipo", "dpo", 25.0)):
        run = tmp_path / f"run-{stage}"
        res = cli("train", "--out", str(run), "--stage", stage, "--set", f"pref.loss={loss_setting}", *common)
        assert res.returncode == 0, res.stderr[-3000:]
        (rec,) = read_metrics(run)
        assert rec["stage"] == stage and math.isclose(rec["loss"], want, rel_tol=1e-5), rec

    cfg_path = hf_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vocab_size"] = 200  # the tokenizer emits ids up to ~320
    cfg_path.write_text(json.dumps(cfg))
    weights = hf_dir / "model.safetensors"
    save_file({k: v[:200] if v.shape[0] == 320 else v for k, v in load_file(weights).items()}, weights)
    run = tmp_path / "run-small"
    res = cli("train", "--out", str(run), *common)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "beyond the model's vocab_size 200" in res.stderr
    assert not run.exists()
    for cmd in (["eval", "--model", str(hf_dir), "--data", str(data), "--shots", "1"],
                ["generate", "--model", str(hf_dir), "--data", str(data), "--user", "u00",
                 "--max-new-tokens", "2"]):  # fmt: skip
        res = cli(*cmd)
        assert res.returncode == 1 and "beyond the model's vocab_size 200" in res.stderr, res.stderr[-2000:]


def test_from_scratch_width_depth_and_heads_overrides_shape_the_model(tmp_path):
    """model.hidden_size / num_hidden_layers / num_attention_heads reshape a named size trained from scratch
    (key/value heads follow the heads: full multi-head); heads that do not divide the width are refused
    before anything is written."""
    from fspo_engine.engine.model import read_config

    data = write_fixture(tmp_path / "data")
    run = tmp_path / "run"
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--set", "model.num_attention_heads=8",
              "--max-steps", "1", "--stage", "pref-ft")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = read_config(run / "pref-ft")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (32, 2, 8, 8, 4)
    bad = tmp_path / "bad"
    res = cli("train", "--data", str(data), "--out", str(bad), *SMALL, "--set", "model.num_attention_heads=3",
              "--max-steps", "1")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "num_attention_heads = 3 does not divide the width 32" in res.stderr and not bad.exists()
