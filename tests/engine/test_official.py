"""The released FSPO recipe: episodes from imported files equal the released loader's, byte for byte, and a
run with configs/official.toml takes the released loss and optimizer steps.

`released_*` below re-implement the rules of the released code (github.com/Asap7772/
fewshot-preference-optimization: preference_datasets.py, trainers.py) from its behaviour, independently of
fspo-engine: they read the raw records, not the imported dataset, and use numpy / random / transformers only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli

from fspo_engine.data_gen import import_dataset
from fspo_engine.engine.dataset import load_dataset
from fspo_engine.engine.episodes import (
    RenderOptions,
    official_epoch_order,
    official_windows,
    render_prompt,
    target_texts,
    tokenize_episodes,
)

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL_TOML = ROOT / "configs" / "official.toml"


# ------------------------------------------------------------------------------------------------ the released rules


def released_records(kind: str, rec: dict) -> tuple[str, str, str]:
    """(question, preferred, dispreferred) of one raw record, stripped as the released loader strips them."""
    if kind == "roleplay":
        return rec["x"].strip(), rec["yw"].strip(), rec["yl"].strip()
    x, y = rec["response_x"].strip(), rec["response_y"].strip()
    return rec["prompt"].strip(), (x if rec["label"] == 0 else y), (y if rec["label"] == 0 else x)


def released_text(shots, question, chosen, rejected, persona=None):
    """shots_to_text(include_dispreferred=True, add_persona=persona is not None) of the released code."""
    text = ""
    for i, (q, w, lose) in enumerate(shots):
        text += "# Example " + str(i + 1) + "\n" + "## Question \n" + q + "\n"
        text += "## Preferred Response \n" + w + "\n" + "## Dispreferred Response \n" + lose + "\n" + "\n"
    if not shots:
        task = "Generate a response to the following question."
    elif persona is not None:
        task = ("Generate a user description based on the examples above. Then, generate a preferred response to "
                "the following question.")
    else:
        task = "Given the examples above, generate a preferred response to the following question."
    text += "# Task\n" + task + "\n" + "## Question \n" + question + "\n"
    c = "## Preferred Response \n" + chosen + "\n"
    r = "## Preferred Response \n" + rejected + "\n"
    if persona is not None:
        c = "## User Description\n" + persona[0] + "\n" + c
        r = "## User Description\n" + persona[1] + "\n" + r
    return text, c, r


def released_episodes(kind, records, num_shots, seed=0, epochs=1, add_persona=False):
    """The released get_roleplay / get_elix + get_batch_iterator: per epoch, the (prompt, chosen, rejected)
    texts in training order."""
    rs = np.random.RandomState(seed)  # TemporarilySeededRandom(seed) seeds numpy's global legacy state
    epoch_seeds = rs.randint(0, 2**32, size=1_000_000)
    column = "level" if kind == "roleplay" else "scorer_level"
    groups: dict = {}
    for rec in records:
        if rec[column] is None or rec[column] != rec[column]:  # groupby drops null and NaN keys
            continue
        groups.setdefault(rec[column], []).append(rec)  # one key for 2 and 2.0, as in one DataFrame column
    data: dict[str, list] = {}  # the released loader keys its data by prompt text
    for _ in range(2 * (num_shots + 1)):
        for level in sorted(groups):  # DataFrame.groupby sorts its keys
            level_rows = groups[level]
            shuffled = [level_rows[i] for i in rs.choice(len(level_rows), size=len(level_rows), replace=False)]
            start = 0
            while start + num_shots + 2 <= len(shuffled):  # N shots, a target, and one row left out
                window = shuffled[start : start + num_shots + 2]
                shots = [released_records(kind, r) for r in window[:num_shots]]
                q, c, r = released_records(kind, window[num_shots])
                persona = None
                if add_persona:
                    last = window[num_shots]
                    rejected_level = last["level_y"] if last["label"] == 0 else last["level_x"]
                    persona = (f"The user is {level}.", f"The user is {rejected_level}.")
                prompt, chosen, rejected = released_text(shots, q, c, r, persona)
                data.setdefault(prompt, []).append((chosen, rejected))
                start += num_shots + 2
    flat = list(data.items())
    out = []
    for e in range(epochs):
        random.Random(int(epoch_seeds[e])).shuffle(flat)  # in place: epoch e shuffles epoch e-1's order
        out.append([(prompt, c, r) for prompt, pairs in flat for c, r in pairs])
    return out


def released_tokens(tokenize, eos, prompt, chosen, rejected, max_length, max_prompt_length):
    """tokenize_batch_element(truncation_mode='keep_start'): no special tokens, eos after each response."""
    p, c, r = tokenize(prompt), tokenize(chosen) + [eos], tokenize(rejected) + [eos]
    longer = max(len(c), len(r))
    if len(p) + longer > max_length:
        p = p[:max_prompt_length]
    if len(p) + longer > max_length:
        c, r = c[: max_length - max_prompt_length], r[: max_length - max_prompt_length]
    return p, c, r


class CharTokenizer:
    """One token per character: token ids are the text's bytes, so equal ids are equal bytes."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [ord(c) + 3 for c in text]


def roleplay_records(seed=0, levels=(7, 2, 11, 5)):
    """Raw roleplay records. Every response has 7 characters, so chosen and rejected tokenize to the same
    length: keep_start then maps exactly onto the released rule (see the test). Questions vary in length so
    that some prompts overflow the budget."""
    rng = random.Random(seed)
    recs = []
    for level in levels:
        for k in range(rng.randint(11, 23)):
            recs.append({"x": f"  q{level}-{k} " + "w" * rng.randint(0, 40) + "?", "yw": f"yes {k:03d}",
                         "yl": f"no! {k:03d}", "level": level, "score_persona": {"description": f"persona {level}"}})
    rng.shuffle(recs)
    return recs


def import_records(tmp_path, kind, records, name):
    src = tmp_path / f"{name}_train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / name
    import_dataset(kind, [src], out)
    return load_dataset(out)


# ------------------------------------------------------------------------------------------------ episodes


def test_official_windows_and_keep_start_render_the_released_episodes_byte_for_byte(tmp_path):
    records = roleplay_records()
    dataset = import_records(tmp_path, "roleplay", records, "rp")
    shots, tok, epochs = 3, CharTokenizer(), 2
    released = released_episodes("roleplay", records, shots, epochs=epochs)
    assert len(released[0]) > 40

    episodes = official_windows(dataset, "train", shots, seed=0)
    k = len(tok.encode(target_texts(episodes[0])[0])) + 1  # every response's tokens, eos included
    prompt_lengths = sorted(len(tok.encode(render_prompt(e.shots, e.target.question))) for e in episodes)
    budget = prompt_lengths[len(prompt_lengths) // 2] + 2 * k  # about half the prompts overflow
    # keep_start keeps the prompt's first budget - 2k tokens when the block (prompt + both responses) overflows;
    # with equal response lengths that is the released rule with these two lengths (see the README).
    max_length, max_prompt_length = budget - k, budget - 2 * k
    cut = 0
    for e in range(epochs):
        ordered = official_epoch_order(episodes, seed=0, epoch=e)
        ours = tokenize_episodes(ordered, tok, max_tokens=budget, options=RenderOptions(bos=False, truncate="keep_start"))
        assert len(ours) == len(released[e])
        for ep, t, (prompt, chosen, rejected) in zip(ordered, ours, released[e]):
            assert (render_prompt(ep.shots, ep.target.question), *target_texts(ep)) == (prompt, chosen, rejected)
            want = released_tokens(tok.encode, tok.eos_id, prompt, chosen, rejected, max_length, max_prompt_length)
            assert (t.prompt_ids, t.chosen_ids, t.rejected_ids) == want, ep.episode_id
            cut += t.prompt_tokens_cut > 0
    assert 0 < cut < sum(len(r) for r in released)  # both cases were compared


def test_elix_descriptions_on_both_branches_match_the_released_persona_rule(tmp_path):
    """With the user-description option, the released code puts the scorer's description on the chosen
    branch and the rejected level's ("persona_rejected") on the rejected branch: rejected_persona."""
    rng = random.Random(3)
    levels = ["a child", "an expert", "a teen"]
    records = []
    for k in range(60):
        lx, ly = rng.sample(levels, 2)
        records.append({"prompt": f"Explain thing {k}.", "response_x": f"x-answer {k}" + "!" * rng.randint(0, 5),
                        "response_y": f"y {k}", "label": rng.randint(0, 1), "level_x": lx, "level_y": ly,
                        "scorer_level": rng.choice(levels)})
    dataset = import_records(tmp_path, "elix", records, "elix")
    released = released_episodes("elix", records, 2, epochs=1, add_persona=True)[0]
    ordered = official_epoch_order(official_windows(dataset, "train", 2, seed=0), seed=0, epoch=0,
                                   user_description=True)
    ours = [(render_prompt(e.shots, e.target.question, user_description=True),
             *target_texts(e, user_description=True, rejected_description="rejected_persona")) for e in ordered]
    assert ours == released and len(ours) > 20
    # "shared": the user's own description on both branches, so it cancels in the margin.
    shared = [target_texts(e, user_description=True) for e in ordered]
    head = lambda e: f"## User Description\n{e.description}\n## Preferred Response \n"  # noqa: E731
    assert all(c.startswith(head(e)) and r.startswith(head(e)) for e, (c, r) in zip(ordered, shared))


def test_an_episode_over_the_released_8192_keeps_its_responses_under_official_toml():
    """The released max_length = max_prompt_length = 8192: a prompt + longer response over 8192 cuts both
    responses to nothing (the pair still counts in the batch, with no gradient). official.toml keeps them whole
    (a deliberate difference, README "The released recipe")."""
    from fspo_engine.engine.config import load_config
    from fspo_engine.engine.dataset import Preference
    from fspo_engine.engine.episodes import Episode

    cfg = load_config(OFFICIAL_TOML)
    tok = CharTokenizer()
    shots = tuple(Preference(f"p{i}", "u", f"question {i}?", "y" * 900, "n" * 900) for i in range(4))
    for extra, released_kept in ((300, True), (400, False)):  # prompt + longer response: 8131, 8231
        target = Preference("t", "u", "target?" + "?" * extra, "chosen " * 20, "rejected " * 10)
        ep = Episode("u/w0.0", "u", shots, target, shots_requested=4)
        prompt, chosen, rejected = render_prompt(shots, target.question), *target_texts(ep)
        assert (len(prompt) + max(len(chosen), len(rejected)) + 1 <= 8192) == released_kept  # eos included
        p, c, r = released_tokens(tok.encode, tok.eos_id, prompt, chosen, rejected, 8192, 8192)
        assert (c, r) == ((tok.encode(chosen) + [2], tok.encode(rejected) + [2]) if released_kept else ([], []))
        [ours] = tokenize_episodes([ep], tok, max_tokens=cfg.data.max_tokens, options=cfg.data.render_options())
        assert (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids) == (
            tok.encode(prompt), tok.encode(chosen) + [2], tok.encode(rejected) + [2])


@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_special_token_texts_in_the_data_are_tokenized_as_the_released_call_under_official_toml(
        tmp_path, split_special_tokens):
    """official.toml's data.split_special_tokens = false: "<|begin_of_text|>", "</s>", "<|eot_id|>" in a record
    become those special tokens' ids in the episodes the trainer trains on, as the released
    `tokenizer(text, add_special_tokens=False)` gives them; true (our default) keeps them text."""
    import transformers
    from helpers import char_tokenizer_dir, random_hf_llama

    from fspo_engine.engine.config import load_config
    from fspo_engine.engine.train import EpisodePlan, Trainer

    model_dir = tmp_path / "model"
    random_hf_llama(model_dir, vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    char_tokenizer_dir(model_dir)
    records = [{**r, "x": "<|begin_of_text|>" + r["x"], "yw": r["yw"] + " done</s>", "yl": "<|eot_id|>" + r["yl"]}
               for r in roleplay_records(seed=2, levels=(1, 2))]  # fmt: skip
    import_records(tmp_path, "roleplay", records, "rp")
    cfg = load_config(OFFICIAL_TOML, {"model.name": str(model_dir), "data.shots": "3",
                                      "data.split_special_tokens": split_special_tokens})
    trainer = Trainer(cfg, str(tmp_path / "rp"), str(tmp_path / "run"), log=lambda _msg: None)
    try:
        ours = EpisodePlan(trainer.dataset, trainer.tokenizer, trainer.cfg, "pref-ft").epoch(0)
    finally:
        trainer.close()

    hf = transformers.AutoTokenizer.from_pretrained(model_dir)  # the released tokenizer call
    tokenize = lambda text: hf(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    released = [released_tokens(tokenize, hf.eos_token_id, *e, 8192, 8192) for e in released_episodes(
        "roleplay", records, 3)[0]]  # fmt: skip
    got = [(t.prompt_ids, t.chosen_ids, t.rejected_ids) for t in ours]
    assert len(got) == len(released) > 10
    specials = {1, 2, 3}  # <|begin_of_text|>, <|eot_id|> (eos), </s>
    assert all(specials <= set(p + c + r) for p, c, r in released)  # every episode has all three in its text
    if split_special_tokens:
        assert all(not specials & set(p + c[:-1] + r[:-1]) for p, c, r in got)  # text only; eos ends each response
        assert all(c[-1] == r[-1] == 2 for _, c, r in got)
    else:
        assert got == released


def released_batches(epochs, batch_size):
    """get_batch_iterator's batching (exact=False): every epoch starts with an empty batch and a batch is yielded
    once full, so an epoch's last partial batch is never trained on and no batch holds two epochs' elements."""
    out = []
    for elements in epochs:
        batch = []
        for element in elements:
            batch.append(element)
            if len(batch) == batch_size:
                out.append(batch)
                batch = []
    return out


@pytest.mark.parametrize("stage", ["ipo", "pref-ft"])
def test_batches_of_several_epochs_are_the_released_loops(tmp_path, stage):
    """Three epochs whose episode count is not a multiple of the batch: each step's batch equals the released
    loop's, batch for batch (IPO: 3 pairs; Pref-FT: 6 SFT sequences, chosen then rejected of 3 episodes), and
    the step count of `epochs = 3` is the released loop's number of batches."""
    from fspo_engine.engine.config import load_config
    from fspo_engine.engine.train import EpisodePlan

    records = roleplay_records(seed=0, levels=(1, 2, 3))
    dataset = import_records(tmp_path, "roleplay", records, "rp")
    cfg = load_config(OFFICIAL_TOML, {"data.shots": "3", "batch.episodes": 3, "pref_ft.episodes": 3})
    plan = EpisodePlan(dataset, CharTokenizer(), cfg, stage)
    epochs = 3
    released = released_episodes("roleplay", records, 3, epochs=epochs)
    whole = len(released[0]) // 3 * 3  # episodes in an epoch's whole batches
    assert whole < len(released[0])  # each epoch leaves a partial batch: counting across epochs would differ
    if stage == "pref-ft":  # sft_mode: each pair gives its chosen then its rejected sequence
        released = [[(p, s) for p, c, r in elements for s in (c, r)] for elements in released]
    want = released_batches(released, 6 if stage == "pref-ft" else 3)

    text = lambda ids: "".join(chr(i - 3) for i in ids)  # noqa: E731  (CharTokenizer's ids back to text)
    steps = plan.steps_for_epochs(epochs)
    assert steps == len(want)
    for step in range(steps):
        got = []
        for ep in plan.batch(step):
            assert ep.chosen_ids[-1] == ep.rejected_ids[-1] == CharTokenizer.eos_id
            prompt, chosen, rejected = text(ep.prompt_ids), text(ep.chosen_ids[:-1]), text(ep.rejected_ids[:-1])
            got += [(prompt, chosen), (prompt, rejected)] if stage == "pref-ft" else [(prompt, chosen, rejected)]
        assert got == want[step], step
    # A resumed run builds a fresh plan and asks for its steps from the checkpoint on: the same batches, in any
    # order (nothing carries over from the steps before).
    fresh = EpisodePlan(dataset, CharTokenizer(), cfg, stage)
    for step in (steps - 1, len(want) // 2, 0):
        assert [e.episode_id for e in fresh.batch(step)] == [e.episode_id for e in plan.batch(step)]
    # The reference log-probs cover exactly the episodes trained on: each epoch's whole batches.
    assert plan.episodes_used(steps) == [whole] * epochs
    assert plan.episodes_used(steps - 1) == [whole] * (epochs - 1) + [whole - 3]


def test_records_the_released_loader_drops_or_reads_oddly_still_give_its_episodes(tmp_path):
    """Null and NaN levels (dropped by its groupby), float levels (2.0 is level 2), empty and blank responses,
    records without a score_persona: the imported dataset's official windows are still the released episodes."""
    rng = random.Random(4)
    records = []
    for rec in roleplay_records(seed=4, levels=(1, 2, 3)):
        roll = rng.random()
        if roll < 0.1:
            rec = {**rec, "level": None if roll < 0.05 else float("nan")}
        elif roll < 0.3:
            rec = {**rec, "level": float(rec["level"])}
        elif roll < 0.4:
            rec = {**rec, "yl": " " * rng.randint(0, 2)}
        elif roll < 0.5:
            rec = {k: v for k, v in rec.items() if k != "score_persona"}
        records.append(rec)
    dataset = import_records(tmp_path, "roleplay", records, "odd")
    manifest = json.loads((tmp_path / "odd" / "manifest.json").read_text())
    assert manifest["skipped"]["count"] > 0 and manifest["kept_as_released"]["count"] > 0
    released = released_episodes("roleplay", records, 3, epochs=2)
    episodes = official_windows(dataset, "train", 3, seed=0)
    for e in range(2):
        ordered = official_epoch_order(episodes, seed=0, epoch=e)
        assert [(render_prompt(ep.shots, ep.target.question), *target_texts(ep)) for ep in ordered] == released[e]
    assert len(released[0]) > 20


def test_the_epoch_seeds_are_a_prefix_of_the_released_loaders_million():
    """official_epoch_order draws only the seeds it needs: the same values as the released 1e6 draw."""
    many = np.random.RandomState(5).randint(0, 2**32, size=1_000_000)
    assert (np.random.RandomState(5).randint(0, 2**32, size=3) == many[:3]).all()


# ------------------------------------------------------------------------------------------------ the recipe


@pytest.mark.parametrize("lr", [1e-7, pytest.param(3e-3, marks=pytest.mark.slow)])
def test_official_toml_pref_ft_steps_equal_the_released_loss_and_rmsprop_steps(tmp_path, lr):
    """configs/official.toml, 3 Pref-FT steps on a tiny model: each step's loss equals the released loss of
    the released loader's batch (2 episodes x both responses = 4 sequences; mean over them of each summed
    NLL), with the model moved by the released optimizer steps (RMSprop, clip 10, LambdaLR warmup). At the
    recipe's lr (1e-7) the steps barely move the model; at 3e-3 they decide the second and third losses."""
    import transformers
    from helpers import hf_model, make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    records = roleplay_records(seed=1, levels=(1, 2, 3))
    import_records(tmp_path, "roleplay", records, "data")
    run = tmp_path / "run"
    res = cli("train", "--config", str(OFFICIAL_TOML), "--model", str(model_dir), "--data", str(tmp_path / "data"),
              "--out", str(run), "--stage", "pref-ft", "--max-steps", "3", "--shots", "3",
              "--set", "data.max_tokens=4096", "--set", "run.progress=false", "--set", f"pref_ft.lr={lr}")
    assert res.returncode == 0, res.stderr[-3000:]
    ours = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]

    # The released trainer, step by step.
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    sequences = [(prompt, s) for prompt, c, r in released_episodes("roleplay", records, 3)[0] for s in (c, r)]
    policy = hf_model(model_dir).train()
    optimizer = torch.optim.RMSprop(policy.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (150 + 1)))
    want = []
    for step in range(3):
        losses = []
        for prompt, target in sequences[4 * step : 4 * step + 4]:  # batch_size = 4 SFT sequences
            p, t, _ = released_tokens(tokenize, tokenizer.eos_token_id, prompt, target, target, 8192, 8192)
            logits = policy(input_ids=torch.tensor([p + t])).logits[0].float()
            logp = torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(1, torch.tensor(t)[:, None]).sum()
            losses.append(-logp)  # losses = -policy_chosen_logps (summed over the sequence)
        loss = torch.stack(losses).mean()
        want.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert len(ours) == 3
    for got, exp in zip(ours, want):
        assert abs(got - exp) <= 1e-5 * abs(exp), (ours, want)
    assert len(set(round(x, 3) for x in want)) == 3  # three different batches: the order is compared too
