"""`fspo-engine gen-data`: generate a synthetic preference dataset, or import an official FSPO one."""

from __future__ import annotations

import click


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@click.command("gen-data")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Dataset directory to write."
)
@click.option(
    "--backend",
    type=click.Choice(["template", "openai", "hf"]),
    default="template",
    show_default=True,
    help="template: offline and deterministic; openai: any OpenAI-compatible server; hf: local model dir.",
)
@click.option(
    "--domains", default="reviews", show_default=True, help="Comma list of reviews, elix, roleplay."
)
@click.option(
    "--users", type=click.IntRange(min=1), default=None, help="Users per domain [200; quickstart 2000, quickstart-easy 600]."
)
@click.option(
    "--prefs-per-user", type=click.IntRange(min=1), default=None, help="Pairs per user [16; quickstart 12, quickstart-easy 24]."
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.2,
    show_default=True,
    help="Fraction of users in the unseen test split.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--label-noise",
    type=click.FloatRange(0.0, 0.5),
    default=None,
    help="Template only: probability of swapping chosen/rejected [0.02; quickstart 0].",
)
@click.option(
    "--preset",
    type=click.Choice(["quickstart", "quickstart-easy"]),
    default=None,
    help="quickstart: small closed vocabulary, 4 traits of 4 values, pairs that reveal one (the CPU "
    "quickstart); quickstart-easy: 2 traits, minimal pairs (one shot reveals the user).",
)
@click.option("--model", default=None, help="LLM backends: model name (openai) or model directory (hf).")
@click.option("--base-url", default=None, help="openai: server URL, e.g. http://127.0.0.1:8000/v1.")
@click.option(
    "--api-key-env",
    default="OPENAI_API_KEY",
    show_default=True,
    help="openai: NAME of the environment variable holding the API key (never written anywhere).",
)
@click.option(
    "--gen-models", default=None, help="Comma list of generator models, used round-robin over views."
)
@click.option("--judge-model", default=None, help="Judge model [--model].")
@click.option(
    "--candidates",
    type=click.IntRange(min=2),
    default=4,
    show_default=True,
    help="Views (responses) per question.",
)
@click.option(
    "--response-mode",
    type=click.Choice(["views", "persona", "both"]),
    default="views",
    show_default=True,
    help="views: view-conditioned; persona: user- vs other-persona-steered; both.",
)
@click.option("--persona-improvement/--no-persona-improvement", default=True, show_default=True)
@click.option(
    "--max-traits",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Traits persona improvement may add per user.",
)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.8, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=16, show_default=True, help="Requests in flight."
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds per request.",
)
@click.option(
    "--max-retries", type=click.IntRange(min=0), default=5, show_default=True, help="Retries on 429/5xx."
)
@click.option(
    "--cache-dir", default=None, type=click.Path(file_okay=False), help="Reply cache [OUT/.llm-cache]."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset or unfinished run in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--import",
    "import_kind",
    type=click.Choice(["roleplay", "review", "elix"]),
    default=None,
    help="Convert an official FSPO dataset instead of generating.",
)
@click.option(
    "--from",
    "import_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="JSONL or Parquet file to import (repeatable).",
)
@click.option(
    "--import-split",
    type=click.Choice(["auto", "train", "test"]),
    default="auto",
    show_default=True,
    help="Split of imported users; auto: from the file name (train/test), else a seeded hash.",
)
def gen_data(out_dir, import_kind, import_files, import_split, domains, gen_models, no_progress, **options):
    """Write a fspo-prefs/1 dataset directory (manifest.json, users.jsonl, prefs.jsonl).

    Re-running a killed run with the same arguments resumes it; same seed and arguments give
    byte-identical output with the template backend.
    """
    from fspo_engine.data_gen.errors import DataGenError

    if import_kind is not None:
        from fspo_engine.data_gen.importers import run_import
        from fspo_engine.data_gen.pipeline import format_summary

        result = run_import(
            import_kind,
            list(import_files),
            out_dir,
            split=import_split,
            test_fraction=options["test_fraction"],
            seed=options["seed"],
            overwrite=options["overwrite"],
        )
        click.echo(format_summary(result))
        return
    if import_files:
        raise DataGenError("--from needs --import roleplay|review|elix")

    from fspo_engine.data_gen.pipeline import format_summary, generate_dataset

    result = generate_dataset(
        out_dir, domains=_csv(domains), gen_models=_csv(gen_models), progress=not no_progress, **options
    )
    click.echo(format_summary(result))
