"""`fspo-engine generate`: answer one user's question, conditioned on a few of their labelled preferences."""

from __future__ import annotations

import click


@click.command("generate")
@click.option("--model", "model", required=True, type=click.Path(path_type=str),
              help="A run directory (its final policy) or an HF model directory.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="Preference dataset directory.")
@click.option("--user", "user_id", required=True, help="The user to personalise for (a user_id of users.jsonl).")
@click.option("--question", default=None, help="The question to answer (default: one of the user's own).")
@click.option("--shots", default=8, type=click.IntRange(min=0), show_default=True, help="How many of the user's preferences go in context.")
@click.option("--user-description/--no-user-description", default=None,
              help="Generate the user description first (the paper's CoT); default: as the run trained.")
@click.option("--max-new-tokens", default=256, type=click.IntRange(min=1), show_default=True)
@click.option("--temperature", default=0.0, type=click.FloatRange(min=0.0), show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, type=click.FloatRange(min=0.0, max=1.0, min_open=True), show_default=True)
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True, help="Shot sampling and token sampling seed.")
@click.option("--max-tokens", default=8192, show_default=True, help="Prompt budget: oldest shots are dropped past it.")
@click.option("--show-prompt", is_flag=True, help="Print the rendered few-shot prompt too.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def generate(model, data_dir, user_id, question, shots, user_description, max_new_tokens, temperature, top_p, seed,
             max_tokens, show_prompt, device):
    """Generate a response personalised to USER from their labelled preferences."""
    import torch

    from fspo_engine.engine.distributed import pick_device
    from fspo_engine.engine.episodes import load_dataset, render_prompt, sample_episodes
    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.evaluate import resolve_models, run_setting
    from fspo_engine.engine.generate import generate as run_generate
    from fspo_engine.engine.model import load_model
    from fspo_engine.engine.tokenizer import check_ids_fit, load_tokenizer

    dataset = load_dataset(data_dir)
    if user_id not in dataset.users:
        raise FspoError(f"--user {user_id!r}: no such user in {dataset.root / 'users.jsonl'}")
    if user_description is None:
        user_description = run_setting(model, "data", "user_description")
    policy_dir, _ = resolve_models(model)
    tokenizer = load_tokenizer(policy_dir)
    dev = pick_device(device)
    llama = load_model(policy_dir, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev).eval()
    episodes = [ep for ep in sample_episodes(dataset, None, shots, seed=seed) if ep.user_id == user_id]
    if not episodes:
        raise FspoError(f"--user {user_id!r}: has no preferences in {dataset.root / 'prefs.jsonl'}")
    episode = episodes[0]
    shot_list = list(episode.shots)
    if question is not None and len(shot_list) < episode.shots_requested:
        shot_list.append(episode.target)  # the user's own question is not asked: all their prefs can be shots
    question = question if question is not None else episode.target.question
    while True:
        prompt = render_prompt(shot_list, question, user_description)
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        if len(ids) + max_new_tokens <= max_tokens or not shot_list:
            break
        shot_list.pop(0)  # oldest first, as in training
    if len(ids) + max_new_tokens > max_tokens:
        raise FspoError(f"--max-tokens {max_tokens}: the zero-shot prompt ({len(ids)} tokens) plus "
                        f"--max-new-tokens {max_new_tokens} does not fit")
    check_ids_fit(tokenizer, llama.config.vocab_size, policy_dir, [ids])
    if show_prompt:
        click.echo(prompt)
    stops = _stop_ids(policy_dir, tokenizer.eos_id, llama.config.eos_token_id)
    out = run_generate(llama, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_ids=stops, seed=seed)
    if out and out[-1] in stops:
        out = out[:-1]
    click.echo(tokenizer.hf.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def _stop_ids(model_dir, eos_id: int, config_eos) -> tuple[int, ...]:
    """Every id that ends a turn: the tokenizer's eos, config.json's eos_token_id and generation_config.json's
    (Llama 3 instruct models end turns with <|eot_id|>, listed there beside <|end_of_text|>)."""
    import json
    from pathlib import Path

    ids = [eos_id]
    sources = [config_eos]
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():
        try:
            sources.append(json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id"))
        except (ValueError, UnicodeDecodeError, AttributeError):
            pass  # a broken generation_config.json only loses its extra stop ids
    for src in sources:
        for i in src if isinstance(src, list) else [src]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                ids.append(i)
    return tuple(ids)
