"""`fspo-engine generate`: answers personalised from a few of each user's labelled preferences.

    generate --model RUN --data DIR --split test --shots 8 --out answers.jsonl    # every (user, question)
    generate --model RUN --data DIR --user ID [--question TEXT]                  # one answer, printed
    generate ... --generator openai --generator-url URL --generator-model NAME   # decoded on a vLLM server

With --generator openai the rows are the same rows, in the same order, each with the same "prompt": only the
decoding runs on the server (engine/remote.py); its replies are cached in `.<out stem>-cache/` beside --out,
so a killed run resumes without asking again what was answered.
"""

from __future__ import annotations

from pathlib import Path

import click

from fspo_engine.cli.eval import description_option, generator_options, generator_server, resolve_description


@click.command("generate")
@click.option("--model", "model", required=True, type=click.Path(path_type=str),
              help="A run directory (its final policy) or an HF model directory.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="Preference dataset directory.")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="JSON Lines output: one line per (user, question) of --split (written atomically).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--users", default=None, help="With --out: comma-separated user ids [every user of --split].")
@click.option("--per-user", default=None, type=click.IntRange(min=1),
              help="With --out: questions per user [all the user's preferences].")
@click.option("--user", "user_id", default=None, help="One user to answer (printed), instead of --out.")
@click.option("--question", default=None, help="With --user: the question to answer (default: one of the user's own).")
@click.option("--shots", default=8, type=click.IntRange(min=0), show_default=True,
              help="How many of the user's preferences go in context.")
@description_option
@click.option("--max-new-tokens", default=256, type=click.IntRange(min=1), show_default=True)
@click.option("--max-description-tokens", default=128, type=click.IntRange(min=1), show_default=True)
@click.option("--temperature", default=0.0, type=click.FloatRange(min=0.0), show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, type=click.FloatRange(min=0.0, max=1.0, min_open=True), show_default=True)
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True, help="Shot sampling and token sampling seed.")
@click.option("--max-tokens", default=8192, show_default=True, help="Prompt + generation budget: oldest shots are dropped past it.")
@click.option("--show-prompt", is_flag=True, help="With --user: print the rendered few-shot prompt too.")
@generator_options
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def generate(model, data_dir, out_file, split, users, per_user, user_id, question, shots, description,
             legacy_description, max_new_tokens, max_description_tokens, temperature, top_p, seed, max_tokens,
             show_prompt, generator, generator_url, generator_model, generator_api_key_env, generator_concurrency,
             generator_retries, device):
    """Generate responses personalised to each user from their labelled preferences."""
    from fspo_engine.engine.episodes import load_dataset
    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.personalize import default_description_mode
    from fspo_engine.engine.rundir import load_run

    if legacy_description is not None and description is not None:
        raise FspoError("--user-description/--no-user-description: give --description instead, not both")
    if legacy_description is not None:  # generate's own older spelling: generate the description first
        description = "generated" if legacy_description else "none"
    description = resolve_description(description, None)
    if (out_file is None) == (user_id is None):
        raise FspoError("give --out FILE.jsonl (answers for every user of --split) or --user ID (one answer), not "
                        + ("both" if out_file else "neither"))
    if out_file is None and (users or per_user):
        raise FspoError("--users/--per-user go with --out")
    if out_file is not None and (question or show_prompt):
        raise FspoError("--question/--show-prompt go with --user")
    server = generator_server(generator, generator_url, generator_model, generator_api_key_env, generator_concurrency,
                              generator_retries)
    if out_file is not None:
        from fspo_engine.engine.checkpoint import check_writable

        check_writable(out_file)
    dataset = load_dataset(data_dir)
    run = load_run(model)
    policy_dir = run.policy
    if description is None:
        description = default_description_mode(run.config.data.user_description)
    settings = dict(max_tokens=max_tokens, max_new_tokens=max_new_tokens,
                    max_description_tokens=max_description_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    bos=run.config.data.bos, split_special_tokens=run.config.data.split_special_tokens)
    if out_file is None:
        return _one(dataset, policy_dir, user_id, question, shots, description, settings, show_prompt, device, server)

    from fspo_engine.engine.scoring import write_jsonl_atomic
    from fspo_engine.engine.winrate import Side, sample_items, side_answers

    user_list = [u.strip() for u in users.split(",") if u.strip()] if users else None
    items = sample_items(dataset, split, shots, seed, user_list, per_user)
    bos, split_special = settings.pop("bos"), settings.pop("split_special_tokens")
    # Remote replies are cached beside the output (resume after a kill); local answers are not cached.
    cache_dir = None if server is None else Path(out_file).parent / f".{Path(out_file).stem}-cache"
    answers = side_answers(Side("model", policy_dir, shots, description, bos, server, split_special), items, cache_dir,
                           device=device, **settings)
    records = [{
        "user_id": ep.user_id,
        "domain": dataset.users[ep.user_id].domain,
        "pref_id": ep.target.pref_id,
        "question": ep.target.question,
        "shots": [{"question": s.question, "chosen": s.chosen, "rejected": s.rejected}
                  for s in ep.shots[len(ep.shots) - a["shots_used"]:]],
        "description_mode": description,
        "description": a["description"],
        "response": a["response"],
        "finish_reason": a["finish_reason"],
        "prompt": a["prompt"],
    } for ep, a in zip(items, answers)]
    write_jsonl_atomic(out_file, records)
    lengths = [r["finish_reason"] for r in records]
    click.echo(f"wrote {len(records)} answers for {len({r['user_id'] for r in records})} users to {out_file} "
               f"({lengths.count('eos')} ended, {lengths.count('length')} cut at --max-new-tokens)", err=True)


def _one(dataset, policy_dir, user_id, question, shots, description, settings, show_prompt, device, server):
    import dataclasses

    from fspo_engine.engine.episodes import render_prompt, sample_episodes
    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.personalize import answer, hide_descriptions, load_generator

    if user_id not in dataset.users:
        raise FspoError(f"--user {user_id!r}: no such user in {dataset.root / 'users.jsonl'}")
    episodes = [ep for ep in sample_episodes(dataset, None, shots, seed=settings["seed"]) if ep.user_id == user_id]
    if not episodes:
        raise FspoError(f"--user {user_id!r}: has no preferences in {dataset.root / 'prefs.jsonl'}")
    episode = episodes[0]
    shot_list = list(episode.shots)
    if question is not None:
        if len(shot_list) < episode.shots_requested:
            shot_list.append(episode.target)  # the user's own question is not asked: all their prefs can be shots
        target = dataclasses.replace(episode.target, question=question)
        episode = dataclasses.replace(episode, shots=tuple(shot_list), target=target)
    if description != "oracle":
        (episode,) = hide_descriptions([episode])
    if server is None:
        gen = load_generator(policy_dir, device=device, **settings)
    else:
        from fspo_engine.engine.remote import load_remote_generator

        gen = load_remote_generator(policy_dir, server, **settings)
    (out,) = answer(gen, [episode], description)
    if show_prompt:
        kept = episode.shots[len(episode.shots) - out["shots_used"]:]
        click.echo(render_prompt(kept, episode.target.question, description != "none"))
    if out["description"] is not None:
        click.echo(f"## User Description ({description})\n{out['description']}")
        click.echo("## Response")
    click.echo(out["response"])
