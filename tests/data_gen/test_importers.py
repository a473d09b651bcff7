"""Importers for the released FSPO datasets, on small fixtures written in the official schemas."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from pathlib import Path

import pytest

from fspo_engine.data_gen import import_dataset, outdir
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.importers import run_import
from fspo_engine.data_gen.pipeline import format_summary

ROLEPLAY = [
    {
        "x": "Plan my weekend.",
        "yw": "A quiet hike.",
        "yl": "A loud party.",
        "level": 3,
        "score_persona": "An introvert who loves nature.",
    },
    {
        "x": "Suggest dinner.",
        "yw": "A salad.",
        "yl": "A steak.",
        "level": 3,
        "score_persona": "An introvert who loves nature.",
    },
    {
        "x": "Plan my weekend.",
        "yw": "A loud party.",
        "yl": "A quiet hike.",
        "level": "1",
        "score_persona": "An extrovert who loves crowds.",
    },
]
REVIEW = [
    {
        "prompt": "Review the phone.",
        "response_x": "Great phone!",
        "response_y": "The phone's battery lasts 20 h.",
        "label": 0,
        "level_x": "casual",
        "level_y": "technical",
        "scorer_level": "casual",
    },
    {
        "prompt": "Review the phone.",
        "response_x": "Great phone!",
        "response_y": "The phone's battery lasts 20 h.",
        "label": 1,
        "level_x": "casual",
        "level_y": "technical",
        "scorer_level": "technical",
    },
    {
        "prompt": "Review the lamp.",
        "response_x": "Nice lamp.",
        "response_y": "Lumens: 800.",
        "label": "1",
        "level_x": 0,
        "level_y": 4,
        "scorer_level": "technical",
    },
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_roleplay_import(tmp_path):
    src = write_jsonl(tmp_path / "roleplay_train.jsonl", ROLEPLAY)
    manifest = import_dataset("roleplay", [src], tmp_path / "out")
    users = read_jsonl(tmp_path / "out" / "users.jsonl")
    prefs = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert manifest["format"] == "fspo-prefs/1" and manifest["domains"] == ["roleplay"]
    assert manifest["counts"] == {"users": 2, "prefs": 3, "train_users": 2, "test_users": 0}
    assert [u["description"] for u in users] == [
        "An introvert who loves nature.",
        "An extrovert who loves crowds.",
    ]
    assert users[0]["traits"] == {"level": "3"} and users[1]["split"] == "train"
    assert [(p["question"], p["chosen"], p["rejected"]) for p in prefs] == [
        ("Plan my weekend.", "A quiet hike.", "A loud party."),
        ("Suggest dinner.", "A salad.", "A steak."),
        ("Plan my weekend.", "A loud party.", "A quiet hike."),
    ]
    assert prefs[0]["user_id"] == prefs[1]["user_id"] == users[0]["user_id"] != prefs[2]["user_id"]
    assert len({p["pref_id"] for p in prefs}) == 3


def test_roleplay_users_are_levels_in_the_released_loaders_groupby_order(tmp_path):
    """The released loader groups roleplay records by `level` (not by persona), in sorted order (numbers,
    then strings); `score_persona` may be an object with a description; a record whose persona is not its
    level's first keeps its own as `score_persona`."""
    records = [
        {"x": "q0", "yw": "a0", "yl": "b0", "level": "beta", "score_persona": {"description": "Likes B.", "id": 7}},
        {"x": "q1", "yw": "a1", "yl": "b1", "level": 10, "score_persona": "Likes ten."},
        {"x": "q2", "yw": "a2", "yl": "b2", "level": 2, "score_persona": "Likes two."},
        {"x": "q3", "yw": "a3", "yl": "b3", "level": "alpha", "score_persona": "Likes A."},
        {"x": "q4", "yw": "a4", "yl": "b4", "level": 10, "score_persona": "Likes ten, again."},
    ]
    src = write_jsonl(tmp_path / "roleplay_train.jsonl", records)
    import_dataset("roleplay", [src], tmp_path / "out")
    users = read_jsonl(tmp_path / "out" / "users.jsonl")
    prefs = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert [u["traits"]["level"] for u in users] == ["2", "10", "alpha", "beta"]
    assert [u["description"] for u in users] == ["Likes two.", "Likes ten.", "Likes A.", "Likes B."]
    by_user = {}
    for p in prefs:
        by_user.setdefault(p["user_id"], []).append(p)
    ten = by_user[users[1]["user_id"]]
    assert [p["question"] for p in ten] == ["q1", "q4"]
    assert "score_persona" not in ten[0] and ten[1]["score_persona"] == "Likes ten, again."
    assert all("rejected_description" not in p for p in prefs)  # the released roleplay loader has none


@pytest.mark.parametrize(
    "persona, message",
    [({"name": "x"}, "field 'score_persona' is an object without a 'description' string"), ({"description": "  "}, "empty score_persona"),
     (["a list"], "field 'score_persona' has type list")],
)
def test_a_bad_score_persona_is_reported(tmp_path, persona, message):
    """--strict refuses it; by default the record is kept (the released loader never reads score_persona) and
    the user is described by its level's first usable persona."""
    src = write_jsonl(tmp_path / "roleplay.jsonl", [{**ROLEPLAY[0], "score_persona": persona}, ROLEPLAY[1]])
    with pytest.raises(DataGenError, match=rf"{src}:1: {message}"):
        import_dataset("roleplay", [src], tmp_path / "out", strict=True)
    manifest = import_dataset("roleplay", [src], tmp_path / "out")
    [user] = read_jsonl(tmp_path / "out" / "users.jsonl")
    assert user["description"] == ROLEPLAY[1]["score_persona"] and manifest["counts"]["prefs"] == 2
    assert manifest["kept_as_released"]["count"] == 1 and manifest["skipped"]["count"] == 0
    assert manifest["kept_as_released"]["examples"][0].startswith(f"roleplay.jsonl:1: {message} (kept")


@pytest.mark.parametrize("kind", ["review", "elix"])
def test_review_and_elix_descriptions_are_the_released_strings(tmp_path, kind):
    records = [
        {**REVIEW[0], "scorer_level": "positive+concise", "level_x": "negative", "level_y": "positive", "label": 1},
        {**REVIEW[0], "scorer_level": 3, "level_x": 3, "level_y": 5, "label": 0},
    ]
    src = write_jsonl(tmp_path / f"{kind}_train.jsonl", records)
    import_dataset(kind, [src], tmp_path / "out")
    users = read_jsonl(tmp_path / "out" / "users.jsonl")
    prefs = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert [u["traits"]["level"] for u in users] == ["3", "positive+concise"]  # numbers first
    word = "This user prefers positive and concise reviews." if kind == "review" else "The user is positive+concise."
    assert [u["description"] for u in users] == ["The user is 3.", word]
    assert [p["rejected_description"] for p in prefs] == ["The user is negative.", "The user is 5."]


@pytest.mark.parametrize("kind, domain", [("review", "reviews"), ("elix", "elix")])
def test_review_and_elix_import_label_zero_means_x_preferred(tmp_path, kind, domain):
    src = write_jsonl(tmp_path / f"{kind}_test.jsonl", REVIEW)
    manifest = import_dataset(kind, [src], tmp_path / "out")
    users = {u["user_id"]: u for u in read_jsonl(tmp_path / "out" / "users.jsonl")}
    prefs = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert (
        manifest["domains"] == [domain] and manifest["counts"]["test_users"] == 2
    )  # "test" in the file name
    first, second, third = prefs
    assert (first["chosen"], first["rejected"]) == ("Great phone!", "The phone's battery lasts 20 h.")
    assert (second["chosen"], second["rejected"]) == ("The phone's battery lasts 20 h.", "Great phone!")
    assert (third["chosen"], third["chosen_level"], third["rejected_level"]) == ("Lumens: 800.", "4", "0")
    assert users[first["user_id"]]["traits"] == {"level": "casual"}
    assert second["user_id"] == third["user_id"] != first["user_id"]  # the scorer's level is the user
    # The users disagree on the same pair: the label lives in the user.
    assert manifest["stats"]["user_user"] == {"shared_pairs": 1, "disagreement": 1.0}


def test_hash_split_and_forced_split(tmp_path):
    many = [{**ROLEPLAY[0], "level": i, "score_persona": f"persona {i}"} for i in range(200)]
    src = write_jsonl(tmp_path / "roleplay.jsonl", many)
    manifest = import_dataset("roleplay", [src], tmp_path / "a", test_fraction=0.3)
    assert 40 < manifest["counts"]["test_users"] < 80
    manifest = import_dataset("roleplay", [src], tmp_path / "b", split="test")
    assert manifest["counts"]["test_users"] == 200


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"x": "q", "yw": "a", "yl": "b", "level": 1}\n', r":1: missing field 'score_persona'"),
        (json.dumps(ROLEPLAY[0]).encode() + b"\n{not json\n", r":2: invalid JSON"),
        (b"[1, 2]\n", r":1: expected a JSON object, got list"),
        (b'{"x": "q\xff", "yw": "a"}\n', r":1: not valid UTF-8"),
        (json.dumps({**ROLEPLAY[0], "yw": 7}).encode(), r":1: field 'yw' has type int"),
        (b"", r": no records"),
        (
            json.dumps(ROLEPLAY[0]).encode().replace(b"A quiet", b"\\ud800 quiet"),
            r":1: field 'yw' is not valid Unicode",
        ),
    ],
)
def test_malformed_files_report_path_and_line_and_write_nothing(tmp_path, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(content)
    with pytest.raises(DataGenError, match=message) as info:
        import_dataset("roleplay", [src], tmp_path / "out", strict=True)
    assert str(info.value).startswith(str(src))
    assert (
        not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "prefs.jsonl").exists()
    )


def test_every_malformed_record_is_reported(tmp_path):
    bad = [{**REVIEW[0], "label": 2}, REVIEW[1], {**REVIEW[2], "prompt": None}]
    src = write_jsonl(tmp_path / "review.jsonl", bad)
    with pytest.raises(DataGenError) as info:
        import_dataset("review", [src], tmp_path / "out", strict=True)
    assert str(info.value).splitlines() == [
        f"{src}:1: label must be 0 or 1, not 2",
        f"{src}:3: missing field 'prompt'",
    ]


def test_missing_file_and_bad_kind(tmp_path):
    with pytest.raises(DataGenError, match="no such file"):
        import_dataset("elix", [tmp_path / "nope.jsonl"], tmp_path / "out")
    with pytest.raises(DataGenError, match="--import must be one of"):
        import_dataset("movies", [tmp_path / "x.jsonl"], tmp_path / "out")


def test_existing_dataset_needs_overwrite_unless_the_import_is_identical(tmp_path):
    src = write_jsonl(tmp_path / "roleplay.jsonl", ROLEPLAY)
    import_dataset("roleplay", [src], tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    # The identical import again (a re-run after a kill just after completion) is a no-op, like gen-data.
    again = run_import("roleplay", [src], tmp_path / "out")
    assert again.prefs_written == 0 and "nothing to do" in format_summary(again)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    with pytest.raises(DataGenError, match="already holds a dataset; pass --overwrite"):
        import_dataset("roleplay", [src], tmp_path / "out", seed=1)  # another import: another dataset
    import_dataset("roleplay", [src], tmp_path / "out", seed=1, overwrite=True)


def test_utf8_bom_at_the_start_is_accepted(tmp_path):
    src = write_jsonl(tmp_path / "roleplay.jsonl", ROLEPLAY)
    bom = tmp_path / "bom" / "roleplay.jsonl"
    bom.parent.mkdir()
    bom.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())  # pandas to_json(..., encoding="utf-8-sig")
    import_dataset("roleplay", [src], tmp_path / "a")
    import_dataset("roleplay", [bom], tmp_path / "b")
    for name in ("users.jsonl", "prefs.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    src = write_jsonl(tmp_path / "roleplay.jsonl", ROLEPLAY)
    old = os.umask(umask)
    try:
        import_dataset("roleplay", [src], tmp_path / "out")
    finally:
        os.umask(old)
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["manifest.json", "prefs.jsonl", "users.jsonl"]  # no temp files left behind
    for name in files:
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask, name


def test_overwrite_that_dies_while_writing_keeps_the_old_dataset(tmp_path, monkeypatch):
    """The old manifest used to be deleted before the new files were written."""
    out = tmp_path / "out"
    import_dataset("roleplay", [write_jsonl(tmp_path / "roleplay.jsonl", ROLEPLAY)], out)
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}
    real = outdir.write_staged

    def dying_write_staged(path, chunks):
        if path.name == "manifest.json":  # the last file staged: users and prefs are already written
            raise OSError("No space left on device")
        return real(path, chunks)

    monkeypatch.setattr("fspo_engine.data_gen.importers.write_staged", dying_write_staged)
    src = write_jsonl(tmp_path / "review.jsonl", REVIEW)
    with pytest.raises(OSError, match="No space"):
        import_dataset("review", [src], out, overwrite=True)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old  # and no temp files
    monkeypatch.undo()
    assert import_dataset("review", [src], out, overwrite=True)["domains"] == ["reviews"]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet_import(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {**r, "level_x": str(r["level_x"]), "level_y": str(r["level_y"]), "label": int(r["label"])}
        for r in REVIEW
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "elix_train.parquet")
    manifest = import_dataset("elix", [tmp_path / "elix_train.parquet"], tmp_path / "out")
    assert manifest["counts"] == {"users": 2, "prefs": 3, "train_users": 2, "test_users": 0}
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataGenError, match="broken.parquet: cannot read Parquet"):
        import_dataset("elix", [tmp_path / "broken.parquet"], tmp_path / "out2")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    (tmp_path / "elix.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataGenError, match=r"elix.parquet: reading Parquet needs pyarrow"):
        import_dataset("elix", [tmp_path / "elix.parquet"], tmp_path / "out")


def test_unparsable_lines_are_reported_per_line_not_raised(tmp_path):
    good = json.dumps(REVIEW[0])
    src = tmp_path / "review.jsonl"
    # Valid JSON syntax that json.loads still refuses: an integer past Python's 4300-digit limit
    # (ValueError) and nesting deeper than the recursion limit (RecursionError).
    src.write_text(good + "\n" + '{"label": ' + "9" * 5000 + "}\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataGenError) as info:
        import_dataset("review", [src], tmp_path / "out")
    lines = str(info.value).splitlines()
    assert (
        lines[0].startswith(f"{src}:2: unreadable JSON (") and lines[1] == f"{src}:3: JSON nested too deeply"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["scorer_level", "level_x"])
def test_a_blank_level_is_rejected_with_strict(tmp_path, field):
    src = write_jsonl(tmp_path / "review.jsonl", [{**REVIEW[0], field: "   "}])
    with pytest.raises(DataGenError, match=rf"{src}:1: empty {field}"):
        import_dataset("review", [src], tmp_path / "out", strict=True)


def test_auto_split_matches_whole_words_of_the_file_name(tmp_path):
    # "latest" contains "test": the file is still a train file.
    for name, split in [("roleplay_latest_train", "train"), ("rp-test", "test"), ("contest", None)]:
        src = write_jsonl(tmp_path / f"{name}.jsonl", ROLEPLAY)
        import_dataset("roleplay", [src], tmp_path / name, test_fraction=0.0)
        users = [json.loads(line) for line in (tmp_path / name / "users.jsonl").read_text().splitlines()]
        assert {u["split"] for u in users} == {split or "train"}, name  # None: hash split, fraction 0


def test_foreign_dataset_files_are_not_replaced_without_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "roleplay.jsonl", ROLEPLAY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "prefs.jsonl").write_text('{"my": "hand-labelled data"}\n')
    with pytest.raises(DataGenError, match="holds prefs.jsonl without a gen-data manifest; pass --overwrite"):
        import_dataset("roleplay", [src], out)
    assert (out / "prefs.jsonl").read_text() == '{"my": "hand-labelled data"}\n'
    assert sorted(os.listdir(out)) == ["prefs.jsonl"]
    import_dataset("roleplay", [src], out, overwrite=True)
    assert "hand-labelled" not in (out / "prefs.jsonl").read_text()


# ------------------------------------------------------------------------------------------------ released reading
# The released loader (preference_datasets.py get_roleplay / get_review / get_elix), re-implemented from its rules
# independently of the importer: which records it trains on, grouped into which users, read how.


def released_groups(kind, records):
    """Each user's (question, preferred, dispreferred) rows as the released loader reads the records: the
    DataFrame grouped by its user column (groupby drops null and NaN keys; one column holds 2 and 2.0 as one
    value), groups in sorted order, rows in file order, texts .strip()ped, and for review/elix response_x
    preferred iff `label == 0`."""
    column = "level" if kind == "roleplay" else "scorer_level"
    groups = {}
    for rec in records:
        level = rec.get(column)
        if level is None or level != level:  # null, NaN: not a group
            continue
        if kind == "roleplay":
            row = (rec["x"].strip(), rec["yw"].strip(), rec["yl"].strip())
        else:
            x, y = rec["response_x"].strip(), rec["response_y"].strip()
            row = (rec["prompt"].strip(), *((x, y) if rec["label"] == 0 else (y, x)))
        groups.setdefault(level, []).append(row)
    return [groups[level] for level in sorted(groups)]


def imported_groups(out):
    """The imported users' preferences, users in users.jsonl order, as stripped rows (rendering strips)."""
    prefs = read_jsonl(out / "prefs.jsonl")
    return [[(p["question"].strip(), p["chosen"].strip(), p["rejected"].strip()) for p in prefs
             if p["user_id"] == u["user_id"]] for u in read_jsonl(out / "users.jsonl")]  # fmt: skip


def test_roleplay_records_the_released_loader_drops_or_trains_on(tmp_path):
    """A null or NaN level is dropped (groupby); a float level 2.0 is the user of level 2; empty and blank texts
    and a missing score_persona are trained on. --strict refuses each of them."""
    base = {"x": "q", "yw": "a", "yl": "b", "score_persona": "P"}
    records = [
        {**base, "level": 2, "x": "two"},
        {**base, "level": None, "x": "null level"},
        {**base, "level": 2.0, "x": "two, as a float", "yl": "   "},
        {**base, "level": float("nan"), "x": "NaN level"},
        {**base, "level": 1, "yw": ""},
        {"x": "no persona", "yw": "a", "yl": "b", "level": 3},
        {**base, "level": 1.5, "x": "a level between"},
    ]
    src = write_jsonl(tmp_path / "rp_train.jsonl", records)  # json.dumps writes NaN, which json.loads reads
    manifest = import_dataset("roleplay", [src], tmp_path / "out")
    assert imported_groups(tmp_path / "out") == released_groups("roleplay", records)
    users = read_jsonl(tmp_path / "out" / "users.jsonl")
    assert [u["traits"]["level"] for u in users] == ["1", "1.5", "2", "3"]
    assert users[-1]["description"] == ""  # level 3's only record has no persona
    assert manifest["skipped"] == {"count": 2, "examples": [
        "rp_train.jsonl:2: missing field 'level' (skipped: the released loader's groupby drops the record)",
        "rp_train.jsonl:4: field 'level' is NaN (skipped: the released loader's groupby drops the record)"]}
    kept = manifest["kept_as_released"]
    assert kept["count"] == 3 and [e.split(" (")[0] for e in kept["examples"]] == [
        "rp_train.jsonl:3: empty yl", "rp_train.jsonl:5: empty yw", "rp_train.jsonl:6: missing field 'score_persona'"]

    with pytest.raises(DataGenError) as info:
        import_dataset("roleplay", [src], tmp_path / "strict", strict=True)
    assert [ln.split(": ", 1)[0] for ln in str(info.value).splitlines()] == [f"{src}:{n}" for n in (2, 3, 4, 5, 6)]
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("kind", ["review", "elix"])
def test_review_and_elix_records_the_released_loader_drops_or_trains_on(tmp_path, kind):
    """A null scorer_level is dropped; a blank one is a user; any label but 0 (2, null, true) makes response_y
    preferred, as `label == 0` reads it, and 0.0 / false response_x; a null level_x is trained on (no
    rejected_description then); a whitespace-only response too."""
    base = {**REVIEW[0], "scorer_level": "expert"}
    records = [
        {**base, "label": 2, "prompt": "label 2"},
        {**base, "label": None, "prompt": "label null"},
        {**base, "label": 0.0, "prompt": "label 0.0"},
        {**base, "label": True, "prompt": "label true"},
        {**base, "label": False, "prompt": "label false"},
        {**base, "scorer_level": None, "prompt": "no user"},
        {**base, "scorer_level": "", "prompt": "blank user"},
        {**base, "label": 1, "level_x": None, "prompt": "null level_x"},
        {**base, "label": 1, "response_y": " \n ", "prompt": "blank response"},
        {**base, "label": 1.0, "prompt": "label 1.0"},
    ]
    src = write_jsonl(tmp_path / f"{kind}_train.jsonl", records)
    manifest = import_dataset(kind, [src], tmp_path / "out")
    assert imported_groups(tmp_path / "out") == released_groups(kind, records)
    prefs = {p["question"]: p for p in read_jsonl(tmp_path / "out" / "prefs.jsonl")}
    # label 1: response_x, written for the null level, is the rejected one.
    assert "rejected_description" not in prefs["null level_x"] and prefs["null level_x"]["chosen_level"] == "technical"
    assert prefs["label 2"]["rejected_description"] == "The user is casual."  # response_x lost: written for casual
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["examples"][0].startswith(
        f"{kind}_train.jsonl:6: missing field 'scorer_level'")
    assert manifest["kept_as_released"]["count"] == 7  # labels 2, null, true, false; blank user; level_x; response

    with pytest.raises(DataGenError) as info:
        import_dataset(kind, [src], tmp_path / "strict", strict=True)
    assert [ln.split(": ", 1)[0] for ln in str(info.value).splitlines()] == [
        f"{src}:{n}" for n in (1, 2, 4, 5, 6, 7, 8, 9)]


def test_records_no_reader_can_read_are_skipped_and_malformed_json_is_an_error_in_either_mode(tmp_path):
    """A null or non-string text makes the released loader fail (`.strip()`), a lone surrogate cannot be written
    as UTF-8, a level that is a list names no user: skipped and counted by default, errors with --strict. A
    line that is not JSON is an error either way; a file whose records are all skipped is one too."""
    good = ROLEPLAY[0]
    records = [good, {**good, "x": None}, {**good, "yw": 7}, {**good, "level": [1]}, good]
    lines = [json.dumps(r) for r in records]
    lines.insert(4, json.dumps(good).replace("A quiet", "\\ud800 quiet"))
    src = tmp_path / "rp.jsonl"
    src.write_text("\n".join(lines) + "\n")
    manifest = import_dataset("roleplay", [src], tmp_path / "out")
    assert manifest["counts"]["prefs"] == 2 and manifest["kept_as_released"]["count"] == 0
    assert [e.split(" (")[0] for e in manifest["skipped"]["examples"]] == [
        "rp.jsonl:2: missing field 'x'", "rp.jsonl:3: field 'yw' has type int", "rp.jsonl:4: field 'level' has type list",
        "rp.jsonl:5: field 'yw' is not valid Unicode"]
    with pytest.raises(DataGenError) as info:
        import_dataset("roleplay", [src], tmp_path / "strict", strict=True)
    assert len(str(info.value).splitlines()) == 4

    src.write_text("\n".join(lines) + "\n{not json\n")
    for strict in (False, True):
        with pytest.raises(DataGenError, match=rf"{src}:7: invalid JSON"):
            import_dataset("roleplay", [src], tmp_path / "json", strict=strict)
    bad = write_jsonl(tmp_path / "all_bad.jsonl", [{**good, "level": None}])
    with pytest.raises(DataGenError, match=rf"^{bad}: no records to import \(1 skipped, e\.g\. all_bad\.jsonl:1: "):
        import_dataset("roleplay", [write_jsonl(tmp_path / "fine.jsonl", [good]), bad], tmp_path / "none")


def test_cli_prints_one_summary_line_and_strict_exits_non_zero(tmp_path):
    from helpers import cli_in_process

    records = [ROLEPLAY[0], {**ROLEPLAY[0], "level": None}, {**ROLEPLAY[1], "yl": ""}, *[{**ROLEPLAY[1], "level": None}] * 6]
    src = write_jsonl(tmp_path / "rp.jsonl", records)
    res = cli_in_process("gen-data", "--import", "roleplay", "--from", src, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith("import: skipped 7 records (rp.jsonl:2: missing field 'level' (skipped: ")
    assert "; ...)" in line and "kept 1 record --strict refuses" in line and "rp.jsonl:3: empty yl" in line
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]["count"] == 7

    res = cli_in_process("gen-data", "--import", "roleplay", "--from", src, "--out", tmp_path / "strict", "--strict")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{src}:2: missing field 'level'" in res.stderr and f"{src}:3: empty yl" in res.stderr
    assert not (tmp_path / "strict").exists()
    res = cli_in_process("gen-data", "--out", tmp_path / "gen", "--strict")
    assert res.returncode != 0 and "--strict needs --import" in res.stderr
