"""Atomic writes: every file the project writes goes through here (DESIGN.md: "Every file the engine writes is
written atomically (temp file + rename); a kill at any moment leaves the last good checkpoint/dataset usable").

A file is written to a temp file beside its destination (same directory, so the rename cannot cross file
systems), fsynced, then `os.replace`d onto the destination: a reader sees the old file or the new one, never
half of one. Temp names are `.{name}.{random}.tmp`, so a killed writer's leftovers are easy to find
(`stale_temps`).

This module lives in data_gen because data_gen is standalone (it imports nothing from engine or kernels)
while engine, cli and benchmarks may import from data_gen; it needs only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path


def json_text(obj) -> str:
    """The JSON files' text (sorted keys, UTF-8 as is, indented, final newline)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2) + "\n"


def _new_temp(path: Path) -> tuple[Path, int]:
    """A new, empty temp file beside `path` and its fd. The file is created as `open(path, "w")` would create
    it: mode 0o666 less the umask (tempfile.mkstemp makes 0o600 files, which the rename would hand on to a
    dataset other users of the machine then cannot read). O_EXCL + a random name keep it unique."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def write_staged(path: Path, chunks: Iterable[str]) -> Path:
    """Write `chunks` (UTF-8) to a new temp file beside `path`, fsynced; returns the temp file's path, for
    the caller to `os.replace` onto `path` (when several files must be swapped in a chosen order)."""
    tmp, fd = _new_temp(Path(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_text_atomic(path: Path, text: str | Iterable[str]) -> None:
    """Replace `path` with `text` (a string, or chunks of one: a long JSON Lines file need not be joined)."""
    os.replace(write_staged(path, [text] if isinstance(text, str) else text), path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (safetensors blobs, images)."""
    path = Path(path)
    tmp, fd = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """Replace `path` with `obj` as JSON (`json_text`)."""
    write_text_atomic(path, json_text(obj))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """For writers that take a file name (safetensors, torch.save, matplotlib): yields a temp path beside
    `path`; when the block ends without an error the file is fsynced and renamed onto `path`, otherwise it is
    deleted. Writers that pick a format from the file name must be told the format (the temp name ends .tmp)."""
    path = Path(path)
    tmp, fd = _new_temp(path)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A directory built whole or not at all: yields an empty temp directory beside `path`; when the block ends
    without an error its files are fsynced and it is renamed onto `path`, which must not exist (a directory
    cannot be replaced in one rename); otherwise it is deleted."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames into it) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temps(directory: Path, names: Iterable[str]) -> list[Path]:
    """The temp files (and directories) a killed writer left in `directory` for the files `names`."""
    return [p for name in names for p in sorted(Path(directory).glob(f".{name}.*.tmp"))]


def remove_stale_temps(directory: Path, names: Iterable[str]) -> None:
    """Delete the temp files a killed run staged for `names` in `directory` (one writer per directory)."""
    for stale in stale_temps(directory, names):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
