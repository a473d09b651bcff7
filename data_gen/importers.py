"""Importers for the released FSPO datasets (JSONL or Parquet) into the fspo-prefs/1 directory.

The files are read as the released loader (`preference_datasets.py`) reads them; the user downloads them
(fspo-engine never downloads). Official schemas:
- roleplay: `x` (question), `yw` (preferred), `yl` (dispreferred), `level`, `score_persona` (the persona
  the labels were scored with: a string, or an object with a `description` string). The released loader
  groups records by `level`: one level is one user, described by its `score_persona` (the first one; a
  record whose own persona differs keeps it as `score_persona` in prefs.jsonl).
- review, elix: `prompt`, `response_x`, `response_y`, `label` (0 = response_x preferred, 1 =
  response_y), `level_x`, `level_y` (the level each response was written for), `scorer_level` (the
  level of the user who scored the pair: that is the user). Descriptions are the released strings: elix
  "The user is {level}.", review "This user prefers {...} reviews." for its eight levels (others: the elix
  form); each preference's `rejected_description` is "The user is {rejected level}.", the released
  `persona_rejected` (data.rejected_description = rejected_persona renders it on the rejected branch).

Users are written in the released loader's `groupby` order (sorted levels: numbers first, then strings),
each user's preferences in file order: `official_windows` in engine/episodes.py then draws the released
loader's episodes from them.

Every record is checked; the import stops before writing anything if any record is malformed and
reports each as `path:line: reason` (Parquet: `path:row N: reason`).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.outdir import foreign_files, json_text, locked_dir, remove_stale_temps, write_staged
from fspo_engine.data_gen.pipeline import GenResult
from fspo_engine.data_gen.stats import dataset_stats

KINDS = {"roleplay": "roleplay", "review": "reviews", "elix": "elix"}  # import kind -> domain name
FIELDS = {
    "roleplay": {"x": str, "yw": str, "yl": str, "level": (str, int), "score_persona": (str, dict)},
    "review": {
        "prompt": str,
        "response_x": str,
        "response_y": str,
        "label": (int, str),
        "level_x": (str, int),
        "level_y": (str, int),
        "scorer_level": (str, int),
    },
}
FIELDS["elix"] = FIELDS["review"]
MAX_REPORTED = 20
# The released `get_review`'s user descriptions (`mapped_level`), by scorer_level.
REVIEW_DESCRIPTIONS = {
    "negative": "This user prefers negative reviews.",
    "positive": "This user prefers positive reviews.",
    "concise": "This user prefers concise reviews.",
    "verbose": "This user prefers verbose reviews.",
    "positive+concise": "This user prefers positive and concise reviews.",
    "negative+concise": "This user prefers negative and concise reviews.",
    "positive+verbose": "This user prefers positive and verbose reviews.",
    "negative+verbose": "This user prefers negative and verbose reviews.",
}


def _persona_text(score_persona) -> str | None:
    """A roleplay record's persona description: the string, or the object's `description` string."""
    if isinstance(score_persona, str):
        return score_persona
    text = score_persona.get("description")
    return text if isinstance(text, str) else None


def _level_description(kind: str, level) -> str:
    """The released loader's user description for a scorer level (`persona_scorer`)."""
    if kind == "review" and str(level) in REVIEW_DESCRIPTIONS:
        return REVIEW_DESCRIPTIONS[str(level)]
    return f"The user is {level}."


def _level_order(level) -> tuple:
    """pandas' groupby order of a level column: numbers sorted, then strings sorted."""
    return (1, level, 0) if isinstance(level, str) else (0, "", level)


class _Unreadable:
    """A record that could not even be parsed; `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason


def _records(path: Path):
    """(location, record) for every record; JSONL unless the suffix says Parquet."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataGenError(
                f"{path}: reading Parquet needs pyarrow: pip install 'fspo-engine[parquet]'"
            ) from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise DataGenError(f"{path}: cannot read Parquet ({exc})") from None
        for i, row in enumerate(rows):
            yield f"{path}:row {i}", row
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # utf-8-sig exports (pandas, Excel): a BOM starts the file
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield where, _Unreadable("not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                rec = _Unreadable(f"invalid JSON ({exc.msg})")
            except ValueError as exc:  # e.g. an integer literal beyond Python's 4300-digit limit
                rec = _Unreadable(f"unreadable JSON ({' '.join(str(exc).split())[:200]})")
            except RecursionError:
                rec = _Unreadable("JSON nested too deeply")
            yield where, rec


def _check(kind: str, rec) -> str | None:
    """The reason `rec` is malformed, or None."""
    if isinstance(rec, _Unreadable):
        return rec.reason
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    for name, types in FIELDS[kind].items():
        if name not in rec or rec[name] is None:
            return f"missing field {name!r}"
        if not isinstance(rec[name], types) or isinstance(rec[name], bool):
            return f"field {name!r} has type {type(rec[name]).__name__}"
        if isinstance(rec[name], str) and not _is_unicode(rec[name]):
            # JSON's "\\ud800" escape: valid JSON, but no UTF-8 writer (ours included) can write it.
            return f"field {name!r} is not valid Unicode (lone surrogate)"
        if "level" in name and isinstance(rec[name], str) and not rec[name].strip():
            # A blank level names no user: it would become "The user's level is ." for all such records.
            return f"empty {name}"
    if kind == "roleplay":
        if not rec["x"].strip() or not rec["yw"].strip() or not rec["yl"].strip():
            return "empty question or response"
        persona = _persona_text(rec["score_persona"])
        if persona is None:
            return "field 'score_persona' is an object without a 'description' string"
        if not _is_unicode(persona):
            return "field 'score_persona' is not valid Unicode (lone surrogate)"
        if not persona.strip():
            return "empty score_persona"
    else:
        if str(rec["label"]) not in ("0", "1"):
            return f"label must be 0 or 1, not {rec['label']!r}"
        if not rec["prompt"].strip() or not rec["response_x"].strip() or not rec["response_y"].strip():
            return "empty prompt or response"
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split_of(path: Path, split: str) -> str | None:
    if split in ("train", "test"):
        return split
    # Whole words of the file name only: "roleplay_latest_train" is a train file, though "latest"
    # contains "test".
    words = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
    if "test" in words or "eval" in words:
        return "test"
    if "train" in words:
        return "train"
    return None  # decided per user by a hash


def _hash_split(key: str, seed: int, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little")
    return "test" if h / 2**64 < test_fraction else "train"


def import_dataset(kind: str, files: list[str | os.PathLike], out_dir: str | os.PathLike, **options) -> dict:
    """Convert official FSPO files of `kind` (roleplay | review | elix) into `out_dir`; returns the manifest.

    Options are `run_import`'s: `split` "train" or "test" for every user, or "auto" (a file whose name says
    train/test (or eval) gives its users that split, other files split users by a seeded hash of the user),
    `test_fraction`, `seed`, `overwrite`. Re-running an import identical to the dataset already in `out_dir`
    writes nothing and succeeds.
    """
    return run_import(kind, files, out_dir, **options).manifest


def run_import(
    kind: str,
    files: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    split: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> GenResult:
    """Import the files (see `import_dataset`) -> a GenResult whose `prefs_written` is 0 when there was nothing to
    do (what the CLI prints)."""
    if kind not in KINDS:
        raise DataGenError(f"--import must be one of {', '.join(KINDS)}, not {kind!r}")
    if split not in ("auto", "train", "test"):
        raise DataGenError(f"--import-split must be auto, train or test, not {split!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataGenError(f"--test-fraction must be in [0, 1), not {test_fraction}")
    if not files:
        raise DataGenError("--import needs at least one --from FILE")
    domain = KINDS[kind]
    users: dict[tuple, dict] = {}
    prefs: list[dict] = []
    errors: list[str] = []
    for file in map(Path, files):
        if not file.is_file():
            raise DataGenError(f"{file}: no such file")
        file_split = _split_of(file, split)
        n_before = len(prefs) + len(errors)
        for where, rec in _records(file):
            reason = _check(kind, rec)
            if reason is not None:
                errors.append(f"{where}: {reason}")
                continue
            if kind == "roleplay":
                level = rec["level"]
                description = _persona_text(rec["score_persona"]).strip()
                question, chosen, rejected = rec["x"], rec["yw"], rec["yl"]
                extra = {}
            else:
                level = rec["scorer_level"]
                description = _level_description(kind, level)
                x_wins = str(rec["label"]) == "0"
                question = rec["prompt"]
                chosen, rejected = (
                    (rec["response_x"], rec["response_y"])
                    if x_wins
                    else (rec["response_y"], rec["response_x"])
                )
                levels = (str(rec["level_x"]), str(rec["level_y"]))
                extra = {
                    "chosen_level": levels[0 if x_wins else 1],
                    "rejected_level": levels[1 if x_wins else 0],
                    # The released `persona_rejected` ("The user is {level}." for review too).
                    "rejected_description": f"The user is {levels[1 if x_wins else 0]}.",
                }
            key = str(level)  # one level is one user, as the released loader's groupby makes it
            traits = {"level": key}
            user_split = file_split or _hash_split(key, seed, test_fraction)
            # A user seen in both a train and a test file becomes two users: test users stay unseen.
            ukey = (key, user_split)
            if ukey not in users:
                digest = hashlib.sha1(f"{kind}/{key}".encode()).hexdigest()[:10]
                suffix = "-test" if file_split == "test" and split == "auto" else ""
                users[ukey] = {
                    "user_id": f"{kind}-{digest}{suffix}",
                    "domain": domain,
                    "split": user_split,
                    "description": description,
                    "traits": traits,
                    "_n": 0,
                    "_order": _level_order(level),
                }
            user = users[ukey]
            if kind == "roleplay" and description != user["description"]:
                extra = {"score_persona": description}  # this record's own persona, where it is not the user's
            prefs.append(
                {
                    "pref_id": f"{user['user_id']}-{user['_n']:05d}",
                    "user_id": user["user_id"],
                    "question": question,
                    "chosen": chosen,
                    "rejected": rejected,
                    "domain": domain,
                    "source": f"{file.name}:{where.rsplit(':', 1)[-1]}",
                    **extra,
                }
            )
            user["_n"] += 1
        if len(prefs) + len(errors) == n_before:
            errors.append(f"{file}: no records")
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DataGenError("\n".join(errors[:MAX_REPORTED]) + more)
    ids = [u["user_id"] for u in users.values()]
    if len(set(ids)) != len(ids):
        raise DataGenError(f"{kind}: a user appears in two splits of one file set; pass --import-split")
    # The released loader's order: its groupby sorts the levels (a stable sort keeps split order within one).
    ordered = sorted(users.values(), key=lambda u: u["_order"])
    user_records = [{k: v for k, v in u.items() if not k.startswith("_")} for u in ordered]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataGenError(f"{out}: exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with locked_dir(out):  # one writer per directory, as for gen-data
            manifest, wrote = _write(out, kind, files, user_records, prefs, seed, overwrite)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
        raise
    return GenResult(out, manifest, 0.0, len(prefs) if wrote else 0, imported=True)


def _lines(records: list[dict]):
    return (json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)


def _same_bytes(path: Path, chunks) -> bool:
    """Whether the file `path` holds exactly the concatenated `chunks` (compared by SHA-256, streaming)."""
    want, have = hashlib.sha256(), hashlib.sha256()
    for chunk in chunks:
        want.update(chunk.encode("utf-8"))
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                have.update(block)
    except OSError:
        return False
    return want.digest() == have.digest()


def _write(out: Path, kind, files, users, prefs, seed, overwrite) -> tuple[dict, bool]:
    """Write the three files (the caller holds the directory lock); returns (manifest, whether written)."""
    n_test = sum(u["split"] == "test" for u in users)
    manifest = {
        "format": "fspo-prefs/1",
        "domains": [KINDS[kind]],
        "seed": seed,
        "generator": {
            "name": "fspo-engine gen-data",
            "version": 1,
            "import": kind,
            "sources": [Path(f).name for f in files],
        },
        "counts": {
            "users": len(users),
            "prefs": len(prefs),
            "train_users": len(users) - n_test,
            "test_users": n_test,
        },
        "stats": dataset_stats(users, prefs),
    }
    if not overwrite:
        if (out / "manifest.json").exists():
            # The same import again (e.g. re-run after a kill that landed just after completion) is a
            # no-op, like an identical gen-data re-run; anything else needs an explicit --overwrite.
            if all(
                _same_bytes(out / name, chunks)
                for name, chunks in (
                    ("manifest.json", [json_text(manifest)]),
                    ("users.jsonl", _lines(users)),
                    ("prefs.jsonl", _lines(prefs)),
                )
            ):
                return manifest, False
            raise DataGenError(f"{out}: already holds a dataset; pass --overwrite")
        if foreign := foreign_files(out):
            raise DataGenError(
                f"{out}: holds {' and '.join(foreign)} without a gen-data manifest; pass --overwrite to replace"
            )
    # Write all three files beside their targets first, so an old dataset (--overwrite) stays whole while
    # the slow part runs. Then swap: the old manifest goes first and the new one comes last, so during
    # the three renames readers see no manifest and refuse the directory instead of mixing old and new.
    remove_stale_temps(out, ["users.jsonl", "prefs.jsonl", "manifest.json"])  # left by a killed import
    staged: list[tuple[Path, Path]] = []
    try:
        for name, records in (("users.jsonl", users), ("prefs.jsonl", prefs)):
            staged.append((write_staged(out / name, _lines(records)), out / name))
        staged.append((write_staged(out / "manifest.json", [json_text(manifest)]), out / "manifest.json"))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    (out / "manifest.json").unlink(missing_ok=True)
    for tmp, target in staged:
        os.replace(tmp, target)
    return manifest, True
