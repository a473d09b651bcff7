"""`fspo-engine score`: per-episode log-probs of chosen and rejected responses, one JSON line each."""

from __future__ import annotations

import click

from fspo_engine.cli.eval import description_option, resolve_description


@click.command("score")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=str),
    help="HF Llama model directory (config.json, *.safetensors, tokenizer files), or a run directory.",
)
@click.option(
    "--data", "data_dir", required=True, type=click.Path(path_type=str), help="Preference dataset directory."
)
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Output JSON Lines file (written atomically).",
)
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option(
    "--shots", default="8", show_default=True, help="Shots per episode: N or LO-HI (sampled per episode)."
)
@click.option(
    "--seed", default=0, type=click.IntRange(min=0), show_default=True, help="Episode sampling seed (episodes are those of epoch 0)."
)
@click.option(
    "--max-tokens",
    default=8192,
    show_default=True,
    help="Token budget of one packed row (one forward); also the per-episode truncation budget.",
)
@description_option
@click.option("--with-tokens", is_flag=True, help="Also write prompt_ids, chosen_ids and rejected_ids.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]))
def score(
    model_dir,
    data_dir,
    out_file,
    split,
    shots,
    seed,
    max_tokens,
    description,
    legacy_description,
    with_tokens,
    device,
    dtype,
):
    """Score every episode of a split: summed log-probs of the chosen and rejected responses.

    Each pref of each user is the target once, with shots drawn from that user's other prefs.
    Writes one JSON line per episode: episode_id, user_id, shots, chosen_logp, rejected_logp,
    chosen_tokens, rejected_tokens (and with --with-tokens the exact ids scored, eos included). For runs
    trained with user descriptions, both responses follow the description the model infers from the shots
    (--description generated, written as `description`), unless --description says otherwise.
    """
    import dataclasses
    import sys

    import torch
    from tqdm import tqdm

    from fspo_engine.engine.checkpoint import check_writable
    from fspo_engine.engine.distributed import pick_device
    from fspo_engine.engine.episodes import (
        RenderOptions,
        episode_stats,
        load_dataset,
        parse_shots,
        sample_episodes,
        tokenize_episodes,
    )
    from fspo_engine.engine.errors import FspoError
    from fspo_engine.engine.generate import turn_stop_ids
    from fspo_engine.engine.model import load_model
    from fspo_engine.engine.packing import pack_batches, packing_stats
    from fspo_engine.engine.personalize import Generator, default_description_mode, hide_descriptions
    from fspo_engine.engine.rundir import load_run
    from fspo_engine.engine.scoring import score_episodes, write_jsonl_atomic
    from fspo_engine.engine.tokenizer import check_ids_fit, load_tokenizer

    # Everything the user gave is checked before the model is loaded, and nothing is written on error.
    shots_spec = parse_shots(shots)
    check_writable(out_file)
    if max_tokens < 16:
        raise FspoError(f"--max-tokens: must be >= 16, got {max_tokens}")
    dataset = load_dataset(data_dir)
    description = resolve_description(description, legacy_description)
    run = load_run(model_dir)  # a run directory scores its final policy, rendered as the run trained
    if description is None:
        description = default_description_mode(run.config.data.user_description)
    bos, truncate = run.config.data.bos, run.config.data.truncate
    model_dir = run.policy
    tokenizer = load_tokenizer(model_dir, split_special_tokens=run.config.data.split_special_tokens)
    episodes = sample_episodes(dataset, None if split == "all" else split, shots_spec, seed=seed, epoch=0)
    if not episodes:
        raise FspoError(f"{data_dir}: no preferences in split {split!r}")
    if description != "oracle":
        episodes = hide_descriptions(episodes)

    device = pick_device(device)
    model = load_model(model_dir, dtype=getattr(torch, dtype), device=device).eval()
    if description == "generated":
        gen = Generator(model, tokenizer, turn_stop_ids(model_dir, tokenizer.eos_id, model.config.eos_token_id),
                        max_tokens=max_tokens, max_new_tokens=0, bos=bos, where=str(model_dir))
        with tqdm(total=len(episodes), unit="ep", desc="describe", file=sys.stderr, disable=None) as bar:
            inferred = gen.describe(episodes, on_done=bar.update)
        episodes = [dataclasses.replace(ep, description=d) for ep, d in zip(episodes, inferred)]
    options = RenderOptions(user_description=description != "none", bos=bos, truncate=truncate)
    tokenized = tokenize_episodes(episodes, tokenizer, max_tokens=max_tokens, options=options)
    check_ids_fit(tokenizer, model.config.vocab_size, model_dir,
                  (t.prompt_ids + t.chosen_ids + t.rejected_ids for t in tokenized))  # fmt: skip

    with tqdm(total=len(tokenized), unit="ep", desc="score", file=sys.stderr, disable=None) as bar:
        out = score_episodes(model, tokenized, max_tokens=max_tokens, device=device, on_row=bar.update)

    records = []
    for i, t in enumerate(tokenized):
        rec = {
            "episode_id": t.episode_id,
            "user_id": t.user_id,
            "shots": t.n_shots,
            "chosen_logp": float(out.chosen[i]),
            "rejected_logp": float(out.rejected[i]),
            "chosen_tokens": int(out.chosen_tokens[i]),
            "rejected_tokens": int(out.rejected_tokens[i]),
        }
        if description != "none":
            rec.update(description_mode=description, description=episodes[i].description)
        if with_tokens:
            rec.update(prompt_ids=t.prompt_ids, chosen_ids=t.chosen_ids, rejected_ids=t.rejected_ids)
        records.append(rec)
    write_jsonl_atomic(out_file, records)

    st = episode_stats(tokenized)
    pk = packing_stats(tokenized, pack_batches(tokenized, max_tokens), max_tokens)
    acc = float((out.chosen > out.rejected).float().mean())
    click.echo(
        f"scored {st['episodes']} episodes of {st['users']} users (mean shots {st['mean_shots']:.2f}; "
        f"{st['episodes_short_of_prefs']} short of prefs, {st['episodes_truncated']} truncated) in {pk['rows']} "
        f"rows, fill {pk['fill_ratio']:.2f}, {pk['token_ratio']:.2f}x fewer tokens than the official layout; "
        f"chosen > rejected on {acc:.3f}; wrote {out_file}",
        err=True,
    )
