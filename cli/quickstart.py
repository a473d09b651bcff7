"""`fspo-engine quickstart`: the whole FSPO pipeline on a tiny model, on CPU, in minutes.

gen-data (template backend, quickstart preset, with test and val users) -> train a tiny Llama from scratch
(Pref-FT, then IPO with Pref-FT as the reference) -> eval on unseen users at 0, 1, 2, 4, 8 shots, beside the
Bayes references of each shot count -> the winrate of 8-shot answers over 0-shot answers under the template
judge. `--split val` scores the val users instead: tuning runs use it, so that the test users are scored
once, for the final setting. Re-running continues an interrupted run (`--resume` semantics) and skips what
is done.
"""

from __future__ import annotations

from pathlib import Path

import click

# Tuned on 2 CPU cores (benchmarks/RESULTS.md, quickstart; the step count on val users): a 2-layer width-128
# Llama that describes the user before answering, 1-8 shots, then IPO.
QUICKSTART_CONFIG = {
    "model.name": "tiny",
    "model.hidden_size": 128,
    # Two layers: per CPU minute they learnt the in-context inference further than three or four
    # (benchmarks/RESULTS.md, quickstart tuning).
    "model.num_hidden_layers": 2,
    # Eight 16-wide heads, not four 32-wide: with four, runs of a six-trait preset each left one or two traits
    # unread (a description slot at chance however many shots revealed it); with eight, all six were read.
    "model.num_attention_heads": 8,
    "model.vocab_size": 1024,  # whole words and most of the episode format become single tokens
    "data.shots": "1-8",
    # The model first writes the user's description from the shots, then answers (the paper's user-description
    # reasoning); eval scores and generates with the description the model wrote, never the true one.
    "data.user_description": True,
    "data.max_tokens": 4096,
    "batch.episodes": 16,
    "optim.lr": 2e-3,
    "optim.warmup_steps": 100,
    "optim.weight_decay": 0.0,
    "optim.min_lr_ratio": 0.05,
    # Chosen on val users (benchmarks/RESULTS.md): 5500 steps scored 0.01-0.05 higher there but cost ~70 s more,
    # which a slower machine of the same kind needs to stay within 10 minutes including install.
    "pref_ft.steps": 4500,
    "pref.loss": "ipo",
    "pref.beta": 0.5,
    "pref.steps": 300,
    "pref.lr": 5e-4,
    "run.save_every": 500,
}


@click.command("quickstart")
@click.option("--out", "out_dir", default="quickstart_out", show_default=True, type=click.Path(path_type=str),
              help="Where the dataset, the run and the evaluation go.")
@click.option("--users", default=None, type=int, help="Synthetic users (default: the preset's).")
@click.option("--pref-ft-steps", default=None, type=int, help="Override the Pref-FT steps.")
@click.option("--pref-steps", default=None, type=int, help="Override the IPO steps.")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True)
@click.option("--preset", default="quickstart", show_default=True, type=click.Choice(["quickstart", "quickstart-easy"]),
              help="quickstart: 4 traits of 4 values, one revealed per shot (a rising few-shot curve); "
                   "quickstart-easy: 2 traits, one shot reveals the user (a step, learnt fast).")
@click.option("--ablation", type=click.Choice(["random-labels"]), default=None,
              help="random-labels: the same texts, each label a seeded coin flip (the paper's structure ablation: "
                   "what the model learns when labels carry no user).")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0.0, 0.5, max_open=True),
              help="Users in the val split (trait combinations of their own, in neither train nor test).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]),
              help="Whose accuracy and winrate to report: test (the final numbers) or val (tuning runs).")
@click.option("--overwrite", is_flag=True, help="Start over: delete --out first (needed after changing options).")
def quickstart(out_dir, users, pref_ft_steps, pref_steps, seed, preset, ablation, val_fraction, split, overwrite):
    """gen-data + Pref-FT + IPO + eval on a tiny model, on CPU, in minutes."""
    import shutil
    import time

    from fspo_engine.cli.eval import print_accuracy, print_winrate
    from fspo_engine.data_gen.errors import DataGenError
    from fspo_engine.data_gen.pipeline import generate_dataset
    from fspo_engine.engine.config import load_config
    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.evaluate import evaluate, write_report
    from fspo_engine.engine.train import Trainer
    from fspo_engine.engine.winrate import run_winrate, write_winrate

    t0 = time.perf_counter()
    out = Path(out_dir)
    if overwrite and out.exists():
        if not (out / "data").is_dir() and not (out / "run").is_dir():
            raise FspoError(f"{out}: not a quickstart directory (no data/ or run/); not deleting it")
        shutil.rmtree(out)
    data = out / "data"
    run = out / "run"
    click.echo(f"[1/4] gen-data ({preset} preset) -> {data}")
    if split == "val" and not val_fraction:
        raise FspoError("--split val needs --val-fraction > 0")
    opts = {"preset": preset, "seed": seed, **({"val_fraction": val_fraction} if val_fraction else {})}
    if ablation:
        opts["ablation"] = ablation
    if users:
        opts["users"] = users
    try:
        generate_dataset(data, **opts)
    except DataGenError as exc:
        if "--overwrite" not in str(exc):
            raise
        raise _changed_options(out, exc) from None
    overrides = dict(QUICKSTART_CONFIG, **{"run.seed": seed, "data.seed": seed})
    if pref_ft_steps is not None:
        overrides["pref_ft.steps"] = pref_ft_steps
    if pref_steps is not None:
        overrides["pref.steps"] = pref_steps
    cfg = load_config(None, overrides)
    click.echo(f"[2/4] train (Pref-FT {cfg.pref_ft.steps} steps, IPO {cfg.pref.steps} steps) -> {run}")
    try:
        trainer = Trainer(cfg, str(data), str(run), resume=(run / "config.toml").exists(),
                          log=lambda m: click.echo(m, err=True))
    except FspoError as exc:
        if "different config" not in str(exc):
            raise
        raise _changed_options(out, exc) from None
    try:
        trainer.run("all")
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    click.echo(f"[3/4] eval on unseen {split} users -> {run / 'eval.json'}")
    # 2 targets per unseen user (800 episodes per shot count with the preset's 400 test users).
    report = evaluate(str(run), str(data), [0, 1, 2, 4, 8], split=split, max_tokens=cfg.data.max_tokens,
                      episodes_per_user=2)
    write_report(report, run / "eval.json", run / "eval.png")
    print_accuracy(report)
    gaps = ", ".join(f"@{r['shots']} {r['accuracy'] - r['bayes_optimal']:+.3f}" for r in report["results"])
    click.echo(f"model minus the population-prior reference: {gaps}")

    click.echo(f"[4/4] winrate of 8-shot over 0-shot answers, template judge, {split} users -> {run / 'winrate.json'}")
    win, records = run_winrate(str(run), str(data), baseline="zero-shot", judge="template", shots=8, per_user=1,
                               split=split, cache_dir=run / ".winrate-cache", max_tokens=cfg.data.max_tokens,
                               max_new_tokens=48)
    write_winrate(win, run / "winrate.json", records)
    print_winrate(win)
    click.echo(f"{time.perf_counter() - t0:.0f} s in all; plots: {run / 'loss_curve.png'}, {run / 'eval.png'}, "
               f"{run / 'winrate.png'}")


def _changed_options(out: Path, exc: Exception) -> Exception:
    """The error for a re-run with other options: quickstart's own remedy, not gen-data's or train's."""
    from fspo_engine.engine.errors import FspoError

    return FspoError(f"{out}: holds a quickstart run made with other options; re-run with --overwrite to start "
                     f"over ({exc})")
