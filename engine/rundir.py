"""The run directory of `fspo-engine train --out`: who may write it, its bookkeeping files, and how the other
commands read it (`load_run`).

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

    run = load_run("runs/r1")     # or a plain HF model directory
    run.policy, run.reference     # the model to evaluate and, after IPO/DPO, its reference
    run.config.data.bos           # the run's TrainConfig (the defaults for a plain directory)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fspo_engine.data_gen.atomic import stale_temps, write_text_atomic
from fspo_engine.engine import checkpoint as ckpt
from fspo_engine.engine.config import TrainConfig, load_config, tomllib
from fspo_engine.engine.distributed import all_reduce_sum, barrier, world
from fspo_engine.engine.errors import FspoError

STAGES = ("pref-ft", "ipo", "dpo")  # each with checkpoints/<stage>/ and its final model in <stage>/

# Keys a resumed run may change: they decide what is logged, shown or kept, not what is trained.
_FREE_ON_RESUME = ("progress", "tensorboard", "keep_last", "log_every", "eval_every", "eval_episodes")


@dataclass
class StageRecord:
    """A finished stage, as run.json records it."""

    final: str  # the stage's final model (an HF directory), relative to the run directory
    steps: int  # optimiser steps trained
    checkpoint: str = ""  # the sealed checkpoint the final was published from, relative to the run directory


@dataclass
class RunInfo:
    """run.json: what the run has done. Written by the trainer (rank 0) after each stage; read by `load_run`."""

    data: str  # the dataset directory the run started on
    data_fp: str | None  # its files' fingerprint: a resumed run must see the same data (None: an older run.json)
    stages: dict[str, StageRecord] = field(default_factory=dict)  # finished stages by name
    stage_order: list[str] = field(default_factory=list)  # the stages of the latest `train` command, in order
    reference: str | None = None  # IPO/DPO's reference model: relative to the run directory, or absolute

    @classmethod
    def read(cls, path: Path) -> RunInfo:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict):
                raise ValueError("expected an object with a 'stages' object")
            stages = {name: StageRecord(final=str(s["final"]), steps=int(s.get("steps", 0)),
                                        checkpoint=str(s.get("checkpoint", "")))
                      for name, s in raw["stages"].items()}  # fmt: skip
            order = raw.get("stage_order", [])
            if not isinstance(order, list) or not all(isinstance(s, str) for s in order):
                raise ValueError("'stage_order' must be a list of stage names")
            reference = raw.get("reference")
            if reference is not None and not isinstance(reference, str):
                raise ValueError("'reference' must be a path or null")
            return cls(data=str(raw.get("data", "")), data_fp=raw.get("data_fp"), stages=stages, stage_order=order,
                       reference=reference)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:  # torn or hand-edited
            raise FspoError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None

    def text(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @property
    def last_stage(self) -> str | None:
        """The latest command's last finished stage: the model the run stands for."""
        done = [s for s in self.stage_order if s in self.stages]
        return done[-1] if done else None


@dataclass(frozen=True)
class Run:
    """A model directory as `eval`, `score`, `generate` and `--winrate` see it: a run directory (run.json) or a
    plain HF model directory."""

    policy: Path  # the model to evaluate: the run's last finished stage's final model, or the directory itself
    reference: Path | None  # the reference model of an IPO/DPO run's policy; None after Pref-FT and for a plain directory
    config: TrainConfig  # config.toml: how the run rendered its episodes (the defaults for a plain directory)
    info: RunInfo | None  # run.json; None for a plain directory


def load_run(model: str | os.PathLike) -> Run:
    """The run (or plain HF model directory) `model`. Raises FspoError for anything else, for a run with no
    finished stage and for a damaged (checksum-failing) final or reference model."""
    model = Path(model)
    if not model.is_dir():
        raise FspoError(f"{model}: not a model directory")
    if not (model / "run.json").is_file():
        if not (model / "config.json").is_file():
            raise FspoError(f"{model}: neither a run directory (run.json) nor a model directory (config.json)")
        return Run(policy=model, reference=None, config=TrainConfig(), info=None)
    info = RunInfo.read(model / "run.json")
    last = info.last_stage
    if last is None:
        raise FspoError(f"{model}: the run has no finished stage yet")
    policy = model / info.stages[last].final
    reference = None
    if last != "pref-ft" and info.reference is not None:
        reference = Path(info.reference) if Path(info.reference).is_absolute() else model / info.reference
    for d in (policy, reference):
        # A run's models are sealed with checksums: refuse a damaged one rather than score garbage.
        if d is not None and (d / ckpt.MARKER).is_file() and (why := ckpt.verify(d)) is not None:
            raise FspoError(f"{d}: damaged model ({why})")
    config_path = model / "config.toml"
    config = load_config(config_path) if config_path.is_file() else TrainConfig()
    return Run(policy=policy, reference=reference, config=config, info=info)


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
            write_text_atomic(cfg_path, text)
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

    def read_info(self, data_root: Path, data_fp: str) -> RunInfo:
        """run.json, or a new run's: a resumed run must see the data it started on (`data_fp`), or it cannot
        reproduce the uninterrupted run."""
        p = self.out / "run.json"
        if not p.is_file():
            return RunInfo(data=str(data_root), data_fp=data_fp)
        info = RunInfo.read(p)
        if info.data_fp not in (None, data_fp):
            raise FspoError(f"{data_root}: not the dataset this run started on ({info.data}); "
                            "--resume needs the same data")  # fmt: skip
        info.data_fp = data_fp
        return info

    def write_info(self, info: RunInfo):
        if self.is_main:
            write_text_atomic(self.out / "run.json", info.text())

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
    write_text_atomic(path, "".join(f"{ln}\n" for _, _, ln in keep))


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
    names = ("tokenizer", *STAGES, "run.json", "config.toml", "metrics.jsonl", "loss_curve.png")
    found = stale_temps(out, names) + stale_temps(out / "reference", ["*"])  # the atomic writes' temp files
    # A stage final's copy (checkpoint.publish), and temp files of older fspo-engine versions.
    found += [p for pattern in (f".{n}.tmp-*" for n in names) for p in out.glob(pattern)]
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
