"""Reading a preference dataset directory: every bad record reported with its path and line, nothing half-valid."""

from __future__ import annotations

import json
import os

import pytest
from helpers import synthetic_records, write_dataset, write_jsonl

from fspo_engine.engine.dataset import load_dataset
from fspo_engine.engine.errors import FspoError


@pytest.fixture
def dataset(tmp_path):
    users, prefs = synthetic_records(n_users=5, prefs_per_user=[12, 9, 3, 1, 6], seed=0, test_users=1)
    return load_dataset(write_dataset(tmp_path / "data", users, prefs))


def test_load_valid_dataset(dataset):
    assert list(dataset.users) == ["u000", "u001", "u002", "u003", "u004"]
    assert [len(dataset.prefs[u]) for u in dataset.users] == [12, 9, 3, 1, 6]
    assert [u.user_id for u in dataset.users_in("test")] == ["u004"]
    assert len(dataset.users_in(None)) == 5 and dataset.num_prefs == 31
    assert dataset.prefs["u001"][0].pref_id == "u001-p000"
    with pytest.raises(FspoError, match="unknown split"):
        dataset.users_in("dev")


def _write_raw(tmp_path, users_lines: list[bytes], prefs_lines: list[bytes], manifest=None):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    man = (
        {"format": "fspo-prefs/1", "domains": [], "seed": 0, "generator": {}}
        if manifest is None
        else manifest
    )
    (d / "manifest.json").write_text(json.dumps(man))
    (d / "users.jsonl").write_bytes(b"".join(line + b"\n" for line in users_lines))
    (d / "prefs.jsonl").write_bytes(b"".join(line + b"\n" for line in prefs_lines))
    return d


def _good_user(uid="u1", **kw):
    return json.dumps(
        {"user_id": uid, "domain": "d", "split": "train", "description": "x", "traits": {}, **kw}
    ).encode()


def _good_pref(pid="p1", uid="u1", **kw):
    return json.dumps(
        {"pref_id": pid, "user_id": uid, "question": "q", "chosen": "a", "rejected": "b", **kw}
    ).encode()


def test_every_bad_record_is_reported_with_path_and_line(tmp_path):
    users = [
        _good_user("u1"),
        b'{"user_id": "u2", "domain": "d", "split": "train", "description": "x"',  # malformed JSON
        _good_user("u3", split="dev"),
        json.dumps(
            {"user_id": "u4", "domain": 3, "split": "train", "description": "x", "traits": {}}
        ).encode(),
        b"",
        _good_user("u1"),  # duplicate
        b"[1, 2]",
    ]
    prefs = [
        _good_pref("p1"),
        json.dumps(
            {"pref_id": "p2", "user_id": "u1", "question": "q", "chosen": "a"}
        ).encode(),  # no rejected
        _good_pref("p3", uid="ghost"),
        b'{"pref_id": "p4", "user_id": "u1", "question": "caf\xe9", "chosen": "a", "rejected": "b"}',  # latin-1
        _good_pref("p5", chosen=None),
        _good_pref("p1"),
        _good_pref("p6", question=True),
    ]
    d = _write_raw(tmp_path, users, prefs)
    with pytest.raises(FspoError) as info:
        load_dataset(d)
    lines = str(info.value).splitlines()
    u, p = d / "users.jsonl", d / "prefs.jsonl"
    expected = [
        (f"{u}:2: malformed JSON", None),
        (f"{u}:3: field 'split' must be one of train, val, test", None),
        (f"{u}:4: field 'domain' must be a string, got an integer", None),
        (f"{u}:6: duplicate user_id 'u1' (first on line 1)", None),
        (f"{u}:7: expected a JSON object, got a list", None),
        (f"{p}:2: missing field 'rejected'", None),
        # p3's unknown user 'ghost' is not reported: users.jsonl had errors (see test_users_errors_...)
        (f"{p}:4: invalid UTF-8", None),
        (f"{p}:5: field 'chosen' must be a string, got null", None),
        (f"{p}:6: duplicate pref_id 'p1' (first on line 1)", None),
        (f"{p}:7: field 'question' must be a string, got a boolean", None),
    ]
    assert len(lines) == len(expected), lines
    for line, (prefix, _) in zip(lines, expected):
        assert line.startswith(prefix), (line, prefix)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_dir", "not a dataset directory"),
        ("empty_users", "users.jsonl: empty file"),
        ("blank_prefs", "prefs.jsonl: empty file"),
        ("missing_prefs", "prefs.jsonl: missing"),
        ("bad_format", "manifest.json: format must be 'fspo-prefs/1'"),
        ("manifest_not_json", "manifest.json:1: malformed JSON"),
        ("manifest_bad_utf8", "manifest.json:2: invalid UTF-8"),
        ("counts_mismatch", "manifest.json: counts.prefs is 5 but prefs.jsonl has 1 records"),
        ("traits_not_str", "users.jsonl:1: traits must map strings to strings"),
        ("empty_id", "users.jsonl:1: field 'user_id' must not be empty"),
    ],
)
def test_file_level_errors(tmp_path, case, message):
    d = _write_raw(tmp_path, [_good_user()], [_good_pref()])
    if case == "no_dir":
        d = tmp_path / "nowhere"
    elif case == "empty_users":
        (d / "users.jsonl").write_bytes(b"")
    elif case == "blank_prefs":
        (d / "prefs.jsonl").write_bytes(b"\n  \n\n")
    elif case == "missing_prefs":
        (d / "prefs.jsonl").unlink()
    elif case == "bad_format":
        (d / "manifest.json").write_text('{"format": "other/2"}')
    elif case == "manifest_not_json":
        (d / "manifest.json").write_text("format: yaml")
    elif case == "manifest_bad_utf8":
        (d / "manifest.json").write_bytes(b'{"format": "fspo-prefs/1",\n "x": "\xff"}')
    elif case == "counts_mismatch":
        (d / "manifest.json").write_text(
            json.dumps({"format": "fspo-prefs/1", "counts": {"users": 1, "prefs": 5}})
        )
    elif case == "traits_not_str":
        write_jsonl(
            d / "users.jsonl",
            [{"user_id": "u1", "domain": "d", "split": "train", "description": "", "traits": {"age": 3}}],
        )
    elif case == "empty_id":
        (d / "users.jsonl").write_bytes(_good_user("") + b"\n")
    with pytest.raises(FspoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(d)


def test_error_report_is_capped(tmp_path):
    d = _write_raw(tmp_path, [_good_user()], [b"{bad"] * 45)
    with pytest.raises(FspoError) as info:
        load_dataset(d)
    lines = str(info.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 25 more error(s) (45 in all)"


def _error_lines(d) -> list[str]:
    with pytest.raises(FspoError) as info:
        load_dataset(d)
    return str(info.value).splitlines()


@pytest.mark.parametrize("case", ["malformed", "user_id_int", "empty", "duplicate", "missing"])
def test_users_errors_do_not_cascade_into_prefs(tmp_path, case):
    """A bad users.jsonl is reported once; the prefs of the users it lost are not each "unknown user_id"
    (that flood buried the real error), while other errors in prefs.jsonl are still reported."""
    users = [_good_user(f"u{i}") for i in range(4)]
    prefs = [_good_pref(f"p{i}-{k}", uid=f"u{i}") for i in range(4) for k in range(6)]
    prefs.append(_good_pref("bad", uid="u0", chosen=7))  # a real prefs error, line 25
    d = _write_raw(tmp_path, users, prefs)
    u = d / "users.jsonl"
    if case == "malformed":
        lines = u.read_bytes().splitlines()
        lines[2] = b'{"user_id": "u2", '
        u.write_bytes(b"\n".join(lines) + b"\n")
        first = f"{u}:3: malformed JSON"
    elif case == "user_id_int":
        write_jsonl(u, [{**json.loads(_good_user("u0")), "user_id": 5}])
        first = f"{u}:1: field 'user_id' must be a string"
    elif case == "empty":
        u.write_bytes(b"")
        first = f"{u}: empty file"
    elif case == "duplicate":
        u.write_bytes(_good_user("u0") + b"\n" + _good_user("u0") + b"\n")
        first = f"{u}:2: duplicate user_id 'u0'"
    else:
        u.unlink()
        first = f"{u}: missing"
    lines = _error_lines(d)
    assert len(lines) == 2 and lines[0].startswith(first), lines
    assert lines[1].startswith(f"{d / 'prefs.jsonl'}:25: field 'chosen' must be a string"), lines
    assert not any("unknown user_id" in line for line in lines)


def test_unknown_user_is_reported_when_users_jsonl_is_clean(tmp_path):
    d = _write_raw(tmp_path, [_good_user("u1")], [_good_pref("p1"), _good_pref("p2", uid="ghost")])
    assert _error_lines(d) == [f"{d / 'prefs.jsonl'}:2: unknown user_id 'ghost' (not in users.jsonl)"]


def test_lone_surrogates_are_reported_not_passed_to_the_tokenizer(tmp_path):
    """JSON escapes of lone surrogates are valid JSON but not valid Unicode (they crashed the tokenizer)."""
    users = [
        _good_user("u1", description="emoji \U0001f642 is fine"),  # ensure_ascii: a valid surrogate *pair*
        _good_user("u2").replace(b'"description": "x"', b'"description": "x \\udc00"'),
        _good_user("u3", traits={"tone": "y"}).replace(b'"y"', b'"\\ud83d y"'),  # high half, no low half
        _good_user("u4", traits={"k": "v"}).replace(b'"k"', b'"\\udfff"'),  # in a traits key
    ]
    prefs = [
        _good_pref("p1"),
        _good_pref("p2", uid="u1").replace(b'"chosen": "a"', b'"chosen": "\\ud800 a"'),
        _good_pref("p3\U0001f642", uid="u1"),
        _good_pref("p4", uid="u1").replace(b'"question": "q"', b'"question": "q\\uDBFF"'),
    ]
    d = _write_raw(tmp_path, users, prefs)
    u, p = d / "users.jsonl", d / "prefs.jsonl"
    assert _error_lines(d) == [
        f"{u}:2: field 'description' is not valid Unicode (lone surrogate)",
        f"{u}:3: field 'traits' is not valid Unicode (lone surrogate)",
        f"{u}:4: field 'traits' is not valid Unicode (lone surrogate)",
        f"{p}:2: field 'chosen' is not valid Unicode (lone surrogate)",
        f"{p}:4: field 'question' is not valid Unicode (lone surrogate)",
    ]
    # The same records without the lone halves load, emoji included.
    (tmp_path / "ok").mkdir()
    d2 = _write_raw(tmp_path / "ok", [users[0]], [_good_pref("p1"), prefs[2]])
    assert load_dataset(d2).prefs["u1"][1].pref_id == "p3\U0001f642"
    (d2 / "manifest.json").write_text('{"format": "fspo-prefs/1", "domains": ["\\ud800"]}')
    assert _error_lines(d2) == [
        f"{d2 / 'manifest.json'}: field 'domains' is not valid Unicode (lone surrogate)"
    ]


def test_utf8_bom_at_the_start_of_a_file_is_accepted(tmp_path):
    users, prefs = synthetic_records(n_users=3, prefs_per_user=4, seed=1, test_users=1)
    plain = load_dataset(write_dataset(tmp_path / "plain", users, prefs))
    d = write_dataset(tmp_path / "bom", users, prefs)
    for name in ("manifest.json", "users.jsonl", "prefs.jsonl"):
        (d / name).write_bytes(b"\xef\xbb\xbf" + (d / name).read_bytes())
    loaded = load_dataset(d)
    assert loaded.users == plain.users and loaded.prefs == plain.prefs and loaded.manifest == plain.manifest
    # Line numbers still count from the real first line; a BOM anywhere but the start is still an error.
    lines = (d / "prefs.jsonl").read_bytes().split(b"\n")
    lines[2] = b"\xef\xbb\xbf" + lines[2]
    lines[4] = b"{oops"
    (d / "prefs.jsonl").write_bytes(b"\n".join(lines))
    errs = _error_lines(d)
    assert len(errs) == 2, errs
    assert errs[0].startswith(f"{d / 'prefs.jsonl'}:3: malformed JSON (Unexpected UTF-8 BOM")
    assert errs[1].startswith(f"{d / 'prefs.jsonl'}:5: malformed JSON")


def test_unfinished_gen_data_directory_is_named_as_such(tmp_path):
    d = _write_raw(tmp_path, [_good_user()], [_good_pref()])
    (d / "manifest.json").unlink()
    assert _error_lines(d) == [
        f"{d / 'manifest.json'}: missing (a dataset directory has manifest.json, users.jsonl and prefs.jsonl)"
    ]
    (d / ".gen-state").mkdir()
    assert _error_lines(d) == [
        f"{d / 'manifest.json'}: missing (gen-data has not finished here: re-run the same gen-data command)"
    ]


def test_a_dataset_swapped_in_while_being_read_is_refused(tmp_path, monkeypatch):
    """gen-data --overwrite renames new files over old ones; a reader that overlapped the swap may have read
    old users and new prefs. It sees the manifest replaced, and says so instead of returning the mix."""
    from fspo_engine.engine import dataset as reader

    users, prefs = synthetic_records(n_users=3, prefs_per_user=4, seed=2, test_users=1)
    d = write_dataset(tmp_path / "d", users, prefs)
    real = reader._read_jsonl

    def read_during_swap(path, errors):
        if path.name == "prefs.jsonl":  # users.jsonl is read: now the writer swaps the new dataset in
            new = d / ".manifest.json.new"
            new.write_bytes((d / "manifest.json").read_bytes())
            os.replace(new, d / "manifest.json")
        return real(path, errors)

    monkeypatch.setattr(reader, "_read_jsonl", read_during_swap)
    assert _error_lines(d) == [f"{d}: was replaced while being read (by gen-data?); run again"]
    monkeypatch.undo()
    assert load_dataset(d).num_prefs == 12


def test_prefs_jsonl_may_carry_a_rejected_description(tmp_path):
    users, prefs = synthetic_records(n_users=2, prefs_per_user=[2, 2], seed=0, test_users=0)
    prefs[1]["rejected_description"] = "A gloomy user."
    prefs[2]["rejected_description"] = None  # null: none
    ds = load_dataset(write_dataset(tmp_path / "ok", users, prefs))
    got = [p.rejected_description for u in ds.users for p in ds.prefs[u]]
    assert got == [None, "A gloomy user.", None, None]
    prefs[3]["rejected_description"] = 7
    with pytest.raises(FspoError, match=r"prefs.jsonl:4: field 'rejected_description' must be a string"):
        load_dataset(write_dataset(tmp_path / "bad", users, prefs))
