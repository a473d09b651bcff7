"""`fspo-engine study`: the paper's human study as a web page, and its report.

    study serve  --model RUN --data DIR --db study.sqlite [--port 8080] [--shots 8] [--baseline zero-shot|DIR]
    study report --db study.sqlite --out report.json            # + report.png beside it
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group("study")
def study():
    """A human study: people give a few preferences, then judge personalised answers against a baseline."""


@study.command("serve")
@click.option("--model", "model", required=True, type=click.Path(path_type=str),
              help="A run directory (its final policy) or an HF model directory.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str),
              help="Preference dataset: onboarding pairs and held-out questions come from its --split.")
@click.option("--db", "db", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="SQLite file holding the study (created if absent; serving it again continues it).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0 = any free port.")
@click.option("--shots", default=8, show_default=True, type=click.IntRange(min=1),
              help="Onboarding pairs per participant: their few-shot preferences.")
@click.option("--comparisons", default=10, show_default=True, type=click.IntRange(min=1),
              help="Held-out questions each participant judges.")
@click.option("--consistency", default=0.25, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Share of the onboarding pairs asked again later, sides swapped.")
@click.option("--baseline", default="zero-shot", show_default=True,
              help="zero-shot (the same model without shots) or a model/run directory (with the same shots).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="Users whose pairs and questions are shown.")
@click.option("--generator-url", default=None, help="Generate on an OpenAI-compatible server at this URL.")
@click.option("--generator-model", default=None, help="The model name on --generator-url.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--max-description-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--max-tokens", default=8192, show_default=True, type=click.IntRange(min=2),
              help="Prompt + generation budget: the oldest shots are dropped past it.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def serve(model, data_dir, db, host, port, shots, comparisons, consistency, baseline, split, generator_url,
          generator_model, max_new_tokens, max_description_tokens, max_tokens, temperature, top_p, device):
    """Serve the study page until Ctrl-C (answers are stored as they are given)."""
    from fspo_engine.engine.episodes import load_dataset
    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.study import LocalAnswerer, RemoteAnswerer, Study, StudyConfig, Worker
    from fspo_engine.engine.study_server import serve as serve_study
    from fspo_engine.engine.winrate import plan_sides

    if (generator_url is None) != (generator_model is None):
        raise FspoError("--generator-url and --generator-model go together")
    if baseline == "oracle-description":
        raise FspoError("--baseline oracle-description: a participant has no true description; use zero-shot or "
                        "a model directory")
    dataset = load_dataset(data_dir)
    sides = plan_sides(model, baseline, shots, None)
    config = StudyConfig(model=str(Path(model).resolve()), data=str(dataset.root.resolve()), shots=shots,
                         comparisons=comparisons, consistency=consistency,
                         baseline=baseline if baseline == "zero-shot" else str(Path(baseline).resolve()),
                         split=split, max_new_tokens=max_new_tokens, max_description_tokens=max_description_tokens,
                         max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    log = lambda msg: click.echo(msg, err=True)
    the_study = Study(db, config, dataset, sides[0].description)
    settings = dict(max_tokens=max_tokens, max_new_tokens=max_new_tokens, max_description_tokens=max_description_tokens,
                    temperature=temperature, top_p=top_p)
    if generator_url is not None:
        answerer = RemoteAnswerer(sides, generator_url, generator_model, **settings)
    else:
        answerer = LocalAnswerer(sides, device=device, **settings)
    worker = Worker(the_study, answerer, sides, log=log)
    the_study.on_onboarded = worker.wake
    serve_study(the_study, worker, host, port, log=log)


@study.command("report")
@click.option("--db", "db", required=True, type=click.Path(dir_okay=False, path_type=str), help="The study's SQLite file.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Report JSON (its plot goes beside it as .png).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Bootstrap seed.")
def report(db, out, seed):
    """Winrate of personalised answers over the baseline (ties half), clustered ci95, self-consistency."""
    from fspo_engine.engine.checkpoint import check_writable
    from fspo_engine.engine.study import study_report, write_report

    check_writable(out)
    rep = study_report(db, seed=seed)
    paths = write_report(rep, out)
    if rep["n"]:
        lo_hi = "" if rep["ci95"] is None else f" [{rep['ci95'][0]:.2f}, {rep['ci95'][1]:.2f}]"
        click.echo(f"winrate {rep['winrate']:.2f}{lo_hi} over {rep['n']} comparisons from {rep['participants']} "
                   f"participants", err=True)
    else:
        click.echo("no comparisons answered yet (n = 0)", err=True)
    click.echo(f"wrote {', '.join(map(str, paths))}", err=True)
