"""`fspo-engine bench NAME [ARGS...]`: run one of the benchmark scripts in benchmarks/."""

from __future__ import annotations

import importlib

import click

BENCHMARKS = {
    "kernels": "fused linear log-prob sums vs plain torch / torch.compile / peers (fwd+bwd time, peak memory)",
    "attention": "prefix-shared attention vs the official duplicated-context layout and flex_attention",
    "packing": "tokens and attention FLOPs per episode: prefix-shared packing vs the official padded layout",
    "train": "a whole training step: fspo-engine's packed path vs the official padded path",
    "checkpoint": "per-rank cost of a checkpoint into FSDP2 (sharded read) and its optimizer out (per-rank shards)",
    "generate": "batched generation vs one prompt at a time vs transformers generate (same weights, same work); "
    "--generator openai: vs the remote path against a completions server",
    "gen-data": "LLM client and gen-data against a fake continuous-batching server: in flight vs the cap, client "
    "CPU per request, req/s, resume overhead after kill -9, peak RSS at two sizes",
    "quickstart": "the quickstart over several seeds: mean, spread and each seed's interval per shot count, and the "
    "winrate",
    "compile-report": "no GPU: every Triton kernel compiled for sm_90 at its shipped configs (registers, spills, "
    "shared memory, pipeline depth, blocks/SM)",
}


# No click help option: `bench NAME --help` must reach the script's own argparse help.
@click.command("bench", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx, name, args):
    """Run a benchmark; ARGS go to the script (`fspo-engine bench NAME --help` lists them).

    \b
    kernels    fused linear log-prob sums vs plain torch / torch.compile / peers
    attention  prefix-shared attention vs the official layout and flex_attention
    packing    tokens and attention FLOPs per episode vs the official padded layout
    train      a whole training step, packed vs the official padded path
    checkpoint per-rank cost of loading into FSDP2 and saving the optimizer, sharded vs whole
    generate   batched generation vs one prompt at a time vs transformers generate
    gen-data   the LLM client and gen-data against a fake server: in flight, CPU/request, resume
    quickstart the quickstart over seeds: mean and spread of the few-shot curve and the winrate
    compile-report  no GPU: the Triton kernels compiled for sm_90 (registers, spills, shared, pipelining)
    """
    if name in (None, "-h", "--help"):
        click.echo(ctx.get_help())
        ctx.exit(0)
    if name not in BENCHMARKS:
        raise click.BadParameter(f"{name!r} is not one of {', '.join(sorted(BENCHMARKS))}", param_hint="NAME")
    module = importlib.import_module(f"fspo_engine.benchmarks.bench_{name.replace('-', '_')}")
    module.main(list(args))
