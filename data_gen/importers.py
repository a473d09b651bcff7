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

Every record is checked, and read record by record as the released loader reads it:
- a record it drops is skipped: a null (or NaN) user level, which its `groupby` leaves out;
- a record it trains on is kept, read as it reads it: empty or whitespace-only texts, a float level (2.0 and
  2 are one user, as in one pandas column), a blank level, a label other than 0 or 1 (its `label == 0` test
  makes any other label "response_y preferred"), a null `level_x`/`level_y` (the preference then has no
  `rejected_description`), a roleplay record without a usable `score_persona` (the loader never reads it;
  the user's description is its level's first usable one, else empty);
- a record it cannot read either (a missing, null or non-string question or response; a level of another
  type) or one no UTF-8 file can hold (a lone surrogate) is skipped.
One reading differs on purpose: a label "0" or "1" (a string) is read as the number, where `label == 0` would
make both "response_y preferred" (the released files hold integers).
Skipped and kept-as-released records are counted, with the first few `file:line: reason`, in the manifest
(`skipped`, `kept_as_released`) and in one line for the command to print. With `strict` every one of them is
an error instead. Malformed JSON (bad UTF-8, invalid JSON, a line that is not an object) is an error in either
mode. On any error the import stops before writing anything and reports each as `path:line: reason`
(Parquet: `path:row N: reason`).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.outdir import foreign_files, json_text, locked_dir, remove_stale_temps, write_staged
from fspo_engine.data_gen.pipeline import GenResult
from fspo_engine.data_gen.stats import dataset_stats

KINDS = {"roleplay": "roleplay", "review": "reviews", "elix": "elix"}  # import kind -> domain name
TEXTS = {"roleplay": ("x", "yw", "yl"), "review": ("prompt", "response_x", "response_y")}  # .strip()ped by the loader
USER_LEVEL = {"roleplay": "level", "review": "scorer_level"}  # the column the released loader groups by
TEXTS["elix"], USER_LEVEL["elix"] = TEXTS["review"], USER_LEVEL["review"]
MAX_REPORTED = 20  # errors listed
MAX_EXAMPLES = 5  # skipped / kept-as-released records named in the manifest and the summary line
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
    """A roleplay record's persona description (the string, or the object's `description` string), stripped;
    None when it has none that can describe a user (missing, another type, blank, a lone surrogate)."""
    text = score_persona.get("description") if isinstance(score_persona, dict) else score_persona
    if not isinstance(text, str) or not text.strip() or not _is_unicode(text):
        return None
    return text.strip()


def _level_key(level) -> str:
    """The user a level names: one pandas column holds 2 and 2.0 as one value, so they are one user."""
    if isinstance(level, float) and level.is_integer():
        return str(int(level))
    return str(level)


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


class _Problem(NamedTuple):
    """Why a record is not clean. `action`: "error" (malformed, in any mode), "skip" (not imported: the
    released loader drops it or cannot read it) or "keep" (imported as the released loader reads it).
    `reason` is the error's text; `outcome` what the default mode does instead."""

    action: str
    reason: str
    outcome: str = ""


def _check(kind: str, rec) -> _Problem | None:
    """How `rec` differs from a clean record, the worst way first (error, then skip, then keep); None if clean."""
    if isinstance(rec, _Unreadable):
        return _Problem("error", rec.reason)
    if not isinstance(rec, dict):
        return _Problem("error", f"expected a JSON object, got {type(rec).__name__}")
    unreadable = "skipped: the released loader cannot read it either"
    unwritable = "skipped: no UTF-8 file can hold it"
    level_name = USER_LEVEL[kind]
    level = rec.get(level_name)
    if level is None or isinstance(level, float) and math.isnan(level):  # absent or null: "missing"
        reason = f"missing field {level_name!r}" if level is None else f"field {level_name!r} is NaN"
        return _Problem("skip", reason, "skipped: the released loader's groupby drops the record")
    if isinstance(level, bool) or not isinstance(level, (str, int, float)):
        return _Problem("skip", f"field {level_name!r} has type {type(level).__name__}", unreadable)
    for name in TEXTS[kind]:
        if rec.get(name) is None:
            return _Problem("skip", f"missing field {name!r}", unreadable)
        if not isinstance(rec[name], str):
            return _Problem("skip", f"field {name!r} has type {type(rec[name]).__name__}", unreadable)
    for name, value in rec.items():
        if isinstance(value, str) and name in (*TEXTS[kind], level_name, "level_x", "level_y") \
                and not _is_unicode(value):  # JSON's "\\ud800": valid JSON, but no UTF-8 writer can write it
            return _Problem("skip", f"field {name!r} is not valid Unicode (lone surrogate)", unwritable)
    kept = "kept: the released loader trains on it"
    if kind == "roleplay":
        persona = rec.get("score_persona")
        no_persona = "kept: the released loader never reads score_persona"
        if persona is None:
            return _Problem("keep", "missing field 'score_persona'", no_persona)
        if not isinstance(persona, (str, dict)):
            return _Problem("keep", f"field 'score_persona' has type {type(persona).__name__}", no_persona)
        text = persona.get("description") if isinstance(persona, dict) else persona
        if not isinstance(text, str):
            return _Problem("keep", "field 'score_persona' is an object without a 'description' string", no_persona)
        if not _is_unicode(text):
            return _Problem("keep", "field 'score_persona' is not valid Unicode (lone surrogate)", no_persona)
        if not text.strip():
            return _Problem("keep", "empty score_persona", no_persona)
    else:
        label = rec.get("label")
        if not (label in ("0", "1") or not isinstance(label, (bool, str)) and label in (0, 1)):
            winner = "response_x" if _x_preferred(label) else "response_y"
            return _Problem("keep", f"label must be 0 or 1, not {label!r}",
                            f"kept with {winner} preferred, as the released loader's `label == 0` reads it")
        for name in ("level_x", "level_y"):
            value = rec.get(name)
            if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
                return _Problem("keep", f"missing field {name!r}" if value is None
                                else f"field {name!r} has type {type(value).__name__}",
                                "kept without rejected_description: the released loader trains on it")  # fmt: skip
            if isinstance(value, str) and not value.strip():
                return _Problem("keep", f"empty {name}", kept)
    for name in TEXTS[kind]:
        if not rec[name].strip():
            return _Problem("keep", f"empty {name}", kept)
    if isinstance(level, str) and not level.strip():
        # A blank level still names a user in the released loader (descriptions "The user is .").
        return _Problem("keep", f"empty {level_name}", kept)
    return None


def _x_preferred(label) -> bool:
    """The released loader's reading: response_x is preferred iff `label == 0` (here the string "0" too)."""
    return label == "0" or not isinstance(label, str) and label == 0


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
    `test_fraction`, `seed`, `overwrite`, `strict`. Re-running an import identical to the dataset already in `out_dir`
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
    strict: bool = False,
) -> GenResult:
    """Import the files (see `import_dataset`) -> a GenResult whose `prefs_written` is 0 when there was nothing to
    do (what the CLI prints). `strict`: every record that is not clean is an error (see the module docstring);
    otherwise records are skipped or kept as the released loader reads them, and counted in the manifest."""
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
    skipped: list[str] = []  # "file:line: reason (outcome)", records not imported
    kept: list[str] = []  # records --strict refuses, imported as the released loader reads them
    for file in map(Path, files):
        if not file.is_file():
            raise DataGenError(f"{file}: no such file")
        file_split = _split_of(file, split)
        n_prefs, n_errors, n_skipped = len(prefs), len(errors), len(skipped)
        for where, rec in _records(file):
            problem = _check(kind, rec)
            if problem is not None:
                if problem.action == "error" or strict:
                    errors.append(f"{where}: {problem.reason}")
                    continue
                note = f"{file.name}:{where.rsplit(':', 1)[-1]}: {problem.reason} ({problem.outcome})"
                if problem.action == "skip":
                    skipped.append(note)
                    continue
                kept.append(note)
            if kind == "roleplay":
                level = rec["level"]
                description = _persona_text(rec.get("score_persona"))
                question, chosen, rejected = rec["x"], rec["yw"], rec["yl"]
                extra = {}
            else:
                level = rec["scorer_level"]
                description = _level_description(kind, level)
                x_wins = _x_preferred(rec.get("label"))
                question = rec["prompt"]
                chosen, rejected = (
                    (rec["response_x"], rec["response_y"])
                    if x_wins
                    else (rec["response_y"], rec["response_x"])
                )
                # The level each response was written for (absent where the record has none).
                levels = [str(v) if isinstance(v, (str, int, float)) and not isinstance(v, bool) else None
                          for v in (rec.get("level_x"), rec.get("level_y"))]  # fmt: skip
                chosen_level, rejected_level = levels if x_wins else levels[::-1]
                extra = {}
                if chosen_level is not None:
                    extra["chosen_level"] = chosen_level
                if rejected_level is not None:
                    extra["rejected_level"] = rejected_level
                    # The released `persona_rejected` ("The user is {level}." for review too).
                    extra["rejected_description"] = f"The user is {rejected_level}."
            key = _level_key(level)  # one level is one user, as the released loader's groupby makes it
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
                    "description": description or "",
                    "traits": traits,
                    "_n": 0,
                    "_order": _level_order(level),
                    "_described": description is not None,
                }
            user = users[ukey]
            if kind == "roleplay" and description is not None:
                if not user["_described"]:  # the level's first usable persona describes the user
                    user["description"], user["_described"] = description, True
                elif description != user["description"]:
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
        if len(prefs) == n_prefs and len(errors) == n_errors:
            why = f" to import ({len(skipped) - n_skipped} skipped, e.g. {skipped[n_skipped]})" \
                if len(skipped) > n_skipped else ""  # fmt: skip
            errors.append(f"{file}: no records{why}")
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
            notes = {"skipped": skipped, "kept_as_released": kept}
            manifest, wrote = _write(out, kind, files, user_records, prefs, seed, overwrite, notes)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
        raise
    return GenResult(out, manifest, 0.0, len(prefs) if wrote else 0, imported=True)


def import_notes(manifest: dict) -> str | None:
    """One line on what an import skipped and kept as released (the command prints it), or None when it was
    clean."""
    parts = []
    for key, what in (("skipped", "skipped {n} record{s}"),
                      ("kept_as_released", "kept {n} record{s} --strict refuses, read as the released loader reads "
                                           "them")):  # fmt: skip
        entry = manifest.get(key) or {}
        n = entry.get("count", 0)
        if n:
            more = "; ..." if n > len(entry["examples"]) else ""
            parts.append(what.format(n=n, s="" if n == 1 else "s") + f" ({'; '.join(entry['examples'])}{more})")
    return f"import: {'; '.join(parts)} (manifest.json has the counts; --strict makes them errors)" if parts else None


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


def _write(out: Path, kind, files, users, prefs, seed, overwrite, notes) -> tuple[dict, bool]:
    """Write the three files (the caller holds the directory lock); returns (manifest, whether written).
    `notes`: {"skipped": [...], "kept_as_released": [...]}, each record's "file:line: reason (outcome)"."""
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
        # Records not imported, and records imported as the released loader reads them though --strict refuses
        # them: how many, and the first few (files by name, as in "sources": the manifest names no directory).
        **{key: {"count": len(lines), "examples": lines[:MAX_EXAMPLES]} for key, lines in notes.items()},
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
