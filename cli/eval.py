"""`fspo-engine eval`: preference accuracy on unseen users against the number of shots."""

from __future__ import annotations

from pathlib import Path

import click


def parse_shot_list(text: str) -> list[int]:
    from fspo_engine.engine.errors import FspoError

    items = [s.strip() for s in text.split(",")]
    if not all(s.isascii() and s.isdigit() for s in items):  # int() would also take "1_0", "+2", "-1"
        raise FspoError(f"--shots: expected a comma-separated list of non-negative integers, got {text!r}")
    shots = [int(s) for s in items]
    if len(set(shots)) != len(shots):
        raise FspoError(f"--shots: {text!r} lists a shot count twice")
    return shots


@click.command("eval")
@click.option("--model", "model", required=True, type=click.Path(path_type=str),
              help="A run directory (policy + its reference) or an HF model directory.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="Preference dataset directory.")
@click.option("--shots", default="0,1,2,4,8", show_default=True, help="Comma-separated shot counts.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--out", "out_file", default=None, type=click.Path(path_type=str),
              help="JSON report (default: MODEL/eval.json); a PNG plot is written beside it.")
@click.option("--max-tokens", default=8192, show_default=True, help="Token budget of one packed row.")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True, help="Episode sampling seed.")
@click.option("--user-description/--no-user-description", default=None,
              help="Targets start with the user description (default: as the run trained; off for a model dir).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def eval_cmd(model, data_dir, shots, split, out_file, max_tokens, seed, user_description, device):
    """Preference accuracy on unseen users for each shot count, as JSON and a PNG plot."""
    from fspo_engine.engine.checkpoint import check_writable
    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.evaluate import evaluate, write_report

    out = Path(out_file) if out_file else Path(model) / "eval.json"
    check_writable(out)
    if out.suffix.lower() == ".png":
        raise FspoError(f"--out {out}: the JSON report's path (the PNG plot is written beside it, as .png)")
    report = evaluate(model, data_dir, parse_shot_list(shots), split=split, max_tokens=max_tokens, seed=seed,
                      device=device, user_description=user_description)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, out, out.with_suffix(".png"))
    click.echo(f"method: {report['method']} ({'policy vs reference' if report['reference'] else 'no reference'})")
    click.echo("| shots | accuracy | mean margin (log-ratio h) | episodes |")
    click.echo("|---:|---:|---:|---:|")
    for r in report["results"]:
        click.echo(f"| {r['shots']} | {r['accuracy']:.3f} | {r['mean_margin']:.3f} | {r['episodes']} |")
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")
