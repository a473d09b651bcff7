"""Atomic, verifiable training checkpoints.

A checkpoint is a directory `RUN/checkpoints/<stage>/step-<N>/` holding
    model/                    an HF Llama directory (config.json, safetensors, tokenizer files)
    train_state.pt            optimiser state, RNG states, data position (loaded with weights_only=True)
    optimizer/rank-R-of-W.pt  under torchrun (W > 1 ranks): rank R's optimizer shard, in place of the
                              optimizer state in train_state.pt (loaded with weights_only=True)
    COMPLETE                  JSON: every other file's size and sha256, written last
It is built under a temporary name and renamed into place, so a kill at any moment leaves either no
checkpoint or a whole one; `COMPLETE` catches a directory that was truncated or edited afterwards.

The model is full (an HF directory, gathered on rank 0). Optimizer states are keyed by parameter name:
in one process the whole state sits in train_state.pt; under torchrun every rank writes its own FSDP2
shard (plain local tensors), in parallel, with no gather of the moments (64 GB for an 8B model with AdamW)
into one host. A run resumes on any number of ranks: on as many as wrote the checkpoint, each rank reads its
own shard; on another number, rank 0 joins the shards (FSDP2 cuts dim 0 in rank order) and the full state
is re-sharded by broadcast. Not torch.distributed.checkpoint: DCP reads its `.metadata` with pickle, and
fspo-engine loads no state through pickle (weights via safetensors, the rest via
`torch.load(weights_only=True)`).

A training stage uses four functions: `save` writes its checkpoint (every rank calls it), `publish` makes
the last one's model the stage's final, `pick_resume` chooses the newest whole checkpoint as a stage starts,
and `restore` puts the optimizer and RNG states back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fspo_engine.data_gen.atomic import atomic_path, fsync_dir, write_text_atomic
from fspo_engine.engine.distributed import (
    all_gather_objects,
    barrier,
    full_optimizer_state,
    local_optimizer_state,
    sharded_optimizer_state,
    state_dict_name,
)
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.model import read_weights, save_state_dict

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d{9})$")
_SHARD_RE = re.compile(r"^rank-\d{5}-of-(\d{5})\.pt$")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str | os.PathLike, what: str = "--out"):
    """Fail now, not after minutes of work, when `path` cannot be written (its nearest existing ancestor must
    be a writable directory; the path itself must not be a directory)."""
    path = Path(path)
    if path.is_dir():
        raise FspoError(f"{what} {path}: is a directory, expected a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FspoError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FspoError(f"{what} {path}: {parent} is not writable")


def _sha256_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once: hashlib releases the GIL, so the shards of a multi-GB
    checkpoint hash in parallel instead of one after another."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def seal(directory: Path):
    """Write the COMPLETE marker listing every file's size and sha256."""
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER]
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _sha256_files(paths))}  # fmt: skip
    write_text_atomic(directory / MARKER, json.dumps({"files": files}, indent=1, sort_keys=True))


def verify(directory: Path) -> str | None:
    """None if the directory is a whole checkpoint, else the reason it is not."""
    marker = directory / MARKER
    if not marker.is_file():
        return "no COMPLETE marker (half-written)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        entries = [(str(rel), int(meta["size"]), str(meta["sha256"])) for rel, meta in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # hand-edited or torn JSON
        return f"unreadable COMPLETE marker ({type(exc).__name__}: {exc})"
    if not entries:
        return "COMPLETE marker lists no files"
    for rel, size, _ in entries:  # the cheap checks first
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has size {p.stat().st_size}, expected {size}"
    for (rel, _, digest), got in zip(entries, _sha256_files([directory / rel for rel, _, _ in entries])):
        if got != digest:
            return f"{rel} does not match its checksum"
    return None


def write_checkpoint(stage_dir: Path, step: int, write_fn, keep_last: int) -> Path:
    """Build a checkpoint with `write_fn(tmp_dir)`, seal it, rename it into place, prune old ones."""
    tmp = begin_checkpoint(stage_dir, step)
    write_fn(tmp)
    return finish_checkpoint(stage_dir, step, tmp, keep_last)


def begin_checkpoint(stage_dir: Path, step: int) -> Path:
    """The empty temporary directory a checkpoint is built in (by one process, or by every rank)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".tmp-step-{step:09d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_checkpoint(stage_dir: Path, step: int, tmp: Path, keep_last: int) -> Path:
    """Seal the built `tmp`, rename it into place as step-N, prune old checkpoints; -> the checkpoint."""
    final = stage_dir / f"step-{step:09d}"
    seal(tmp)
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step (after a resume): replace the old copy
        old = stage_dir / f".old-step-{step:09d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(stage_dir)
    # Checkpoints past this step are an abandoned future: the run resumed from an older one because these
    # were broken. Left in place they would count as the newest and prune every checkpoint written now.
    kept = [c for c in list_checkpoints(stage_dir) if step_of(c) <= step]
    for stale in [c for c in list_checkpoints(stage_dir) if step_of(c) > step] + kept[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in stage_dir.glob(".tmp-step-*"):  # from killed runs
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def list_checkpoints(stage_dir: Path) -> list[Path]:
    """Checkpoint directories of a stage, oldest first (whole or not)."""
    if not stage_dir.is_dir():
        return []
    return sorted(p for p in stage_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def missing_shards(ckpt: Path) -> str | None:
    """None if `optimizer/` (when there is one) holds the shards of every rank of one world size."""
    folder = ckpt / "optimizer"
    if not folder.is_dir():
        return None
    names = sorted(p.name for p in folder.iterdir())
    sizes = {m.group(1) for m in (_SHARD_RE.match(n) for n in names) if m}
    if len(sizes) != 1:
        return f"optimizer/ holds no single set of rank shards ({', '.join(names[:4]) or 'empty'})"
    world = int(sizes.pop())
    if names != [optimizer_shard_path(ckpt, r, world).name for r in range(world)]:
        return f"optimizer/ holds {len(names)} of its {world} rank shards"
    return None


def latest_valid(stage_dir: Path, log=print) -> Path | None:
    """The newest whole checkpoint of a stage; broken ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(stage_dir)):
        why = verify(ckpt) or missing_shards(ckpt)
        if why is None:
            return ckpt
        log(f"{ckpt}: skipping broken checkpoint: {why}")
    return None


def step_of(ckpt: Path) -> int:
    return int(_STEP_RE.match(ckpt.name).group(1))


def optimizer_shard_path(ckpt: Path, rank: int, world: int) -> Path:
    """Where rank `rank` of a `world`-rank run keeps its optimizer shard in a checkpoint."""
    return ckpt / "optimizer" / f"rank-{rank:05d}-of-{world:05d}.pt"


def save_train_state(path: Path, state: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a corrupt file; torch's own text runs to many lines
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise FspoError(f"{path}: unreadable training state ({first})") from None


def rng_state() -> dict:
    import random

    state = {"torch": torch.get_rng_state(), "python": list(_flatten_py_state(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    import random

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"][0], tuple(state["python"][1:-1]), state["python"][-1]
    random.setstate((version, internal, None if gauss == "none" else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten_py_state(st):
    # random.getstate() = (version, tuple of 625 ints, gauss_next); weights_only loads lists of ints/floats/str.
    version, internal, gauss = st
    return [version, *internal, "none" if gauss is None else gauss]


# ----------------------------------------------------------------------------------------------------------
# A training stage's checkpoints


def save(stage_dir: Path, step: int, model, optimizer, tokenizer_dir: Path, *, dtype: torch.dtype, keep_last: int,
         rank: int = 0, world: int = 1) -> Path:
    """Checkpoint step `step` of a stage into `stage_dir`; -> the checkpoint. A collective under torchrun:
    every rank calls it.

    The model as a full HF directory (in `dtype`) from rank 0. The optimizer state keyed by parameter name:
    whole in train_state.pt in one process; under torchrun each rank writes its own shard into the checkpoint
    rank 0 builds (no gather of the Adam moments into one host), and a resume on any number of ranks can read
    them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    is_main = rank == 0
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)
    train_state = {"step": step, "rng": rng_state()}
    tmp = begin_checkpoint(stage_dir, step) if is_main else None
    if world > 1:
        tmp = Path(all_gather_objects(str(tmp) if is_main else None)[0])
        save_train_state(optimizer_shard_path(tmp, rank, world),
                         local_optimizer_state(get_optimizer_state_dict(model, optimizer)))
        train_state["optimizer_shards"] = world
        barrier()  # every shard is written before rank 0 seals the checkpoint
        missing = [r for r in range(world) if is_main and not optimizer_shard_path(tmp, r, world).is_file()]
        if missing:
            raise FspoError(f"{tmp}: rank(s) {missing} saved their optimizer shards out of rank 0's sight: under "
                            "torchrun, --out must be a directory that every rank sees (a shared filesystem)")
    else:
        train_state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=full)
    final = stage_dir / f"step-{step:09d}"
    if is_main:
        save_state_dict(model_state, model.config, tmp / "model", tokenizer_dir=tokenizer_dir, dtype=dtype)
        save_train_state(tmp / "train_state.pt", train_state)
        final = finish_checkpoint(stage_dir, step, tmp, keep_last)
    barrier()
    return final


def publish(model_dir: Path, final: Path, dtype: torch.dtype | None, config):
    """A checkpoint's `model_dir` as the HF directory `final` (a stage's final model), cast to `dtype` unless
    None, sealed, and renamed into place."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    if dtype is not None:
        save_state_dict(read_weights(tmp), config, tmp, dtype=dtype)
    seal(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@dataclass
class Resume:
    """The checkpoint a stage resumes from. Every rank holds the same `path` and the state's step, rng and
    optimizer_shards; only rank 0 holds a single-process checkpoint's optimizer state."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return self.state["step"]


def pick_resume(stage_dir: Path, rank: int = 0, world: int = 1, log=print) -> Resume | None:
    """The newest whole checkpoint of a stage, or None. Rank 0 verifies the checkpoints (hashing every file)
    and reads the training state; the other ranks take its choice, step and RNG state."""
    resume_from, state = None, {}
    if rank == 0:
        resume_from = latest_valid(stage_dir, log=log)
        if resume_from is not None:
            state = load_train_state(resume_from / "train_state.pt")
    if world > 1:
        picked = all_gather_objects((str(resume_from) if resume_from else None, state.get("step"),
                                     state.get("rng"), state.get("optimizer_shards"))
                                    if rank == 0 else None)[0]  # fmt: skip
        resume_from = Path(picked[0]) if picked[0] else None
        state = {**state, "step": picked[1], "rng": picked[2], "optimizer_shards": picked[3]}
    return Resume(resume_from, state) if resume_from is not None else None


def restore(resume: Resume, model, optimizer, rank: int = 0, world: int = 1):
    """The optimizer state and RNG states of `resume`, into the policy loaded from its model/ and a new optimizer.

    On as many ranks as wrote the checkpoint, each rank reads its own optimizer shard. Otherwise rank 0 holds
    the full state (joined from another number of ranks' shards) and shares it by broadcast: an 8B model's
    Adam moments are 64 GB, never loaded into host memory once per rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = resume.state
    shards = state.get("optimizer_shards")
    if shards is not None and shards == world:  # as many ranks as wrote it: each reads its own
        try:
            local, why = load_train_state(optimizer_shard_path(resume.path, rank, shards)), None
        except FspoError as exc:
            local, why = None, str(exc)
        why = next((w for w in all_gather_objects(why) if w), None)
        if why:  # every rank stops here, together: none is left waiting in a collective
            raise FspoError(why)
        set_optimizer_state_dict(model, optimizer, sharded_optimizer_state(local, model),
                                 options=StateDictOptions(full_state_dict=False))
    else:
        optim_state = {}
        if rank == 0:
            optim_state = state["optimizer"] if shards is None else full_optimizer_state(
                [load_train_state(optimizer_shard_path(resume.path, r, shards)) for r in range(shards)])
            optim_state = _by_name(optim_state, model, optimizer)
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=world > 1))
    set_rng_state(state["rng"])


def _by_name(optim_state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state keyed by parameter name, as checkpoints hold it. Single-process checkpoints of
    fspo-engine before 2026-11-28 hold `optimizer.state_dict()` (integer ids in optimizer order): re-keyed."""
    groups = optim_state.get("param_groups", [])
    if not groups or not all(isinstance(i, int) for g in groups for i in g["params"]):
        return optim_state
    names = {id(p): state_dict_name(n) for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups]}
