"""Training configuration: typed sections, a TOML file plus CLI overrides, unknown keys are errors.

```toml
[model]
name = "tiny"            # or a Hugging Face Llama directory
[data]
shots = "2-8"
[optim]
lr = 2e-3
[pref_ft]
steps = 600
[pref]
loss = "ipo"
beta = 0.5
steps = 300
```
Every field has a one-line doc (the comment after it); `resolved_toml()` writes the config back as TOML,
and the run directory keeps it as `config.toml`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fspo_engine.engine.episodes import RenderOptions, parse_shots
from fspo_engine.engine.errors import FspoError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSection:
    name: str = "tiny"  # a named size (tiny, 1B, 3B, 8B) trained from scratch, or an HF Llama directory
    dtype: str = "auto"  # parameter dtype: auto (fp32 on CPU, bf16 autocast with fp32 master weights on GPU), float32, bfloat16, float64 (numerics checks: the golden run)
    save_dtype: str = "auto"  # stage finals' weights: auto (as the checkpoints: what a later stage starts from), source (the source checkpoint's dtype), float32, bfloat16, float16
    attention_impl: str = "auto"  # auto (Triton on CUDA), triton, torch
    logprob_impl: str = "auto"  # fused log-prob op: auto (Triton on CUDA), triton, torch
    activation_checkpointing: bool = False  # recompute each block in backward (less memory, ~30% more compute)
    compile: bool = False  # torch.compile each block
    vocab_size: int = 512  # sentencepiece vocabulary trained on the dataset for a from-scratch model
    hidden_size: int = 0  # from-scratch only: override the named size's width (0 = keep)
    num_hidden_layers: int = 0  # from-scratch only: override the named size's depth (0 = keep)
    num_attention_heads: int = 0  # from-scratch only: override the named size's heads, key/value heads alike (0 = keep); must divide the width


@dataclass
class DataSection:
    shots: str = "8"  # shots per episode: "8" or a range "1-8" sampled per episode
    max_tokens: int = 8192  # token budget of one packed row (micro-batch)
    user_description: bool = False  # targets start with "## User Description" (the paper's user-description CoT)
    episodes_per_user: int = 0  # episodes per user per epoch (0 = one per preference of the user); sampled only
    seed: int = 0  # episode sampling seed
    episode_sampling: str = "sampled"  # sampled (each pref a target once per epoch, shots drawn from the user's others) or official_windows (the released loader's)
    truncate: str = "drop_oldest_shots"  # over max_tokens: drop_oldest_shots, or keep_start (cut the prompt's end, as the released code)
    bos: bool = True  # prompt starts with the tokenizer's bos (the released loader adds no special tokens)
    split_special_tokens: bool = True  # a special token's text in the data ("</s>", "<|eot_id|>") is plain text; false: it becomes the special id (as released)
    rejected_description: str = "shared"  # with user_description, the rejected branch's: shared (the user's) or rejected_persona (the pref's, as released)

    def render_options(self) -> RenderOptions:
        """The rendering and truncation keys, as `episodes.tokenize_episodes` takes them."""
        return RenderOptions(user_description=self.user_description, bos=self.bos, truncate=self.truncate,
                             rejected_description=self.rejected_description)


@dataclass
class OptimSection:
    name: str = "adamw"  # adamw, or rmsprop (the released recipe's: torch defaults, no momentum)
    lr: float = 1e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW decoupled weight decay (not applied to norms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW / RMSprop epsilon
    alpha: float = 0.99  # RMSprop smoothing constant of the squared-gradient average (torch's default)
    warmup_steps: int = 10  # linear warmup steps
    schedule: str = "cosine"  # cosine, linear or constant decay after warmup
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping)


@dataclass
class BatchSection:
    episodes: int = 16  # episodes per optimiser step (global batch, across ranks)


@dataclass
class PrefFtSection:
    steps: int = 100  # optimiser steps of few-shot Pref-FT
    epochs: int = 0  # > 0: train epochs * (epoch's episodes // batch) steps instead of `steps` (the released n_epochs)
    lr: float = 0.0  # stage learning rate (0 = optim.lr)
    episodes: int = 0  # episodes per Pref-FT step (0 = batch.episodes)
    targets: str = "chosen"  # responses trained on: chosen, or both (chosen and rejected, as the released code)
    reduction: str = "mean"  # mean (NLL per target token) or sum (summed NLL per response, averaged over responses, as released)


@dataclass
class PrefSection:
    loss: str = "ipo"  # the preference stage of --stage all: ipo or dpo (--stage ipo|dpo names it directly)
    beta: float = 0.1  # β: IPO target margin 1/(2β); DPO inverse temperature
    label_smoothing: float = 0.0  # DPO conservative label smoothing ε
    length_normalize: bool = False  # use mean per-token log-probs (TRL convention) instead of sums
    steps: int = 100  # optimiser steps of IPO/DPO
    epochs: int = 0  # > 0: train epochs * (epoch's episodes // batch) steps instead of `steps` (the released n_epochs)
    lr: float = 0.0  # stage learning rate (0 = optim.lr)


@dataclass
class RunSection:
    seed: int = 0  # model init and RNG seed
    save_every: int = 0  # checkpoint every N optimiser steps (0 = only at stage ends)
    keep_last: int = 2  # checkpoints kept per stage
    log_every: int = 1  # metrics.jsonl line every N steps
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard extra)
    progress: bool = True  # progress bar
    eval_every: int = 0  # held-out metrics (val users; test users when the data has none) every N optimiser steps and at each stage's end (0 = never)
    eval_episodes: int = 64  # held-out episodes per evaluation: a fixed sample at the training shot counts


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    pref_ft: PrefFtSection = field(default_factory=PrefFtSection)
    pref: PrefSection = field(default_factory=PrefSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "config"):
        """Every value in range, so a bad one fails before a run writes anything (not steps later)."""

        def bad(key, why):
            raise FspoError(f"{where}: {key}: {why}")

        def check(key, value, ok, why):
            if isinstance(value, float) and not math.isfinite(value) or not ok(value):
                bad(key, f"{why}, got {value!r}")

        if self.pref.loss not in ("ipo", "dpo"):
            bad("pref.loss", f"must be ipo or dpo, got {self.pref.loss!r}")
        for key, value, choices in (
            ("optim.schedule", self.optim.schedule, ("cosine", "linear", "constant")),
            ("optim.name", self.optim.name, ("adamw", "rmsprop")),
            ("pref_ft.targets", self.pref_ft.targets, ("chosen", "both")),
            ("pref_ft.reduction", self.pref_ft.reduction, ("mean", "sum")),
            ("data.episode_sampling", self.data.episode_sampling, ("sampled", "official_windows")),
            ("data.truncate", self.data.truncate, ("drop_oldest_shots", "keep_start")),
            ("data.rejected_description", self.data.rejected_description, ("shared", "rejected_persona")),
        ):
            if value not in choices:
                bad(key, f"must be {' or '.join(choices)}, got {value!r}")
        positive = lambda v: v > 0  # noqa: E731
        non_negative = lambda v: v >= 0  # noqa: E731
        for key, value, ok, why in (
            ("optim.lr", self.optim.lr, positive, "must be > 0"),
            ("optim.eps", self.optim.eps, positive, "must be > 0"),
            ("optim.beta1", self.optim.beta1, lambda v: 0 <= v < 1, "must be in [0, 1)"),
            ("optim.beta2", self.optim.beta2, lambda v: 0 <= v < 1, "must be in [0, 1)"),
            ("optim.alpha", self.optim.alpha, lambda v: 0 <= v < 1, "must be in [0, 1)"),
            ("optim.min_lr_ratio", self.optim.min_lr_ratio, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            ("optim.weight_decay", self.optim.weight_decay, non_negative, "must be >= 0"),
            ("optim.grad_clip", self.optim.grad_clip, non_negative, "must be >= 0 (0 = no clipping)"),
            ("pref_ft.lr", self.pref_ft.lr, non_negative, "must be >= 0 (0 = optim.lr)"),
            ("pref.lr", self.pref.lr, non_negative, "must be >= 0 (0 = optim.lr)"),
            ("pref.beta", self.pref.beta, positive, "must be > 0"),
            ("pref.label_smoothing", self.pref.label_smoothing, lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
            ("batch.episodes", self.batch.episodes, positive, "must be >= 1"),
            ("pref_ft.episodes", self.pref_ft.episodes, non_negative, "must be >= 0 (0 = batch.episodes)"),
            ("data.max_tokens", self.data.max_tokens, lambda v: v >= 16, "must be >= 16"),
            ("data.episodes_per_user", self.data.episodes_per_user, non_negative, "must be >= 0 (0 = one per pref)"),
            ("data.seed", self.data.seed, non_negative, "must be >= 0"),
            ("pref_ft.steps", self.pref_ft.steps, non_negative, "must be >= 0"),
            ("pref.steps", self.pref.steps, non_negative, "must be >= 0"),
            ("pref_ft.epochs", self.pref_ft.epochs, non_negative, "must be >= 0 (0 = pref_ft.steps)"),
            ("pref.epochs", self.pref.epochs, non_negative, "must be >= 0 (0 = pref.steps)"),
            ("optim.warmup_steps", self.optim.warmup_steps, non_negative, "must be >= 0"),
            ("run.seed", self.run.seed, non_negative, "must be >= 0"),
            ("run.save_every", self.run.save_every, non_negative, "must be >= 0 (0 = stage ends only)"),
            ("run.keep_last", self.run.keep_last, positive, "must be >= 1"),
            ("run.log_every", self.run.log_every, positive, "must be >= 1"),
            ("run.eval_every", self.run.eval_every, non_negative, "must be >= 0 (0 = never)"),
            ("run.eval_episodes", self.run.eval_episodes, positive, "must be >= 1"),
            ("model.vocab_size", self.model.vocab_size, lambda v: v >= 300, "must be >= 300 (256 byte pieces + 3)"),
            ("model.hidden_size", self.model.hidden_size, non_negative, "must be >= 0 (0 = the named size's)"),
            ("model.num_hidden_layers", self.model.num_hidden_layers, non_negative,
             "must be >= 0 (0 = the named size's)"),
            ("model.num_attention_heads", self.model.num_attention_heads, non_negative,
             "must be >= 0 (0 = the named size's)"),
        ):  # fmt: skip
            check(key, value, ok, why)
        for key, value in (("model.attention_impl", self.model.attention_impl),
                           ("model.logprob_impl", self.model.logprob_impl)):
            if value not in ("auto", "triton", "torch"):
                bad(key, f"must be auto, triton or torch, got {value!r}")
        if self.model.dtype not in ("auto", "float32", "bfloat16", "float64"):
            bad("model.dtype", f"must be auto, float32, bfloat16 or float64, got {self.model.dtype!r}")
        if self.model.save_dtype not in ("auto", "source", "float32", "bfloat16", "float16"):
            bad("model.save_dtype", f"must be auto, source, float32, bfloat16 or float16, got {self.model.save_dtype!r}")
        if self.model.name in _named_sizes() and self.model.hidden_size:
            heads = _named_sizes()[self.model.name]["num_attention_heads"]
            if self.model.hidden_size % heads:
                bad("model.hidden_size", f"must be a multiple of {self.model.name}'s {heads} attention heads, "
                                         f"got {self.model.hidden_size}")  # fmt: skip
        try:
            shots = parse_shots(self.data.shots)
        except FspoError as exc:
            bad("data.shots", str(exc).removeprefix("--shots: "))
        if self.optim.name == "rmsprop" and self.optim.weight_decay:
            bad("optim.weight_decay", "applies to adamw only (the released recipe's RMSprop has none); set it to 0")
        if self.data.episode_sampling == "official_windows":
            if not isinstance(shots, int):
                bad("data.shots", f"data.episode_sampling = official_windows takes one shot count (the released "
                                  f"loader's N), got {self.data.shots!r}")
            if self.data.episodes_per_user:
                bad("data.episodes_per_user", "applies to data.episode_sampling = sampled only; set it to 0")

    def resolved_toml(self) -> str:
        lines = []
        for section in dataclasses.fields(self):
            lines.append(f"[{section.name}]")
            for f in dataclasses.fields(getattr(self, section.name)):
                lines.append(f"{f.name} = {_toml_value(getattr(getattr(self, section.name), f.name))}")
            lines.append("")
        return "\n".join(lines)


def _named_sizes() -> dict:
    from fspo_engine.engine.model import NAMED_SIZES  # the model module imports torch: only when needed

    return NAMED_SIZES


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _coerce(value: Any, typ: str, key: str, where: str) -> Any:
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[typ]
    if typ == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # shots = 8 in TOML
    if isinstance(value, bool) and typ != "bool" or not isinstance(value, expected):
        raise FspoError(f"{where}: {key}: expected {typ}, got {type(value).__name__} {value!r}")
    return float(value) if typ == "float" else value


def _apply(cfg: TrainConfig, tree: dict, where: str):
    for section_name, body in tree.items():
        if section_name not in {f.name for f in dataclasses.fields(cfg)}:
            raise FspoError(f"{where}: unknown section [{section_name}] "
                            f"(known: {', '.join(f.name for f in dataclasses.fields(cfg))})")
        if not isinstance(body, dict):
            raise FspoError(f"{where}: [{section_name}] must be a table")
        section = getattr(cfg, section_name)
        types = {f.name: f.type for f in dataclasses.fields(section)}
        for key, value in body.items():
            if key not in types:
                raise FspoError(f"{where}: unknown key {section_name}.{key} (known: {', '.join(types)})")
            setattr(section, key, _coerce(value, types[key], f"{section_name}.{key}", where))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then `overrides` ({"section.key": value}); validated at the end."""
    cfg = TrainConfig()
    where = "config"
    if path is not None:
        where = str(path)
        p = Path(path)
        shipped = Path(__file__).resolve().parent.parent / "configs" / f"{p.name}.toml"
        if not p.is_file() and p.suffix == "" and p.parent == Path(".") and shipped.is_file():
            p = shipped  # a config shipped with fspo-engine, by name: `--config official`
        if not p.is_file():
            raise FspoError(f"{p}: config file not found")
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is fine
        except UnicodeDecodeError as exc:
            raise FspoError(f"{p}: not UTF-8 ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise FspoError(f"{p}: {exc}") from None
        _apply(cfg, tree, where)
    tree: dict[str, dict] = {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        tree.setdefault(section, {})[key] = value
    _apply(cfg, tree, "command line")
    cfg.validate(where)
    return cfg


def parse_set_option(items: tuple[str, ...]) -> dict[str, Any]:
    """`--set optim.lr=3e-4 --set pref.loss=dpo` -> {"optim.lr": 3e-4, "pref.loss": "dpo"} (TOML values)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise FspoError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()  # a bare string
    return out
