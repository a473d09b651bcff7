"""engine/checkpoint.py: checkpoints load in transformers, damaged ones are skipped, older formats resume, and
every rank's shard is required."""

from __future__ import annotations

import json
import shutil

import torch
import transformers
from helpers import SMALL, cli, read_metrics, write_fixture

from fspo_engine.engine import checkpoint as ckpt


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


def test_resume_from_an_older_single_process_checkpoint(tmp_path):
    """Single-process checkpoints of earlier fspo-engine versions hold optimizer.state_dict() (integer
    parameter ids): they still resume, exactly, also with activation checkpointing (whose wrapper renames
    the blocks' parameters in named_parameters())."""
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
