"""The quickstart over several seeds: what a new user can expect from `make quickstart`, as a mean and a spread.

One run's interval (eval.json `ci95`) says how much another draw of users would move its numbers; it does not
say what another seed does (other users, other held-out combinations, another initialisation), and on 2 CPU
cores that moves the few-shot curve and the winrate more than the interval does. This runs
`fspo-engine quickstart --seed S` for each seed (each in its own process, timed; a finished seed is reused:
the quickstart skips what is done) and sums up every seed's eval.json and winrate.json:

    fspo-engine bench quickstart [--seeds 0,1,2] [--split test|val] [--out DIR] [--pref-ft-steps N]
                                 [--jobs J] [--threads T] [--aggregate-only]

Writes OUT/seeds.json (per shot count: each seed's accuracy, mean, sample std, min, max; the same for the
references and the winrate), OUT/seeds.md (the table RESULTS.md quotes) and OUT/seeds.png. `--split val` is
for tuning (the quickstart's `--split val`: val users only); report `test` once, for the final setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fspo_engine.data_gen.atomic import write_text_atomic

KEYS = (("accuracy", "model"), ("bayes_optimal", "Bayes, population prior"),
        ("training_prior_accuracy", "Bayes, training users' prior"))


def run_seed(seed: int, out: Path, split: str, extra: list[str], threads: int | None) -> float:
    """`fspo-engine quickstart` for one seed in its own process; its wall seconds (the log: OUT/seed-S.log)."""
    cmd = [sys.executable, "-m", "fspo_engine.cli.main", "quickstart", "--seed", str(seed), "--split", split,
           "--out", str(out / f"seed-{seed}"), *extra]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    with open(out / f"seed-{seed}.log", "w", encoding="utf-8") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        raise SystemExit(f"seed {seed}: quickstart failed (exit {res.returncode}); see {out / f'seed-{seed}.log'}")
    return time.perf_counter() - t0


def spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"values": v.tolist(), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def aggregate(out: Path, seeds: list[int], split: str) -> dict:
    """Every seed's eval.json and winrate.json under OUT/seed-S/run/, summed up per shot count."""
    evals, wins = {}, {}
    for s in seeds:
        run = out / f"seed-{s}" / "run"
        evals[s] = json.loads((run / "eval.json").read_text(encoding="utf-8"))
        wins[s] = json.loads((run / "winrate.json").read_text(encoding="utf-8"))
        for name, rep in (("eval.json", evals[s]), ("winrate.json", wins[s])):
            if rep.get("split") != split:
                raise SystemExit(f"{run / name}: scored {rep.get('split')} users, not {split}; rerun the "
                                 f"quickstart with --split {split}")
    shots = [r["shots"] for r in evals[seeds[0]]["results"]]
    table = {}
    for i, n in enumerate(shots):
        rows = [evals[s]["results"][i] for s in seeds]
        table[n] = {key: spread([r[key] for r in rows]) for key, _ in KEYS if all(key in r for r in rows)}
        table[n]["ci95"] = {s: r["ci95"] for s, r in zip(seeds, rows)}
    return {
        "split": split, "seeds": seeds, "shots": shots, "accuracy": table,
        "winrate": spread([wins[s]["winrate"] for s in seeds]),
        "winrate_ci95": {s: wins[s]["ci95"] for s in seeds},
        "ci95_method": evals[seeds[0]].get("ci95_method"),
    }


def markdown(summary: dict) -> str:
    shots = summary["shots"]
    head = "| | " + " | ".join(str(n) for n in shots) + " |\n|---|" + "---:|" * len(shots) + "\n"
    lines = []
    for key, title in KEYS:
        if not all(key in summary["accuracy"][n] for n in shots):
            continue
        cells = [summary["accuracy"][n][key] for n in shots]
        lines.append(f"| {title}, mean ± sd | " + " | ".join(f"{c['mean']:.3f} ± {c['std']:.3f}" for c in cells) + " |")
        if key == "accuracy":
            lines.append("| model, min – max | " + " | ".join(f"{c['min']:.3f} – {c['max']:.3f}" for c in cells) + " |")
            for j, s in enumerate(summary["seeds"]):
                lines.append(f"| seed {s} [95% CI, users resampled] | " + " | ".join(
                    f"{c['values'][j]:.3f} [{summary['accuracy'][n]['ci95'][s][0]:.2f}, "
                    f"{summary['accuracy'][n]['ci95'][s][1]:.2f}]" for c, n in zip(cells, shots)) + " |")
    w = summary["winrate"]
    per_seed = ", ".join(f"seed {s} {v:.3f} [{summary['winrate_ci95'][s][0]:.3f}, {summary['winrate_ci95'][s][1]:.3f}]"
                         for s, v in zip(summary["seeds"], w["values"]))
    return (head + "\n".join(lines) + f"\n\nWinrate of 8-shot over zero-shot answers ({summary['split']} users): "
            f"mean {w['mean']:.3f} ± {w['std']:.3f} (min {w['min']:.3f}, max {w['max']:.3f}); {per_seed}.\n")


def plot(summary: dict, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fspo_engine.engine.metrics import save_figure

    shots = summary["shots"]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for j in range(len(summary["seeds"])):
        ax.plot(shots, [summary["accuracy"][n]["accuracy"]["values"][j] for n in shots], color="tab:blue",
                alpha=0.35, lw=1, marker=".", label="model, each seed" if j == 0 else None)
    mean = [summary["accuracy"][n]["accuracy"]["mean"] for n in shots]
    ax.plot(shots, mean, color="tab:blue", lw=2, marker="o", label=f"model, mean of {len(summary['seeds'])} seeds")
    for key, title, style, color in (("bayes_optimal", "Bayes, population prior", "--", "black"),
                                     ("training_prior_accuracy", "Bayes, training users' prior", ":", "tab:red")):
        if all(key in summary["accuracy"][n] for n in shots):
            ax.plot(shots, [summary["accuracy"][n][key]["mean"] for n in shots], ls=style, color=color, label=title)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("shots")
    ax.set_ylabel("preference accuracy")
    ax.set_title(f"quickstart, {summary['split']} users, {len(summary['seeds'])} seeds", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="fspo-engine bench quickstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--out", default="bench_quickstart_out")
    ap.add_argument("--pref-ft-steps", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="Seeds run at once (timings are only comparable at 1).")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each seed's process.")
    ap.add_argument("--aggregate-only", action="store_true", help="Sum up the seeds already under --out.")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [] if args.pref_ft_steps is None else ["--pref-ft-steps", str(args.pref_ft_steps)]
    if not args.aggregate_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            seconds = list(pool.map(lambda s: run_seed(s, out, args.split, extra, args.threads), seeds))
        for s, t in zip(seeds, seconds):
            print(f"seed {s}: {t:.0f} s")
    summary = aggregate(out, seeds, args.split)
    write_text_atomic(out / "seeds.json", json.dumps(summary, indent=2))
    table = markdown(summary)
    write_text_atomic(out / "seeds.md", table)
    plot(summary, out / "seeds.png")
    print(table)
    print(f"wrote {out / 'seeds.json'}, {out / 'seeds.md'} and {out / 'seeds.png'}")


if __name__ == "__main__":
    main()
