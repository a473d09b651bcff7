"""engine/rundir.py: who may write a run directory, its bookkeeping (run.json, metrics.jsonl, config.toml on
--resume), and `load_run`."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import SMALL, cli, make_tiny_model_dir, read_metrics, write_fixture

from fspo_engine.engine import checkpoint as ckpt
from fspo_engine.engine.config import TrainConfig, load_config
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.rundir import (
    RunInfo,
    StageRecord,
    _try_lock,
    discard_if_unstarted,
    load_run,
    truncate_metrics,
)
from fspo_engine.engine.train import Trainer


def test_resume_requires_same_config_and_fresh_run_refuses_existing_dir(tmp_path):
    data = write_fixture(tmp_path / "data")
    run = tmp_path / "run"
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--stage", "pref-ft", "--max-steps", "1")
    assert res.returncode == 0, res.stderr
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--stage", "pref-ft", "--max-steps", "1")
    assert res.returncode == 1 and "--resume" in res.stderr
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--stage", "pref-ft", "--max-steps", "2",
              "--resume")
    assert res.returncode == 1 and "different config" in res.stderr and "Traceback" not in res.stderr
    # A config.toml written before a key existed (an older fspo-engine) resumes: the key reads as its default.
    cfg_text = (run / "config.toml").read_text()
    (run / "config.toml").write_text("\n".join(ln for ln in cfg_text.splitlines() if not ln.startswith("save_dtype")))
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--stage", "pref-ft", "--max-steps", "1",
              "--resume", "--set", "run.log_every=5", "--set", "run.keep_last=4")  # logging keys may change
    assert res.returncode == 0 and "already complete" in res.stderr, res.stderr
    # --resume on a directory with no run yet (a job script that always passes it) starts one, and says so.
    # (Its stderr is not a terminal: plain progress lines, no bar of carriage returns.)
    res = cli("train", "--data", str(data), "--out", str(tmp_path / "new"), *SMALL, "--stage", "pref-ft",
              "--max-steps", "1", "--resume", "--set", "run.progress=true")
    assert res.returncode == 0 and "holds no run yet" in res.stderr, res.stderr
    assert "[pref-ft] step 1/1: loss" in res.stderr and "\r" not in res.stderr, res.stderr
    # A second job on a run directory that a live process holds (e.g. orphaned torchrun workers) is refused.
    import fcntl

    fd = os.open(run, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--stage", "pref-ft", "--max-steps", "1",
                  "--resume")
    finally:
        os.close(fd)
    assert res.returncode == 1 and "another training run is using this directory" in res.stderr, res.stderr
    other = write_fixture(tmp_path / "other", seed=1)  # same shape, other texts
    res = cli("train", "--data", str(other), "--out", str(run), *SMALL, "--stage", "pref-ft", "--max-steps", "1",
              "--resume")
    assert res.returncode == 1 and "not the dataset this run started on" in res.stderr, res.stderr
    # A run's final model is sealed: a flipped byte is refused by score/eval, not scored as garbage.
    weights = run / "pref-ft" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    res = cli("score", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "s.jsonl"))
    assert res.returncode == 1 and "damaged model" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "s.jsonl").exists()


def test_run_directory_ownership(tmp_path):
    """The trainer never adopts or deletes a directory that is not its run: a non-empty --out that holds no
    run is refused untouched; a failed start never removes a directory another process holds; a Trainer
    that fails after taking the lock releases it (a corrected retry in the same process works)."""
    data = write_fixture(tmp_path / "data")
    mine = tmp_path / "project"
    (mine / "tokenizer").mkdir(parents=True)
    (mine / "tokenizer" / "notes.txt").write_text("keep me")
    res = cli("train", "--data", str(data), "--out", str(mine), *SMALL, "--max-steps", "1")
    assert res.returncode == 1 and "holds no run" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert sorted(p.name for p in mine.rglob("*")) == ["notes.txt", "tokenizer"]

    other = tmp_path / "other-job"
    other.mkdir()
    fd = _try_lock(other)  # as the job that won the race for this --out holds it
    try:
        assert not discard_if_unstarted(other) and other.is_dir()
    finally:
        os.close(fd)
    assert discard_if_unstarted(other) and not other.exists()

    run = tmp_path / "run"
    cfg = load_config(None, {"model.hidden_size": 32, "model.num_hidden_layers": 1, "model.vocab_size": 400,
                             "run.progress": False})
    Trainer(cfg, str(data), str(run), log=lambda m: None).close()
    (run / "run.json").write_text("{torn")
    with pytest.raises(FspoError, match="unreadable"):
        Trainer(cfg, str(data), str(run), resume=True, log=lambda m: None)
    (run / "run.json").unlink()
    # Leftovers of a killed run: a half-copied final, a checkpoint being replaced. Removed under the lock.
    (run / ".pref-ft.tmp-999").mkdir()
    (run / ".pref-ft.tmp-999" / "model.safetensors").write_bytes(b"x" * 100)
    (run / "checkpoints" / "pref-ft" / ".old-step-000000002-999").mkdir(parents=True)
    Trainer(cfg, str(data), str(run), resume=True, log=lambda m: None).close()  # not "another training run"
    assert not (run / ".pref-ft.tmp-999").exists()
    assert not (run / "checkpoints" / "pref-ft" / ".old-step-000000002-999").exists()


def test_resume_in_a_later_stage_keeps_its_history_after_republishing_an_earlier_final(tmp_path):
    """Killed mid-IPO with the Pref-FT final lost: --resume republishes Pref-FT from its last checkpoint and
    IPO resumes from its own; metrics.jsonl ends as the uninterrupted run's (IPO's first steps kept)."""
    data = write_fixture(tmp_path / "data")
    args = [*SMALL, "--set", "pref_ft.steps=4", "--set", "pref.steps=4", "--save-every", "2",
            "--set", "run.keep_last=3"]
    whole = tmp_path / "whole"
    res = cli("train", "--data", str(data), "--out", str(whole), *args)
    assert res.returncode == 0, res.stderr
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "ipo" / "step-000000004")
    for final in ("ipo", "pref-ft"):
        shutil.rmtree(cut / final)
    info = json.loads((cut / "run.json").read_text())
    info["stages"] = {}
    (cut / "run.json").write_text(json.dumps(info))
    res = cli("train", "--data", str(data), "--out", str(cut), *args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr and "step 2" in res.stderr, res.stderr
    a, b = read_metrics(whole), read_metrics(cut)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"])) for x, y in zip(a, b))


def test_metrics_stay_ordered_when_a_later_command_runs_one_stage(tmp_path):
    """`--stage pref-ft`, then `--stage ipo` (its run.json stage_order is ["ipo"]) resumed after a kill:
    metrics.jsonl keeps Pref-FT's lines first, each stage's in step order."""
    lines = [{"stage": "pref-ft", "step": i} for i in (1, 2, 3)] + [{"stage": "ipo", "step": i} for i in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    # As a resumed `--stage ipo` finds it: IPO's first lines, Pref-FT's (rewritten by an earlier truncation),
    # IPO's lines past its checkpoint (step 2), and a torn line.
    order = [lines[3], lines[4], lines[0], lines[1], lines[2], lines[5]]
    path.write_text("".join(json.dumps(r) + "\n" for r in order) + '{"stage": "ip')
    truncate_metrics(path, "ipo", 2)
    assert read_metrics(tmp_path) == lines[:5]


def _fake_run(tmp_path, hf_dir, stages=("pref-ft", "ipo"), order=None, config: dict | None = None):
    """A run directory as the trainer leaves it: run.json, config.toml and each stage's sealed final (a copy of
    `hf_dir`)."""
    run = tmp_path / "run"
    run.mkdir()
    info = RunInfo(data="data", data_fp="fp", stage_order=list(order or stages), reference="pref-ft")
    for s in stages:
        shutil.copytree(hf_dir, run / s)
        ckpt.seal(run / s)
        info.stages[s] = StageRecord(final=s, steps=2, checkpoint=f"checkpoints/{s}/step-000000002")
    (run / "run.json").write_text(info.text())
    (run / "config.toml").write_text(load_config(None, config or {}).resolved_toml())
    return run


def test_load_run_reads_a_run_or_a_plain_model_directory(tmp_path):
    hf_dir = make_tiny_model_dir(tmp_path / "hf")
    plain = load_run(hf_dir)
    assert (plain.policy, plain.reference, plain.info) == (hf_dir, None, None)
    assert plain.config == TrainConfig()  # scored as a model trained elsewhere: bos, drop_oldest_shots, sums

    run = _fake_run(tmp_path, hf_dir, config={"data.bos": False, "data.user_description": True,
                                              "pref.length_normalize": True})  # fmt: skip
    loaded = load_run(run)
    assert (loaded.policy, loaded.reference) == (run / "ipo", run / "pref-ft")
    assert not loaded.config.data.bos and loaded.config.data.user_description and loaded.config.pref.length_normalize
    assert loaded.info == RunInfo.read(run / "run.json") and loaded.info.last_stage == "ipo"
    assert RunInfo.read(run / "run.json").text() == (run / "run.json").read_text()  # read and written alike
    # `--stage pref-ft` run again after IPO: the run stands for Pref-FT, which has no reference.
    info = loaded.info
    info.stage_order = ["pref-ft"]
    (run / "run.json").write_text(info.text())
    assert (load_run(run).policy, load_run(run).reference) == (run / "pref-ft", None)


def test_load_run_refuses_what_it_cannot_stand_for(tmp_path):
    hf_dir = make_tiny_model_dir(tmp_path / "hf")
    with pytest.raises(FspoError, match="not a model directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FspoError, match=r"neither a run directory \(run.json\) nor a model directory"):
        load_run(tmp_path / "empty")
    run = _fake_run(tmp_path, hf_dir, stages=("pref-ft",), order=("pref-ft", "ipo"))
    info = RunInfo.read(run / "run.json")
    (run / "run.json").write_text(RunInfo(data="d", data_fp=None, stage_order=["ipo"]).text())
    with pytest.raises(FspoError, match="no finished stage"):
        load_run(run)
    for torn in ("{torn", "[]", '{"stages": {"pref-ft": {"steps": 1}}}', '{"stages": {}, "stage_order": "ipo"}'):
        (run / "run.json").write_text(torn)
        with pytest.raises(FspoError, match="run.json: unreadable"):
            load_run(run)
    (run / "run.json").write_text(info.text())
    weights = run / "pref-ft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(FspoError, match="damaged model"):
        load_run(run)


def test_train_from_a_run_directory_starts_from_its_final_policy(tmp_path):
    """--model RUN: the run's final policy, spelled once (absolute) in config.toml, so that --resume compares
    equal from any working directory."""
    hf_dir = make_tiny_model_dir(tmp_path / "hf")
    source = _fake_run(tmp_path, hf_dir)
    data = write_fixture(tmp_path / "data")
    out = tmp_path / "finetuned"
    cfg = load_config(None, {"model.name": os.path.relpath(source), "run.progress": False, "data.shots": "2"})
    Trainer(cfg, str(data), str(out), log=lambda m: None).close()
    assert load_config(out / "config.toml").model.name == str((source / "ipo").resolve())
