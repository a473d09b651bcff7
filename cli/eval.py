"""`fspo-engine eval`: preference accuracy on unseen users against the number of shots, or (--winrate) the
winrate of the model's generated answers against a baseline's, judged both ways."""

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


def description_option(f):
    """--description none|generated|oracle, shared by eval, score and generate (engine/personalize.py)."""
    f = click.option(
        "--description", default=None, type=click.Choice(["none", "generated", "oracle"]),
        help="User descriptions: generated = the model infers one from the shots first (default for runs "
             "trained with data.user_description); oracle = the user's TRUE description (an upper bound, "
             "labelled oracle); none = no description (default otherwise).")(f)
    # Older spellings: --user-description meant the true description; it now means the inferred one.
    f = click.option("--user-description/--no-user-description", "legacy_description", default=None, hidden=True)(f)
    return f


def generator_options(f):
    """--generator local|openai and its server options, shared by generate and eval --winrate
    (engine/remote.py)."""
    for decorator in reversed([
        click.option("--generator", default="local", show_default=True, type=click.Choice(["local", "openai"]),
                     help="local: decode in this process; openai: send each prompt (as token ids) to an "
                          "OpenAI-compatible /v1/completions server serving the same model, e.g. vLLM."),
        click.option("--generator-url", default=None,
                     help="With --generator openai: the server, e.g. http://127.0.0.1:8000/v1 [OPENAI_BASE_URL]."),
        click.option("--generator-model", default=None,
                     help="With --generator openai: the model's name on the server (vllm serve DIR: DIR, unless "
                          "--served-model-name)."),
        click.option("--generator-api-key-env", "--api-key-env", "generator_api_key_env", default="OPENAI_API_KEY",
                     show_default=True, help="NAME of the environment variable holding the generation server's "
                                             "API key (never written anywhere)."),
        click.option("--generator-concurrency", default=64, show_default=True, type=click.IntRange(min=1),
                     help="Generation requests in flight (a continuous-batching server batches them)."),
        click.option("--generator-retries", default=5, show_default=True, type=click.IntRange(min=0),
                     help="Retries of a failed generation request (connection errors, 5xx, 429)."),
    ]):
        f = decorator(f)
    return f


def generator_server(generator: str, url: str | None, model: str | None, api_key_env: str, concurrency: int,
                     retries: int, flag: str = "--generator"):
    """The `engine.remote.Server` the options name, or None for local generation; FspoError for a bad mix."""
    import os

    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.remote import Server

    if generator == "local":
        if url is not None or model is not None:
            raise FspoError(f"{flag}-url/{flag}-model go with --generator openai")
        return None
    if not model:
        raise FspoError(f"--generator openai needs {flag}-model NAME (the name the server serves the model under)")
    if not url and not os.environ.get("OPENAI_BASE_URL"):
        raise FspoError(f"--generator openai needs {flag}-url URL (e.g. http://127.0.0.1:8000/v1)")
    return Server(url, model, api_key_env, concurrency, retries, flag=flag)


def resolve_description(description: str | None, legacy: bool | None) -> str | None:
    if legacy is None:
        return description
    if description is not None:
        from fspo_engine.engine.errors import FspoError

        raise FspoError("--user-description/--no-user-description: give --description instead, not both")
    click.echo("warning: --user-description/--no-user-description are --description generated/none now",
               err=True)
    return "generated" if legacy else "none"


@click.command("eval")
@click.option("--model", "model", required=True, type=click.Path(path_type=str),
              help="A run directory (policy + its reference) or an HF model directory.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="Preference dataset directory.")
@click.option("--shots", default=None,
              help="Comma-separated shot counts [0,1,2,4,8]; with --winrate one count [8].")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="Whose episodes: test (unseen users; report these once, for the final setting), val (held-out "
                   "users for tuning: gen-data --val-fraction) or train.")
@click.option("--out", "out_file", default=None, type=click.Path(path_type=str),
              help="JSON report (default: MODEL/eval.json, or MODEL/winrate.json); a PNG plot is written beside it.")
@click.option("--max-tokens", default=8192, show_default=True, help="Token budget of one packed row (and of a prompt "
              "plus its generation).")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True,
              help="Episode sampling seed (and token sampling seed with --temperature > 0).")
@description_option
@click.option("--winrate", is_flag=True, help="Judge generated answers against --baseline instead of scoring pairs.")
@click.option("--baseline", default=None,
              help="zero-shot (same model, no shots), oracle-description (same model after the true description) "
                   "or a model/run directory. [zero-shot]")
@click.option("--judge", default="template", show_default=True, type=click.Choice(["template", "openai"]),
              help="template: the template generator's own scoring rule (offline); openai: an OpenAI-compatible "
                   "chat-completions server.")
@click.option("--judge-url", default=None, help="The judge server, e.g. http://127.0.0.1:8000/v1 [OPENAI_BASE_URL].")
@click.option("--judge-model", default=None, help="The judge's model name on that server.")
@click.option("--judge-api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="NAME of the environment variable holding the judge's API key (never written anywhere).")
@click.option("--judge-concurrency", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--judge-retries", default=5, show_default=True, type=click.IntRange(min=0),
              help="Retries of a failed judge request (429, 5xx, timeouts), with exponential backoff.")
@click.option("--users", default=None, help="With --winrate: comma-separated user ids [every user of --split].")
@click.option("--per-user", default=None, type=click.IntRange(min=1),
              help="With --winrate: questions per user [all the user's preferences].")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--max-description-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0.0, max=1.0, min_open=True))
@generator_options
@click.option("--baseline-generator-url", default=None,
              help="With --winrate: the baseline's answers from this completions server (with "
                   "--baseline-generator-model); default: --generator's server for zero-shot and oracle-description, "
                   "else in this process.")
@click.option("--baseline-generator-model", default=None, help="The baseline model's name on that server.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def eval_cmd(model, data_dir, shots, split, out_file, max_tokens, seed, description, legacy_description, winrate,
             baseline, judge, judge_url, judge_model, judge_api_key_env, judge_concurrency, judge_retries, users,
             per_user, max_new_tokens, max_description_tokens, temperature, top_p, generator, generator_url,
             generator_model, generator_api_key_env, generator_concurrency, generator_retries, baseline_generator_url,
             baseline_generator_model, device):
    """Preference accuracy on unseen users for each shot count (JSON + PNG), or with --winrate the winrate of
    the model's answers against a baseline's under a judge."""
    from fspo_engine.engine.checkpoint import check_writable
    from fspo_engine.engine.errors import FspoError

    description = resolve_description(description, legacy_description)
    out = Path(out_file) if out_file else Path(model) / ("winrate.json" if winrate else "eval.json")
    if out.suffix.lower() == ".png":
        raise FspoError(f"--out {out}: the JSON report's path (the PNG plot is written beside it, as .png)")
    if not winrate:
        for name, value in (("--baseline", baseline), ("--users", users), ("--per-user", per_user),
                            ("--judge-url", judge_url), ("--judge-model", judge_model),
                            ("--judge", None if judge == "template" else judge),
                            ("--generator", None if generator == "local" else generator),
                            ("--generator-url", generator_url), ("--generator-model", generator_model),
                            ("--baseline-generator-url", baseline_generator_url),
                            ("--baseline-generator-model", baseline_generator_model)):
            if value is not None:
                raise FspoError(f"{name} is a --winrate option")
    check_writable(out)
    if winrate:
        servers = dict(generator=generator_server(generator, generator_url, generator_model, generator_api_key_env,
                                                  generator_concurrency, generator_retries))
        if (baseline_generator_url is None) != (baseline_generator_model is None):
            raise FspoError("--baseline-generator-url and --baseline-generator-model go together")
        if baseline_generator_url is not None:
            servers["baseline_generator"] = generator_server(
                "openai", baseline_generator_url, baseline_generator_model, generator_api_key_env,
                generator_concurrency, generator_retries, flag="--baseline-generator")
        return _winrate(model, data_dir, shots, split, out, max_tokens, seed, description, baseline or "zero-shot",
                        judge, judge_url, judge_model, judge_api_key_env, judge_concurrency, judge_retries, users,
                        per_user, max_new_tokens, max_description_tokens, temperature, top_p, device, servers)

    from fspo_engine.engine.evaluate import evaluate, write_report

    report = evaluate(model, data_dir, parse_shot_list(shots or "0,1,2,4,8"), split=split, max_tokens=max_tokens,
                      seed=seed, device=device, description=description,
                      max_description_tokens=max_description_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, out, out.with_suffix(".png"))
    print_accuracy(report)
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


def print_accuracy(report: dict):
    click.echo(f"method: {report['method']} ({'policy vs reference' if report['reference'] else 'no reference'}); "
               f"description: {report['description']}; {report['split']} users")
    rows = report["results"]
    refs = [(key, title) for key, title in (("bayes_optimal", "Bayes, population prior"),
                                            ("training_prior_accuracy", "Bayes, training users' prior"))
            if all(key in r for r in rows)]
    click.echo("| shots | accuracy [95% CI] |" + "".join(f" {title} |" for _, title in refs)
               + " mean margin (log-ratio h) | episodes | users |")
    click.echo("|---:|---:|" + "---:|" * len(refs) + "---:|---:|---:|")
    for r in rows:
        ci = f" [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if "ci95" in r else ""
        cells = "".join(f" {r[key]:.3f} |" for key, _ in refs)
        click.echo(f"| {r['shots']} | {r['accuracy']:.3f}{ci} |{cells} {r['mean_margin']:.3f} | {r['episodes']} | "
                   f"{r.get('users', '')} |")
    if refs:
        click.echo("CI: users resampled (a user's episodes together). The Bayes rows are references computed from "
                   "the same shots, not ceilings (eval.json `references`).")


def _winrate(model, data_dir, shots, split, out, max_tokens, seed, description, baseline, judge, judge_url,
             judge_model, judge_api_key_env, judge_concurrency, judge_retries, users, per_user, max_new_tokens,
             max_description_tokens, temperature, top_p, device, servers):
    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.winrate import run_winrate, write_winrate

    counts = parse_shot_list(shots or "8")
    if len(counts) != 1:
        raise FspoError(f"--shots: one shot count with --winrate, got {shots!r}")
    user_list = [u.strip() for u in users.split(",") if u.strip()] if users else None
    report, records = run_winrate(
        model, data_dir, baseline=baseline, judge=judge, shots=counts[0], split=split, seed=seed, users=user_list,
        per_user=per_user, description=description, judge_url=judge_url, judge_model=judge_model,
        judge_api_key_env=judge_api_key_env, judge_concurrency=judge_concurrency, judge_retries=judge_retries,
        cache_dir=out.parent / f".{out.stem}-cache", device=device, max_tokens=max_tokens,
        max_new_tokens=max_new_tokens, max_description_tokens=max_description_tokens, temperature=temperature,
        top_p=top_p, **servers)
    out.parent.mkdir(parents=True, exist_ok=True)
    out_json, png, pairs = write_winrate(report, out, records)
    print_winrate(report)
    click.echo(f"wrote {out_json}, {png} and {pairs}")


def print_winrate(report: dict):
    lo, hi = report["ci95"]
    click.echo(f"{report['shots']}-shot model vs {report['baseline']} ({report['judge']} judge, description: "
               f"{report['description']}, answers: {report.get('generator', 'local')} vs "
               f"{report.get('baseline_generator', 'local')}): winrate {report['winrate']:.3f} [95% CI {lo:.3f}, {hi:.3f}]; "
               f"{report['wins']} wins, {report['ties']} ties ({report['order_flips']} order flips), "
               f"{report['losses']} losses, n = {report['n']}"
               + (f"; {report['malformed']} malformed verdicts left out" if report["malformed"] else ""))
    if len(report["per_domain"]) > 1:
        for dom, r in report["per_domain"].items():
            click.echo(f"  {dom}: {r['winrate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}], n = {r['n']}")
    if "description_accuracy" in report:
        click.echo(f"description accuracy (true trait values the inferred descriptions state): "
                   f"{report['description_accuracy']:.3f}")
