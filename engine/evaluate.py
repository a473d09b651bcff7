"""Preference accuracy on held-out users (`test`, or `val` while tuning) as a function of the number of shots.

With a reference model (a run directory records which one), accuracy is that of FSPO's implicit reward:
an episode is right when h = (π_c − π_r) − (ref_c − ref_r) > 0. A plain model directory has no
reference; it is scored by comparing log π_c with log π_r, and the output says so (`"method"`).

Runs trained with user descriptions are scored after the description the policy infers from the shots
(`"description": "generated"`, engine/personalize.py); the user's true description is used only when asked
for (`"oracle"`), and the report says which.

Scoring: an episode scores 1 when the margin is positive, 0 when negative and 1/2 on an exact tie (margin 0,
e.g. identical responses), as the reference predictors below count their ties. Every accuracy carries `ci95`,
a 95% interval from a bootstrap that resamples users (engine/intervals.py): a user's episodes stand or fall
together, so they are not independent trials.

References, on a template dataset (data_gen/bayes.py: the generator's own model, enumerated exactly), each
scored on the same episodes from the shots the model kept:
- `bayes_optimal`: the expected accuracy of the Bayes predictor under the *population* prior (every trait
  combination equally likely), i.e. one that knows how users are made but not which combinations the split
  held out. It is the right reference for a model that cannot know the split, not a ceiling: a predictor
  told the held-out combinations could score more, and a finite sample of episodes can land above it.
- `bayes_predictor_accuracy`: that predictor's score on the data's own labels (ties half).
- `training_prior_accuracy`: a Bayes predictor that believes the *training* users' prior (their trait
  combinations as often as they occur, add-0.1 smoothed so that no combination is impossible): what a model
  that memorised the training users would score on users with combinations it never saw.
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
from fspo_engine.engine.intervals import CI95_METHOD, cluster_ci95
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
    tokenizer = load_tokenizer(policy_dir, split_special_tokens=run.config.data.split_special_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = load_model(policy_dir, dtype=dtype, device=device).eval()
    ref = load_model(ref_dir, dtype=dtype, device=device).eval() if ref_dir is not None else None
    bayes = models_for(dataset.manifest)  # {} unless the template generator made the data
    results = []
    for n in shots:
        eps = sample_episodes(dataset, split, n, seed=seed, epoch=0, episodes_per_user=episodes_per_user)
        if not eps:
            hint = "; gen-data --val-fraction F makes a val split" if split == "val" else ""
            raise FspoError(f"{dataset.root}: no {split} users with preferences to evaluate on{hint}")
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
        scores = episode_scores(margin)
        users = [t.user_id for t in tok]
        entry = {
            "shots": n,
            "accuracy": float(np.mean(scores)),
            "ci95": cluster_ci95(scores, users, seed=seed),
            "users": len(set(users)),
            "mean_margin": margin.mean().item(),
            "episodes": len(tok),
            "mean_shots_used": sum(t.n_shots for t in tok) / len(tok),
        }
        if bayes:
            entry.update(bayes_optimal(dataset, eps, tok, bayes, seed=seed))
        if description == "generated" and bayes:
            entry["description_accuracy"], entry["description_accuracy_ci95"] = description_accuracy(
                dataset, eps, bayes, seed=seed)
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
        "ci95_method": CI95_METHOD,
        "scoring": "margin > 0 scores 1, margin = 0 scores 1/2, margin < 0 scores 0",
        **({"references": REFERENCES} if bayes else {}),
        "results": results,
    }


# What each reference key in eval.json is (written into the report, so a reader of the JSON needn't find this).
REFERENCES = {
    "bayes_optimal": "expected accuracy of the Bayes predictor under the population prior (every trait "
                     "combination equally likely; it does not know which combinations the split held out): "
                     "a reference for a model that cannot know the split, not a ceiling",
    "bayes_predictor_accuracy": "the same predictor scored on the data's own labels (ties 1/2)",
    "training_prior_accuracy": "a Bayes predictor under the training users' prior (their trait combinations as "
                               "often as they occur, add-0.1 smoothed), scored on the data's labels: what a model "
                               "that memorised the training users would score",
}
TRAINING_PRIOR_SMOOTHING = 0.1  # pseudo-users added to every trait combination of the training users' prior


def episode_scores(margin: torch.Tensor) -> np.ndarray:
    """Each episode's score: 1 when the chosen side wins (margin > 0), 0 when it loses, 1/2 on an exact tie."""
    m = margin.double().cpu().numpy()
    return np.where(m > 0, 1.0, np.where(m < 0, 0.0, 0.5))


def bayes_optimal(dataset, episodes, tokenized, models, seed: int = 0) -> dict:
    """The references (module docstring) on these episodes, from the shots each kept after truncation (the
    oldest are dropped first), each with its `<key>_ci95` from the same user-clustered bootstrap as the
    model's accuracy. `bayes_optimal` is the population-prior predictor's expected accuracy, mean
    max(p, 1 - p); `bayes_predictor_accuracy` how often naming its likelier side matches the data's label;
    `training_prior_accuracy` the same count under the training users' smoothed prior."""
    expected, realized, trained = [], [], []
    train_prior = {}
    for name, model in models.items():
        users = [u.traits for u in dataset.users.values() if u.domain == name and u.split == "train"]
        try:
            train_prior[name] = model.prior_of(users) + TRAINING_PRIOR_SMOOTHING if users else None
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
    users = [t.user_id for t in tokenized]
    columns = {"bayes_optimal": expected, "bayes_predictor_accuracy": realized}
    if trained and len(trained) == len(realized):
        columns["training_prior_accuracy"] = trained
    out = {}
    for key, values in columns.items():
        out[key] = float(np.mean(values))
        out[f"{key}_ci95"] = cluster_ci95(values, users, seed=seed)
    return out


def _named_side(p: float) -> float:
    """1 when naming the likelier side picks the data's chosen side (p = P(chosen)), 0 when not, 1/2 on a tie
    (within float rounding: a posterior summed over many trait vectors lands a few ulps off an exact 1/2)."""
    return 0.5 if abs(p - 0.5) < 1e-9 else 1.0 if p > 0.5 else 0.0


def description_accuracy(dataset, episodes, models, seed: int = 0) -> tuple[float, list[float]]:
    """Mean over episodes of the fraction of the user's true trait values that the inferred description
    states (template datasets: the domain knows how each value is worded), and its user-clustered ci95."""
    fractions = []
    for ep in episodes:
        user = dataset.users[ep.user_id]
        stated = models[user.domain].domain.stated_traits(ep.description, user.traits)
        fractions.append(sum(stated.values()) / max(len(stated), 1))
    return float(np.mean(fractions)), cluster_ci95(fractions, [ep.user_id for ep in episodes], seed=seed)


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

    rows = report["results"]
    xs = [r["shots"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    ax.errorbar(xs, [r["accuracy"] for r in rows], yerr=_error_bars(rows, "accuracy"), marker="o", capsize=3,
                label="model (95% CI, users resampled)")
    references = (("bayes_optimal", "Bayes, population prior", "s", "--", "black"),
                  ("training_prior_accuracy", "Bayes, training users' prior", "^", ":", "tab:red"))
    shown = [key for key, *_ in references if all(key in r for r in rows)]
    for key, label, marker, ls, color in references:
        if key in shown:
            ax.plot(xs, [r[key] for r in rows], marker=marker, ls=ls, color=color, label=label)
            if all(f"{key}_ci95" in r for r in rows):
                ax.fill_between(xs, [r[f"{key}_ci95"][0] for r in rows], [r[f"{key}_ci95"][1] for r in rows],
                                color=color, alpha=0.12, lw=0)
    if shown:
        ax.legend(loc="lower right", fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("shots (the user's labelled preferences in context)")
    ax.set_ylabel("preference accuracy")
    ax.set_ylim(0, 1)
    desc = report.get("description", "none")
    ax.set_title(f"{report['split']} users, {report['method'].replace('_', ' ')}"
                 + ("" if desc == "none" else f", {desc} description"))
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)


def _error_bars(rows: list[dict], key: str) -> list[list[float]] | None:
    """matplotlib's yerr (distances below and above) from each row's `ci95`; None when a row has none (an
    eval.json written before intervals)."""
    if not all("ci95" in r for r in rows):
        return None
    return [[max(r[key] - r["ci95"][0], 0.0) for r in rows], [max(r["ci95"][1] - r[key], 0.0) for r in rows]]
