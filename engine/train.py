"""The FSPO training loop: few-shot Pref-FT, then few-shot IPO (or DPO) with Pref-FT as the reference.

    for step in stage:
        episodes = plan[step]                     # deterministic in (seed, stage, epoch): exact resume
        for row in pack(episodes, max_tokens):    # micro-batches by token budget, no padding
            logp = episode_logprobs(model, row)   # prefix-shared packed forward + fused lm_head log-probs
            (loss_part(logp, ref[row]) ).backward()   # parts sum to the global-batch loss
        clip, step, zero_grad(set_to_none=True)

Read top to bottom: the plan (`EpisodePlan`), the trainer's setup and models, the stage loop (`_run_stage`)
and the step (`_train_step`). Everything else has its own module: the run directory's lock and bookkeeping
files (engine/rundir.py), checkpoints and resuming (engine/checkpoint.py), the reference log-probs
(engine/reference.py), held-out evaluation (engine/validate.py), the optimizer and its schedule
(engine/optim.py), and what the run reports (engine/metrics.py). This file runs past ~500 lines on purpose:
the plan, the models a stage trains, the stage loop and the step are the training loop itself, and split up
they would send a reader of the loop through four files (nanoGPT's and torchtitan's train.py keep them too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fspo_engine.data_gen.atomic import atomic_dir
from fspo_engine.engine import checkpoint as ckpt
from fspo_engine.engine.config import TrainConfig
from fspo_engine.engine.dataset import Dataset, load_dataset
from fspo_engine.engine.distributed import (
    all_gather_cat,
    all_reduce_sum,
    apply_ac_and_compile,
    barrier,
    die_with_launcher,
    init_distributed,
    load_sharded,
    parallelize,
    pick_device,
    rank_rows,
    world,
)
from fspo_engine.engine.episodes import (
    FORMAT_PIECES,
    official_epoch_order,
    official_windows,
    parse_shots,
    sample_episodes,
    tokenize_episodes,
)
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.losses import preference_inputs, reward_metrics, sft_denominator, stage_loss
from fspo_engine.engine.metrics import StageProgress, TensorBoard, mfu, plot_loss_curve, progress_bar
from fspo_engine.engine.model import (
    NAMED_SIZES,
    LlamaConfig,
    build_model,
    check_weights,
    load_model,
    read_config,
    stored_dtype,
)
from fspo_engine.engine.optim import lr_at, make_optimizer
from fspo_engine.engine.packing import PackItem, pack_batches
from fspo_engine.engine.reference import ReferenceCache, fingerprint_files, model_fingerprint
from fspo_engine.engine.rundir import STAGES, RunDir, StageRecord, load_run
from fspo_engine.engine.scoring import episode_logprobs, score_episodes
from fspo_engine.engine.tokenizer import check_ids_fit, load_tokenizer, train_tokenizer
from fspo_engine.engine.validate import Validator

STAGE_SEED = {"pref-ft": 0, "ipo": 1, "dpo": 1}  # each stage draws its own episodes


def stages_for(stage: str, loss: str) -> list[str]:
    if stage == "all":
        return ["pref-ft", loss]
    if stage in STAGES:
        return [stage]
    raise FspoError(f"--stage: expected pref-ft, ipo, dpo or all, got {stage!r}")


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
            tok = tokenize_episodes(eps, self.tokenizer, max_tokens=d.max_tokens, options=d.render_options())
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

    @property
    def steps_per_epoch(self) -> int | None:
        """official_windows: the whole batches of one epoch. The released loop starts every epoch with an
        empty batch, so each epoch's last partial batch is never trained on. None for sampled episodes, whose
        batches run on across an epoch's end."""
        if self.cfg.data.episode_sampling != "official_windows":
            return None
        n = self.epoch_size // self.batch_size
        if n == 0:
            raise FspoError(f"{self.dataset.root}: an epoch has {self.epoch_size} official-window episodes, fewer "
                            f"than one batch of {self.batch_size}: the released loop, which drops each epoch's "
                            f"partial batch, trains nothing on it (lower the stage's batch size)")  # fmt: skip
        return n

    def steps_for_epochs(self, epochs: int) -> int:
        """Optimiser steps in `epochs` epochs: whole batches only (the released `n_epochs`)."""
        return epochs * (self.epoch_size // self.batch_size)

    def batch(self, step: int) -> list:
        B = self.batch_size
        per_epoch = self.steps_per_epoch
        if per_epoch is not None:  # official windows: batches never straddle two epochs
            e, k = divmod(step, per_epoch)
            return self.epoch(e)[k * B : (k + 1) * B]
        out = []
        for i in range(step * B, (step + 1) * B):
            e, j = divmod(i, self.epoch_size)
            out.append(self.epoch(e)[j])
        return out

    def episodes_used(self, steps: int) -> list[int]:
        """How many of each epoch's episodes (a prefix of its order) the first `steps` steps train on, one
        entry per epoch they reach (at least one): the reference log-probs to compute."""
        B, E, per_epoch = self.batch_size, self.epoch_size, self.steps_per_epoch
        if per_epoch is not None:
            n = max(1, math.ceil(steps / per_epoch))
            return [min(per_epoch, steps - e * per_epoch) * B for e in range(n)]
        n = max(1, math.ceil(steps * B / E))
        return [min(E, steps * B - e * E) for e in range(n)]

    def plan_key(self, e: int) -> dict:
        d = self.cfg.data
        key = {"stage_seed": self.seed, "epoch": e, "shots": d.shots, "max_tokens": d.max_tokens,
               "user_description": d.user_description, "episodes_per_user": d.episodes_per_user,
               "split": "train"}
        # Later keys only where they differ from their defaults: reference caches of older runs stay valid.
        defaults = type(d)()
        key.update({k: getattr(d, k) for k in ("episode_sampling", "truncate", "bos", "rejected_description",
                                               "split_special_tokens")
                    if getattr(d, k) != getattr(defaults, k)})  # fmt: skip
        return key


class Trainer:
    """One training run: its data, tokenizer, run directory and models, then `run()`: its stages in turn."""

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
        self.tensorboard = TensorBoard(self.out / "tensorboard", cfg.run.tensorboard)
        self.source_dtype = self._param_dtype()  # the weights' dtype in the source checkpoint
        if cfg.model.name not in NAMED_SIZES:  # a bad model directory fails before the run directory exists
            if not Path(cfg.model.name).is_dir():
                raise FspoError(f"{cfg.model.name}: neither a named size ({', '.join(NAMED_SIZES)}) nor a model "
                                "directory")  # fmt: skip
            # A run directory starts from its final policy. One spelling per directory ("m/", "./m", "/abs/m"):
            # config.toml holds it, and --resume compares config.toml, possibly from another working directory.
            source = str(load_run(cfg.model.name).policy.resolve())
            self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=source))
            check_weights(cfg.model.name)
            self._check_vocab(load_tokenizer(cfg.model.name, split_special_tokens=cfg.data.split_special_tokens),
                              read_config(cfg.model.name).vocab_size)
            self.source_dtype = stored_dtype(cfg.model.name)
        self.run_dir = RunDir(self.out, log=self.log)
        try:
            self.run_dir.prepare(cfg, resume)
            self.run_info = self.run_dir.read_info(self.dataset.root, self.data_fp)
            self.tokenizer_dir = self._tokenizer()
            self.tokenizer = load_tokenizer(self.tokenizer_dir, split_special_tokens=cfg.data.split_special_tokens)
        except BaseException:
            self.close(failed=True)  # the run directory's lock too: a corrected retry in this process works
            raise
        self.autocast = self.device.type == "cuda" and cfg.model.dtype == "auto"
        self.validator = Validator(cfg, self.dataset, self.tokenizer, self.device, self._autocast, log=self.log)

    def _check_vocab(self, tokenizer, vocab_size: int):
        """Every id the training texts and the episode format encode to fits the model's embedding."""
        texts = [*FORMAT_PIECES, *self._texts(self.cfg.data.user_description)]
        check_ids_fit(tokenizer, vocab_size, self.cfg.model.name, tokenizer.encode_batch(texts))

    def _texts(self, descriptions: bool) -> list[str]:
        """The training users' texts: each preference's question and responses, then, with `descriptions`,
        the user's description and the rejected branches' (where the run renders them)."""
        d, texts = self.cfg.data, []
        for user in self.dataset.users_in("train"):
            prefs = self.dataset.prefs.get(user.user_id, [])
            texts += [t for p in prefs for t in (p.question, p.chosen, p.rejected)]
            if descriptions:
                texts.append(user.description)
                if d.user_description and d.rejected_description == "rejected_persona":
                    texts += [p.rejected_description for p in prefs if p.rejected_description]
        return texts

    def _tokenizer(self) -> Path:
        name = self.cfg.model.name
        if name not in NAMED_SIZES:
            return Path(name)
        tok_dir = self.out / "tokenizer"
        if self.is_main and not (tok_dir / "tokenizer.json").is_file():
            shutil.rmtree(tok_dir, ignore_errors=True)  # a killed attempt's, without its tokenizer.json
            with atomic_dir(tok_dir) as tmp:
                # The episode format's fixed headers become single tokens (they are most of a context's text).
                train_tokenizer(self._texts(descriptions=True), self.cfg.model.vocab_size, tmp,
                                whole_pieces=FORMAT_PIECES)
        barrier()
        return tok_dir

    def close(self, failed: bool = False):
        """Flush TensorBoard, release the run directory and leave the process group (torchrun).

        After a failure the process group is left alone: destroying it is collective, and peers may be
        blocked in another collective (a deadlock); torchrun ends them when this rank exits non-zero."""
        import torch.distributed as dist

        self.tensorboard.close()
        self.run_dir.release()
        if not failed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ models

    def _param_dtype(self) -> torch.dtype:
        return {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(self.cfg.model.dtype, torch.float32)

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
            return load_sharded(model_dir or m.name, self._param_dtype(), self.device, attention_impl=m.attention_impl,
                                activation_checkpointing=m.activation_checkpointing, compile=m.compile,
                                mixed_precision=self.autocast).train()
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
        if m.num_attention_heads:
            overrides.update(num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
                             head_dim=0)
        cfg = LlamaConfig.from_name(m.name, **overrides)
        if m.num_attention_heads and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            raise FspoError(f"model.num_attention_heads = {cfg.num_attention_heads} does not divide the width "
                            f"{cfg.hidden_size}")
        return build_model(cfg, dtype=self._param_dtype(), device=self.device, seed=self.cfg.run.seed)

    def _reference(self, model_dir: Path):
        """The reference model, in eval mode. Under torchrun it is sharded like the policy (the same FSDP2
        wrapping and mixed precision, so that both compute alike): every rank holding a whole reference
        beside its policy shards would cost a whole model per GPU."""
        m = self.cfg.model
        if self.world > 1:
            return load_sharded(model_dir, self._param_dtype(), self.device, attention_impl=m.attention_impl,
                                mixed_precision=self.autocast).eval()
        return self._load(model_dir).eval()

    def _load(self, model_dir: Path):
        return load_model(model_dir, dtype=self._param_dtype(), device=self.device,
                          attention_impl=self.cfg.model.attention_impl)

    def _wrap(self, model):
        """Activation checkpointing, compile and (under torchrun) FSDP2 are applied to the finished model."""
        m = self.cfg.model
        if self.world > 1:
            return parallelize(model, activation_checkpointing=m.activation_checkpointing, compile=m.compile,
                               mixed_precision=self.autocast)
        return apply_ac_and_compile(model, activation_checkpointing=m.activation_checkpointing, compile=m.compile)

    def _weights_of(self, info: StageRecord) -> Path:
        """Where a later stage reads a finished stage's weights (its initial policy and its reference): the
        final, or, when finals are cast (model.save_dtype), the master weights of the stage's last checkpoint
        that the final was cast from, so that the cast never rounds away what the stage learned."""
        if self._final_dtype() != self._param_dtype():
            sealed = self.out / info.checkpoint
            if info.checkpoint and ckpt.verify(sealed) is None:
                return sealed / "model"
            self.log(f"{sealed}: not a whole checkpoint; the next stage starts from the cast final")
        return self.out / info.final

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    # ------------------------------------------------------------------ stages

    def run(self, stage: str = "all", max_steps: int | None = None) -> dict[str, StageRecord]:
        stages = stages_for(stage, self.cfg.pref.loss)
        self.run_info.stage_order = stages
        result = {}
        policy_dir = None
        earlier = self.run_info.stages.get("pref-ft")
        if stages[0] != "pref-ft" and earlier and ckpt.verify(self.out / earlier.final) is None:
            policy_dir = self._weights_of(earlier)  # `--stage ipo` after `--stage pref-ft` in the same run
        for s in stages:
            done = self.run_info.stages.get(s)
            if done and (self.out / done.final).is_dir() and ckpt.verify(self.out / done.final) is None:
                self.log(f"[{s}] already complete: {self.out / done.final}")
                policy_dir = self._weights_of(done)
                result[s] = done
                continue
            result[s] = self._run_stage(s, policy_dir, max_steps)
            policy_dir = self._weights_of(result[s])
        if self.is_main:
            plot_loss_curve(self.out, self.log)
        barrier()  # no rank tears the process group down while another still works (gloo aborts then)
        return result

    def _run_stage(self, stage: str, init_dir: Path | None, max_steps: int | None) -> StageRecord:
        cfg = self.cfg
        plan = EpisodePlan(self.dataset, self.tokenizer, cfg, stage)
        total, peak_lr = self._stage_steps(stage, max_steps, plan)
        ref_dir = self._reference_dir(stage, init_dir)
        stage_dir = self.out / "checkpoints" / stage
        resume = ckpt.pick_resume(stage_dir, self.rank, self.world, log=self.log)
        model = self._policy(resume.path / "model" if resume else init_dir)
        start = resume.step if resume else 0
        if resume:
            self.log(f"[{stage}] resuming from {resume.path} (step {start})")
        self.run_dir.truncate_metrics(stage, start)
        optimizer = make_optimizer(model, cfg)
        if resume:
            ckpt.restore(resume, model, optimizer, self.rank, self.world)
        else:
            torch.manual_seed(cfg.run.seed)
        evaluating = cfg.run.eval_every > 0 and start < total
        eval_eps = self.validator.episodes(model) if evaluating else []
        ref_table, eval_ref = {}, None  # reference log-probs: of every planned episode, of the held-out ones
        if ref_dir is not None and start < total:
            ref_table, eval_ref = self._reference_logprobs(stage, ref_dir, plan, total, eval_eps)

        progress = StageProgress(stage, total, start, cfg.run.progress and self.is_main, log=self.log)
        last_ckpt = resume.path if resume else None
        for step in range(start, total):
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
            grad_norm = self._clip_grad_norm(model)
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
                rec["mfu"] = mfu(model.config, cfg.data.max_tokens, rec["tokens_per_s"])
            evaluated = evaluating and ((step + 1) % cfg.run.eval_every == 0 or step + 1 == total)
            if evaluated:
                rec.update(self.validator.evaluate(stage, model, eval_eps, eval_ref))
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == total or evaluated:
                self.run_dir.append_metrics(rec)
                self.tensorboard.write(rec)
            progress.step(rec, evaluated)
            if step + 1 < total and cfg.run.save_every and (step + 1) % cfg.run.save_every == 0:
                last_ckpt = self._save(stage_dir, step + 1, model, optimizer)
        progress.close()
        if last_ckpt is None or ckpt.step_of(last_ckpt) != total:
            last_ckpt = self._save(stage_dir, total, model, optimizer)
        return self._publish(stage, total, last_ckpt, model)

    def _stage_steps(self, stage: str, max_steps: int | None, plan: EpisodePlan) -> tuple[int, float]:
        sec = self.cfg.pref_ft if stage == "pref-ft" else self.cfg.pref
        # Official windows: an epoch smaller than one batch fails here, before any model loads.
        official = plan.steps_per_epoch is not None
        if max_steps is not None:
            steps = max_steps
        elif sec.epochs:  # whole batches per epoch, as the released loop counts them (`plan.steps_for_epochs`)
            steps = plan.steps_for_epochs(sec.epochs)
            left = plan.epoch_size % plan.batch_size
            self.log(f"[{stage}] {sec.epochs} epoch(s) of {plan.epoch_size} episodes, {plan.batch_size} a step: "
                     f"{steps} steps" + (f" (each epoch's last {left} left out, as released)" if official and left
                                         else ""))  # fmt: skip
        else:
            steps = sec.steps
        return steps, (sec.lr or self.cfg.optim.lr)

    def _reference_dir(self, stage: str, init_dir: Path | None) -> Path | None:
        """IPO/DPO's reference model (the policy it starts from), recorded in run.json; None for Pref-FT."""
        if stage == "pref-ft":
            return None
        name = self.cfg.model.name
        ref_dir = init_dir if init_dir is not None else Path(name)
        if name in NAMED_SIZES and init_dir is None:
            raise FspoError(f"--stage {stage} from scratch has no reference model: run pref-ft first "
                            "(--stage all) or pass --model with a Pref-FT'd HF directory")
        self.run_info.reference = str(ref_dir.relative_to(self.out)) if ref_dir.is_relative_to(self.out) \
            else str(ref_dir.resolve())
        self.run_dir.write_info(self.run_info)
        return ref_dir

    def _reference_logprobs(self, stage: str, ref_dir: Path, plan: EpisodePlan, total: int, eval_eps: list):
        """Reference log-probs for every planned epoch, computed once, before any training step (cached in
        RUN/reference/), and of the held-out episodes: -> ({episode_id: (chosen, rejected)}, EpisodeLogprobs
        or None). Every rank scores its share of each planned epoch; rank 0 writes the gathered cache."""
        cfg = self.cfg
        cache = ReferenceCache(self.out / "reference", model_fingerprint(ref_dir), self.data_fp)
        # Only the episodes the stage will reach: the last planned epoch is usually partial.
        used = plan.episodes_used(total)
        n_epochs = len(used)
        ref_model = self._reference(ref_dir)
        bar = progress_bar(sum(-(-u // self.world) for u in used), f"[{stage}] reference log-probs", "ep",
                           cfg.run.progress and self.is_main)
        table, eval_ref = {}, None
        # The reference runs at the policy's precision (bf16 autocast over fp32 weights on CUDA): at step 0
        # policy and reference then agree exactly, and IPO/DPO margins start at 0, not at rounding noise.
        with self._autocast():
            for e in range(n_epochs):
                key = {**plan.plan_key(e), "episodes": used[e], "autocast": self.autocast}
                table.update(cache.get_epoch(key, plan.epoch(e)[:used[e]], ref_model, cfg.data.max_tokens,
                                             cfg.model.logprob_impl, self.device, log=self.log,
                                             on_row=bar.update, rank=self.rank, world=self.world))
            bar.close()
            if eval_eps:  # all of them on every rank (the same forwards, as FSDP2 needs): a small set
                eval_ref = score_episodes(ref_model, eval_eps, cfg.data.max_tokens, impl=cfg.model.logprob_impl,
                                          device=self.device)
        del ref_model
        barrier()
        return table, eval_ref

    def _clip_grad_norm(self, model) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0
                                                   else float("inf"))
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP2

    def _save(self, stage_dir: Path, step: int, model, optimizer) -> Path:
        return ckpt.save(stage_dir, step, model, optimizer, self.tokenizer_dir, dtype=self._param_dtype(),
                         keep_last=self.cfg.run.keep_last, rank=self.rank, world=self.world)

    def _publish(self, stage: str, total: int, last_ckpt: Path, model) -> StageRecord:
        """The stage's final model `RUN/<stage>/`: its last checkpoint's, cast to model.save_dtype (checkpoints
        keep the master weights), published atomically and recorded in run.json."""
        info = StageRecord(final=stage, steps=total, checkpoint=str(last_ckpt.relative_to(self.out)))
        if self.is_main:
            cast = self._final_dtype() if self._final_dtype() != self._param_dtype() else None
            ckpt.publish(last_ckpt / "model", self.out / stage, cast, model.config)
            self.run_info.stages[stage] = info
            self.run_dir.write_info(self.run_info)
        barrier()
        self.log(f"[{stage}] done: {self.out / stage}")
        return info

    # ------------------------------------------------------------------ the step

    def _train_step(self, stage: str, model, episodes: list, ref_table: dict) -> dict:
        """Forward/backward over micro-batches (packed rows) whose losses sum exactly to the global-batch loss.
        The step's numbers stay on the device until one read at the end: no sync per micro-batch."""
        cfg, dev = self.cfg, self.device
        pref_ft = stage == "pref-ft"
        denominator = None
        if pref_ft:
            # pref_ft.targets = chosen packs [context | chosen] blocks; both packs [context | chosen | rejected],
            # the rejected branch trained on too (the released code's SFT targets).
            both = cfg.pref_ft.targets == "both"
            items = [PackItem(ep.prompt_ids, ep.responses if both else [ep.chosen_ids], ep.episode_id)
                     for ep in episodes]  # fmt: skip
            # The whole batch's denominator, so that the rows' losses sum to the batch's (sft_loss).
            denominator = sft_denominator(torch.tensor([len(r) for it in items for r in it.responses]),
                                          cfg.pref_ft.reduction)  # fmt: skip
        else:
            items = episodes
        # Under torchrun each rank takes every world-th episode of the global batch. FSDP2 averages
        # gradients over ranks, so each rank's loss is scaled by the world size: the average of the
        # ranks' gradients is then the gradient of the global-batch loss.
        scale = float(self.world)
        share, rows = rank_rows(items, lambda eps: pack_batches(eps, cfg.data.max_tokens), self.rank, self.world)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # fp64: as exact as summing on the host
        chosen_nll = torch.zeros((), dtype=torch.float64, device=dev)
        pairs, n_tokens = [], 0  # IPO/DPO: each row's (π_c, π_r, ref_c, ref_r), [4, E_row]
        for row, real in rows:
            with self._autocast():
                out = episode_logprobs(model, row.to(dev), impl=cfg.model.logprob_impl)
            if pref_ft:
                loss = stage_loss(stage, cfg, out, denominator=denominator)
            else:
                ref = torch.tensor([ref_table[share[i].episode_id] for i in row.episodes], dtype=out.chosen.dtype,
                                   device=dev)  # fmt: skip
                ref = out._replace(chosen=ref[:, 0], rejected=ref[:, 1])
                # The row's mean, weighted by its share of the global batch: the rows sum to the batch's mean.
                loss = stage_loss(stage, cfg, out, ref) * (len(row.episodes) / len(episodes))
            (loss * (scale if real else 0.0)).backward()
            if not real:
                continue
            loss_sum += loss.detach()
            n_tokens += row.num_tokens
            if pref_ft:
                chosen_nll -= out.chosen.detach().sum()
            else:
                pairs.append(torch.stack(preference_inputs(out, ref, cfg.pref.length_normalize)).detach())
        if pref_ft:
            loss, nll, n_tokens = all_reduce_sum([*torch.stack([loss_sum, chosen_nll]).tolist(), float(n_tokens)])
            # nll_per_token is the chosen responses' whatever the targets: comparable across pref_ft settings.
            return {"loss": loss, "nll_per_token": nll / sum(len(ep.chosen_ids) for ep in episodes), "_tokens": n_tokens}
        pc, pr, rc, rr = (all_gather_cat(t) for t in torch.cat(pairs, dim=1))
        rewards = reward_metrics(pc, pr, rc, rr, cfg.pref.beta)
        values = torch.stack([t.double() for t in (loss_sum, *rewards.values(), pc.mean(), pr.mean())]).tolist()
        loss, n_tokens = all_reduce_sum([values[0], float(n_tokens)])
        return {"loss": loss, **dict(zip(rewards, values[1:5])), "logps/chosen": values[5], "logps/rejected": values[6],
                "_tokens": n_tokens}
