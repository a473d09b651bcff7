"""`fspo-engine model-info DIR`: a model directory's config, parameter count and FLOPs per token."""

from __future__ import annotations

import json

import click


@click.command("model-info")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--context", default=4096, show_default=True, help="Mean context length for attention FLOPs.")
@click.option("--check-weights/--no-check-weights", default=True, show_default=True,
              help="Also check every tensor's name and shape in the safetensors headers.")
def model_info(model_dir: str, context: int, check_weights: bool):
    """Print a Llama directory's config, parameter count and FLOPs per token (a run directory: its final
    policy)."""
    from dataclasses import asdict

    from fspo_engine.engine.model import check_weights as check_model_weights
    from fspo_engine.engine.model import read_config
    from fspo_engine.engine.rundir import load_run

    model_dir = load_run(model_dir).policy
    cfg = read_config(model_dir)
    if check_weights:  # headers only: names and shapes of every tensor, no weights read
        check_model_weights(model_dir, cfg)
    n_params = cfg.num_params
    flops = cfg.flops_per_token(context)
    click.echo(json.dumps({k: v for k, v in asdict(cfg).items() if k != "attention_impl"}, indent=2))
    click.echo(f"parameters: {n_params:,} ({_si(n_params)})")
    if check_weights:
        from fspo_engine.engine.model import stored_dtype

        click.echo(f"weights stored as: {str(stored_dtype(model_dir)).removeprefix('torch.')}")
    click.echo(f"forward FLOPs/token: {_si(flops['forward'])}FLOP (matmuls {_si(flops['matmul'])}FLOP, "
               f"attention at context {context}: {_si(flops['attention'])}FLOP); training ~3x forward")


def _si(x: float) -> str:
    """1234567 -> '1.23 M' (k, M, G, T): readable for a tiny test model and for an 8B one alike."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "
