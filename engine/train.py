"""The FSPO training loop: few-shot Pref-FT, then few-shot IPO (or DPO) with Pref-FT as the reference.

    for step in stage:
        episodes = plan[step]                     # deterministic in (seed, stage, epoch): exact resume
        for row in pack(episodes, max_tokens):    # micro-batches by token budget, no padding
            logp = episode_logprobs(model, row)   # prefix-shared packed forward + fused lm_head log-probs
            (loss_part(logp, ref[row]) ).backward()   # parts sum to the global-batch loss
        clip, step, zero_grad(set_to_none=True)

Run directory:
    config.toml            the resolved config (a resumed run must match it)
    run.json               stages done, their final models, which model is the reference
    metrics.jsonl          one line per optimiser step
    tokenizer/             the tokenizer trained on the data (from-scratch runs)
    checkpoints/<stage>/step-N/   atomic, sealed checkpoints (engine/checkpoint.py)
    <stage>/               the stage's final model, an HF directory
    reference/             cached reference log-probs
    loss_curve.png
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fspo_engine.engine import checkpoint as ckpt
from fspo_engine.engine.config import TrainConfig
from fspo_engine.engine.distributed import (
    all_gather_cat,
    all_gather_objects,
    all_reduce_sum,
    apply_ac_and_compile,
    barrier,
    die_with_launcher,
    full_optimizer_state,
    init_distributed,
    load_sharded,
    local_optimizer_state,
    parallelize,
    pick_device,
    rank_rows,
    sharded_optimizer_state,
    state_dict_name,
    world,
)
from fspo_engine.engine.episodes import (
    FORMAT_PIECES,
    Dataset,
    load_dataset,
    official_epoch_order,
    official_windows,
    parse_shots,
    sample_episodes,
    tokenize_episodes,
)
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.losses import dpo_loss, ipo_loss, normalise_by_length, reward_metrics, sft_loss
from fspo_engine.engine.model import (
    NAMED_SIZES,
    LlamaConfig,
    build_model,
    check_weights,
    load_model,
    read_config,
    read_weights,
    save_state_dict,
    stored_dtype,
)
from fspo_engine.engine.packing import PackItem, pack_batches
from fspo_engine.engine.reference import ReferenceCache, fingerprint_files, model_fingerprint
from fspo_engine.engine.scoring import EpisodeLogprobs, episode_logprobs, score_episodes, segment_logprobs
from fspo_engine.engine.tokenizer import check_ids_fit, load_tokenizer, train_tokenizer

STAGE_SEED = {"pref-ft": 0, "ipo": 1, "dpo": 1}  # each stage draws its own episodes


def stages_for(stage: str, loss: str) -> list[str]:
    if stage == "all":
        return ["pref-ft", loss]
    if stage in ("pref-ft", "ipo", "dpo"):
        return [stage]
    raise FspoError(f"--stage: expected pref-ft, ipo, dpo or all, got {stage!r}")


def _config_diff(old: str, new: str) -> str:
    """`section.key: old -> new` for the keys two resolved configs disagree on (first five)."""
    from fspo_engine.engine.config import tomllib

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


# Keys a resumed run may change: they decide what is logged, shown or kept, not what is trained.
_FREE_ON_RESUME = ("progress", "tensorboard", "keep_last", "log_every", "eval_every", "eval_episodes")


def _training_part(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the run keys of _FREE_ON_RESUME at their defaults, for comparing a resume's config."""
    import dataclasses

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **{k: getattr(type(cfg.run)(), k)
                                                                       for k in _FREE_ON_RESUME}))


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


def _remove_leftovers(out: Path):
    """Temporary files and folders of a killed run (a model copy can be GBs). Called while holding the run
    directory's lock, so no live writer owns them. eval's temporaries are left alone (eval takes no lock)."""
    names = [f".{n}.tmp-*" for n in ("tokenizer", *STAGE_SEED, "run.json", "config.toml", "metrics.jsonl",
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


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine/linear decay to peak * min_ratio (or constant). step is 0-based."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return peak * (min_ratio + (1 - min_ratio) * decay)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """optim.name: AdamW, no weight decay on norms (1-D params), fused on CUDA, foreach elsewhere; or RMSprop
    as the released FSPO recipe builds it (`torch.optim.RMSprop(params, lr)`: torch's defaults, no momentum,
    no weight decay), with optim.alpha and optim.eps."""
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).is_cuda
    if cfg.optim.name == "rmsprop":  # config validation keeps weight_decay at 0 here
        return torch.optim.RMSprop(groups, lr=cfg.optim.lr, alpha=cfg.optim.alpha, eps=cfg.optim.eps,
                                   foreach=None if on_cuda else True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps, fused=on_cuda or None, foreach=None if on_cuda else True)


@dataclass
class EpisodePlan:
    """The deterministic stream of training episodes of one stage: step -> its global batch."""

    dataset: Dataset
    tokenizer: object
    cfg: TrainConfig
    stage: str
    _cache: dict = field(default_factory=dict)
    _size: int | None = None
    _official: list | None = None

    @property
    def seed(self) -> int:
        if self.cfg.data.episode_sampling == "official_windows":
            return self.cfg.data.seed  # the released loader: both stages get seed 0's episodes, in the same order
        return self.cfg.data.seed * 7919 + STAGE_SEED[self.stage]

    @property
    def batch_size(self) -> int:
        """Episodes per optimiser step of this stage."""
        if self.stage == "pref-ft" and self.cfg.pref_ft.episodes:
            return self.cfg.pref_ft.episodes
        return self.cfg.batch.episodes

    def epoch(self, e: int):
        if e not in self._cache:
            d = self.cfg.data
            if d.episode_sampling == "official_windows":
                if self._official is None:  # the released loader builds one set that every epoch reorders
                    self._official = official_windows(self.dataset, "train", parse_shots(d.shots), seed=self.seed)
                eps = official_epoch_order(self._official, self.seed, e, d.user_description)
            else:
                eps = sample_episodes(self.dataset, "train", parse_shots(d.shots), seed=self.seed, epoch=e,
                                      episodes_per_user=d.episodes_per_user or None, shuffle=True)
            if not eps:
                raise FspoError(f"{self.dataset.root}: no training episodes (no train users with preferences"
                                + (f"; official windows need {parse_shots(d.shots) + 2} per user)"
                                   if d.episode_sampling == "official_windows" else ")"))  # fmt: skip
            tok = tokenize_episodes(eps, self.tokenizer, max_tokens=d.max_tokens, **tokenize_options(self.cfg))
            self._cache = {k: v for k, v in self._cache.items() if k == e - 1}  # memory: two epochs at most
            self._cache[e] = tok
        return self._cache[e]

    @property
    def epoch_size(self) -> int:
        # Every epoch has the same episodes count (each preference is a target once per epoch; official
        # windows: one set, reordered).
        if self._size is None:
            self._size = len(self.epoch(0))
        return self._size

    def batch(self, step: int) -> list:
        B = self.batch_size
        out = []
        for i in range(step * B, (step + 1) * B):
            e, j = divmod(i, self.epoch_size)
            out.append(self.epoch(e)[j])
        return out

    def epochs_for(self, steps: int) -> int:
        return max(1, math.ceil(steps * self.batch_size / self.epoch_size))

    def plan_key(self, e: int) -> dict:
        d = self.cfg.data
        key = {"stage_seed": self.seed, "epoch": e, "shots": d.shots, "max_tokens": d.max_tokens,
               "user_description": d.user_description, "episodes_per_user": d.episodes_per_user,
               "split": "train"}
        # Later keys only where they differ from their defaults: reference caches of older runs stay valid.
        defaults = type(d)()
        key.update({k: getattr(d, k) for k in ("episode_sampling", "truncate", "bos", "rejected_description")
                    if getattr(d, k) != getattr(defaults, k)})  # fmt: skip
        return key


def tokenize_options(cfg: TrainConfig) -> dict:
    """The rendering and truncation keys of data.* that `tokenize_episodes` takes."""
    d = cfg.data
    return {"user_description": d.user_description, "bos": d.bos, "truncate": d.truncate,
            "rejected_description": d.rejected_description}


class Trainer:
    def __init__(self, cfg: TrainConfig, data_dir: str, out_dir: str, resume: bool = False,
                 device: str | None = None, log=print):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rank, _, self.world = world()
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda _msg: None)
        picked = pick_device(device)
        self.device = init_distributed(picked.type) if self.world > 1 else picked
        if self.world == 1 and "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun --nproc_per_node=1
            die_with_launcher()
        for key, value in (("batch.episodes", cfg.batch.episodes), ("pref_ft.episodes", cfg.pref_ft.episodes)):
            if 0 < value < self.world:
                raise FspoError(f"{key} ({value}) must be at least the number of ranks ({self.world})")
        self.dataset = load_dataset(data_dir)
        if not any(self.dataset.prefs.get(u.user_id) for u in self.dataset.users_in("train")):
            raise FspoError(f"{self.dataset.root}: no training episodes (no train users with preferences)")
        self.data_fp = fingerprint_files([self.dataset.root / f for f in ("manifest.json", "users.jsonl",
                                                                          "prefs.jsonl")])
        if cfg.run.tensorboard:  # fail before anything is written, not at the first logged step
            try:
                importlib.import_module("torch.utils.tensorboard")
            except ImportError:
                raise FspoError("run.tensorboard = true needs the tensorboard package: "
                                "pip install 'fspo-engine[tensorboard]'") from None
        self.source_dtype = self._param_dtype()  # the weights' dtype in the source checkpoint
        if cfg.model.name not in NAMED_SIZES:  # a bad model directory fails before the run directory exists
            if not Path(cfg.model.name).is_dir():
                raise FspoError(f"{cfg.model.name}: neither a named size ({', '.join(NAMED_SIZES)}) nor a model "
                                "directory")  # fmt: skip
            check_weights(cfg.model.name)
            self._check_vocab(load_tokenizer(cfg.model.name), read_config(cfg.model.name).vocab_size)
            self.source_dtype = stored_dtype(cfg.model.name)
        self._tb = self._lock_fd = None
        try:
            self._prepare_run_dir(resume)
            self.run_info = self._read_run_info()
            self.tokenizer_dir = self._tokenizer()
            self.tokenizer = load_tokenizer(self.tokenizer_dir)
        except BaseException:
            self.close(failed=True)  # the run directory's lock too: a corrected retry in this process works
            raise
        self.autocast = self.device.type == "cuda" and cfg.model.dtype == "auto"
        self.metrics_path = self.out / "metrics.jsonl"
        self._eval_set = None

    def _check_vocab(self, tokenizer, vocab_size: int):
        """Every id the training texts and the episode format encode to fits the model's embedding."""
        texts = list(FORMAT_PIECES)
        for user in self.dataset.users_in("train"):
            texts += [t for p in self.dataset.prefs.get(user.user_id, []) for t in (p.question, p.chosen, p.rejected)]
            if self.cfg.data.user_description:
                texts.append(user.description)
                texts += self._rejected_descriptions(user)
        check_ids_fit(tokenizer, vocab_size, self.cfg.model.name, tokenizer.encode_batch(texts))

    def _rejected_descriptions(self, user) -> list[str]:
        """The rejected branches' descriptions of a user's preferences, where the run renders them."""
        d = self.cfg.data
        if not (d.user_description and d.rejected_description == "rejected_persona"):
            return []
        return [p.rejected_description for p in self.dataset.prefs.get(user.user_id, []) if p.rejected_description]

    # ------------------------------------------------------------------ run directory

    def _prepare_run_dir(self, resume: bool):
        cfg_path = self.out / "config.toml"
        text = self.cfg.resolved_toml()
        started = (self.out / "checkpoints").is_dir() or (self.out / "run.json").is_file()
        if cfg_path.is_file() and started:
            if not resume:
                raise FspoError(f"{self.out}: already holds a run; pass --resume to continue it or pick a new --out")
            # Compared as configs, not as text: a key a newer fspo-engine added reads as its default.
            from fspo_engine.engine.config import load_config

            if _training_part(load_config(cfg_path)) != _training_part(self.cfg):
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
            busy = 0.0 if self._lock_run_dir() else 1.0
        if all_reduce_sum([busy])[0]:  # every rank fails, none waits at a barrier for rank 0
            raise FspoError(f"{self.out}: another training run is using this directory (still running, or "
                            "orphaned workers of a killed torchrun: stop them first)")  # fmt: skip
        if self.is_main:
            _remove_leftovers(self.out)
            if not started:  # leftovers of an attempt that died before its first checkpoint: start clean
                shutil.rmtree(self.out / "tokenizer", ignore_errors=True)
            ckpt.atomic_write_text(cfg_path, text)
        barrier()

    def _lock_run_dir(self) -> bool:
        """Hold an exclusive flock on the run directory for this process's life (False: another holds it).

        Two jobs writing one run (a --resume started while a killed torchrun's workers still train)
        would interleave checkpoints and metrics. The kernel drops the lock when the process dies, kill -9
        included, so a stale lock never blocks a resume."""
        self._lock_fd = _try_lock(self.out)
        return self._lock_fd is not None

    def _read_run_info(self) -> dict:
        p = self.out / "run.json"
        if not p.is_file():
            return {"stages": {}, "reference": None, "data": str(self.dataset.root), "data_fp": self.data_fp}
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(info, dict) or not isinstance(info.get("stages"), dict):
                raise ValueError("expected an object with a 'stages' object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise FspoError(f"{p}: unreadable ({exc})") from None
        # A resumed run must see the data it started on, or it cannot reproduce the uninterrupted run.
        if info.get("data_fp", self.data_fp) != self.data_fp:
            raise FspoError(f"{self.dataset.root}: not the dataset this run started on ({info.get('data')}); "
                            "--resume needs the same data")  # fmt: skip
        info.setdefault("data_fp", self.data_fp)
        return info

    def _write_run_info(self):
        if self.is_main:
            ckpt.atomic_write_text(self.out / "run.json", json.dumps(self.run_info, indent=2, sort_keys=True))

    def _tokenizer(self) -> Path:
        name = self.cfg.model.name
        if name not in NAMED_SIZES:
            return Path(name)
        tok_dir = self.out / "tokenizer"
        if self.is_main and not (tok_dir / "tokenizer.json").is_file():
            texts = []
            for user in self.dataset.users_in("train"):
                for p in self.dataset.prefs.get(user.user_id, []):
                    texts += [p.question, p.chosen, p.rejected]
                texts.append(user.description)
                texts += self._rejected_descriptions(user)
            tmp = self.out / f".tokenizer.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            # The episode format's fixed headers become single tokens (they are most of a context's text).
            train_tokenizer(texts, self.cfg.model.vocab_size, tmp, whole_pieces=FORMAT_PIECES)
            shutil.rmtree(tok_dir, ignore_errors=True)
            os.replace(tmp, tok_dir)
        barrier()
        return tok_dir

    # ------------------------------------------------------------------ models

    def _param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.model.dtype == "bfloat16" else torch.float32

    def _final_dtype(self) -> torch.dtype:
        """Stage finals' dtype (model.save_dtype). By default the master weights' (what the checkpoints hold):
        a later stage starts from this final and scores its reference with it, and a bf16 cast would round
        away Pref-FT updates below bf16's resolution (~0.4% of a weight) before IPO begins. "source" is the
        source checkpoint's dtype: half the size for a bf16 Llama, for a run's last stage."""
        choice = self.cfg.model.save_dtype
        if choice == "auto":
            return self._param_dtype()
        return self.source_dtype if choice == "source" else getattr(torch, choice)

    def _policy(self, model_dir: Path | None):
        """The model to train, in train mode, wrapped: from `model_dir`, else from --model. Under torchrun,
        weights from a directory go straight into each rank's FSDP2 shards (`load_sharded`): no rank holds
        the whole model. A named size is built whole on every rank (same seed) and then sharded."""
        m = self.cfg.model
        if model_dir is None and m.name in NAMED_SIZES:
            model = self._initial_model()
        elif self.world > 1:
            return load_sharded(model_dir or m.name, self._param_dtype(), self.device, m.attention_impl,
                                m.activation_checkpointing, m.compile, mixed_precision=self.autocast).train()
        else:
            model = self._load(Path(model_dir or m.name))
        return self._wrap(model.train())

    def _initial_model(self):
        """A fresh model of a named size."""
        m = self.cfg.model
        overrides = {"vocab_size": max(self.tokenizer.vocab_size, m.vocab_size),
                     "bos_token_id": self.tokenizer.bos_id, "eos_token_id": self.tokenizer.eos_id,
                     "attention_impl": m.attention_impl}
        if m.hidden_size:
            overrides["hidden_size"] = m.hidden_size
            overrides["head_dim"] = 0
        if m.num_hidden_layers:
            overrides["num_hidden_layers"] = m.num_hidden_layers
        cfg = LlamaConfig.from_name(m.name, **overrides)
        return build_model(cfg, dtype=self._param_dtype(), device=self.device, seed=self.cfg.run.seed)

    def _reference(self, model_dir: Path):
        """The reference model, in eval mode. Under torchrun it is sharded like the policy (the same FSDP2
        wrapping and mixed precision, so that both compute alike): every rank holding a whole reference
        beside its policy shards would cost a whole model per GPU."""
        m = self.cfg.model
        if self.world > 1:
            return load_sharded(model_dir, self._param_dtype(), self.device, m.attention_impl,
                                mixed_precision=self.autocast).eval()
        return self._load(model_dir).eval()

    def _load(self, model_dir: Path):
        return load_model(model_dir, dtype=self._param_dtype(), device=self.device,
                          attention_impl=self.cfg.model.attention_impl)

    def _wrap(self, model):
        """Activation checkpointing, compile and (under torchrun) FSDP2 are applied to the finished model."""
        m = self.cfg.model
        if self.world > 1:
            return parallelize(model, m.activation_checkpointing, m.compile, mixed_precision=self.autocast)
        return apply_ac_and_compile(model, m.activation_checkpointing, m.compile)

    # ------------------------------------------------------------------ metrics

    def _truncate_metrics(self, stage: str, step: int):
        """As `stage` starts at `step`, drop its metric lines past that step (written by a killed run after
        its checkpoint) and torn lines. Other stages' lines stay: a later stage that resumes from its own
        checkpoint keeps its history (each stage truncates itself when it starts). Lines are ordered by
        stage, then step, as an uninterrupted run writes them."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
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
        ckpt.atomic_write_text(self.metrics_path, "".join(f"{ln}\n" for _, _, ln in keep))

    def _emit(self, record: dict):
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
        if self.cfg.run.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter  # checked importable in __init__

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            gstep = record["step"] + (10**6 if record["stage"] != "pref-ft" else 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{record['stage']}/{k}", v, gstep)

    # ------------------------------------------------------------------ stages

    def run(self, stage: str = "all", max_steps: int | None = None) -> dict:
        stages = stages_for(stage, self.cfg.pref.loss)
        self.run_info["stage_order"] = stages
        result = {}
        policy_dir = None
        earlier = self.run_info["stages"].get("pref-ft")
        if stages[0] != "pref-ft" and earlier and ckpt.verify(self.out / earlier["final"]) is None:
            policy_dir = self._weights_of(earlier)  # `--stage ipo` after `--stage pref-ft` in the same run
        for s in stages:
            done = self.run_info["stages"].get(s)
            if done and (self.out / done["final"]).is_dir() and ckpt.verify(self.out / done["final"]) is None:
                self.log(f"[{s}] already complete: {self.out / done['final']}")
                policy_dir = self._weights_of(done)
                result[s] = done
                continue
            result[s] = self._run_stage(s, policy_dir, max_steps)
            policy_dir = self._weights_of(result[s])
        if self.is_main:
            self._plot()
        barrier()  # no rank tears the process group down while another still works (gloo aborts then)
        return result

    def _say(self, bar, msg: str):
        """A console line that does not tear the progress bar."""
        if not bar.disable:
            bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def _weights_of(self, info: dict) -> Path:
        """Where a later stage reads a finished stage's weights (its initial policy and its reference): the
        final, or, when finals are cast (model.save_dtype), the master weights of the stage's last checkpoint
        that the final was cast from, so that the cast never rounds away what the stage learned."""
        if self._final_dtype() != self._param_dtype():
            sealed = self.out / info.get("checkpoint", "")
            if info.get("checkpoint") and ckpt.verify(sealed) is None:
                return sealed / "model"
            self.log(f"{sealed}: not a whole checkpoint; the next stage starts from the cast final")
        return self.out / info["final"]

    def _stage_steps(self, stage: str, max_steps: int | None, plan: EpisodePlan) -> tuple[int, float]:
        sec = self.cfg.pref_ft if stage == "pref-ft" else self.cfg.pref
        if max_steps is not None:
            steps = max_steps
        elif sec.epochs:  # the released loop drops each epoch's last partial batch
            steps = sec.epochs * (plan.epoch_size // plan.batch_size)
            self.log(f"[{stage}] {sec.epochs} epoch(s) of {plan.epoch_size} episodes, {plan.batch_size} a step: "
                     f"{steps} steps")
        else:
            steps = sec.steps
        return steps, (sec.lr or self.cfg.optim.lr)

    def _run_stage(self, stage: str, init_dir: Path | None, max_steps: int | None) -> dict:
        cfg = self.cfg
        plan = EpisodePlan(self.dataset, self.tokenizer, cfg, stage)
        total, peak_lr = self._stage_steps(stage, max_steps, plan)
        stage_dir = self.out / "checkpoints" / stage

        # Policy initialisation and reference.
        ref_dir = None
        if stage != "pref-ft":
            ref_dir = init_dir if init_dir is not None else Path(cfg.model.name)
            if cfg.model.name in NAMED_SIZES and init_dir is None:
                raise FspoError(f"--stage {stage} from scratch has no reference model: run pref-ft first "
                                "(--stage all) or pass --model with a Pref-FT'd HF directory")
            self.run_info["reference"] = str(ref_dir.relative_to(self.out)) if ref_dir.is_relative_to(self.out) \
                else str(ref_dir.resolve())
            self._write_run_info()
        start_step = 0
        # Rank 0 verifies the checkpoints (hashing every file) and reads the training state; the other ranks
        # take its choice, step and RNG state. Each rank then reads its own optimizer shard, or, when the
        # checkpoint was written by another number of ranks, gets it from rank 0 by broadcast (an 8B model's
        # Adam moments are 64 GB: never loaded into host memory once per rank).
        resume_from, state = None, {}
        if self.is_main:
            resume_from = ckpt.latest_valid(stage_dir, log=self.log)
            if resume_from is not None:
                state = ckpt.load_train_state(resume_from / "train_state.pt")
        if self.world > 1:
            picked = all_gather_objects((str(resume_from) if resume_from else None, state.get("step"),
                                         state.get("rng"), state.get("optimizer_shards"))
                                        if self.is_main else None)[0]  # fmt: skip
            resume_from = Path(picked[0]) if picked[0] else None
            state = {**state, "step": picked[1], "rng": picked[2], "optimizer_shards": picked[3]}
        if resume_from is not None:
            model = self._policy(resume_from / "model")
            start_step = state["step"]
            self.log(f"[{stage}] resuming from {resume_from} (step {start_step})")
        else:
            model = self._policy(init_dir)
        self._truncate_metrics(stage, start_step)
        optimizer = make_optimizer(model, cfg)
        if resume_from is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            shards = state.get("optimizer_shards")
            if shards is not None and shards == self.world:  # as many ranks as wrote it: each reads its own
                try:
                    local, why = ckpt.load_train_state(ckpt.optimizer_shard_path(resume_from, self.rank, shards)), None
                except FspoError as exc:
                    local, why = None, str(exc)
                why = next((w for w in all_gather_objects(why) if w), None)
                if why:  # every rank stops here, together: none is left waiting in a collective
                    raise FspoError(why)
                set_optimizer_state_dict(model, optimizer, sharded_optimizer_state(local, model),
                                         options=StateDictOptions(full_state_dict=False))
            else:  # rank 0 holds the full state (joined from another number of ranks' shards) and shares it
                optim_state = {}
                if self.is_main:
                    optim_state = state["optimizer"] if shards is None else full_optimizer_state(
                        [ckpt.load_train_state(ckpt.optimizer_shard_path(resume_from, r, shards))
                         for r in range(shards)])
                    optim_state = _by_name(optim_state, model, optimizer)
                set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(
                    full_state_dict=True, broadcast_from_rank0=self.world > 1))
            ckpt.set_rng_state(state["rng"])
        else:
            torch.manual_seed(cfg.run.seed)

        # Reference log-probs for every planned epoch, computed once, before any training step.
        ref_tables = {}
        evaluating = cfg.run.eval_every > 0 and start_step < total
        eval_eps = self._eval_episodes(model) if evaluating else []
        eval_ref = None  # the reference's log-probs of the held-out episodes (IPO/DPO)
        if ref_dir is not None and start_step < total:
            cache = ReferenceCache(self.out / "reference", model_fingerprint(ref_dir), self.data_fp)
            n_epochs = plan.epochs_for(total)
            # Every rank scores its share of each planned epoch; rank 0 writes the gathered cache.
            ref_model = self._reference(ref_dir)
            # Only the episodes the stage will reach: the last planned epoch is usually partial.
            used = [min(plan.epoch_size, total * plan.batch_size - e * plan.epoch_size) for e in range(n_epochs)]
            bar = _bar(total=sum(-(-u // self.world) for u in used), desc=f"[{stage}] reference log-probs",
                       unit="ep", enabled=cfg.run.progress and self.is_main)
            # The reference runs at the policy's precision (bf16 autocast over fp32 weights on CUDA): at step 0
            # policy and reference then agree exactly, and IPO/DPO margins start at 0, not at rounding noise.
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else _nullcontext()
            with autocast:
                for e in range(n_epochs):
                    key = {**plan.plan_key(e), "episodes": used[e], "autocast": self.autocast}
                    ref_tables[e] = cache.get_epoch(key, plan.epoch(e)[:used[e]], ref_model, cfg.data.max_tokens,
                                                    cfg.model.logprob_impl, self.device, log=self.log,
                                                    on_row=bar.update, rank=self.rank, world=self.world)
                bar.close()
                if evaluating:  # all of them on every rank (the same forwards, as FSDP2 needs): a small set
                    eval_ref = score_episodes(ref_model, eval_eps, cfg.data.max_tokens,
                                              impl=cfg.model.logprob_impl, device=self.device)
            del ref_model
            barrier()
        ref_table = {k: v for t in ref_tables.values() for k, v in t.items()}

        bar = _bar(total=total, initial=start_step, desc=f"[{stage}]", unit="step",
                   enabled=cfg.run.progress and self.is_main)
        # A batch job's log (stderr not a terminal) gets a plain line every ~5% of the stage, not a bar.
        plain_every = max(1, total // 20) if cfg.run.progress and bar.disable else 0
        t_stage = time.perf_counter()
        last_ckpt = resume_from
        for step in range(start_step, total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, peak_lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            episodes = plan.batch(step)
            rec = self._train_step(stage, model, episodes, ref_table)
            if not math.isfinite(rec["loss"]):
                raise FspoError(f"[{stage}] step {step + 1}: loss is {rec['loss']}; stopping. The newest "
                                f"checkpoint is {last_ckpt or 'none (no checkpoint yet)'}, and the "
                                f"{cfg.run.keep_last} newest are kept: each model/ is an HF directory to restart "
                                "from with --model (e.g. with a lower optim.lr)")
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0
                                                       else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):
                raise FspoError(f"[{stage}] step {step + 1}: gradient norm is {grad_norm.item()}; stopping. The "
                                f"last good checkpoint is {last_ckpt or 'none'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":  # the step's kernels, optimizer included, counted in this step
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            rec.update(stage=stage, step=step + 1, lr=lr, grad_norm=grad_norm.item(),
                       episodes_per_s=len(episodes) / dt, tokens_per_s=rec.pop("_tokens") / dt, step_time_s=dt)
            if self.device.type == "cuda":
                rec["mfu"] = self._mfu(model, rec["tokens_per_s"])
            evaluated = evaluating and ((step + 1) % cfg.run.eval_every == 0 or step + 1 == total)
            if evaluated:
                rec.update(self._evaluate(stage, model, eval_eps, eval_ref))
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == total or evaluated:
                self._emit(rec)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{rec[k]:.4g}" for k in ("loss", "rewards/accuracy", "tokens_per_s")
                             if k in rec})
            if evaluated:
                held = ", ".join(f"{k.removeprefix('eval/')} {rec[k]:.4g}" for k in
                                 ("eval/loss", "eval/rewards/accuracy", "eval/episodes") if k in rec)  # fmt: skip
                self._say(bar, f"[{stage}] step {step + 1} held-out: {held}")
            if plain_every and ((step + 1) % plain_every == 0 or step + 1 == total):
                done, left = step + 1 - start_step, total - step - 1
                rate = done / (time.perf_counter() - t_stage)
                shown = ", ".join(f"{k.split('/')[-1]} {rec[k]:.4g}" for k in ("loss", "rewards/accuracy") if k in rec)
                self.log(f"[{stage}] step {step + 1}/{total}: {shown}, {rate:.3g} steps/s, ETA {left / rate:.0f} s")
            if step + 1 < total and cfg.run.save_every and (step + 1) % cfg.run.save_every == 0:
                last_ckpt = self._save(stage_dir, step + 1, model, optimizer)
        bar.close()
        if last_ckpt is None or ckpt.step_of(last_ckpt) != total:
            last_ckpt = self._save(stage_dir, total, model, optimizer)
        # The stage's final model: an HF directory, published atomically.
        final = self.out / stage
        if not self.is_main:
            barrier()
            return {"final": stage, "steps": total, "checkpoint": str(last_ckpt.relative_to(self.out))}
        tmp = self.out / f".{stage}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(last_ckpt / "model", tmp)
        if self._final_dtype() != self._param_dtype():  # checkpoints keep the master weights; finals are cast
            save_state_dict(read_weights(tmp), model.config, tmp, dtype=self._final_dtype())
        ckpt.seal(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.run_info["stages"][stage] = {"final": stage, "steps": total, "checkpoint": str(last_ckpt.relative_to(self.out))}
        self._write_run_info()
        barrier()
        self.log(f"[{stage}] done: {final}")
        return self.run_info["stages"][stage]

    def _save(self, stage_dir: Path, step: int, model, optimizer) -> Path:
        # The model as a full HF directory from rank 0 (a collective under torchrun: every rank calls this).
        # The optimizer state keyed by parameter name: whole in train_state.pt in one process; under
        # torchrun each rank writes its own shard into the checkpoint rank 0 builds (no gather of the Adam
        # moments into one host), and a resume on any number of ranks can read them (see checkpoint.py).
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=full)
        train_state = {"step": step, "rng": ckpt.rng_state()}
        tmp = ckpt.begin_checkpoint(stage_dir, step) if self.is_main else None
        if self.world > 1:
            tmp = Path(all_gather_objects(str(tmp) if self.is_main else None)[0])
            ckpt.save_train_state(ckpt.optimizer_shard_path(tmp, self.rank, self.world),
                                  local_optimizer_state(get_optimizer_state_dict(model, optimizer)))
            train_state["optimizer_shards"] = self.world
            barrier()  # every shard is written before rank 0 seals the checkpoint
            missing = [r for r in range(self.world) if self.is_main and
                       not ckpt.optimizer_shard_path(tmp, r, self.world).is_file()]  # fmt: skip
            if missing:
                raise FspoError(f"{tmp}: rank(s) {missing} saved their optimizer shards out of rank 0's sight: under "
                                "torchrun, --out must be a directory that every rank sees (a shared filesystem)")
        else:
            train_state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=full)
        final = stage_dir / f"step-{step:09d}"
        if self.is_main:
            dtype = torch.bfloat16 if self.cfg.model.dtype == "bfloat16" else torch.float32
            save_state_dict(model_state, model.config, tmp / "model", tokenizer_dir=self.tokenizer_dir, dtype=dtype)
            ckpt.save_train_state(tmp / "train_state.pt", train_state)
            final = ckpt.finish_checkpoint(stage_dir, step, tmp, self.cfg.run.keep_last)
        barrier()
        return final

    def _mfu(self, model, tokens_per_s: float) -> float:
        c = model.config
        flops = 3 * c.flops_per_token(self.cfg.data.max_tokens // 2)["forward"]
        peak = 989e12  # H100/H200 dense bf16 TFLOP/s
        return flops * tokens_per_s / peak

    def _eval_episodes(self, model) -> list:
        """The held-out episodes of run.eval_every: test users at the training shot counts, a fixed sample
        (its own seed: the training draws do not move), the same for every stage."""
        if self._eval_set is None:
            d = self.cfg.data
            eps = sample_episodes(self.dataset, "test", parse_shots(d.shots), seed=d.seed * 7919 + 104729,
                                  shuffle=True)  # fmt: skip
            if not eps:
                raise FspoError(f"{self.dataset.root}: run.eval_every needs test users with preferences")
            self._eval_set = tokenize_episodes(eps[: self.cfg.run.eval_episodes], self.tokenizer,
                                               max_tokens=d.max_tokens, **tokenize_options(self.cfg))
            users = len({t.user_id for t in self._eval_set})
            self.log(f"held-out: {len(self._eval_set)} episodes of {users} test users (run.eval_episodes = "
                     f"{self.cfg.run.eval_episodes}, {len(eps)} available)")
        check_ids_fit(self.tokenizer, model.config.vocab_size, self.cfg.model.name,
                      (t.prompt_ids + t.chosen_ids + t.rejected_ids for t in self._eval_set))  # fmt: skip
        return self._eval_set

    def _evaluate(self, stage: str, model, episodes: list, ref: EpisodeLogprobs | None) -> dict:
        """Held-out metrics of the policy now: `eval/loss` (the stage's loss: Pref-FT's as pref_ft.targets and
        pref_ft.reduction say, IPO/DPO against the reference), `eval/nll_per_token` (the chosen responses') and,
        for IPO/DPO, the implicit rewards (`eval/rewards/accuracy`: FSPO's held-out preference accuracy). Every
        rank scores its share (padded like a training step: FSDP2's collectives must line up); no RNG is drawn."""
        cfg, dev = self.cfg, self.device
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else _nullcontext()
        share, rows = self._rank_rows(episodes, lambda eps: pack_batches(eps, cfg.data.max_tokens))
        parts = []
        model.eval()
        with torch.no_grad():
            for row, real in rows:
                with autocast:
                    out = episode_logprobs(model, row.to(dev), impl=cfg.model.logprob_impl)
                if real:  # share[i] is episodes[i * world + rank]
                    idx = torch.tensor(row.episodes, dtype=torch.long) * self.world + self.rank
                    parts.append((idx, out.chosen.float().cpu(), out.rejected.float().cpu(),
                                  out.chosen_tokens.cpu(), out.rejected_tokens.cpu()))  # fmt: skip
        model.train()
        E = len(episodes)
        pc, pr = torch.zeros(E), torch.zeros(E)
        ct, rt = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
        for rank_parts in all_gather_objects(parts):
            for idx, c, r, cn, rn in rank_parts:
                pc[idx], pr[idx], ct[idx], rt[idx] = c, r, cn, rn
        nll = -(pc.double().sum() / ct.sum().clamp(min=1)).item()
        if stage == "pref-ft":
            both = cfg.pref_ft.targets == "both"
            logp, tokens = (torch.cat([pc, pr]), torch.cat([ct, rt])) if both else (pc, ct)
            loss = sft_loss(logp.double(), tokens, cfg.pref_ft.reduction).item()
            return {"eval/loss": loss, "eval/nll_per_token": nll, "eval/episodes": E}
        rc, rr = ref.chosen.float(), ref.rejected.float()
        if cfg.pref.length_normalize:
            pc, pr = normalise_by_length(pc, ct), normalise_by_length(pr, rt)
            rc, rr = normalise_by_length(rc, ct), normalise_by_length(rr, rt)
        beta = cfg.pref.beta
        loss = ipo_loss(pc, pr, rc, rr, beta) if stage == "ipo" else \
            dpo_loss(pc, pr, rc, rr, beta, cfg.pref.label_smoothing)  # fmt: skip
        return {"eval/loss": loss.item(), "eval/nll_per_token": nll, "eval/episodes": E,
                **{f"eval/{k}": v for k, v in reward_metrics(pc, pr, rc, rr, beta).items()}}

    def _train_step(self, stage: str, model, episodes: list, ref_table: dict) -> dict:
        """Forward/backward over micro-batches (packed rows) summing exactly to the global-batch loss."""
        cfg = self.cfg
        E = len(episodes)
        dev = self.device
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else _nullcontext()
        # Under torchrun each rank takes every world-th episode of the global batch. FSDP2 averages
        # gradients over ranks, so each rank's loss is scaled by the world size: the average of the
        # ranks' gradients is then the gradient of the global-batch loss.
        scale = float(self.world)
        pack = lambda eps: pack_batches(eps, cfg.data.max_tokens)  # noqa: E731
        if stage == "pref-ft":
            # pref_ft.targets = chosen packs [context | chosen] blocks; both packs [context | chosen | rejected],
            # the rejected branch trained on too (the released code's SFT targets).
            both = cfg.pref_ft.targets == "both"
            items = [PackItem(ep.prompt_ids, ep.responses if both else [ep.chosen_ids], ep.episode_id)
                     for ep in episodes]  # fmt: skip
            total_targets = sum(len(r) for it in items for r in it.responses)
            # sft_loss's denominator for the whole batch, so that the rows' parts sum to the batch's loss.
            denom = total_targets if cfg.pref_ft.reduction == "mean" else sum(len(it.responses) for it in items)
            nll_sum, chosen_nll, n_tokens = 0.0, 0.0, 0
            _, rows = self._rank_rows(items, pack)
            for row, real in rows:
                row = row.to(dev)
                with autocast:
                    seg = segment_logprobs(model, row, impl=cfg.model.logprob_impl)
                nll = -seg.sum()
                (nll / denom * (scale if real else 0.0)).backward()
                if real:
                    nll_sum += nll.item()
                    chosen_nll -= seg[row.seg_branch == 1].sum().item()
                    n_tokens += row.num_tokens
            nll_sum, chosen_nll, n_tokens = all_reduce_sum([nll_sum, chosen_nll, float(n_tokens)])
            # nll_per_token is the chosen responses' whatever the targets: comparable across pref_ft settings.
            return {"loss": nll_sum / denom, "nll_per_token": chosen_nll / sum(len(ep.chosen_ids) for ep in episodes),
                    "_tokens": n_tokens}
        # IPO / DPO
        beta = cfg.pref.beta
        stats = {k: [] for k in ("pc", "pr", "rc", "rr")}
        loss_sum, n_tokens = 0.0, 0
        share, rows = self._rank_rows(episodes, pack)
        for row, real in rows:
            idx = row.episodes
            ref = torch.tensor([ref_table[share[i].episode_id] for i in idx], dtype=torch.float32, device=dev)
            row = row.to(dev)
            with autocast:
                out = episode_logprobs(model, row, impl=cfg.model.logprob_impl)
            pc, pr = out.chosen.float(), out.rejected.float()
            rc, rr = ref[:, 0], ref[:, 1]
            if cfg.pref.length_normalize:
                ct, rt = out.chosen_tokens.to(dev), out.rejected_tokens.to(dev)
                pc, pr = normalise_by_length(pc, ct), normalise_by_length(pr, rt)
                rc, rr = normalise_by_length(rc, ct), normalise_by_length(rr, rt)
            if stage == "ipo":  # the stage names its loss (pref.loss only picks the stage of --stage all)
                part = ipo_loss(pc, pr, rc, rr, beta)
            else:
                part = dpo_loss(pc, pr, rc, rr, beta, cfg.pref.label_smoothing)
            loss = part * (len(idx) / E)  # mean over the row -> its share of the global-batch mean
            (loss * (scale if real else 0.0)).backward()
            if not real:
                continue
            loss_sum += loss.item()
            n_tokens += row.num_tokens
            for k, v in zip(("pc", "pr", "rc", "rr"), (pc, pr, rc, rr)):
                stats[k].append(v.detach())
        loss_sum, n_tokens = all_reduce_sum([loss_sum, float(n_tokens)])
        pc, pr, rc, rr = (all_gather_cat(torch.cat(stats[k])) for k in ("pc", "pr", "rc", "rr"))
        rec = {"loss": loss_sum, **reward_metrics(pc, pr, rc, rr, beta),
               "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item(), "_tokens": n_tokens}
        return rec

    def close(self, failed: bool = False):
        """Flush TensorBoard, release the run directory and leave the process group (torchrun).

        After a failure the process group is left alone: destroying it is collective, and peers may be
        blocked in another collective (a deadlock); torchrun ends them when this rank exits non-zero."""
        import torch.distributed as dist

        if self._tb is not None:
            self._tb.close()
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)  # releases the run directory's lock
            self._lock_fd = None
        if not failed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def _rank_rows(self, items: list, pack) -> tuple[list, list]:
        return rank_rows(items, pack, self.rank, self.world)

    def _plot(self):
        if not self.metrics_path.is_file():  # --max-steps 0: nothing was logged, nothing to plot
            return
        try:
            plot_metrics(self.metrics_path, self.out / "loss_curve.png")
        except Exception as exc:  # a plot must never fail a finished run
            self.log(f"could not plot the loss curve: {exc}")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bar(total, desc, unit, enabled, initial=0):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file would fill with carriage returns).
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if enabled else True,
                dynamic_ncols=True, leave=True, file=sys.stderr)


def plot_metrics(metrics_path: Path, out_png: Path):
    """Loss per stage and IPO/DPO reward accuracy against step (held-out points where run.eval_every), as a
    PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in Path(metrics_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    stages = list(dict.fromkeys(r["stage"] for r in recs))
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, s in zip(axes[0], stages):
        rs = [r for r in recs if r["stage"] == s]
        ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], label="loss", color="tab:blue")
        ev = [r for r in rs if "eval/loss" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval/loss"] for r in ev], "o--", color="tab:blue", alpha=0.6,
                    label="held-out loss")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(s)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if any("rewards/accuracy" in r for r in rs):
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in rs], [r.get("rewards/accuracy", float("nan")) for r in rs],
                     color="tab:orange", alpha=0.7, label="reward accuracy")
            ev = [r for r in rs if "eval/rewards/accuracy" in r]
            if ev:
                ax2.plot([r["step"] for r in ev], [r["eval/rewards/accuracy"] for r in ev], "o--",
                         color="tab:red", alpha=0.8, label="held-out accuracy")
            ax2.set_ylabel("reward accuracy")
            ax2.set_ylim(0, 1)
            ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
