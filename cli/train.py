"""`fspo-engine train`: few-shot Pref-FT, then IPO/DPO, with exact resume."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="Preference dataset directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="Run directory.")
@click.option("--model", "model_name", default=None,
              help="A named size (tiny, 1B, 3B, 8B), an HF Llama directory or a run directory (its final policy); "
                   "overrides [model] name.")
@click.option("--config", "config_file", default=None, type=click.Path(path_type=str), help="TOML config file.")
@click.option("--stage", default="all", show_default=True, type=click.Choice(["pref-ft", "ipo", "dpo", "all"]))
@click.option("--shots", default=None, help="Shots per episode: N or LO-HI (overrides data.shots).")
@click.option("--max-steps", type=int, default=None,
              help="Optimiser steps per stage (overrides the config's steps and epochs).")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (overrides run.save_every).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest valid checkpoint.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override any config key.")
def train(data_dir, out_dir, model_name, config_file, stage, shots, max_steps, save_every, resume, device, sets):
    """Train a Llama with FSPO on a preference dataset (Pref-FT, then IPO or DPO).

    Under `torchrun --nproc_per_node=N -m fspo_engine.cli.main train ...` the model is sharded with FSDP2
    (NCCL on GPUs, gloo on CPU) and each rank takes every N-th episode of the global batch.
    """
    from fspo_engine.engine.config import load_config, parse_set_option
    from fspo_engine.engine.rundir import discard_if_unstarted
    from fspo_engine.engine.train import Trainer

    overrides = parse_set_option(sets)
    if model_name is not None:
        overrides["model.name"] = model_name
    if shots is not None:
        overrides["data.shots"] = shots
    if save_every is not None:
        overrides["run.save_every"] = save_every
    if max_steps is not None:  # steps, not epochs (a config's pref_ft.epochs would win over steps)
        overrides.update({"pref_ft.steps": max_steps, "pref.steps": max_steps, "pref_ft.epochs": 0, "pref.epochs": 0})
    cfg = load_config(config_file, overrides)
    fresh = not Path(out_dir).exists()
    try:
        trainer = Trainer(cfg, data_dir, out_dir, resume=resume, device=device, log=lambda m: click.echo(m, err=True))
        try:
            result = trainer.run(stage)
        except BaseException:
            trainer.close(failed=True)
            raise
        trainer.close()
    except BaseException:
        if fresh:  # a run that failed before it had anything worth resuming leaves no directory behind
            discard_if_unstarted(Path(out_dir))
        raise
    if trainer.is_main:
        for s, info in result.items():
            click.echo(f"{s}: {trainer.out / info.final}")
