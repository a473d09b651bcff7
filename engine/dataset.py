"""The preference dataset directory (DESIGN.md "Preference dataset directory"): read and validated whole.

    dataset = load_dataset(dir)   # manifest.json, users.jsonl, prefs.jsonl -> Dataset, or one FspoError

Every malformed record is reported as `path:line: reason`, all of them (up to 20) in one error, before
anything downstream sees the data: a half-valid dataset never reaches sampling, the tokenizer or training.
engine/episodes.py samples and renders episodes from the `Dataset` this returns.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fspo_engine.engine.errors import FspoError

DATASET_FORMAT = "fspo-prefs/1"
SPLITS = ("train", "val", "test")
MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True)
class Preference:
    pref_id: str
    user_id: str
    question: str
    chosen: str
    rejected: str
    # prefs.jsonl's optional `rejected_description`: the description of the persona the rejected response
    # was written for (the released code's `persona_rejected`); data.rejected_description = rejected_persona
    rejected_description: str | None = None


@dataclass(frozen=True)
class User:
    user_id: str
    domain: str
    split: str  # "train" | "test"
    description: str  # the oracle user description (target of the user-description option)
    traits: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Dataset:
    root: Path
    manifest: dict
    users: dict[str, User]  # user_id -> User, in users.jsonl order
    prefs: dict[str, list[Preference]]  # user_id -> that user's preferences, in prefs.jsonl order

    def users_in(self, split: str | None) -> list[User]:
        """Users of one split ("train", "val", "test"), or all users for None."""
        if split is not None and split not in SPLITS:
            raise FspoError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return [u for u in self.users.values() if split is None or u.split == split]

    @property
    def num_prefs(self) -> int:
        return sum(len(p) for p in self.prefs.values())


class _Errors:
    """Collects `path:line: reason` lines so that one run reports every bad record, not just the first."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, where: str, reason: str):
        self.lines.append(f"{where}: {reason}")

    def raise_if_any(self):
        if not self.lines:
            return
        shown = self.lines[:MAX_REPORTED_ERRORS]
        more = len(self.lines) - len(shown)
        if more:
            shown.append(f"... and {more} more error(s) ({len(self.lines)} in all)")
        raise FspoError("\n".join(shown))


def _type_name(value) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes without a leading UTF-8 BOM (utf-8-sig semantics: Windows editors and pandas'
    `encoding="utf-8-sig"` exports write one). The BOM sits inside line 1, so line numbers are unchanged;
    a BOM anywhere else is still malformed JSON."""
    raw = path.read_bytes()
    return raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw


def _is_unicode(value) -> bool:
    """False if a string inside `value` (str, or list/dict of them, keys included) holds a lone surrogate.
    JSON's "\\ud800" escape is valid JSON but not valid Unicode: it would pass the reader and then crash
    the tokenizer (or any UTF-8 writer) with a traceback, far from the record that caused it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_is_unicode(k) and _is_unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_unicode(v) for v in value)
    return True


_NOT_UNICODE = "is not valid Unicode (lone surrogate)"


def _read_jsonl(path: Path, errors: _Errors) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for every non-blank line of a JSON Lines file; problems go to `errors`
    (a generator, so the caller's checks of each record land in `errors` in line order)."""
    if not path.is_file():
        errors.add(str(path), "missing (a dataset directory has manifest.json, users.jsonl and prefs.jsonl)")
        return
    n_records = n_errors = 0
    raw = _read_bytes(path)
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.add(where, f"invalid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})")
            n_errors += 1
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            errors.add(where, f"malformed JSON ({exc.msg} at column {exc.colno})")
            n_errors += 1
            continue
        if not isinstance(obj, dict):
            errors.add(where, f"expected a JSON object, got {_type_name(obj)}")
            n_errors += 1
            continue
        n_records += 1
        yield lineno, obj
    if not n_records and not n_errors:
        errors.add(str(path), "empty file (expected one JSON object per line)")


def _check_fields(obj: dict, spec: dict[str, type], where: str, errors: _Errors) -> bool:
    ok = True
    for name, kind in spec.items():
        if name not in obj:
            errors.add(where, f"missing field {name!r}")
            ok = False
        elif not isinstance(obj[name], kind) or isinstance(obj[name], bool) and kind is not bool:
            errors.add(where, f"field {name!r} must be {_type_name(kind())}, got {_type_name(obj[name])}")
            ok = False
        elif kind is str and name.endswith("_id") and not obj[name]:
            errors.add(where, f"field {name!r} must not be empty")
            ok = False
        elif not _is_unicode(obj[name]):
            errors.add(where, f"field {name!r} {_NOT_UNICODE}")
            ok = False
    return ok


_USER_FIELDS = {"user_id": str, "domain": str, "split": str, "description": str, "traits": dict}
_PREF_FIELDS = {"pref_id": str, "user_id": str, "question": str, "chosen": str, "rejected": str}


def _read_manifest(path: Path, errors: _Errors) -> dict:
    if not path.is_file():
        why = "(a dataset directory has manifest.json, users.jsonl and prefs.jsonl)"
        if (path.parent / ".gen-state").is_dir():
            # gen-data writes the manifest last (and removes an old one just before it swaps files in), so
            # no manifest beside its state directory means a run stopped part-way.
            why = "(gen-data has not finished here: re-run the same gen-data command)"
        errors.add(str(path), f"missing {why}")
        return {}
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        errors.add(f"{path}:{line}", "invalid UTF-8")
        return {}
    if not text.strip():
        errors.add(str(path), "empty file (expected a JSON object)")
        return {}
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        errors.add(f"{path}:{exc.lineno}", f"malformed JSON ({exc.msg} at column {exc.colno})")
        return {}
    if not isinstance(manifest, dict):
        errors.add(str(path), f"expected a JSON object, got {_type_name(manifest)}")
        return {}
    bad = [name for name, value in manifest.items() if not (_is_unicode(name) and _is_unicode(value))]
    if bad:
        errors.add(str(path), f"field {bad[0]!r} {_NOT_UNICODE}")
        return {}  # it would crash whatever copies the manifest into a run directory
    if manifest.get("format") != DATASET_FORMAT:
        errors.add(str(path), f"format must be {DATASET_FORMAT!r}, got {manifest.get('format')!r}")
    for name, kind in (("domains", list), ("seed", int), ("generator", dict), ("counts", dict)):
        if name in manifest and (not isinstance(manifest[name], kind) or isinstance(manifest[name], bool)):
            errors.add(
                str(path), f"field {name!r} must be {_type_name(kind())}, got {_type_name(manifest[name])}"
            )
    return manifest


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read and validate a dataset directory. Every malformed record is reported (`path:line: reason`)
    in one FspoError before anything is returned: nothing downstream ever sees a half-valid dataset."""
    root = Path(path)
    if not root.is_dir():
        raise FspoError(f"{root}: not a dataset directory")
    errors = _Errors()
    manifest_path = root / "manifest.json"
    manifest_id = _file_identity(manifest_path)
    manifest = _read_manifest(manifest_path, errors)

    users: dict[str, User] = {}
    first_line: dict[str, int] = {}
    users_path = root / "users.jsonl"
    errors_before_users = len(errors.lines)
    for lineno, obj in _read_jsonl(users_path, errors):
        where = f"{users_path}:{lineno}"
        if not _check_fields(obj, _USER_FIELDS, where, errors):
            continue
        if obj["split"] not in SPLITS:
            errors.add(where, f"field 'split' must be one of {', '.join(SPLITS)}, got {obj['split']!r}")
            continue
        bad_traits = [k for k, v in obj["traits"].items() if not isinstance(v, str)]
        if bad_traits:
            errors.add(where, f"traits must map strings to strings; {bad_traits[0]!r} is not a string")
            continue
        uid = obj["user_id"]
        if uid in users:
            errors.add(where, f"duplicate user_id {uid!r} (first on line {first_line[uid]})")
            continue
        first_line[uid] = lineno
        users[uid] = User(uid, obj["domain"], obj["split"], obj["description"], dict(obj["traits"]))

    # Any bad or missing users.jsonl makes `users` incomplete: checking prefs against it would bury the one
    # real error under an "unknown user_id" line per preference of every user it lost (or of all users).
    users_complete = len(errors.lines) == errors_before_users
    prefs: dict[str, list[Preference]] = {uid: [] for uid in users}
    pref_line: dict[str, int] = {}
    prefs_path = root / "prefs.jsonl"
    for lineno, obj in _read_jsonl(prefs_path, errors):
        where = f"{prefs_path}:{lineno}"
        if not _check_fields(obj, _PREF_FIELDS, where, errors):
            continue
        pid, uid = obj["pref_id"], obj["user_id"]
        if pid in pref_line:
            errors.add(where, f"duplicate pref_id {pid!r} (first on line {pref_line[pid]})")
            continue
        pref_line[pid] = lineno
        if uid not in users:
            if users_complete:
                errors.add(where, f"unknown user_id {uid!r} (not in {users_path.name})")
            continue
        rejected_description = obj.get("rejected_description")
        if rejected_description is not None and not _check_fields(obj, {"rejected_description": str}, where, errors):
            continue
        prefs[uid].append(Preference(pid, uid, obj["question"], obj["chosen"], obj["rejected"], rejected_description))

    # gen-data and the importer swap a dataset in by removing the manifest, renaming the two files and
    # renaming a new manifest (a new inode) into place; if that overlapped this read, the files read may
    # be half old, half new. The one true error is then this, not whatever the mix looks like.
    if manifest_id is not None and _file_identity(manifest_path) != manifest_id:
        raise FspoError(f"{root}: was replaced while being read (by gen-data?); run again")
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    for key, actual, fname in (
        ("users", len(users), "users.jsonl"),
        ("prefs", len(pref_line), "prefs.jsonl"),
    ):
        expected = counts.get(key)
        if isinstance(expected, int) and not errors.lines and expected != actual:
            errors.add(
                str(root / "manifest.json"), f"counts.{key} is {expected} but {fname} has {actual} records"
            )
    errors.raise_if_any()
    return Dataset(root=root, manifest=manifest, users=users, prefs=prefs)
