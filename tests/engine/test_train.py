"""The trainer: losses, learning, exact resume after kill -9, checkpoint integrity, config errors."""

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
from safetensors.torch import load_file, save_file

from fspo_engine.engine import checkpoint as ckpt
from fspo_engine.engine.config import load_config
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.losses import dpo_loss, ipo_loss, reward_metrics, sft_loss


def write_fixture(root, users=16, prefs_per_user=8, seed=0, everyone_upbeat=False):
    """A small dataset with one clear trait: half the users prefer upbeat replies, half gloomy ones
    (or, with `everyone_upbeat`, a preference learnable without reading the shots)."""
    import random

    r = random.Random(seed)
    up, down = "great lovely superb bright happy".split(), "awful dull poor grey sad".split()
    root.mkdir(parents=True, exist_ok=True)
    us, ps = [], []
    for u in range(users):
        likes_up = everyone_upbeat or u % 2 == 0
        us.append({"user_id": f"u{u:02d}", "domain": "reviews", "split": "test" if u >= users - 4 else "train",
                   "description": f"prefers {'upbeat' if likes_up else 'gloomy'} replies",
                   "traits": {"tone": "upbeat" if likes_up else "gloomy"}})
        for k in range(prefs_per_user):
            a = " ".join(r.choice(up) for _ in range(3))
            b = " ".join(r.choice(down) for _ in range(3))
            c, d = (a, b) if likes_up else (b, a)
            ps.append({"pref_id": f"u{u:02d}-{k}", "user_id": f"u{u:02d}", "question": f"how was item {k}?",
                       "chosen": c, "rejected": d})
    (root / "manifest.json").write_text(json.dumps({"format": "fspo-prefs/1", "domains": ["reviews"], "seed": seed,
                                                    "generator": {}, "counts": {"users": users, "prefs": len(ps)}}))
    (root / "users.jsonl").write_text("".join(json.dumps(x) + "\n" for x in us))
    (root / "prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ps))
    return root


SMALL = ["--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=2", "--set", "model.vocab_size=400",
         "--set", "batch.episodes=6", "--set", "data.max_tokens=512", "--shots", "1-3",
         "--set", "run.progress=false"]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fspo_engine.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_metrics(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ losses


def test_losses_against_hand_computed_values():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    # h = (pc - pr) - (rc - rr) = [1 - (-0.5), -3 - (-1)] = [1.5, -2.0]
    beta = 0.5
    assert math.isclose(ipo_loss(pc, pr, rc, rr, beta).item(), ((1.5 - 1.0) ** 2 + (-2.0 - 1.0) ** 2) / 2)
    sig = lambda x: 1 / (1 + math.exp(-x))
    expect = -(math.log(sig(0.75)) + math.log(sig(-1.0))) / 2
    assert math.isclose(dpo_loss(pc, pr, rc, rr, beta).item(), expect, rel_tol=1e-6)
    eps = 0.1
    smooth = -((1 - eps) * math.log(sig(0.75)) + eps * math.log(sig(-0.75))
               + (1 - eps) * math.log(sig(-1.0)) + eps * math.log(sig(1.0))) / 2
    assert math.isclose(dpo_loss(pc, pr, rc, rr, beta, eps).item(), smooth, rel_tol=1e-6)
    assert math.isclose(sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])).item(), 2.0)
    # "sum": each response's summed NLL, averaged over responses (the released `-policy_chosen_logps`, .mean()).
    assert math.isclose(sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1]), "sum").item(), 4.0)
    m = reward_metrics(pc, pr, rc, rr, beta)
    assert math.isclose(m["rewards/chosen"], (0.5 * 0.5 + 0.5 * -1.0) / 2)
    assert m["rewards/accuracy"] == 0.5
    assert math.isclose(m["rewards/margin"], beta * (1.5 - 2.0) / 2)


# ------------------------------------------------------------------------------------------------ config


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlrr = 3\n")
    with pytest.raises(FspoError, match="unknown key optim.lrr"):
        load_config(bad)
    bad.write_text("[optim]\nlr = 'fast'\n")
    with pytest.raises(FspoError, match="optim.lr: expected float"):
        load_config(bad)
    bad.write_text("[nope]\nx = 1\n")
    with pytest.raises(FspoError, match=r"unknown section \[nope\]"):
        load_config(bad)
    bad.write_text("[pref]\nloss = 'kto'\n")
    with pytest.raises(FspoError, match="pref.loss"):
        load_config(bad)
    bad.write_text("[optim\n")
    with pytest.raises(FspoError, match=str(bad)):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text("[optim]\nlr = 3e-4\n[data]\nshots = 4\n")
    cfg = load_config(good, {"pref.beta": 0.25})
    assert cfg.optim.lr == 3e-4 and cfg.data.shots == "4" and cfg.pref.beta == 0.25
    for key, value in (("optim.lr", float("nan")), ("optim.beta1", 2.0), ("optim.eps", -1.0),
                       ("optim.min_lr_ratio", -2.0), ("optim.grad_clip", -1.0), ("pref_ft.lr", -0.01),
                       ("run.log_every", 0), ("model.num_hidden_layers", -1), ("model.hidden_size", 30),
                       ("model.num_attention_heads", -1),
                       ("data.seed", -1), ("data.max_tokens", 8), ("model.save_dtype", "int8"),
                       ("optim.name", "adam"), ("optim.alpha", 1.0), ("pref_ft.targets", "rejected"),
                       ("pref_ft.reduction", "none"), ("pref_ft.episodes", -1), ("pref_ft.epochs", -1),
                       ("data.episode_sampling", "windows"), ("data.truncate", "keep_end"),
                       ("data.rejected_description", "other")):  # fmt: skip
        with pytest.raises(FspoError, match=key.replace(".", r"\.")):
            load_config(None, {key: value})
    # Keys that only make sense together.
    for overrides, key in (({"optim.name": "rmsprop", "optim.weight_decay": 0.1}, "optim.weight_decay"),
                           ({"data.episode_sampling": "official_windows", "data.shots": "1-8"}, "data.shots"),
                           ({"data.episode_sampling": "official_windows", "data.episodes_per_user": 2},
                            "data.episodes_per_user")):  # fmt: skip
        with pytest.raises(FspoError, match=key.replace(".", r"\.")):
            load_config(None, overrides)
    # The shipped recipe loads; a config.toml written before the recipe's keys existed reads them as defaults.
    official = load_config(Path(__file__).resolve().parents[2] / "configs" / "official.toml")
    assert (official.optim.name, official.pref_ft.targets, official.pref_ft.reduction, official.data.bos,
            official.data.episode_sampling, official.data.truncate) == ("rmsprop", "both", "sum", False,
                                                                        "official_windows", "keep_start")  # fmt: skip
    new_keys = {"optim": {"name", "alpha"}, "pref_ft": {"targets", "reduction", "episodes", "epochs"},
                "pref": {"epochs"}, "data": {"episode_sampling", "truncate", "bos", "rejected_description"}}
    lines, section = [], ""
    for ln in official.resolved_toml().splitlines():
        section = ln.strip("[]") if ln.startswith("[") else section
        if ln.split(" = ")[0] not in new_keys.get(section, ()):
            lines.append(ln)
    (tmp_path / "older.toml").write_text("\n".join(lines))
    older = load_config(tmp_path / "older.toml")
    assert older.optim.name == "adamw" and older.data.bos and older.optim.lr == official.optim.lr
    bad.write_bytes("\ufeff[optim]\nlr = 3e-4\n".encode())  # a BOM, as Windows editors write
    assert load_config(bad).optim.lr == 3e-4
    # The resolved TOML reads back to the same config.
    again = tmp_path / "again.toml"
    again.write_text(cfg.resolved_toml())
    assert load_config(again) == cfg


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


# ------------------------------------------------------------------------------------------------ training


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


def test_checkpoint_loads_in_transformers_with_same_logprobs(tmp_path):
    from fspo_engine.engine.dataset import load_dataset
    from fspo_engine.engine.episodes import sample_episodes, tokenize_episodes
    from fspo_engine.engine.model import load_model
    from fspo_engine.engine.scoring import score_episodes
    from fspo_engine.engine.tokenizer import load_tokenizer

    data = write_fixture(tmp_path / "data")
    run = tmp_path / "run"
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--stage", "pref-ft", "--max-steps", "3")
    assert res.returncode == 0, res.stderr
    model_dir = ckpt.latest_valid(run / "checkpoints" / "pref-ft") / "model"
    tok = load_tokenizer(model_dir)
    eps = tokenize_episodes(sample_episodes(load_dataset(data), "test", 2, seed=0)[:4], tok)
    ours = score_episodes(load_model(model_dir).eval(), eps, max_tokens=512)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, ep in enumerate(eps):
        for resp, got in ((ep.chosen_ids, ours.chosen[i]), (ep.rejected_ids, ours.rejected[i])):
            ids = torch.tensor([ep.prompt_ids + resp])
            with torch.no_grad():
                logp = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
            n = len(ep.prompt_ids)
            ref = sum(logp[n - 1 + j, t].item() for j, t in enumerate(resp))
            assert abs(got.item() - ref) / abs(ref) < 1e-4


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


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    data = write_fixture(tmp_path / "data")
    run = tmp_path / "run"
    args = [*SMALL, "--stage", "pref-ft", "--set", "pref_ft.steps=4", "--save-every", "2", "--set", "run.keep_last=3"]
    res = cli("train", "--data", str(data), "--out", str(run), *args)
    assert res.returncode == 0, res.stderr
    stage = run / "checkpoints" / "pref-ft"
    assert [p.name for p in ckpt.list_checkpoints(stage)] == ["step-000000002", "step-000000004"]
    # Flip bytes inside the newest checkpoint's weights: the checksum catches it.
    w = stage / "step-000000004" / "model" / "model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-5] ^= 0xFF
    w.write_bytes(bytes(blob))
    assert "checksum" in ckpt.verify(stage / "step-000000004")
    seen = []
    assert ckpt.latest_valid(stage, log=seen.append) == stage / "step-000000002"
    assert seen and "step-000000004" in seen[0]
    # The stage had finished; make it resume: forget that it finished, then --resume redoes steps 3-4.
    info = json.loads((run / "run.json").read_text())
    info["stages"] = {}
    (run / "run.json").write_text(json.dumps(info))
    before = read_metrics(run)
    res = cli("train", "--data", str(data), "--out", str(run), *args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "skipping broken checkpoint" in res.stderr
    after = read_metrics(run)
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert all(abs(x["loss"] - y["loss"]) < 1e-6 for x, y in zip(before, after))


def test_resume_in_a_later_stage_keeps_its_history_after_republishing_an_earlier_final(tmp_path):
    """Killed mid-IPO with the Pref-FT final lost: --resume republishes Pref-FT from its last checkpoint and
    IPO resumes from its own; metrics.jsonl ends as the uninterrupted run's (IPO's first steps kept)."""
    import shutil

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


def test_resume_from_an_older_single_process_checkpoint(tmp_path):
    """Single-process checkpoints of earlier fspo-engine versions hold optimizer.state_dict() (integer
    parameter ids): they still resume, exactly, also with activation checkpointing (whose wrapper renames
    the blocks' parameters in named_parameters())."""
    import shutil

    data = write_fixture(tmp_path / "data")
    args = [*SMALL, "--stage", "pref-ft", "--set", "pref_ft.steps=4", "--save-every", "2", "--set", "run.keep_last=3",
            "--set", "model.activation_checkpointing=true"]
    whole = tmp_path / "whole"
    assert cli("train", "--data", str(data), "--out", str(whole), *args).returncode == 0
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "pref-ft" / "step-000000004")
    shutil.rmtree(cut / "pref-ft")
    (cut / "run.json").unlink()
    step2 = cut / "checkpoints" / "pref-ft" / "step-000000002"
    state = torch.load(step2 / "train_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    state["optimizer"] = {"state": {index[n]: v for n, v in state["optimizer"]["state"].items()},
                          "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]}
    torch.save(state, step2 / "train_state.pt")
    (step2 / "COMPLETE").unlink()
    ckpt.seal(step2)
    res = cli("train", "--data", str(data), "--out", str(cut), *args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(whole), read_metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"])) for x, y in zip(a, b))


def test_held_out_eval_during_training(tmp_path):
    """run.eval_every logs held-out metrics (test users) without moving training; the last ones equal an
    independent scoring of the stage finals."""
    from fspo_engine.engine.model import load_model
    from fspo_engine.engine.scoring import score_episodes
    from fspo_engine.engine.train import Trainer

    data = write_fixture(tmp_path / "data")
    args = [*SMALL, "--set", "pref_ft.steps=4", "--set", "pref.steps=4", "--set", "pref.beta=0.5",
            "--set", "optim.lr=2e-3", "--set", "data.user_description=true"]
    plain, run = tmp_path / "plain", tmp_path / "run"
    assert cli("train", "--data", str(data), "--out", str(plain), *args).returncode == 0
    res = cli("train", "--data", str(data), "--out", str(run), *args, "--set", "run.eval_every=3",
              "--set", "run.eval_episodes=10")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(plain), read_metrics(run)
    assert [(r["stage"], r["step"], r["loss"]) for r in a] == [(r["stage"], r["step"], r["loss"]) for r in b]
    ev = [r for r in b if "eval/loss" in r]
    assert [(r["stage"], r["step"]) for r in ev] == [("pref-ft", 3), ("pref-ft", 4), ("ipo", 3), ("ipo", 4)]
    assert 0.0 <= ev[-1]["eval/rewards/accuracy"] <= 1.0 and "eval/rewards/accuracy" not in ev[0]
    assert (run / "loss_curve.png").stat().st_size > 0

    cfg = load_config(run / "config.toml")
    trainer = Trainer(cfg, str(data), str(run), resume=True, log=lambda m: None)
    pref_ft, ipo = load_model(run / "pref-ft").eval(), load_model(run / "ipo").eval()
    eps = trainer.validator.episodes(pref_ft)
    trainer.close()
    assert len(eps) == 10
    ref = score_episodes(pref_ft, eps, cfg.data.max_tokens)
    pol = score_episodes(ipo, eps, cfg.data.max_tokens)
    nll = -(ref.chosen.double().sum() / ref.chosen_tokens.sum()).item()
    assert abs(nll - ev[1]["eval/loss"]) <= 1e-5 * abs(nll), (nll, ev[1])
    want = ipo_loss(pol.chosen, pol.rejected, ref.chosen, ref.rejected, 0.5).item()
    assert abs(want - ev[3]["eval/loss"]) <= 1e-5 * max(1.0, abs(want)), (want, ev[3])
    want = reward_metrics(pol.chosen, pol.rejected, ref.chosen, ref.rejected, 0.5)["rewards/accuracy"]
    assert want == ev[3]["eval/rewards/accuracy"]
    assert ev[3]["eval/episodes"] == 10
    # The held-out episodes carry the users' true descriptions: every record and the log line say "oracle".
    assert all(r["eval/description"] == "oracle" for r in ev)
    assert "true descriptions: oracle" in res.stderr and "oracle" in res.stderr.split("held-out:")[1]
    # eval scores the run the way it trained (user descriptions first) unless told otherwise.
    res = cli("eval", "--model", str(run), "--data", str(data), "--shots", "1")
    assert res.returncode == 0 and json.loads((run / "eval.json").read_text())["user_description"] is True
    res = cli("eval", "--model", str(run), "--data", str(data), "--shots", "1", "--no-user-description")
    assert res.returncode == 0 and json.loads((run / "eval.json").read_text())["user_description"] is False


def test_metrics_stay_ordered_when_a_later_command_runs_one_stage(tmp_path):
    """`--stage pref-ft`, then `--stage ipo` (its run.json stage_order is ["ipo"]) resumed after a kill:
    metrics.jsonl keeps Pref-FT's lines first, each stage's in step order."""
    from fspo_engine.engine.rundir import truncate_metrics

    lines = [{"stage": "pref-ft", "step": i} for i in (1, 2, 3)] + [{"stage": "ipo", "step": i} for i in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    # As a resumed `--stage ipo` finds it: IPO's first lines, Pref-FT's (rewritten by an earlier truncation),
    # IPO's lines past its checkpoint (step 2), and a torn line.
    order = [lines[3], lines[4], lines[0], lines[1], lines[2], lines[5]]
    path.write_text("".join(json.dumps(r) + "\n" for r in order) + '{"stage": "ip')
    truncate_metrics(path, "ipo", 2)
    assert read_metrics(tmp_path) == lines[:5]


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
    from fspo_engine.engine.rundir import _try_lock, discard_if_unstarted
    from fspo_engine.engine.train import Trainer

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


def test_a_checkpoint_without_every_ranks_optimizer_shard_is_skipped(tmp_path):
    """A torchrun checkpoint is whole only with one optimizer shard per rank. One sealed without a rank's
    shard (a rank that wrote elsewhere) is skipped for the one before, as a damaged checkpoint is."""
    stage = tmp_path / "pref-ft"

    def write(step, shards):
        def fill(tmp):
            ckpt.save_train_state(tmp / "train_state.pt", {"step": step})
            for rank, world in shards:
                ckpt.save_train_state(ckpt.optimizer_shard_path(tmp, rank, world), {"rank": rank})
        return ckpt.write_checkpoint(stage, step, fill, keep_last=10)

    write(2, [(0, 2), (1, 2)])
    write(4, [(0, 3), (1, 3), (2, 3)])  # resumed on 3 ranks: whole
    write(6, [(0, 3), (2, 3)])
    write(8, [(0, 2), (1, 3), (2, 3)])
    logs = []
    assert ckpt.latest_valid(stage, log=logs.append) == stage / "step-000000004"
    assert "2 of its 3 rank shards" in logs[1] and "no single set" in logs[0], logs
    assert ckpt.missing_shards(stage / "step-000000002") is None


def test_write_checkpoint_drops_an_abandoned_future(tmp_path):
    """A run that resumed past broken newer checkpoints drops them when it saves: kept, they would count as
    the newest and keep_last would prune every checkpoint the resumed run writes."""
    stage = tmp_path / "stage"
    for step in (2, 4):
        ckpt.write_checkpoint(stage, step, lambda d, s=step: (d / "x").write_text(str(s)), keep_last=3)
    (stage / "step-000000004" / "x").write_text("bit rot")
    assert ckpt.latest_valid(stage, log=lambda m: None) == stage / "step-000000002"
    ckpt.write_checkpoint(stage, 3, lambda d: (d / "x").write_text("3"), keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(stage)] == ["step-000000003"]
    assert ckpt.verify(stage / "step-000000003") is None


def test_finetune_a_transformers_checkpoint_and_dpo_stage(tmp_path):
    """The real-user path: --model HF_DIR (bf16 weights, its own tokenizer, tied embeddings), Pref-FT then
    DPO; with model.save_dtype=source the finals come back in bf16 (checkpoints keep fp32 master weights)
    and load in transformers; eval uses the run's reference."""
    from helpers import make_tiny_model_dir
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


def test_a_warning_about_the_users_checkpoint_is_one_line_once(tmp_path):
    """A tied config whose files hold a different lm_head loads untied, with a warning. The DPO stage reads
    that directory twice (policy and reference): the user sees one `warning:` line, not a Python warning
    per load pointing into our code."""
    from helpers import make_tiny_model_dir

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
    from helpers import make_tiny_model_dir

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
