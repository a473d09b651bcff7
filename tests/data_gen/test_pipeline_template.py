"""Template backend: determinism, resumability, the quickstart preset's properties, splits."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fspo_engine.data_gen import generate_dataset, outdir
from fspo_engine.data_gen.domains import get_domain
from fspo_engine.data_gen.domains.reviews import AXES, QS_AXES, QS_EASY_AXES, QS_WORDS
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.outdir import STATE_DIR
from fspo_engine.data_gen.producers import TemplateProducer

FILES = ("manifest.json", "users.jsonl", "prefs.jsonl")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def file_bytes(d):
    return {name: (Path(d) / name).read_bytes() for name in FILES}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    args = dict(domains=("reviews", "elix", "roleplay"), users=40, prefs_per_user=6, seed=3, progress=False)
    generate_dataset(tmp_path / "a", **args)
    generate_dataset(tmp_path / "b", commit_every_s=1e-9, **args)  # commit points must not change the output
    generate_dataset(tmp_path / "c", **{**args, "seed": 4})
    a, b, c = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b"), file_bytes(tmp_path / "c")
    assert a == b
    assert a["prefs.jsonl"] != c["prefs.jsonl"]
    manifest = json.loads(a["manifest.json"])
    assert manifest["format"] == "fspo-prefs/1"
    assert manifest["counts"] == {"users": 120, "prefs": 720, "train_users": 96, "test_users": 24}
    assert not (tmp_path / "a" / STATE_DIR).exists()


def test_records_follow_the_contract(tmp_path):
    generate_dataset(tmp_path, domains=("elix", "roleplay"), users=20, prefs_per_user=5, progress=False)
    users = read_jsonl(tmp_path / "users.jsonl")
    prefs = read_jsonl(tmp_path / "prefs.jsonl")
    ids = {u["user_id"] for u in users}
    assert len(ids) == len(users) == 40
    for u in users:
        assert u["split"] in ("train", "test") and u["description"] and isinstance(u["traits"], dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in u["traits"].items())
    assert len({p["pref_id"] for p in prefs}) == len(prefs) == 200
    for p in prefs:
        assert p["user_id"] in ids and p["chosen"] != p["rejected"] and p["question"]
    # Per domain, exactly round(0.2 * 20) test users.
    assert Counter((u["domain"], u["split"]) for u in users)[("elix", "test")] == 4


def test_label_noise_rate(tmp_path):
    generate_dataset(tmp_path, users=100, prefs_per_user=20, label_noise=0.25, progress=False)
    prefs = read_jsonl(tmp_path / "prefs.jsonl")
    rate = sum(p["noise_flipped"] for p in prefs) / len(prefs)
    assert 0.21 < rate < 0.29
    labels = json.loads((tmp_path / "manifest.json").read_text())["stats"]["labels"]
    assert labels["label_entropy_before"] > 0.7


def test_reviews_test_users_hold_interpolated_combinations(tmp_path):
    generate_dataset(tmp_path, users=300, prefs_per_user=1, test_fraction=0.25, progress=False)
    users = read_jsonl(tmp_path / "users.jsonl")
    combo = lambda u: tuple(u["traits"][a] for a in sorted(AXES))
    train = {combo(u) for u in users if u["split"] == "train"}
    test = {combo(u) for u in users if u["split"] == "test"}
    assert test and not train & test  # unseen combinations...
    for axis_values in zip(*test):  # ...of values that are each seen in training
        for value in axis_values:
            assert any(value in c for c in train)


def test_quickstart_easy_preset_is_small_clean_and_ambiguous_without_shots(tmp_path):
    generate_dataset(tmp_path, preset="quickstart-easy", users=200, prefs_per_user=20, progress=False)
    users = {u["user_id"]: u for u in read_jsonl(tmp_path / "users.jsonl")}
    prefs = read_jsonl(tmp_path / "prefs.jsonl")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["generator"]["label_noise"] == 0.0 and manifest["generator"]["preset"] == "quickstart-easy"
    words = lambda t: re.findall(r"\w+", t.lower())
    vocab = {w for p in prefs for t in (p["question"], p["chosen"], p["rejected"]) for w in words(t)}
    vocab |= {w for u in users.values() for w in words(u["description"])}
    assert len(vocab) <= 80
    value_words = {v: ws for axis in QS_EASY_AXES for v, ws in QS_WORDS[axis].items()}
    sides = Counter()
    for p in prefs:
        assert 3 <= len(words(p["chosen"])) <= 12 and 3 <= len(words(p["rejected"])) <= 12
        traits = users[p["user_id"]]["traits"]
        # The chosen response carries every trait value of its user; the rejected one lacks exactly
        # the deciding axis' value, and carries the other value's words instead.
        for value in traits.values():
            assert set(words(p["chosen"])) & set(value_words[value])
        (axis,) = p["axes"]
        (other,) = [v for v in QS_EASY_AXES[axis] if v != traits[axis]]
        assert not set(words(p["rejected"])) & set(value_words[traits[axis]])
        assert set(words(p["rejected"])) & set(value_words[other])
        sides[traits["sentiment"]] += 1
    # Without the user, a pair's label is a coin flip: each trait value is preferred half the time,
    # and users who share a pair disagree about it about half the time.
    assert 0.4 < sides["positive"] / len(prefs) < 0.6
    assert 0.4 < manifest["stats"]["user_user"]["disagreement"] < 0.6


def test_quickstart_preset_reveals_a_user_a_few_traits_at_a_time(tmp_path):
    generate_dataset(tmp_path, preset="quickstart", users=300, prefs_per_user=12, progress=False)
    users = {u["user_id"]: u for u in read_jsonl(tmp_path / "users.jsonl")}
    prefs = read_jsonl(tmp_path / "prefs.jsonl")
    domain = get_domain("reviews", "quickstart")
    words = lambda t: re.findall(r"\w+", t.lower())
    vocab = {w for p in prefs for t in (p["question"], p["chosen"], p["rejected"]) for w in words(t)}
    assert len(vocab) <= 60
    changed, sides = Counter(), Counter()
    for p in prefs:
        traits = users[p["user_id"]]["traits"]
        c, r = domain.read_attrs(p["chosen"]), domain.read_attrs(p["rejected"])
        # Both responses mention exactly the contrasted axes, with different values, and the chosen side
        # matches the user on more of them: a shot tells about those traits of the user and no others.
        mentioned = [a for a in sorted(QS_AXES) if c[a] is not None]
        assert mentioned == p["axes"] == [a for a in sorted(QS_AXES) if r[a] is not None]
        assert 1 <= len(mentioned) <= max(domain.changed_axes)
        assert all(c[a] != r[a] for a in mentioned)
        assert domain.score(traits, c) > domain.score(traits, r)
        if len(mentioned) == 1:  # one trait: the chosen side is the user's value
            assert c[mentioned[0]] == traits[mentioned[0]]
        changed[len(mentioned)] += 1
        if c["sentiment"] is not None:
            sides[c["sentiment"]] += 1
    assert set(changed) == set(domain.changed_axes) == {1}  # one trait a pair: a shot reveals one trait
    # Each sentiment is the chosen one about as often: without the user, a pair's label is a coin flip.
    assert all(0.18 < sides[v] / sum(sides.values()) < 0.32 for v in QS_AXES["sentiment"]), sides
    # Test users hold combinations no training user has, in whole orbits (a combination and its shifts), so
    # that every trait value keeps the same share of the training users.
    combo = lambda u: tuple(u["traits"][a] for a in sorted(QS_AXES))
    train = Counter(combo(u) for u in users.values() if u["split"] == "train")
    test = {combo(u) for u in users.values() if u["split"] == "test"}
    assert test and not set(train) & test
    heldout = domain.heldout_combos(0, 0.2)
    assert test <= heldout and len(heldout) == 8
    allowed = [c for c in itertools.product(*(QS_AXES[a] for a in sorted(QS_AXES))) if c not in heldout]
    for i, axis in enumerate(sorted(QS_AXES)):
        assert Counter(c[i] for c in heldout) == {v: 2 for v in QS_AXES[axis]}, axis
        assert len(set(Counter(c[i] for c in allowed).values())) == 1, axis  # training users' pool: balanced


def test_quickstart_preset_rejects_other_domains():
    for preset in ("quickstart", "quickstart-easy"):
        with pytest.raises(DataGenError, match=preset):
            generate_dataset("/nonexistent-never-created", preset=preset, domains=("elix",))
    with pytest.raises(DataGenError, match="unknown preset"):
        get_domain("reviews", "fast")


def test_resume_after_a_crash_drops_what_came_after_the_last_commit(tmp_path, monkeypatch):
    args = dict(domains=("reviews", "roleplay"), users=30, prefs_per_user=4, progress=False, commit_every_s=1e-9)
    generate_dataset(tmp_path / "ref", **args)

    real_unit = TemplateProducer.unit
    calls = itertools.count()

    async def crashing_unit(self, user):
        if next(calls) == 37:
            raise KeyboardInterrupt  # like a kill in the middle of the 38th unit
        return await real_unit(self, user)

    monkeypatch.setattr(TemplateProducer, "unit", crashing_unit)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "run", **args)
    state = json.loads((tmp_path / "run" / STATE_DIR / "state.json").read_text())
    assert state["done"] == 37 and not (tmp_path / "run" / "manifest.json").exists()
    with open(tmp_path / "run" / STATE_DIR / "prefs.jsonl", "ab") as f:
        f.write(b'{"pref_id": "torn-wri')  # bytes written after the last checkpoint
    monkeypatch.setattr(TemplateProducer, "unit", real_unit)
    with pytest.raises(DataGenError, match="other arguments"):
        generate_dataset(tmp_path / "run", **{**args, "seed": 1})
    generate_dataset(tmp_path / "run", **args)
    assert file_bytes(tmp_path / "run") == file_bytes(tmp_path / "ref")


def test_rerun_of_a_complete_dataset_is_a_no_op_and_other_args_need_overwrite(tmp_path):
    first = generate_dataset(tmp_path, users=10, prefs_per_user=2, progress=False)
    assert first.prefs_written == 20
    again = generate_dataset(tmp_path, users=10, prefs_per_user=2, progress=False)
    assert again.prefs_written == 0 and again.manifest == first.manifest
    with pytest.raises(DataGenError, match="--overwrite"):
        generate_dataset(tmp_path, users=11, prefs_per_user=2, progress=False)
    generate_dataset(tmp_path, users=11, prefs_per_user=2, progress=False, overwrite=True)
    assert len(read_jsonl(tmp_path / "users.jsonl")) == 11


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no handler in the code under test catches it."""


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path, monkeypatch):
    """--overwrite used to delete the old dataset first: a kill mid-run then left no dataset at all."""
    new_args = dict(users=30, prefs_per_user=4, seed=1, commit_every_s=1e-9, progress=False)
    generate_dataset(tmp_path / "ref", **new_args)
    d = tmp_path / "d"
    generate_dataset(d, users=12, prefs_per_user=3, progress=False)
    old = file_bytes(d)

    # A kill while the new dataset is being generated: the old one is untouched.
    real_unit, calls = TemplateProducer.unit, itertools.count()

    async def crashing_unit(self, user):
        if next(calls) == 20:
            raise Killed
        return await real_unit(self, user)

    monkeypatch.setattr(TemplateProducer, "unit", crashing_unit)
    with pytest.raises(Killed):
        generate_dataset(d, overwrite=True, **new_args)
    assert file_bytes(d) == old and (d / STATE_DIR).is_dir()
    monkeypatch.setattr(TemplateProducer, "unit", real_unit)

    # A kill inside the final swap, between the new users.jsonl and the new prefs.jsonl: there is no
    # manifest, so readers refuse the directory instead of pairing new users with old prefs.
    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(dst).name == "prefs.jsonl":
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(outdir.os, "replace", dying_replace)
    with pytest.raises(Killed):
        generate_dataset(d, **new_args)  # same arguments: resumes the run, then dies in _finalize
    monkeypatch.setattr(outdir.os, "replace", real_replace)
    assert not (d / "manifest.json").exists()
    assert (d / "users.jsonl").read_bytes() == (tmp_path / "ref" / "users.jsonl").read_bytes()
    assert (d / "prefs.jsonl").read_bytes() == old["prefs.jsonl"]
    # Re-running completes the swap.
    generate_dataset(d, **new_args)
    assert file_bytes(d) == file_bytes(tmp_path / "ref") and not (d / STATE_DIR).exists()
    assert sorted(os.listdir(d)) == sorted(FILES)  # the killed swap's staged manifest is cleaned up


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    """tempfile.mkstemp creates 0600 files; renamed into place, they hid the dataset from other users."""
    old = os.umask(umask)
    try:
        generate_dataset(tmp_path, users=5, prefs_per_user=2, progress=False)
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~umask
    for name in FILES:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert sorted(os.listdir(tmp_path)) == sorted([*FILES, "plain"])  # no temp files left behind


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(users=0), "--users"),
        (dict(test_fraction=1.0), "--test-fraction"),
        (dict(label_noise=0.9), "--label-noise"),
        (dict(domains=("reviews", "reviews")), "repeats"),
        (dict(backend="openai"), "--model"),
        (dict(backend="vllm"), "--backend"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_bad_arguments_raise_datagen_error(tmp_path, options, message):
    with pytest.raises(DataGenError, match=message):
        generate_dataset(tmp_path, progress=False, **options)


def test_killed_subprocess_then_rerun_matches_uninterrupted_run(tmp_path):
    """SIGKILL a real `gen-data` process mid-run; re-running the same command finishes the dataset."""
    argv = ["--domains", "reviews,elix,roleplay", "--users", "1000", "--prefs-per-user", "10", "--seed", "5"]
    cmd = [sys.executable, "-m", "fspo_engine.cli.main", "gen-data", "--no-progress", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    state_path = killed / STATE_DIR / "state.json"
    done = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(state_path.read_text())["done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 512:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended before it could be killed: {proc.stderr.read()!r}"
    )
    assert 0 < done < 3000 and not (killed / "manifest.json").exists()

    rerun = subprocess.run([*cmd, "--out", str(killed)], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    generate_dataset(
        tmp_path / "whole",
        domains=("reviews", "elix", "roleplay"),
        users=1000,
        prefs_per_user=10,
        seed=5,
        progress=False,
    )
    assert file_bytes(killed) == file_bytes(tmp_path / "whole")
    assert not (killed / STATE_DIR).exists()


@pytest.mark.parametrize("preset, domains", [("quickstart", ("reviews",)), (None, ("reviews", "elix"))])
def test_a_validation_split_holds_users_and_combinations_of_its_own(tmp_path, preset, domains):
    args = dict(preset=preset, domains=domains, users=300, prefs_per_user=2, seed=4, progress=False)
    plain = generate_dataset(tmp_path / "plain", **args)
    result = generate_dataset(tmp_path / "val", val_fraction=0.1, **args)
    users = read_jsonl(tmp_path / "val" / "users.jsonl")
    split = {u["user_id"]: u["split"] for u in users}
    assert sum(s == "val" for s in split.values()) == 30 * len(domains)
    assert result.manifest["counts"]["val_users"] == 30 * len(domains)
    assert result.manifest["generator"]["val_fraction"] == 0.1 and "val_fraction" not in plain.manifest["generator"]
    # The test users are the same users with the same traits: adding a validation split takes from train only.
    before = {u["user_id"]: u for u in read_jsonl(tmp_path / "plain" / "users.jsonl") if u["split"] == "test"}
    assert {k: v for k, v in before.items()} == {u["user_id"]: u for u in users if u["split"] == "test"}
    domain = get_domain("reviews", preset)
    combos = {s: {tuple(u["traits"][a] for a in sorted(domain.axes)) for u in users
                  if u["split"] == s and u["domain"] == "reviews"} for s in ("train", "val", "test")}
    assert combos["val"] and not combos["val"] & combos["train"] and not combos["val"] & combos["test"]
    assert not combos["test"] & combos["train"]
    with pytest.raises(DataGenError, match="--test-fraction \\+ --val-fraction"):
        generate_dataset(tmp_path / "bad", test_fraction=0.6, val_fraction=0.5, progress=False)
