"""Preference accuracy on unseen (`test`) users as a function of the number of shots.

With a reference model (a run directory records which one), accuracy is that of FSPO's implicit reward:
an episode is right when h = (π_c − π_r) − (ref_c − ref_r) > 0. A plain model directory has no
reference; it is scored by comparing log π_c with log π_r, and the output says so (`"method"`).

Runs trained with user descriptions are scored after the description the policy infers from the shots
(`"description": "generated"`, engine/personalize.py); the user's true description is used only when asked
for (`"oracle"`), and the report says which. On a template dataset every shot count also gets the
Bayes-optimal accuracy (data_gen/bayes.py): the best any predictor can do from exactly those shots.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from fspo_engine.data_gen.atomic import write_text_atomic
from fspo_engine.data_gen.bayes import models_for
from fspo_engine.engine.distributed import pick_device
from fspo_engine.engine.episodes import RenderOptions, load_dataset, sample_episodes, tokenize_episodes
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.generate import turn_stop_ids
from fspo_engine.engine.metrics import save_figure
from fspo_engine.engine.model import load_model
from fspo_engine.engine.personalize import (
    Generator,
    check_description_mode,
    default_description_mode,
    hide_descriptions,
)
from fspo_engine.engine.rundir import load_run
from fspo_engine.engine.scoring import score_episodes
from fspo_engine.engine.tokenizer import check_ids_fit, load_tokenizer


def evaluate(model: str, data: str, shots: list[int], split: str = "test", max_tokens: int = 8192, seed: int = 0,
             device: str | None = None, impl: str = "auto", description: str | None = None,
             episodes_per_user: int | None = None, progress: bool = True,
             length_normalize: bool | None = None, max_description_tokens: int = 128) -> dict:
    """Preference accuracy per shot count. length_normalize: compare mean per-token log-probs instead of
    sums (None = as the run trained). description: "none" | "generated" | "oracle" (engine/personalize.py);
    None = "generated" for a run trained with user descriptions, else "none".

    mean_margin is the mean log-ratio margin h = (π_c − π_r) − (ref_c − ref_r), or π_c − π_r without a
    reference; not scaled by β (training's rewards/margin is β·h)."""
    from tqdm.auto import tqdm

    run = load_run(model)
    if length_normalize is None:
        length_normalize = run.config.pref.length_normalize
    if description is None:
        description = default_description_mode(run.config.data.user_description)
    check_description_mode(description)
    # Render episodes as the run trained on them (the released recipe's runs have no bos, cut prompts' starts).
    bos = run.config.data.bos
    options = RenderOptions(user_description=description != "none", bos=bos, truncate=run.config.data.truncate)

    device = pick_device(device)
    policy_dir, ref_dir = run.policy, run.reference
    dataset = load_dataset(data)
    tokenizer = load_tokenizer(policy_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = load_model(policy_dir, dtype=dtype, device=device).eval()
    ref = load_model(ref_dir, dtype=dtype, device=device).eval() if ref_dir is not None else None
    bayes = models_for(dataset.manifest)  # {} unless the template generator made the data
    results = []
    for n in shots:
        eps = sample_episodes(dataset, split, n, seed=seed, epoch=0, episodes_per_user=episodes_per_user)
        if not eps:
            raise FspoError(f"{dataset.root}: no {split} users with preferences to evaluate on")
        if description != "oracle":
            eps = hide_descriptions(eps)
        if description == "generated":
            gen = Generator(policy, tokenizer, stop_ids=turn_stop_ids(policy_dir, tokenizer.eos_id, policy.config.eos_token_id),
                            max_tokens=max_tokens, max_description_tokens=max_description_tokens, max_new_tokens=0,
                            bos=bos, where=str(policy_dir))
            with tqdm(total=len(eps), desc=f"describe {n}-shot", unit="ep", leave=False,
                      disable=None if progress else True) as bar:
                inferred = gen.describe(eps, on_done=bar.update)
            eps = [dataclasses.replace(ep, description=d) for ep, d in zip(eps, inferred)]
        tok = tokenize_episodes(eps, tokenizer, max_tokens=max_tokens, options=options)
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
        entry = {
            "shots": n,
            "accuracy": (margin > 0).float().mean().item(),
            "mean_margin": margin.mean().item(),
            "episodes": len(tok),
            "mean_shots_used": sum(t.n_shots for t in tok) / len(tok),
        }
        if bayes:
            entry.update(bayes_optimal(dataset, eps, tok, bayes))
        if description == "generated" and bayes:
            entry["description_accuracy"] = description_accuracy(dataset, eps, bayes)
        results.append(entry)
    return {
        "model": str(policy_dir),
        "reference": None if ref_dir is None else str(ref_dir),
        "method": "implicit_reward" if ref is not None else "logprob",
        "length_normalized": length_normalize,
        "description": description,
        "user_description": description != "none",  # targets carry a description (older readers' key)
        "split": split,
        "data": str(dataset.root),
        "results": results,
    }


def bayes_optimal(dataset, episodes, tokenized, models) -> dict:
    """The Bayes-optimal accuracy on these episodes, from the shots each kept after truncation (the oldest
    are dropped first): `bayes_optimal` is its expected accuracy, mean max(p, 1 - p); `bayes_predictor_accuracy`
    is how often naming the likelier side matches the data's own label (ties count half).

    `training_prior_accuracy` is the same count for a Bayes predictor that believes the *training* users'
    prior (their trait combinations, as often as they occur) instead of the uniform one: what a model that
    learnt the training users perfectly would score. On test users that hold held-out combinations it falls
    below the ceiling: the shots point at a combination that prior says never happens."""
    expected, realized, trained = [], [], []
    train_prior = {}
    for name, model in models.items():
        users = [u.traits for u in dataset.users.values() if u.domain == name and u.split == "train"]
        try:
            train_prior[name] = model.prior_of(users) if users else None
        except ValueError:  # a hand-edited template dataset: no training prior to compare with
            train_prior[name] = None
    for ep, t in zip(episodes, tokenized):
        domain = dataset.users[ep.user_id].domain
        model = models[domain]
        kept = [(s.chosen, s.rejected) for s in ep.shots[len(ep.shots) - t.n_shots:]]
        target = (ep.target.chosen, ep.target.rejected)
        try:
            p = model.p_chosen(kept, target)
            q = None if train_prior[domain] is None else model.p_chosen(kept, target, prior=train_prior[domain])
        except ValueError as exc:  # a hand-edited template dataset
            raise FspoError(f"{dataset.root / 'prefs.jsonl'}: episode {ep.episode_id}: {exc}") from None
        expected.append(max(p, 1.0 - p))
        realized.append(_named_side(p))
        if q is not None:
            trained.append(_named_side(q))
    out = {"bayes_optimal": float(np.mean(expected)), "bayes_predictor_accuracy": float(np.mean(realized))}
    if trained and len(trained) == len(realized):
        out["training_prior_accuracy"] = float(np.mean(trained))
    return out


def _named_side(p: float) -> float:
    """1 when naming the likelier side picks the data's chosen side (p = P(chosen)), 0 when not, 1/2 on a tie
    (within float rounding: a posterior summed over many trait vectors lands a few ulps off an exact 1/2)."""
    return 0.5 if abs(p - 0.5) < 1e-9 else 1.0 if p > 0.5 else 0.0


def description_accuracy(dataset, episodes, models) -> float:
    """Mean over episodes of the fraction of the user's true trait values that the inferred description
    states (template datasets: the domain knows how each value is worded)."""
    fractions = []
    for ep in episodes:
        user = dataset.users[ep.user_id]
        stated = models[user.domain].domain.stated_traits(ep.description, user.traits)
        fractions.append(sum(stated.values()) / max(len(stated), 1))
    return float(np.mean(fractions))


def _margin(lp, length_normalize: bool) -> torch.Tensor:
    """chosen - rejected log-prob per episode: sums, or means over each response's tokens."""
    if length_normalize:
        return lp.chosen / lp.chosen_tokens.clamp(min=1) - lp.rejected / lp.rejected_tokens.clamp(min=1)
    return lp.chosen - lp.rejected


def write_report(report: dict, out_json: Path, out_png: Path | None = None):
    write_text_atomic(out_json, json.dumps(report, indent=2))
    if out_png is not None:
        plot_accuracy(report, out_png)


def plot_accuracy(report: dict, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["shots"] for r in report["results"]]
    ys = [r["accuracy"] for r in report["results"]]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(xs, ys, marker="o", label="model")
    if all("bayes_optimal" in r for r in report["results"]):
        ax.plot(xs, [r["bayes_optimal"] for r in report["results"]], marker="s", ls="--", color="black",
                label="Bayes-optimal")
        if all("training_prior_accuracy" in r for r in report["results"]):
            ax.plot(xs, [r["training_prior_accuracy"] for r in report["results"]], marker="^", ls=":",
                    color="tab:red", label="Bayes, training users' prior")
        ax.legend(loc="lower right")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("shots (the user's labelled preferences in context)")
    ax.set_ylabel("preference accuracy")
    ax.set_ylim(0, 1)
    desc = report.get("description", "none")
    ax.set_title(f"{report['split']} users, {report['method'].replace('_', ' ')}"
                 + ("" if desc == "none" else f", {desc} description"))
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)
