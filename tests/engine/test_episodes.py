"""Deterministic episode sampling, the official text format, truncation (dataset validation: test_dataset.py)."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import synthetic_records, write_dataset

from fspo_engine.engine.dataset import Preference, load_dataset
from fspo_engine.engine.episodes import (
    Episode,
    RenderOptions,
    episode_stats,
    parse_shots,
    render_prompt,
    render_response,
    sample_episodes,
    tokenize_episode,
    tokenize_episodes,
)
from fspo_engine.engine.errors import FspoError


class CharTokenizer:
    """One token per character (id = code point + 3): lengths are easy to reason about."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [ord(c) + 3 for c in text]


@pytest.fixture
def dataset(tmp_path):
    users, prefs = synthetic_records(n_users=5, prefs_per_user=[12, 9, 3, 1, 6], seed=0, test_users=1)
    return load_dataset(write_dataset(tmp_path / "data", users, prefs))


# ----------------------------------------------------------------------------------------------------------
# Sampling


def _key(ep: Episode):
    return ep.episode_id, ep.target.pref_id, tuple(s.pref_id for s in ep.shots), ep.shots_requested


def test_same_seed_same_episodes_other_epoch_other_shots(dataset):
    a = sample_episodes(dataset, "train", shots=4, seed=7, epoch=0)
    b = sample_episodes(dataset, "train", shots=4, seed=7, epoch=0)
    assert [_key(e) for e in a] == [_key(e) for e in b]
    c = sample_episodes(dataset, "train", shots=4, seed=7, epoch=1)
    assert [e.target.pref_id for e in a] == [
        e.target.pref_id for e in c
    ]  # each pref is a target once per epoch
    assert [_key(e)[2] for e in a] != [_key(e)[2] for e in c]
    assert c[0].episode_id == "u000/e1/0"
    d = sample_episodes(dataset, "train", shots=4, seed=8, epoch=0)
    assert [_key(e)[2] for e in a] != [_key(e)[2] for e in d]


def test_episodes_use_own_prefs_never_the_target(dataset):
    eps = sample_episodes(dataset, None, shots=8, seed=0, epoch=3)
    assert len(eps) == dataset.num_prefs
    for ep in eps:
        own = {p.pref_id for p in dataset.prefs[ep.user_id]}
        ids = [s.pref_id for s in ep.shots]
        assert ep.target.pref_id in own and set(ids) <= own
        assert ep.target.pref_id not in ids and len(set(ids)) == len(ids)
        assert ep.n_shots == min(8, len(own) - 1)
    counts = Counter(e.target.pref_id for e in eps)
    assert set(counts.values()) == {1}


def test_user_draws_do_not_depend_on_other_users(tmp_path, dataset):
    users, prefs = synthetic_records(n_users=5, prefs_per_user=[12, 9, 3, 1, 6], seed=0, test_users=1)
    fewer = load_dataset(
        write_dataset(tmp_path / "fewer", users[1:], [p for p in prefs if p["user_id"] != "u000"])
    )
    full = {e.episode_id: _key(e) for e in sample_episodes(dataset, None, 3, seed=1, epoch=0)}
    for e in sample_episodes(fewer, None, 3, seed=1, epoch=0):
        assert full[e.episode_id] == _key(e)


def test_shots_range_is_sampled_per_episode(dataset):
    eps = sample_episodes(dataset, "train", shots=(1, 8), seed=0, epoch=0)
    asked = [e.shots_requested for e in eps]
    assert min(asked) >= 1 and max(asked) <= 8 and len(set(asked)) >= 4
    for e in eps:
        assert e.n_shots == min(e.shots_requested, len(dataset.prefs[e.user_id]) - 1)
    assert parse_shots("1-8") == (1, 8) and parse_shots("8") == 8 and parse_shots(" 0 ") == 0
    for bad in ("8-1", "x", "1-2-3", "-1", "", "1_0", "+2", "1-"):
        with pytest.raises(FspoError, match="--shots"):
            parse_shots(bad)


def test_episodes_per_user_and_shuffle(dataset):
    eps = sample_episodes(dataset, "train", shots=2, seed=0, epoch=0, episodes_per_user=2)
    per_user = Counter(e.user_id for e in eps)
    assert per_user == {"u000": 2, "u001": 2, "u002": 2, "u003": 1}
    shuffled = sample_episodes(dataset, "train", shots=2, seed=0, epoch=0, episodes_per_user=2, shuffle=True)
    assert sorted(map(_key, shuffled)) == sorted(map(_key, eps)) and list(map(_key, shuffled)) != list(
        map(_key, eps)
    )


def test_too_few_prefs_gives_fewer_shots_and_is_counted(dataset):
    eps = sample_episodes(dataset, "train", shots=4, seed=0, epoch=0)
    toks = tokenize_episodes(eps, CharTokenizer())
    stats = episode_stats(toks)
    # u002 has 3 prefs (2 shots each), u003 has 1 (zero shots): 4 episodes short.
    assert stats["episodes_short_of_prefs"] == 4
    assert stats["episodes_truncated"] == 0 and stats["episodes"] == 12 + 9 + 3 + 1
    zero = [t for t in toks if t.user_id == "u003"]
    assert len(zero) == 1 and zero[0].n_shots == 0 and zero[0].shots_requested == 4


# ----------------------------------------------------------------------------------------------------------
# Rendering and tokenizing


P1 = Preference("p1", "u", "What is tea?", "A drink.", "A car.")
P2 = Preference("p2", "u", " Why? ", "Because.\n", "No.")
TARGET = Preference("t", "u", "Best city?", "Kyoto, for the temples.", "Any.")


def test_render_matches_the_official_format_exactly():
    assert render_prompt([P1, P2], TARGET.question) == (
        "# Example 1\n## Question \nWhat is tea?\n## Preferred Response \nA drink.\n"
        "## Dispreferred Response \nA car.\n\n"
        "# Example 2\n## Question \nWhy?\n## Preferred Response \nBecause.\n## Dispreferred Response \nNo.\n\n"
        "# Task\nGiven the examples above, generate a preferred response to the following question.\n"
        "## Question \nBest city?\n"
    )
    assert (
        render_prompt([], "Q?")
        == "# Task\nGenerate a response to the following question.\n## Question \nQ?\n"
    )
    assert render_prompt([P1], "Q?", user_description=True).endswith(
        "# Task\nGenerate a user description based on the examples above. Then, generate a preferred response "
        "to the following question.\n## Question \nQ?\n"
    )
    assert render_response(" Kyoto. ") == "## Preferred Response \nKyoto.\n"
    assert render_response("Kyoto.", "Likes temples.") == (
        "## User Description\nLikes temples.\n## Preferred Response \nKyoto.\n"
    )


def _episode(shots, target=TARGET, desc="Likes temples."):
    return Episode("u/e0/0", "u", tuple(shots), target, shots_requested=len(shots), description=desc)


def test_token_ids_have_bos_and_eos_in_the_right_places():
    tok = CharTokenizer()
    t = tokenize_episode(_episode([P1, P2]), tok, options=RenderOptions(user_description=True))
    assert t.prompt_ids == [1] + tok.encode(render_prompt([P1, P2], TARGET.question, True))
    assert t.chosen_ids == tok.encode(render_response(TARGET.chosen, "Likes temples.")) + [2]
    assert t.rejected_ids == tok.encode(render_response(TARGET.rejected, "Likes temples.")) + [2]
    assert t.responses == [t.chosen_ids, t.rejected_ids] and t.num_tokens == len(t.prompt_ids) + len(
        t.chosen_ids
    ) + len(t.rejected_ids)


def test_truncation_drops_oldest_shots_first_and_never_cuts_the_target():
    tok = CharTokenizer()
    shots = [Preference(f"s{i}", "u", f"question {i}?", "yes " * 10, "no " * 10) for i in range(5)]
    full = tokenize_episode(_episode(shots), tok)
    with_3 = tokenize_episode(_episode(shots[2:]), tok)
    # A budget that fits the 3 newest shots but not 4: the 2 oldest go.
    t = tokenize_episode(_episode(shots), tok, max_tokens=with_3.num_tokens)
    assert t.n_shots == 3 and t.prompt_ids == with_3.prompt_ids and t.shots_available == 5
    assert t.chosen_ids == full.chosen_ids and t.rejected_ids == full.rejected_ids
    assert tokenize_episode(_episode(shots), tok, max_tokens=with_3.num_tokens - 1).n_shots == 2
    zero = tokenize_episode(_episode([]), tok)
    assert tokenize_episode(_episode(shots), tok, max_tokens=zero.num_tokens).n_shots == 0
    with pytest.raises(FspoError, match=r"episode u/e0/0: needs \d+ tokens with zero shots"):
        tokenize_episode(_episode(shots), tok, max_tokens=zero.num_tokens - 1)
    # The batch path agrees with the one-by-one path, and reports every episode that cannot fit.
    eps = [_episode(shots), _episode(shots[:1])]
    batch = tokenize_episodes(eps, tok, max_tokens=with_3.num_tokens)
    assert [b.prompt_ids for b in batch] == [
        tokenize_episode(e, tok, with_3.num_tokens).prompt_ids for e in eps
    ]
    with pytest.raises(FspoError) as info:
        tokenize_episodes(eps, tok, max_tokens=10)
    assert len(str(info.value).splitlines()) == 1 and "(and 1 more episodes that do not fit)" in str(
        info.value
    )


def test_real_tokenizer_end_to_end(dataset, tmp_path):
    from helpers import tokenizer_corpus

    from fspo_engine.engine.tokenizer import train_tokenizer

    tok = train_tokenizer(tokenizer_corpus(), 400, tmp_path / "tok")
    eps = sample_episodes(dataset, "train", shots=3, seed=0, epoch=0)
    toks = tokenize_episodes(eps, tok, max_tokens=300)
    for e, t in zip(eps, toks):
        assert t.prompt_ids[0] == tok.bos_id and t.chosen_ids[-1] == tok.eos_id == t.rejected_ids[-1]
        assert tok.decode(t.chosen_ids[:-1]) == render_response(e.target.chosen)
        assert t.num_tokens <= 300
        kept = e.shots[e.n_shots - t.n_shots :]
        assert tok.decode(t.prompt_ids[1:]) == render_prompt(kept, e.target.question)


# ----------------------------------------------------------------------------------------------------------
# The released code's choices (data.bos, data.truncate, data.rejected_description, official windows)


def test_without_bos_and_with_keep_start_the_prompts_end_is_cut():
    tok = CharTokenizer()
    shots = [Preference(f"s{i}", "u", f"question {i}?", "yes " * 10, "no " * 10) for i in range(5)]
    whole = tokenize_episode(_episode(shots), tok, options=RenderOptions(bos=False))
    assert whole.prompt_ids == tok.encode(render_prompt(shots, TARGET.question))  # no bos
    budget = whole.num_tokens - 25
    no_bos_keep_start = RenderOptions(bos=False, truncate="keep_start")
    t = tokenize_episode(_episode(shots), tok, max_tokens=budget, options=no_bos_keep_start)
    assert t.prompt_ids == whole.prompt_ids[:-25] and t.num_tokens == budget and t.prompt_tokens_cut == 25
    assert (t.chosen_ids, t.rejected_ids, t.n_shots) == (whole.chosen_ids, whole.rejected_ids, 5)
    keep_start = RenderOptions(truncate="keep_start")
    with_bos = tokenize_episode(_episode(shots), tok, max_tokens=budget, options=keep_start)
    assert with_bos.prompt_ids == [tok.bos_id] + whole.prompt_ids[:-26]
    # The batch path agrees; the stats count the cut prompts.
    batch = tokenize_episodes([_episode(shots), _episode(shots[:1])], tok, max_tokens=budget, options=no_bos_keep_start)
    assert batch[0].prompt_ids == t.prompt_ids and batch[1].prompt_tokens_cut == 0
    assert episode_stats(batch)["episodes_prompt_cut"] == 1 and episode_stats(batch)["episodes_truncated"] == 0
    room = len(t.chosen_ids) + len(t.rejected_ids)
    assert tokenize_episode(_episode(shots), tok, max_tokens=room + 1, options=keep_start).prompt_ids == [1]
    with pytest.raises(FspoError, match=r"episode u/e0/0: its responses alone need \d+ tokens"):
        tokenize_episode(_episode(shots), tok, max_tokens=room, options=keep_start)
    with pytest.raises(FspoError, match="truncate must be"):
        RenderOptions(truncate="keep_end")


def test_rejected_description_is_shared_or_the_rejected_personas():
    tok = CharTokenizer()
    target = Preference("t", "u", "Best city?", "Kyoto.", "Any.", rejected_description="Likes nothing.")
    shared = tokenize_episode(_episode([P1], target), tok, options=RenderOptions(user_description=True))
    theirs = RenderOptions(user_description=True, rejected_description="rejected_persona")
    own = tokenize_episode(_episode([P1], target), tok, options=theirs)
    assert shared.rejected_ids == tok.encode(render_response("Any.", "Likes temples.")) + [2]
    assert own.rejected_ids == tok.encode(render_response("Any.", "Likes nothing.")) + [2]
    assert own.chosen_ids == shared.chosen_ids == tok.encode(render_response("Kyoto.", "Likes temples.")) + [2]
    # Without the user-description option there is no description to choose.
    plain = tokenize_episode(_episode([P1], target), tok, options=RenderOptions(rejected_description="rejected_persona"))
    assert plain.rejected_ids == tok.encode(render_response("Any.")) + [2]
    with pytest.raises(FspoError, match="preference t .* has no rejected_description"):
        tokenize_episodes([_episode([P1])], tok, options=theirs)


def test_official_windows_cut_each_users_shuffled_prefs_into_windows(dataset):
    """Windows of N + 2 over one permutation of each user's prefs per pass: N shots, the target, one left
    out; users with fewer than N + 2 prefs give none; 2(N + 1) passes by default."""
    from fspo_engine.engine.episodes import official_epoch_order, official_windows

    eps = official_windows(dataset, "train", 2, seed=0)
    sizes = {u: len(dataset.prefs[u]) for u in ("u000", "u001", "u002", "u003")}  # 12, 9, 3, 1
    per_pass = Counter(e.user_id for e in eps)
    assert per_pass == {u: 6 * (n // 4) for u, n in sizes.items() if n >= 4}
    for e in eps:
        used = [p.pref_id for p in e.shots] + [e.target.pref_id]
        assert len(set(used)) == 3 and e.n_shots == e.shots_requested == 2
    # Within one pass a user's windows never share a preference.
    first_pass = [e for e in eps if e.episode_id.split("/")[1].startswith("w0.") and e.user_id == "u000"]
    used = [p.pref_id for e in first_pass for p in (*e.shots, e.target)]
    assert len(first_pass) == 3 and len(set(used)) == 9
    assert official_windows(dataset, "train", 2, seed=0) == eps  # deterministic
    assert official_windows(dataset, "train", 2, seed=1) != eps
    assert len(official_windows(dataset, "train", 2, seed=0, passes=1)) == len(eps) // 6
    # Every epoch is the same set in another order.
    e0, e1 = official_epoch_order(eps, 0, 0), official_epoch_order(eps, 0, 1)
    assert sorted(e.episode_id for e in e0) == sorted(e.episode_id for e in e1) and e0 != e1
    with pytest.raises(FspoError, match="one shot count"):
        official_windows(dataset, "train", (1, 2))
