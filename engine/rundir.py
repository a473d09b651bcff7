"""The run directory of `fspo-engine train --out`: who may write it, and its bookkeeping files.

    config.toml            the resolved config (a resumed run must match it)
    run.json               stages done, their final models, which model is the reference
    metrics.jsonl          one line per logged optimiser step
    tokenizer/             the tokenizer trained on the data (from-scratch runs)
    checkpoints/<stage>/step-N/   atomic, sealed checkpoints (engine/checkpoint.py)
    <stage>/               the stage's final model, an HF directory
    reference/             cached reference log-probs (engine/reference.py)
    loss_curve.png, tensorboard/   (engine/metrics.py)

One run writes it at a time: the trainer holds an exclusive flock on the directory for its life (rank 0
under torchrun), and only then removes what a killed run left half-written. A directory that is not a run
is never adopted, and one that holds nothing worth resuming is removed after a failed start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from fspo_engine.engine import checkpoint as ckpt
from fspo_engine.engine.config import TrainConfig, load_config, tomllib
from fspo_engine.engine.distributed import all_reduce_sum, barrier, world
from fspo_engine.engine.errors import FspoError

STAGES = ("pref-ft", "ipo", "dpo")  # each with checkpoints/<stage>/ and its final model in <stage>/

# Keys a resumed run may change: they decide what is logged, shown or kept, not what is trained.
_FREE_ON_RESUME = ("progress", "tensorboard", "keep_last", "log_every", "eval_every", "eval_episodes")


class RunDir:
    """The run directory `out` of this process's run. Rank 0 writes; every method may be called on every rank."""

    def __init__(self, out: Path, log=print):
        self.out = out
        self.metrics_path = out / "metrics.jsonl"
        self.is_main = world()[0] == 0
        self.log = log
        self._lock_fd = None

    def prepare(self, cfg: TrainConfig, resume: bool):
        """Check that `out` is this run's (new, empty, or a run with the same config and --resume), lock it,
        remove a killed run's leftovers and write config.toml. Raises FspoError, on every rank, otherwise."""
        cfg_path = self.out / "config.toml"
        text = cfg.resolved_toml()
        started = (self.out / "checkpoints").is_dir() or (self.out / "run.json").is_file()
        if cfg_path.is_file() and started:
            if not resume:
                raise FspoError(f"{self.out}: already holds a run; pass --resume to continue it or pick a new --out")
            # Compared as configs, not as text: a key a newer fspo-engine added reads as its default.
            if _training_part(load_config(cfg_path)) != _training_part(cfg):
                old = cfg_path.read_text(encoding="utf-8", errors="replace")
                raise FspoError(f"{cfg_path}: --resume with a different config: {_config_diff(old, text)}")
        if self.out.exists() and not self.out.is_dir():
            raise FspoError(f"{self.out}: exists and is not a directory")
        if self.out.is_dir() and not cfg_path.is_file() and not started and \
                any(not p.name.startswith(".") for p in self.out.iterdir()):  # .DS_Store, .gitkeep: empty
            # Not a run: the trainer would write into it and replace folders it happens to name (tokenizer/,
            # pref-ft/, ipo/). Nothing was changed.
            raise FspoError(f"{self.out}: exists, is not empty and holds no run; pick a new --out (or an empty "
                            "directory)")  # fmt: skip
        if resume and not started:  # e.g. a job script that always passes --resume, on its first start
            self.log(f"--resume: {self.out} holds no run yet; starting a new one")
        barrier()  # every rank has checked before rank 0 writes
        busy = 0.0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            busy = 0.0 if self._lock() else 1.0
        if all_reduce_sum([busy])[0]:  # every rank fails, none waits at a barrier for rank 0
            raise FspoError(f"{self.out}: another training run is using this directory (still running, or "
                            "orphaned workers of a killed torchrun: stop them first)")  # fmt: skip
        if self.is_main:
            _remove_leftovers(self.out)
            if not started:  # leftovers of an attempt that died before its first checkpoint: start clean
                shutil.rmtree(self.out / "tokenizer", ignore_errors=True)
            ckpt.atomic_write_text(cfg_path, text)
        barrier()

    def _lock(self) -> bool:
        """Hold an exclusive flock on the run directory for this process's life (False: another holds it).

        Two jobs writing one run (a --resume started while a killed torchrun's workers still train)
        would interleave checkpoints and metrics. The kernel drops the lock when the process dies, kill -9
        included, so a stale lock never blocks a resume."""
        self._lock_fd = _try_lock(self.out)
        return self._lock_fd is not None

    def release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the run directory's lock
            self._lock_fd = None

    def read_info(self, data_root: Path, data_fp: str) -> dict:
        """run.json, or a new run's: a resumed run must see the data it started on (`data_fp`), or it cannot
        reproduce the uninterrupted run."""
        p = self.out / "run.json"
        if not p.is_file():
            return {"stages": {}, "reference": None, "data": str(data_root), "data_fp": data_fp}
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(info, dict) or not isinstance(info.get("stages"), dict):
                raise ValueError("expected an object with a 'stages' object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise FspoError(f"{p}: unreadable ({exc})") from None
        if info.get("data_fp", data_fp) != data_fp:
            raise FspoError(f"{data_root}: not the dataset this run started on ({info.get('data')}); "
                            "--resume needs the same data")  # fmt: skip
        info.setdefault("data_fp", data_fp)
        return info

    def write_info(self, info: dict):
        if self.is_main:
            ckpt.atomic_write_text(self.out / "run.json", json.dumps(info, indent=2, sort_keys=True))

    def append_metrics(self, record: dict):
        if self.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                f.flush()

    def truncate_metrics(self, stage: str, step: int):
        if self.is_main and self.metrics_path.is_file():
            truncate_metrics(self.metrics_path, stage, step)


def truncate_metrics(path: Path, stage: str, step: int):
    """As `stage` starts at `step`, drop its metric lines past that step (written by a killed run after its
    checkpoint) and torn lines. Other stages' lines stay: a later stage that resumes from its own checkpoint
    keeps its history (each stage truncates itself when it starts). Lines are ordered by stage, then step, as
    an uninterrupted run writes them."""
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or rec.get("stage") == stage and rec.get("step", 0) > step:
            continue
        keep.append((rec.get("stage"), rec.get("step", 0), line))
    # Pref-FT first, then the other stages in the order they first appear (a run's stage_order names only
    # its latest command's stages: `--stage ipo` after `--stage pref-ft` must not move Pref-FT's lines).
    first = {}
    for s, _, _ in keep:
        first.setdefault(s, len(first))
    keep.sort(key=lambda r: (r[0] != "pref-ft", first[r[0]], r[1] if isinstance(r[1], int) else 0))
    ckpt.atomic_write_text(path, "".join(f"{ln}\n" for _, _, ln in keep))


def discard_if_unstarted(out: Path) -> bool:
    """Remove a run directory that holds no sealed checkpoint and no finished stage (a run that failed or
    was interrupted before it had anything worth resuming), so a failed start leaves nothing behind.
    Rank 0 only under torchrun. True when removed."""
    if world()[0] != 0 or not out.is_dir():
        return False
    if any(ckpt.list_checkpoints(stage) for stage in (out / "checkpoints").glob("*") if stage.is_dir()):
        return False
    if any(ckpt.verify(d.parent) is None for d in out.glob("*/COMPLETE")):
        return False
    fd = _try_lock(out)
    if fd is None:  # another run holds it (two jobs started on one --out): it is theirs, not ours to remove
        return False
    try:
        shutil.rmtree(out, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _training_part(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the run keys of _FREE_ON_RESUME at their defaults, for comparing a resume's config."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **{k: getattr(type(cfg.run)(), k)
                                                                       for k in _FREE_ON_RESUME}))


def _config_diff(old: str, new: str) -> str:
    """`section.key: old -> new` for the keys two resolved configs disagree on (first five)."""

    def flat(text):
        try:
            tree = tomllib.loads(text)
        except ValueError:
            return {}
        return {f"{sec}.{k}": v for sec, body in tree.items() if isinstance(body, dict) for k, v in body.items()}

    a, b = flat(old), flat(new)
    diff = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]  # fmt: skip
    return "; ".join(diff[:5]) or "the file was edited"


def _remove_leftovers(out: Path):
    """Temporary files and folders of a killed run (a model copy can be GBs). Called while holding the run
    directory's lock, so no live writer owns them. eval's temporaries are left alone (eval takes no lock)."""
    names = [f".{n}.tmp-*" for n in ("tokenizer", *STAGES, "run.json", "config.toml", "metrics.jsonl",
                                     "loss_curve.png")]  # fmt: skip
    found = [p for pattern in names for p in out.glob(pattern)]
    found += [p for pattern in ("*/.tmp-step-*", "*/.old-step-*") for p in (out / "checkpoints").glob(pattern)]
    found += list((out / "reference").glob(".*.tmp-*"))
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _try_lock(directory: Path) -> int | None:
    """An exclusive flock on `directory`: the open fd, or None when another process holds it. The kernel
    drops the lock when the fd closes or the process dies (kill -9 included). Without fcntl (Windows) the
    fd is returned unlocked."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        import fcntl
    except ImportError:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a filesystem without flock (some FUSE/NFS mounts): run unlocked, as without fcntl
        return fd
    return fd
