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
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Fraction of users in the validation split (tuning); presets with held-out trait combinations give "
    "them combinations in neither train nor test.",
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
@click.option(
    "--base-url",
    default=None,
    help="openai: server URL, e.g. http://127.0.0.1:8000/v1; several as URL1,URL2 (each request goes to the "
    "least-loaded healthy one).",
)
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
    "--personas",
    default=None,
    help="LLM backends: llm (default: the LLM writes each user's persona from traits drawn from the schema), "
    "template (the domain's fixed tables) or a JSONL FILE of {description, traits}.",
)
@click.option(
    "--persona-schema",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON file of traits (and question topics) per domain, replacing the built-in schema.",
)
@click.option(
    "--questions",
    default=None,
    help="LLM backends: llm (default: the LLM writes questions per domain from sampled topics), template, or a "
    "JSONL FILE of {question, domain}.",
)
@click.option(
    "--questions-per-domain",
    type=click.IntRange(min=1),
    default=None,
    help="LLM questions per domain [enough that each serves at most ~5 pairs].",
)
@click.option(
    "--dedup-threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.7,
    show_default=True,
    help="MinHash Jaccard similarity at which two personas or questions count as near-duplicates.",
)
@click.option(
    "--candidates",
    type=click.IntRange(min=2),
    default=4,
    show_default=True,
    help="views/both modes: views (responses) per question.",
)
@click.option(
    "--response-mode",
    type=click.Choice(["user-views", "views", "persona", "both"]),
    default="user-views",
    show_default=True,
    help="user-views: per (user, question), a response for a view this user would prefer and one for a "
    "contrasting view; views: one set of views per question shared by all users; persona: written for this "
    "user vs another; both: shared views plus this user's.",
)
@click.option("--persona-improvement/--no-persona-improvement", default=True, show_default=True)
@click.option(
    "--max-traits",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Traits persona improvement may add per user.",
)
@click.option(
    "--swap-control-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.05,
    show_default=True,
    help="Share of kept pairs re-judged under another user's persona (stats.labels.persona_swap_change_rate).",
)
@click.option(
    "--min-prefs-per-user",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Users with fewer kept preferences are dropped (and counted).",
)
@click.option(
    "--ablation",
    type=click.Choice(["random-labels"]),
    default=None,
    help="random-labels: the same texts, each label a seeded coin flip independent of the user (any backend).",
)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.8, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Requests in flight, over all servers.",
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
    "--max-retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Retries of a request on 429/5xx/timeouts/resets (on another server when there is one).",
)
@click.option(
    "--backoff", "backoff_s", type=click.FloatRange(min=0.0), default=0.5, show_default=True,
    help="First retry delay in seconds; doubles per retry, with jitter (a Retry-After header wins).",
)
@click.option(
    "--backoff-max", "backoff_max_s", type=click.FloatRange(min=0.0), default=30.0, show_default=True,
    help="Longest delay between retries, in seconds.",
)
@click.option(
    "--malformed-retries", type=click.IntRange(min=0), default=2, show_default=True,
    help="New tries at a reply that fails its schema (or is empty), before it is counted and dropped.",
)
@click.option(
    "--commit-every-s", type=click.FloatRange(min=0.0, min_open=True), default=30.0, show_default=True,
    help="Seconds between commits of the finished users (a killed run resumes from the last one).",
)
@click.option(
    "--cache-dir", default=None, type=click.Path(file_okay=False), help="Reply cache [OUT/.llm-cache]."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset or unfinished run in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--dry-run", is_flag=True,
    help="Print the planned number of requests and an estimate of tokens, per stage, and send nothing.",
)
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
@click.option(
    "--strict",
    is_flag=True,
    help="--import: a record the released loader drops, or reads in its own way (an empty text, a label other "
    "than 0/1, ...), is an error (path:line: reason) instead of being skipped or kept and counted.",
)
def gen_data(out_dir, import_kind, import_files, import_split, strict, domains, gen_models, no_progress, dry_run,
             **options):
    """Write a fspo-prefs/1 dataset directory (manifest.json, users.jsonl, prefs.jsonl).

    Re-running a killed run with the same arguments resumes it; same seed and arguments give
    byte-identical output with the template backend.
    """
    from fspo_engine.data_gen.errors import DataGenError

    if import_kind is not None:
        from fspo_engine.data_gen.importers import import_notes, run_import
        from fspo_engine.data_gen.pipeline import format_summary

        result = run_import(
            import_kind,
            list(import_files),
            out_dir,
            split=import_split,
            test_fraction=options["test_fraction"],
            seed=options["seed"],
            overwrite=options["overwrite"],
            strict=strict,
        )
        notes = import_notes(result.manifest)
        if notes:
            click.echo(notes, err=True)
        click.echo(format_summary(result))
        return
    if import_files:
        raise DataGenError("--from needs --import roleplay|review|elix")
    if strict:
        raise DataGenError("--strict needs --import roleplay|review|elix")

    from fspo_engine.data_gen.pipeline import format_plan, format_summary, generate_dataset, plan

    if dry_run:
        click.echo(format_plan(plan(domains=_csv(domains), gen_models=_csv(gen_models), **options)))
        return
    result = generate_dataset(
        out_dir, domains=_csv(domains), gen_models=_csv(gen_models), progress=not no_progress, **options
    )
    click.echo(format_summary(result))
