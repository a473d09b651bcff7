"""The output directory of gen-data and import: one writer at a time, files replaced whole or not at all, and
gen-data's resumable state.

    OUT/manifest.json, users.jsonl, prefs.jsonl   the dataset (DESIGN.md); a manifest means it is complete
    OUT/gen_stats.json                            the last LLM run's bookkeeping (requests, tokens): not data
    OUT/questions.jsonl                           the question pool an LLM or a file made (LLM runs)
    OUT/gen_stats.json                            the LLM client's statistics per invocation: not data
    OUT/.gen-state/users.jsonl, prefs.jsonl       the units done so far, appended in order
    OUT/.gen-state/personas.jsonl                 each done LLM unit's accepted persona (resume replays it)
    OUT/.gen-state/questions.jsonl                the question pool, written once before the first unit
    OUT/.gen-state/state.json                     units done, the files' byte lengths, counters, statistics
    OUT/.llm-cache/replies.sqlite                 LLM replies (data_gen/cache.py)

At every commit the files are fsynced and state.json is replaced atomically; a killed run re-run with the
same arguments truncates the files to the recorded lengths (dropping what was appended after the last
commit) and goes on, so nothing is duplicated or lost. `finalize` moves the files into place and writes the
manifest last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs on one --out must then not overlap
    fcntl = None
from fspo_engine.data_gen.atomic import json_text, remove_stale_temps, write_json_atomic, write_staged  # noqa: F401
from fspo_engine.data_gen.errors import DataGenError

STATE_DIR = ".gen-state"
GEN_STATS = "gen_stats.json"  # sidecar: run bookkeeping of the last LLM run, not part of the dataset


def dumps(record: dict) -> str:
    """One JSON Lines record, as the dataset files hold them (sorted keys, UTF-8 as is)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


@contextlib.contextmanager
def locked_dir(out: Path):
    """Hold an exclusive lock on the directory `out` (flock on the directory's own fd) for a whole run.

    A second gen-data or import on the same --out then fails at once instead of interleaving its writes
    with ours. Locking the directory rather than a lock file leaves nothing behind, and the kernel drops
    the lock when the process dies (kill -9 included), so a stale lock cannot block a resume."""
    if fcntl is None:
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataGenError(f"{out}: another gen-data run is writing this directory") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def foreign_files(out: Path) -> list[str]:
    """Dataset file names in `out` that no manifest of ours vouches for (the user's own files)."""
    if (out / "manifest.json").exists() or (out / STATE_DIR).exists():
        return []
    return [name for name in ("users.jsonl", "prefs.jsonl") if (out / name).exists()]


# --- gen-data's run state ----------------------------------------------------------------------------------
def finished_dataset(out: Path, generator: dict, overwrite: bool) -> dict | None:
    """The manifest of the dataset `out` already holds, when it was made with these arguments (`generator`):
    nothing is left to do. None when there is: after checking that `out` holds nothing it would replace
    without --overwrite (another dataset, the user's own files), and, with --overwrite, discarding an
    unfinished run."""
    state_dir = out / STATE_DIR
    manifest_path = out / "manifest.json"
    if overwrite:
        # Only an unfinished run is discarded now. The old dataset stays whole (and usable by train/score)
        # until finalize swaps the new files in: a kill before then leaves it exactly as it was.
        shutil.rmtree(state_dir, ignore_errors=True)
    elif manifest_path.exists() and not state_dir.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise DataGenError(f"{manifest_path}: unreadable manifest ({exc}); pass --overwrite") from None
        if manifest.get("generator") != generator:
            raise DataGenError(f"{out}: already holds a dataset made with other arguments; pass --overwrite")
        return manifest
    elif foreign := foreign_files(out):
        raise DataGenError(
            f"{out}: holds {' and '.join(foreign)} without a gen-data manifest; pass --overwrite to replace"
        )
    return None


def read_state(out: Path, generator: dict) -> dict | None:
    """The state of an unfinished run of the same arguments in `out`, or None when there is none."""
    state_dir = out / STATE_DIR
    if not (state_dir / "state.json").exists():
        return None
    try:
        state = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataGenError(f"{state_dir / 'state.json'}: unreadable ({exc}); pass --overwrite") from None
    if state.get("generator") != generator:
        raise DataGenError(f"{out}: holds an unfinished run with other arguments; pass --overwrite")
    return state


STATE_FILES = ("users.jsonl", "prefs.jsonl", "personas.jsonl")  # appended unit by unit, in unit order


def new_state(out: Path, generator: dict) -> dict:
    state_dir = out / STATE_DIR
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir()
    state = {
        "generator": generator,
        "phase": "generating",
        "done": 0,
        "bytes": {name: 0 for name in STATE_FILES},
        "counters": {},
        "invocations": [],  # the LLM client's statistics, one entry per gen-data invocation (gen_stats.json)
        "first_error": None,
    }
    write_json_atomic(state_dir / "state.json", state)
    return state


class StateFiles:
    """The units done, in .gen-state/: `append` a unit's records to users.jsonl, prefs.jsonl and personas.jsonl
    (the persona each LLM unit accepted, dropped users included: a resume replays them into the duplicate
    check); `commit` makes the appended prefix a resume point (the files fsynced, then state.json replaced
    with the units done and the files' byte lengths). Opening drops whatever a killed run appended after its
    last commit."""

    def __init__(self, out: Path, state: dict):
        self.dir, self.state = out / STATE_DIR, state
        self._files = contextlib.ExitStack()
        self.handles: dict[str, object] = {}

    def __enter__(self):
        sizes = self.state.setdefault("bytes", {})
        for name in STATE_FILES:
            path = self.dir / name
            with open(path, "ab") as f:
                f.truncate(sizes.get(name, 0))
            self.handles[name] = self._files.enter_context(open(path, "ab"))
        return self

    def __exit__(self, *exc):
        self._files.close()
        return False

    def append(self, record: dict | None, prefs: list[dict], persona: dict | None = None):
        if record is not None:
            self.handles["users.jsonl"].write((dumps(record) + "\n").encode())
        self.handles["prefs.jsonl"].write("".join(dumps(p) + "\n" for p in prefs).encode())
        if persona is not None:
            self.handles["personas.jsonl"].write((dumps(persona) + "\n").encode())

    def commit(self, done: int, **updates):
        for f in self.handles.values():
            f.flush()
            os.fsync(f.fileno())
        self.state.update(done=done, bytes={name: f.tell() for name, f in self.handles.items()}, **updates)
        write_json_atomic(self.dir / "state.json", self.state)


def read_committed(state_dir: Path, name: str):
    """The records of a state file, one by one (streamed: it may hold millions)."""
    path = state_dir / name
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def finalize(out: Path, state: dict) -> dict:
    """Move the files into place and write the manifest last; safe to repeat after a kill.

    Three files cannot be replaced at once. So that no reader ever pairs new users with old prefs (or an
    old manifest with new files), the old manifest is removed first: readers refuse a directory without
    one (and a reader that was already reading sees its manifest replaced, and refuses too). Everything
    slow (writing, fsync) happens before that, leaving a window of three renames in which the directory
    has no manifest; a kill inside it leaves the state at "finalizing", and re-running the same gen-data
    command completes the swap."""
    state_dir = out / STATE_DIR
    remove_stale_temps(out, ["manifest.json", GEN_STATS])
    # Run bookkeeping (requests, cache hits, retries, tokens) differs between runs that make the same
    # data, so it lives beside the manifest, never in it; a template run leaves none (and no stale one).
    if state.get("gen_stats"):
        write_json_atomic(out / GEN_STATS, state["gen_stats"])
    else:
        (out / GEN_STATS).unlink(missing_ok=True)
    staged = write_staged(out / "manifest.json", [json_text(state["manifest"])])
    (out / "manifest.json").unlink(missing_ok=True)
    for name in ("users.jsonl", "prefs.jsonl", "questions.jsonl"):
        if (state_dir / name).exists():
            os.replace(state_dir / name, out / name)
        elif name == "questions.jsonl":
            (out / name).unlink(missing_ok=True)  # an overwritten LLM dataset's pool is not this dataset's
    os.replace(staged, out / "manifest.json")
    shutil.rmtree(state_dir, ignore_errors=True)
    return state["manifest"]
