"""The LLM reply cache: one SQLite database, `CACHE_DIR/replies.sqlite`, keyed by a hash of the request.

A million preferences cost ~15M requests; a file per reply (the first design) made 15M files. One
database in WAL mode holds them in a handful of files (`replies.sqlite`, `-wal`, `-shm`).

Writes are batched: `put` and `mark_sent` queue in memory, and `flush` commits the queue in one
transaction (automatically when it holds `flush_rows` entries or is `flush_s` old; the pipeline calls
`flush` before it commits its own state, so every committed preference has its replies on disk). A
process killed with -9 loses at most the uncommitted batch: WAL makes each commit atomic, so the file
is never corrupt, and a lost reply is only asked again. Durability is against a killed process, not
power loss (synchronous=NORMAL: commits do not fsync; the OS still holds them).

The `sent` table logs requests put on the wire that have no cached reply yet: a request whose reply is
cached is never sent again, so its row is deleted when the reply is committed, and the table holds
only what was in flight or failed (it does not grow with the run). A later invocation that sends a
key found there, logged by another invocation, is re-asking it: `mark_sent` says so, and the client
counts it (`reasked`, the price of a kill). Requests both sent and answered inside the last
uncommitted batch before a kill are not seen: the count is a lower bound by one batch (`flush_s`).

Two processes on one database wait for each other's write lock (busy timeout) instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from pathlib import Path

FILENAME = "replies.sqlite"


def request_key(request: dict) -> str:
    """sha256 hex of the canonical JSON of a request (ASCII-escaped, so lone surrogates hash too)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ReplyCache:
    """get/put of (text, prompt_tokens, completion_tokens) by request key; disabled when `root` is None."""

    def __init__(self, root: str | Path | None, *, flush_rows: int = 2000, flush_s: float = 1.0,
                 busy_timeout_s: float = 60.0):
        self.root = Path(root) if root is not None else None
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self._replies: dict[bytes, tuple[str, int, int]] = {}  # queued, not yet committed
        self._sent: dict[bytes, None] = {}  # queued sent marks (ordered set)
        self._last_flush = time.monotonic()
        # Distinguishes this invocation's sent marks from earlier ones' (two processes: two ids).
        self.invocation = random.SystemRandom().getrandbits(62)
        self._db = None
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a batch takes the write lock up
        # front (waiting up to the busy timeout) instead of failing when it upgrades from a read.
        self._db = sqlite3.connect(self.root / FILENAME, timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key BLOB PRIMARY KEY, text TEXT NOT NULL, "
                         "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL) WITHOUT ROWID")
        self._db.execute("CREATE TABLE IF NOT EXISTS sent (key BLOB PRIMARY KEY, invocation INTEGER NOT NULL) "
                         "WITHOUT ROWID")

    @property
    def path(self) -> Path | None:
        return None if self.root is None else self.root / FILENAME

    def get(self, key: str) -> tuple[str, int, int] | None:
        if self._db is None:
            return None
        k = bytes.fromhex(key)
        if k in self._replies:
            return self._replies[k]
        row = self._db.execute("SELECT text, prompt_tokens, completion_tokens FROM replies WHERE key=?",
                               (k,)).fetchone()
        return None if row is None else (row[0], int(row[1]), int(row[2]))

    def put(self, key: str, text: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Queue a reply; text must be valid Unicode (the client never caches anything else)."""
        if self._db is None:
            return
        self._replies[bytes.fromhex(key)] = (text, int(prompt_tokens), int(completion_tokens))
        self._maybe_flush()

    def discard(self, key: str | None) -> None:
        """Forget the reply of `key` (one that failed its caller's checks), queued or committed."""
        if self._db is None or key is None:
            return
        k = bytes.fromhex(key)
        if self._replies.pop(k, None) is None:
            self._db.execute("DELETE FROM replies WHERE key=?", (k,))

    def mark_sent(self, key: str) -> bool:
        """Log that `key` goes on the wire; True when an earlier invocation had sent it and got no reply."""
        if self._db is None:
            return False
        k = bytes.fromhex(key)
        row = self._db.execute("SELECT invocation FROM sent WHERE key=?", (k,)).fetchone()
        self._sent[k] = None
        self._maybe_flush()
        return row is not None and row[0] != self.invocation

    def _maybe_flush(self) -> None:
        if (len(self._replies) + len(self._sent) >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_s):
            self.flush()

    def flush(self) -> None:
        """Commit the queued replies and sent marks in one transaction."""
        self._last_flush = time.monotonic()
        if self._db is None or not (self._replies or self._sent):
            return
        replies, sent = self._replies, self._sent
        self._replies, self._sent = {}, {}
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                                 [(k, *v) for k, v in replies.items()])
            # A key answered in this batch needs no sent row; one answered now but sent in an earlier
            # batch (or invocation) has its row removed: it will never be sent again.
            self._db.executemany("INSERT OR IGNORE INTO sent VALUES (?, ?)",
                                 [(k, self.invocation) for k in sent if k not in replies])
            self._db.executemany("DELETE FROM sent WHERE key=?", [(k,) for k in replies])
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            # Put the batch back (newer entries win) so that a later flush can retry it.
            self._replies = {**replies, **self._replies}
            self._sent = {**sent, **self._sent}
            raise

    def __len__(self) -> int:
        if self._db is None:
            return 0
        committed = self._db.execute("SELECT count(*) FROM replies").fetchone()[0]
        return committed + len(self._replies)

    def pending_sent(self) -> int:
        """Sent rows committed and not yet answered (in flight at the last commit, or failed)."""
        return 0 if self._db is None else self._db.execute("SELECT count(*) FROM sent").fetchone()[0]

    def close(self) -> None:
        if self._db is None:
            return
        try:
            self.flush()
        finally:
            self._db.close()
            self._db = None
