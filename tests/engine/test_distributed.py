"""FSDP2 under torchrun (2 ranks, gloo on CPU) trains exactly like one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import SMALL, write_fixture

from fspo_engine.engine import checkpoint as ckpt

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


_TRAIN_SETS = ("--set", "pref_ft.steps=3", "--set", "pref.steps=3", "--set", "optim.lr=2e-3", "--set", "pref.beta=0.5",
               "--set", "batch.episodes=6")


def _train(cmd_prefix, data, out, extra=()):
    args = [*cmd_prefix, "-m", "fspo_engine.cli.main", "train", "--data", str(data), "--out", str(out), *SMALL,
            *_TRAIN_SETS, *extra]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_rank_fsdp2_matches_single_process(tmp_path):
    data = write_fixture(tmp_path / "data")
    held_out = ("--set", "run.eval_every=2", "--set", "run.eval_episodes=7")  # 7: the ranks' shares differ
    single = _train([sys.executable], data, tmp_path / "single", held_out)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    dist = _train([torchrun, "--standalone", "--nproc_per_node=2"], data, tmp_path / "dist", held_out)
    assert [(r["stage"], r["step"]) for r in single] == [(r["stage"], r["step"]) for r in dist]
    assert {r["stage"] for r in dist} == {"pref-ft", "ipo"}
    for a, b in zip(single, dist):
        # Same global batch, same loss; only the order of floating-point reductions differs.
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), (a, b)
        if "rewards/accuracy" in a:
            assert a["rewards/accuracy"] == b["rewards/accuracy"]
        assert ("eval/loss" in a) == ("eval/loss" in b) == (a["step"] in (2, 3)), (a, b)
        for key in ("eval/loss", "eval/nll_per_token", "eval/rewards/accuracy"):
            if key in a:  # held-out scoring split over ranks (padded rows), gathered back in order
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a, b)
    # Rank 0 wrote one run directory; the checkpoint it gathered from the shards loads as a plain model.
    from fspo_engine.engine.model import load_model

    a = load_model(tmp_path / "single" / "ipo")
    b = load_model(tmp_path / "dist" / "ipo")
    for (name, pa), (_, pb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert (pa - pb).abs().max() <= 1e-4 * max(1.0, pa.abs().max().item()), name


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_two_rank_resume_restores_sharded_optimizer_state(tmp_path):
    """A 2-rank run resumed from a mid-stage checkpoint (each rank's optimizer shard, read back by the rank
    that wrote it) logs the same losses as the uninterrupted 2-rank run; so do one process and three ranks
    resuming it (the shards joined on rank 0, re-sharded by broadcast)."""
    data = write_fixture(tmp_path / "data")
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2"]
    # 5 steps, checkpoints at 2, 4 and 5; steps 4 and 5 depend on the Adam moments saved at step 2.
    extra = ("--stage", "pref-ft", "--save-every", "2", "--set", "run.keep_last=3", "--set", "pref_ft.steps=5")
    whole = _train(torchrun, data, tmp_path / "whole", extra)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    # As if killed right after the step-2 checkpoint: later checkpoints, the final model and the record of
    # the finished stage are gone (metrics lines past step 2 stay, as a killed run leaves them).
    for step in (4, 5):
        shutil.rmtree(cut / "checkpoints" / "pref-ft" / f"step-{step:09d}")
    shutil.rmtree(cut / "pref-ft")
    (cut / "run.json").unlink()
    step2 = cut / "checkpoints" / "pref-ft" / "step-000000002"
    # Each rank wrote its own optimizer shard; the training state holds no optimizer (nothing was gathered).
    assert sorted(p.name for p in (step2 / "optimizer").iterdir()) == ["rank-00000-of-00002.pt",
                                                                       "rank-00001-of-00002.pt"]
    state = torch.load(step2 / "train_state.pt", weights_only=True)
    assert "optimizer" not in state and state["optimizer_shards"] == 2
    cut_single, cut_three = tmp_path / "cut_single", tmp_path / "cut_three"
    shutil.copytree(cut, cut_single)
    shutil.copytree(cut, cut_three)
    resumed = _train(torchrun, data, cut, (*extra, "--resume"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(whole, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, a["grad_norm"]), (a, b)
    # The same checkpoint resumed by one process (checkpoints are full states keyed by parameter name):
    # same global batch, so the same losses up to the order of floating-point reductions.
    single = _train([sys.executable], data, cut_single, (*extra, "--resume"))
    assert [r["step"] for r in single] == [1, 2, 3, 4, 5]
    for a, b in zip(whole, single):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), (a, b)
    three = _train([*torchrun[:-1], "--nproc_per_node=3"], data, cut_three, (*extra, "--resume"))
    assert [r["step"] for r in three] == [1, 2, 3, 4, 5]
    for a, b in zip(whole, three):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), (a, b)
    # The 3-rank resume wrote 3 shards at steps 4 and 5.
    assert len(list((cut_three / "checkpoints" / "pref-ft" / "step-000000004" / "optimizer").iterdir())) == 3
    # A shard that passes its checksum (re-sealed) but is not a tensor file: rank 1 fails to read it, and every
    # rank stops together with one error line (none is left in a collective, no gloo traceback).
    bad = cut_three / "checkpoints" / "pref-ft" / "step-000000005"
    (bad / "optimizer" / "rank-00001-of-00003.pt").write_bytes(b"not a checkpoint")
    (bad / "COMPLETE").unlink()
    ckpt.seal(bad)
    shutil.rmtree(cut_three / "pref-ft")
    (cut_three / "run.json").unlink()
    res = subprocess.run([*torchrun[:-1], "--nproc_per_node=3", "-m", "fspo_engine.cli.main", "train", "--data",
                          str(data), "--out", str(cut_three), *SMALL, *_TRAIN_SETS, *extra, "--resume"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode != 0 and len(errors) == 1 and "rank-00001-of-00003.pt" in errors[0], res.stderr[-3000:]
    assert "unreadable training state" in errors[0] and "Connection closed" not in res.stderr, res.stderr[-3000:]


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_bad_input_under_torchrun_is_reported_once(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "fspo_engine.cli.main", "train",
                          "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), *SMALL],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'missing'}: not a dataset directory"], res.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_one_worker_dies_with_a_killed_torchrun(tmp_path):
    """torchrun --nproc_per_node=1 sets WORLD_SIZE=1, but a kill -9 of the launcher must still end the worker:
    an orphan would train on and hold the run directory against the user's --resume."""
    import signal
    import time

    data = write_fixture(tmp_path / "data")
    run = tmp_path / "run"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=1", "-m", "fspo_engine.cli.main",
                                 "train", "--data", str(data), "--out", str(run), *SMALL, "--save-every", "1",
                                 "--stage", "pref-ft", "--set", "pref_ft.steps=100000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not list((run / "checkpoints" / "pref-ft").glob("step-*")):  # training for real
            assert time.time() < deadline and launcher.poll() is None, "the run never reached its first checkpoint"
            time.sleep(0.1)
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == launcher.pid]
        assert workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        time.sleep(3)
        alive = [w for w in workers if _alive(w)]
        for w in alive:
            os.kill(w, signal.SIGKILL)
        assert not alive, "the worker outlived its launcher"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# Every worker script ends alike: all ranks agree, then leave the group.
_WORKER_END = """dist.barrier()
print(f"rank {rank}: ok", flush=True)
# Leave the group before exit: gloo threads torn down by interpreter exit can abort one rank (SIGABRT).
dist.destroy_process_group()
"""

_SHARDED_LOAD_WORKER = r'''
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fspo_engine.engine.distributed import init_distributed, load_sharded, parallelize
from fspo_engine.engine.model import load_model

init_distributed("cpu")
rank, world = dist.get_rank(), dist.get_world_size()
failures = []
for model_dir in sys.argv[1:]:
    for dtype in (torch.float32, torch.bfloat16):
        sharded = load_sharded(model_dir, dtype, torch.device("cpu"), activation_checkpointing=True)
        # The plain path: load the whole model, then shard it.
        whole = parallelize(load_model(model_dir, dtype=dtype), activation_checkpointing=True)
        a, b = dict(sharded.named_parameters()), dict(whole.named_parameters())
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for name in a:
            assert isinstance(a[name], DTensor) and a[name].dtype == dtype, name
            local_rows = a[name].to_local().shape[0]
            if not torch.equal(a[name].to_local(), b[name].to_local()):
                failures.append(f"{model_dir} {dtype} {name}: rank {rank}'s shard differs")
            if not torch.equal(a[name].full_tensor(), b[name].full_tensor()):
                failures.append(f"{model_dir} {dtype} {name}: gathered tensor differs")
        # The shard really is a shard: this rank holds ceil(n / world) rows or fewer, not the whole tensor.
        emb = a["model.embed_tokens.weight"]
        assert emb.to_local().shape[0] <= -(-emb.shape[0] // world) < emb.shape[0]
        assert (sharded.lm_head is None) == (whole.lm_head is None) == whole.config.tie_word_embeddings, model_dir
        # One training step moves both alike (the sharded copy is a working FSDP2 module, not just storage).
        ids = torch.arange(3 + rank, 40 + rank) % sharded.config.vocab_size
        pos, zeros = torch.arange(len(ids)), torch.zeros_like(ids)
        for m in (sharded, whole):
            m.logits(m(ids, pos, zeros, zeros)).float().logsumexp(-1).mean().backward()
        for name in a:
            if not torch.equal(a[name].grad.to_local(), b[name].grad.to_local()):
                failures.append(f"{model_dir} {dtype} {name}: gradient differs")
assert not failures, failures
''' + _WORKER_END


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_sharded_load_equals_loading_whole_then_sharding(tmp_path):
    """Under torchrun the policy's weights are read straight into each rank's FSDP2 shards. On 3 ranks with
    sizes that do not divide (vocab 1001, hidden 48: uneven and empty-free chunks), tied and untied, stored in
    fp32 and bf16, and loaded as fp32 and bf16: bitwise the shards, full tensors and gradients of loading the
    whole model and sharding it."""
    from helpers import make_tiny_model_dir

    dirs = [make_tiny_model_dir(tmp_path / "untied", vocab_size=1001, hidden_size=48, num_heads=4,
                                num_kv_heads=2, intermediate_size=91, tokenizer=False),
            make_tiny_model_dir(tmp_path / "tied_bf16", vocab_size=1001, hidden_size=48, num_heads=4,
                                num_kv_heads=2, intermediate_size=91, tie=True, tokenizer=False,
                                dtype=torch.bfloat16)]
    worker = tmp_path / "worker.py"
    worker.write_text(_SHARDED_LOAD_WORKER)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node=3", str(worker), *map(str, dirs)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert all(f"rank {r}: ok" in res.stdout for r in range(3)), res.stdout  # ranks' lines may interleave


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_bench_checkpoint_smoke(tmp_path):
    """`bench checkpoint` runs its four variants on 2 ranks and writes its table, JSON and plot; each rank's
    own shards are half the model (the floor it reports next to the peaks)."""
    res = subprocess.run([sys.executable, "-m", "fspo_engine.cli.main", "bench", "checkpoint", "--size", "small",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["variant"] for r in results] == ["load: sharded read", "load: whole-then-shard",
                                               "save optimizer: per-rank shards", "save optimizer: gathered on rank 0"]
    for r in results:
        assert "failed" not in r, r
        assert [x["rank"] for x in r["ranks"]] == [0, 1]
        assert sum(x["shard_bytes"] for x in r["ranks"]) == r["model_bytes"]
        assert r["seconds"] > 0
    assert (tmp_path / "checkpoint.png").stat().st_size > 0
    assert "per-rank shards" in (tmp_path / "results.md").read_text()


_SCORE_SHARE_WORKER = r'''
import sys

import torch
import torch.distributed as dist

from fspo_engine.engine.distributed import init_distributed, load_sharded
from fspo_engine.engine.model import load_model
from fspo_engine.engine.packing import PackItem
from fspo_engine.engine.scoring import score_episodes, score_share

init_distributed("cpu")
rank, world = dist.get_rank(), dist.get_world_size()
model_dir = sys.argv[1]
g = torch.Generator().manual_seed(5)


def item(i, ctx):
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()
    return PackItem(ids(ctx), [ids(1 + i % 5), ids(2 + i % 3)], f"e{i}")


# Rank 0's share packs into more rows than rank 1's (long episodes at even indices), and the last case
# has fewer episodes than ranks: the rank without a share still joins every forward.
cases = {"uneven": [item(i, 70 if i % 2 == 0 else 5) for i in range(7)], "one episode": [item(0, 9)]}
sharded = load_sharded(model_dir, torch.float32, torch.device("cpu")).eval()
whole = load_model(model_dir).eval()
for name, episodes in cases.items():
    mine = score_share(sharded, episodes, 80, rank, world, impl="torch")
    ref = score_episodes(whole, episodes[rank::world], 80, impl="torch")
    for a, b in ((mine.chosen, ref.chosen), (mine.rejected, ref.rejected)):
        # The sharded model gathers the very same weights and runs the same ops: the numbers are bitwise equal.
        assert torch.equal(a, b), (name, (a - b).abs().max())
    assert mine.chosen_tokens.tolist() == ref.chosen_tokens.tolist(), name
''' + _WORKER_END


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_score_share_keeps_sharded_ranks_in_step(tmp_path):
    """Reference log-probs under torchrun come from a sharded model, whose every forward is a collective:
    ranks whose shares pack into fewer rows (or none) run padding forwards. Without them the job hangs;
    with them each rank's numbers equal an unsharded model's on its share."""
    from helpers import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "m", vocab_size=300, tokenizer=False)
    worker = tmp_path / "worker.py"
    worker.write_text(_SCORE_SHARE_WORKER)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    try:
        res = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(worker), str(model_dir)],
                             capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks fell out of step (a collective never completed)")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert all(f"rank {r}: ok" in res.stdout for r in range(2)), res.stdout
