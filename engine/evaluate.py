"""Preference accuracy on unseen (`test`) users as a function of the number of shots.

With a reference model (a run directory records which one), accuracy is that of FSPO's implicit reward:
an episode is right when h = (π_c − π_r) − (ref_c − ref_r) > 0. A plain model directory has no
reference; it is scored by comparing log π_c with log π_r, and the output says so (`"method"`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fspo_engine.engine import checkpoint as ckpt
from fspo_engine.engine.checkpoint import atomic_write_text
from fspo_engine.engine.distributed import pick_device
from fspo_engine.engine.episodes import load_dataset, sample_episodes, tokenize_episodes
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.model import load_model
from fspo_engine.engine.scoring import score_episodes
from fspo_engine.engine.tokenizer import check_ids_fit, load_tokenizer


def resolve_models(model: str | os.PathLike) -> tuple[Path, Path | None]:
    """(policy dir, reference dir or None) for a run directory or a plain HF model directory."""
    model = Path(model)
    if not model.is_dir():
        raise FspoError(f"{model}: not a model directory")
    run_json = model / "run.json"
    if run_json.is_file():
        try:
            info = json.loads(run_json.read_text(encoding="utf-8"))
            order = [s for s in info.get("stage_order", []) if s in info.get("stages", {})]
            policy = model / info["stages"][order[-1]]["final"] if order else None
            ref = info.get("reference") if order and order[-1] != "pref-ft" else None
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # torn or hand-edited run.json
            raise FspoError(f"{run_json}: unreadable ({type(exc).__name__}: {exc})") from None
        if policy is None:
            raise FspoError(f"{model}: the run has no finished stage yet")
        ref_dir = None if ref is None else (Path(ref) if Path(ref).is_absolute() else model / ref)
        for d in (policy, ref_dir):
            # A run's models are sealed with checksums: refuse a damaged one rather than score garbage.
            if d is not None and (d / ckpt.MARKER).is_file() and (why := ckpt.verify(d)) is not None:
                raise FspoError(f"{d}: damaged model ({why})")
        return policy, ref_dir
    if not (model / "config.json").is_file():
        raise FspoError(f"{model}: neither a run directory (run.json) nor a model directory (config.json)")
    return model, None


def evaluate(model: str, data: str, shots: list[int], split: str = "test", max_tokens: int = 8192, seed: int = 0,
             device: str | None = None, impl: str = "auto", user_description: bool | None = None,
             episodes_per_user: int | None = None, progress: bool = True,
             length_normalize: bool | None = None) -> dict:
    """Preference accuracy per shot count. length_normalize: compare mean per-token log-probs instead of
    sums; user_description: targets start with the user description. None = what the run trained with (its
    config.toml), off for a plain model directory.

    mean_margin is the mean log-ratio margin h = (π_c − π_r) − (ref_c − ref_r), or π_c − π_r without a
    reference; not scaled by β (training's rewards/margin is β·h)."""
    from tqdm.auto import tqdm

    if length_normalize is None:
        length_normalize = run_setting(model, "pref", "length_normalize")
    if user_description is None:
        user_description = run_setting(model, "data", "user_description")

    device = pick_device(device)
    policy_dir, ref_dir = resolve_models(model)
    dataset = load_dataset(data)
    tokenizer = load_tokenizer(policy_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = load_model(policy_dir, dtype=dtype, device=device).eval()
    ref = load_model(ref_dir, dtype=dtype, device=device).eval() if ref_dir is not None else None
    results = []
    for n in shots:
        eps = sample_episodes(dataset, split, n, seed=seed, epoch=0, episodes_per_user=episodes_per_user)
        if not eps:
            raise FspoError(f"{dataset.root}: no {split} users with preferences to evaluate on")
        tok = tokenize_episodes(eps, tokenizer, max_tokens=max_tokens, user_description=user_description)
        for m, where in ((policy, policy_dir), (ref, ref_dir)):
            if m is not None:
                check_ids_fit(tokenizer, m.config.vocab_size, where,
                              (t.prompt_ids + t.chosen_ids + t.rejected_ids for t in tok))  # fmt: skip
        bar = tqdm(total=len(tok) * (2 if ref is not None else 1), desc=f"eval {n}-shot", unit="ep",
                   disable=None if progress else True, leave=False)  # None: off when stderr is not a terminal
        margin = _margin(score_episodes(policy, tok, max_tokens, impl=impl, device=device, on_row=bar.update),
                         length_normalize)  # fmt: skip
        if ref is not None:
            r = score_episodes(ref, tok, max_tokens, impl=impl, device=device, on_row=bar.update)
            margin = margin - _margin(r, length_normalize)
        bar.close()
        results.append({
            "shots": n,
            "accuracy": (margin > 0).float().mean().item(),
            "mean_margin": margin.mean().item(),
            "episodes": len(tok),
            "mean_shots_used": sum(t.n_shots for t in tok) / len(tok),
        })
    return {
        "model": str(policy_dir),
        "reference": None if ref_dir is None else str(ref_dir),
        "method": "implicit_reward" if ref is not None else "logprob",
        "length_normalized": length_normalize,
        "user_description": user_description,
        "split": split,
        "data": str(dataset.root),
        "results": results,
    }


def _margin(lp, length_normalize: bool) -> torch.Tensor:
    """chosen - rejected log-prob per episode: sums, or means over each response's tokens."""
    if length_normalize:
        return lp.chosen / lp.chosen_tokens.clamp(min=1) - lp.rejected / lp.rejected_tokens.clamp(min=1)
    return lp.chosen - lp.rejected


def run_setting(model: str | os.PathLike, section: str, key: str) -> bool:
    """A boolean setting of the run that `model` is (its config.toml), e.g. ("data", "user_description"):
    scoring a run the way it trained. False for a plain model directory."""
    model = Path(model)
    cfg = model / "config.toml"
    if not (model / "run.json").is_file() or not cfg.is_file():
        return False
    from fspo_engine.engine.config import tomllib

    try:
        return bool(tomllib.loads(cfg.read_text(encoding="utf-8")).get(section, {}).get(key, False))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FspoError(f"{cfg}: unreadable ({exc})") from None


def write_report(report: dict, out_json: Path, out_png: Path | None = None):
    atomic_write_text(out_json, json.dumps(report, indent=2))
    if out_png is not None:
        plot_accuracy(report, out_png)


def plot_accuracy(report: dict, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["shots"] for r in report["results"]]
    ys = [r["accuracy"] for r in report["results"]]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(xs, ys, marker="o")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("shots (the user's labelled preferences in context)")
    ax.set_ylabel("preference accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['split']} users, {report['method'].replace('_', ' ')}")
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
