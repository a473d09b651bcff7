"""The FSPO paper's human study as a tool: real people give a few preferences, then judge personalised answers
against a baseline's, blind. This module holds the study's state (one SQLite file), what each participant is
shown and may answer, the background generation of answers, and the report. engine/study_server.py serves it.

A participant's path, planned once when they start (all of it stored, so a restart or a closed tab changes
nothing):

    onboarding    `shots` preference pairs drawn from the dataset's pairs (one domain, distinct questions,
                  sides random): what they pick is `chosen`, the other `rejected`. These are their shots.
    comparisons   held-out questions of the same domain. Once onboarding is done, a worker thread generates
                  the personalised answer (the model after the participant's shots) and the baseline's
                  (`zero-shot`: the same model without shots; or another model, with the same shots). The
                  page shows both blind, sides random; the participant picks A, B or tie.
    consistency   a share of the onboarding pairs again, sides swapped, mixed among the comparisons: does
                  the participant pick the same response again?
    description   runs trained with user descriptions write one from the shots before answering; it is
                  stored with each answer, and at the end the first one is shown: "does this fit you?"

Every answer is written when given, in one transaction that first checks it against what that participant
was shown (an unknown, foreign or repeated id is refused and nothing is written). Participants are known by a
random token (`secrets`) that only they hold; the database keeps its SHA-256, never the token.

Answers are generated through one boundary, `generate_answers(side, episodes, seed)`: `LocalAnswerer` runs
the models in this process (engine/personalize.py, the code `generate` and `eval --winrate` use);
`RemoteAnswerer` is where a generation server plugs in (issue 25).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fspo_engine.data_gen.atomic import write_text_atomic
from fspo_engine.engine.dataset import Dataset, Preference
from fspo_engine.engine.episodes import Episode, render_prompt, render_response
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.intervals import ci95_of_clusters

STUDY_FORMAT = "fspo-study/1"
BASELINES = ("zero-shot",)  # or a model directory
CHOICES = {"onboarding": ("A", "B"), "consistency": ("A", "B"), "comparisons": ("A", "B", "tie"),
           "description_fit": ("yes", "no")}
MAX_ATTEMPTS = 3  # generation tries per comparison before the study goes on without it
_ITEM_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,64}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,        -- sha256 of the participant's token (the token itself is not kept)
    csrf TEXT NOT NULL,                     -- posted back with every form
    seed INTEGER NOT NULL,                  -- draws their pairs, sides and order
    domain TEXT NOT NULL,
    created_at REAL NOT NULL,
    onboarded_at REAL,                      -- when the last onboarding answer came
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS onboarding (
    id INTEGER PRIMARY KEY,
    participant_id INTEGER NOT NULL REFERENCES participants(id),
    item TEXT NOT NULL UNIQUE,              -- the random id the page posts back
    position INTEGER NOT NULL,              -- place in the participant's sequence
    pref_id TEXT NOT NULL,                  -- the dataset pair shown
    question TEXT NOT NULL,
    option_a TEXT NOT NULL,
    option_b TEXT NOT NULL,
    a_is_dataset_chosen INTEGER NOT NULL,   -- 1: A is the dataset's `chosen`, B its `rejected`
    choice TEXT CHECK (choice IN ('A', 'B')),
    shown_at REAL,
    answered_at REAL,
    UNIQUE (participant_id, position)
);
CREATE TABLE IF NOT EXISTS consistency (
    id INTEGER PRIMARY KEY,
    participant_id INTEGER NOT NULL REFERENCES participants(id),
    item TEXT NOT NULL UNIQUE,
    position INTEGER NOT NULL,
    onboarding_id INTEGER NOT NULL REFERENCES onboarding(id),
    option_a TEXT NOT NULL,                 -- the onboarding pair's B
    option_b TEXT NOT NULL,                 -- and its A: sides swapped
    choice TEXT CHECK (choice IN ('A', 'B')),
    agrees INTEGER,                         -- 1: the same response as in onboarding
    shown_at REAL,
    answered_at REAL,
    UNIQUE (participant_id, position)
);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    participant_id INTEGER NOT NULL REFERENCES participants(id),
    item TEXT NOT NULL UNIQUE,
    position INTEGER NOT NULL,
    pref_id TEXT NOT NULL,                  -- the dataset pair whose question is asked
    question TEXT NOT NULL,
    personalized_side TEXT NOT NULL CHECK (personalized_side IN ('A', 'B')),
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'ready', 'failed')),
    personalized TEXT,
    baseline TEXT,
    description TEXT,                       -- the description the model wrote before its answer (or NULL)
    baseline_description TEXT,
    personalized_prompt TEXT,               -- the exact text fed to the model (bos not shown)
    baseline_prompt TEXT,
    personalized_finish TEXT,
    baseline_finish TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,    -- failed generation attempts (failed after MAX_ATTEMPTS)
    generated_at REAL,
    choice TEXT CHECK (choice IN ('A', 'B', 'tie')),
    winner TEXT CHECK (winner IN ('personalized', 'baseline', 'tie')),
    shown_at REAL,
    answered_at REAL,
    UNIQUE (participant_id, position)
);
CREATE TABLE IF NOT EXISTS description_fit (
    id INTEGER PRIMARY KEY,
    participant_id INTEGER NOT NULL UNIQUE REFERENCES participants(id),
    item TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    choice TEXT CHECK (choice IN ('yes', 'no')),
    shown_at REAL,
    answered_at REAL
);
"""


class Rejected(Exception):
    """A request the study refuses: HTTP `status` (4xx) and why. Nothing was written."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StudyConfig:
    """What defines a study: a database holds one, and serving it again with other settings is an error."""

    model: str  # the run or model directory, absolute
    data: str  # the dataset directory, absolute
    shots: int = 8  # onboarding pairs = the participant's shots
    comparisons: int = 10  # held-out questions judged per participant
    consistency: float = 0.25  # share of the onboarding pairs asked again, sides swapped
    baseline: str = "zero-shot"  # or a model directory (answers with the same shots)
    split: str = "test"  # where pairs and questions come from
    max_new_tokens: int = 256
    max_description_tokens: int = 128
    max_tokens: int = 8192  # prompt + generation budget; the oldest shots are dropped past it
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def n_checks(self) -> int:
        if self.shots == 0 or self.consistency <= 0:
            return 0
        return min(self.shots, max(1, round(self.consistency * self.shots)))


@dataclass(frozen=True)
class Participant:
    id: int
    csrf: str
    seed: int
    domain: str

    def check_csrf(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _new_item() -> str:
    return secrets.token_urlsafe(12)


# ----------------------------------------------------------------------------------------------------------
# The database


def connect(path: str | os.PathLike, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the study's settings: autocommit (transactions are explicit), rows by name,
    foreign keys on, fsync on every commit (people's answers survive a power cut, not only a kill)."""
    path = Path(path)
    try:
        if readonly:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        else:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 30000")
    except sqlite3.Error as exc:
        raise FspoError(f"{path}: cannot open as an SQLite database ({exc})") from None
    return conn


def init_db(path: Path, config: StudyConfig) -> None:
    """Create the tables (WAL journal) or check that the database holds this very study."""
    if path.exists() and not path.is_file():
        raise FspoError(f"{path}: not a file")
    if not path.parent.is_dir():
        raise FspoError(f"{path}: its directory {path.parent} does not exist")
    conn = connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; persistent in the file
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
        conn.execute("BEGIN IMMEDIATE")
        stored = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM meta")}
        want = dataclasses.asdict(config)
        if not stored:
            conn.execute("INSERT INTO meta VALUES ('format', ?), ('config', ?), ('created_at', ?)",
                         (STUDY_FORMAT, json.dumps(want, sort_keys=True), str(time.time())))
        else:
            if stored.get("format") != STUDY_FORMAT:
                raise FspoError(f"{path}: not an fspo-engine study database (format {stored.get('format')!r})")
            have = json.loads(stored.get("config", "{}"))
            diff = [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]
            if diff:
                raise FspoError(f"{path}: holds a study with other settings ({'; '.join(diff)}); serve it with "
                                "the same options, or give a new --db")
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise FspoError(f"{path}: not a usable study database ({exc})") from None
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


# ----------------------------------------------------------------------------------------------------------
# The study: participants, what they see, what they answer


class Study:
    """One study database and the dataset it draws from. Thread-safe: every call opens its own connection
    and writes in one `BEGIN IMMEDIATE` transaction (SQLite serialises writers)."""

    def __init__(self, db: str | os.PathLike, config: StudyConfig, dataset: Dataset, description_mode: str,
                 on_onboarded: Callable[[], object] | None = None):
        self.db = Path(db)
        self.config = config
        self.description_mode = description_mode  # the personalised side's: "none" | "generated"
        self.on_onboarded = on_onboarded
        self.pool = _question_pool(dataset, config)
        init_db(self.db, config)

    @contextmanager
    def _tx(self):
        conn = connect(self.db)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    # --- participants -------------------------------------------------------------------------------
    def new_participant(self) -> tuple[str, Participant]:
        """Plan a new participant's whole sequence and store it; -> (their token, the participant)."""
        token = secrets.token_urlsafe(24)
        seed = secrets.randbits(62)
        rng = np.random.default_rng(seed)
        cfg = self.config
        domain = sorted(self.pool)[int(rng.integers(len(self.pool)))]
        questions = self.pool[domain]
        picks = rng.choice(len(questions), size=cfg.shots + cfg.comparisons, replace=False).tolist()
        pairs = [questions[i][int(rng.integers(len(questions[i])))] for i in picks]
        now = time.time()
        with self._tx() as conn:
            pid = conn.execute("INSERT INTO participants (token_hash, csrf, seed, domain, created_at) "
                               "VALUES (?, ?, ?, ?, ?)",
                               (token_hash(token), secrets.token_urlsafe(24), seed, domain, now)).lastrowid
            onboarding_ids = []
            for pos, pref in enumerate(pairs[:cfg.shots]):
                a_chosen = bool(rng.integers(2))
                a, b = (pref.chosen, pref.rejected) if a_chosen else (pref.rejected, pref.chosen)
                onboarding_ids.append(conn.execute(
                    "INSERT INTO onboarding (participant_id, item, position, pref_id, question, option_a, option_b, "
                    "a_is_dataset_chosen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (pid, _new_item(), pos, pref.pref_id, pref.question.strip(), a.strip(), b.strip(),
                     int(a_chosen))).lastrowid)
            # After onboarding: comparisons and consistency checks in one shuffled sequence.
            checks = sorted(rng.choice(cfg.shots, size=cfg.n_checks, replace=False).tolist()) if cfg.n_checks else []
            later = [("comparison", p) for p in pairs[cfg.shots:]] + [("check", i) for i in checks]
            for pos, k in enumerate(rng.permutation(len(later)).tolist(), start=cfg.shots):
                kind, what = later[k]
                if kind == "comparison":
                    conn.execute("INSERT INTO comparisons (participant_id, item, position, pref_id, question, "
                                 "personalized_side) VALUES (?, ?, ?, ?, ?, ?)",
                                 (pid, _new_item(), pos, what.pref_id, what.question.strip(),
                                  "A" if rng.integers(2) else "B"))
                else:
                    row = conn.execute("SELECT option_a, option_b FROM onboarding WHERE id = ?",
                                       (onboarding_ids[what],)).fetchone()
                    conn.execute("INSERT INTO consistency (participant_id, item, position, onboarding_id, option_a, "
                                 "option_b) VALUES (?, ?, ?, ?, ?, ?)",
                                 (pid, _new_item(), pos, onboarding_ids[what], row["option_b"], row["option_a"]))
        return token, self._participant_by_id(pid)

    def _participant_by_id(self, pid: int) -> Participant:
        conn = connect(self.db)
        try:
            r = conn.execute("SELECT id, csrf, seed, domain FROM participants WHERE id = ?", (pid,)).fetchone()
        finally:
            conn.close()
        return Participant(r["id"], r["csrf"], r["seed"], r["domain"])

    def participant(self, token: str | None) -> Participant | None:
        """The participant holding `token`, or None."""
        if not token or not _TOKEN_RE.match(token):
            return None
        conn = connect(self.db)
        try:
            r = conn.execute("SELECT id, csrf, seed, domain FROM participants WHERE token_hash = ?",
                             (token_hash(token),)).fetchone()
        finally:
            conn.close()
        return None if r is None else Participant(r["id"], r["csrf"], r["seed"], r["domain"])

    # --- what the participant sees next --------------------------------------------------------------
    def current(self, p: Participant) -> dict:
        """The participant's next step, marked as shown: a dict with `kind` (onboarding, consistency,
        comparisons, description_fit, preparing or done), `item`, the texts to show and `step`/`steps`."""
        now = time.time()
        with self._tx() as conn:
            view = self._next(conn, p)
            if view.get("item") is not None:
                conn.execute(f"UPDATE {view['kind']} SET shown_at = ? WHERE item = ? AND shown_at IS NULL",
                             (now, view["item"]))
            elif view["kind"] == "done":
                conn.execute("UPDATE participants SET finished_at = ? WHERE id = ? AND finished_at IS NULL",
                             (now, p.id))
            view.update(self._progress(conn, p))
        return view

    def state(self, p: Participant) -> str:
        """What the next step is (`kind` of `current`) without marking anything shown: the page's poll."""
        with self._tx() as conn:
            return self._next(conn, p)["kind"]

    def _next(self, conn, p: Participant) -> dict:
        r = conn.execute("SELECT item, question, option_a, option_b FROM onboarding WHERE participant_id = ? "
                         "AND answered_at IS NULL ORDER BY position LIMIT 1", (p.id,)).fetchone()
        if r is not None:
            return {"kind": "onboarding", **dict(r)}
        r = conn.execute(
            "SELECT 'consistency' AS kind, c.item, c.position, o.question, c.option_a, c.option_b "
            "FROM consistency c JOIN onboarding o ON o.id = c.onboarding_id "
            "WHERE c.participant_id = ? AND c.answered_at IS NULL "
            "UNION ALL SELECT 'comparisons', item, position, question, "
            "CASE personalized_side WHEN 'A' THEN personalized ELSE baseline END, "
            "CASE personalized_side WHEN 'A' THEN baseline ELSE personalized END "
            "FROM comparisons WHERE participant_id = ? AND answered_at IS NULL AND status = 'ready' "
            "ORDER BY position LIMIT 1", (p.id, p.id)).fetchone()
        if r is not None:
            return {k: r[k] for k in ("kind", "item", "question", "option_a", "option_b")}
        pending = conn.execute("SELECT COUNT(*) FROM comparisons WHERE participant_id = ? AND status = 'pending'",
                               (p.id,)).fetchone()[0]
        if pending:
            return {"kind": "preparing", "item": None, "pending": pending}
        fit = self._fit_row(conn, p)
        if fit is not None and fit["answered_at"] is None:
            return {"kind": "description_fit", "item": fit["item"], "description": fit["description"]}
        return {"kind": "done", "item": None}

    def _fit_row(self, conn, p: Participant):
        """The "does this describe you?" question, created once every comparison is answered (descriptions
        runs only): it shows the description the model wrote for the participant's first comparison."""
        row = conn.execute("SELECT * FROM description_fit WHERE participant_id = ?", (p.id,)).fetchone()
        if row is not None or self.description_mode != "generated":
            return row
        desc = conn.execute("SELECT description FROM comparisons WHERE participant_id = ? AND status = 'ready' "
                            "AND description IS NOT NULL AND description != '' ORDER BY position LIMIT 1",
                            (p.id,)).fetchone()
        if desc is None:
            return None
        conn.execute("INSERT INTO description_fit (participant_id, item, description) VALUES (?, ?, ?)",
                     (p.id, _new_item(), desc[0]))
        return conn.execute("SELECT * FROM description_fit WHERE participant_id = ?", (p.id,)).fetchone()

    def _progress(self, conn, p: Participant) -> dict:
        total = done = 0
        for table in ("onboarding", "consistency", "comparisons", "description_fit"):
            extra = " AND status != 'failed'" if table == "comparisons" else ""
            n, answered = conn.execute(f"SELECT COUNT(*), COUNT(answered_at) FROM {table} WHERE participant_id = ?"
                                       + extra, (p.id,)).fetchone()
            total, done = total + n, done + answered
        if self.description_mode == "generated" and not conn.execute(
                "SELECT 1 FROM description_fit WHERE participant_id = ?", (p.id,)).fetchone():
            total += 1  # the description question still to come
        return {"step": min(done + 1, total), "steps": total}

    # --- answers ---------------------------------------------------------------------------------------
    def submit(self, p: Participant, item: str | None, choice: str | None) -> str:
        """Store `choice` for the question `item` that `p` was shown; -> the kind of question. Raises
        `Rejected` (nothing written) for an id that is not one of p's shown, unanswered questions, or a
        choice that question does not offer."""
        if not item or not _ITEM_RE.match(item):
            raise Rejected(400, "missing or malformed question id")
        now = time.time()
        with self._tx() as conn:
            for kind in CHOICES:
                row = conn.execute(f"SELECT * FROM {kind} WHERE item = ? AND participant_id = ?",
                                   (item, p.id)).fetchone()
                if row is not None:
                    break
            else:
                raise Rejected(404, "no such question for this participant")
            if choice not in CHOICES[kind]:
                raise Rejected(400, f"choice must be one of {', '.join(CHOICES[kind])}")
            if row["answered_at"] is not None:
                raise Rejected(409, "this question was already answered")
            if row["shown_at"] is None:
                raise Rejected(409, "this question was not shown yet")
            extra = {}
            if kind == "comparisons":
                extra["winner"] = "tie" if choice == "tie" else \
                    "personalized" if choice == row["personalized_side"] else "baseline"
            elif kind == "consistency":
                first = conn.execute("SELECT option_a, option_b, choice FROM onboarding WHERE id = ?",
                                     (row["onboarding_id"],)).fetchone()
                picked_then = first["option_a"] if first["choice"] == "A" else first["option_b"]
                picked_now = row["option_a"] if choice == "A" else row["option_b"]
                extra["agrees"] = int(picked_now == picked_then)
            sets = ", ".join(f"{k} = ?" for k in ("choice", "answered_at", *extra))
            cur = conn.execute(f"UPDATE {kind} SET {sets} WHERE id = ? AND answered_at IS NULL",
                               (choice, now, *extra.values(), row["id"]))
            assert cur.rowcount == 1  # the transaction holds the write lock: nobody answered in between
            onboarded = kind == "onboarding" and not conn.execute(
                "SELECT 1 FROM onboarding WHERE participant_id = ? AND answered_at IS NULL", (p.id,)).fetchone()
            if onboarded:
                conn.execute("UPDATE participants SET onboarded_at = ? WHERE id = ?", (now, p.id))
        if onboarded and self.on_onboarded is not None:
            self.on_onboarded()
        return kind

    # --- generation ------------------------------------------------------------------------------------
    def next_pending(self) -> int | None:
        """A participant (id) who finished onboarding and still has comparisons without answers: the one
        who finished first."""
        conn = connect(self.db)
        try:
            r = conn.execute("SELECT p.id FROM participants p WHERE p.onboarded_at IS NOT NULL AND EXISTS "
                             "(SELECT 1 FROM comparisons c WHERE c.participant_id = p.id AND c.status = 'pending') "
                             "ORDER BY p.onboarded_at, p.id LIMIT 1").fetchone()
        finally:
            conn.close()
        return None if r is None else r[0]

    def generate_for(self, pid: int, answerer, sides) -> int:
        """Generate both answers of participant `pid`'s pending comparisons and store them; -> how many.
        `sides`: (personalised Side, baseline Side) from `winrate.plan_sides`."""
        ours_side, their_side = sides
        conn = connect(self.db)
        try:
            seed = conn.execute("SELECT seed FROM participants WHERE id = ?", (pid,)).fetchone()[0]
            shots = [_shot(pid, r) for r in conn.execute(
                "SELECT * FROM onboarding WHERE participant_id = ? ORDER BY position", (pid,))]
            todo = conn.execute("SELECT id, pref_id, question FROM comparisons WHERE participant_id = ? "
                                "AND status = 'pending' ORDER BY position", (pid,)).fetchall()
        finally:
            conn.close()
        if not todo:
            return 0
        user = f"participant-{pid}"
        episodes = [Episode(episode_id=f"{user}/{r['id']}", user_id=user, shots=tuple(shots),
                            target=Preference(r["pref_id"], user, r["question"], "", ""),
                            shots_requested=len(shots)) for r in todo]
        try:
            ours = answerer.generate_answers(ours_side, episodes, seed % 2**31)
            theirs = answerer.generate_answers(their_side, episodes, seed % 2**31)
        except Exception as exc:  # noqa: BLE001 - stored with the comparison; after MAX_ATTEMPTS it is skipped
            with self._tx() as conn:
                conn.executemany(
                    "UPDATE comparisons SET attempts = attempts + 1, error = ?, status = CASE WHEN attempts + 1 >= ? "
                    "THEN 'failed' ELSE 'pending' END WHERE id = ? AND status = 'pending'",
                    [(f"{type(exc).__name__}: {exc}", MAX_ATTEMPTS, r["id"]) for r in todo])
            raise
        now = time.time()
        with self._tx() as conn:
            conn.executemany(
                "UPDATE comparisons SET status = 'ready', personalized = ?, baseline = ?, description = ?, "
                "baseline_description = ?, personalized_prompt = ?, baseline_prompt = ?, personalized_finish = ?, "
                "baseline_finish = ?, generated_at = ? WHERE id = ? AND status = 'pending'",
                [(x["response"], y["response"], x["description"], y["description"], x["prompt"], y["prompt"],
                  x["finish_reason"], y["finish_reason"], now, r["id"]) for r, x, y in zip(todo, ours, theirs)])
        return len(todo)

    def counts(self) -> dict:
        conn = connect(self.db)
        try:
            return {"participants": conn.execute("SELECT COUNT(*) FROM participants").fetchone()[0],
                    "pending": conn.execute("SELECT COUNT(*) FROM comparisons WHERE status = 'pending'").fetchone()[0]}
        finally:
            conn.close()

    def close(self):
        """Fold the write-ahead log back into the database file (a clean stop leaves one file)."""
        conn = connect(self.db)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()


def _shot(pid: int, r) -> Preference:
    """An answered onboarding pair as one of the participant's shots: what they picked is `chosen`."""
    picked, other = (r["option_a"], r["option_b"]) if r["choice"] == "A" else (r["option_b"], r["option_a"])
    return Preference(f"participant-{pid}/{r['position']}", f"participant-{pid}", r["question"], picked, other)


def _question_pool(dataset: Dataset, cfg: StudyConfig) -> dict[str, list[list[Preference]]]:
    """Per domain of `cfg.split`'s users, the pairs grouped by distinct question (a participant never sees a
    question twice); only domains with enough questions for one participant."""
    by_domain: dict[str, dict[str, list[Preference]]] = {}
    for user in dataset.users_in(cfg.split):
        for pref in dataset.prefs.get(user.user_id, []):
            by_domain.setdefault(user.domain, {}).setdefault(pref.question.strip(), []).append(pref)
    need = cfg.shots + cfg.comparisons
    pool = {d: [qs[q] for q in sorted(qs)] for d, qs in by_domain.items() if len(qs) >= need}
    if not pool:
        most = max((len(qs) for qs in by_domain.values()), default=0)
        raise FspoError(f"{dataset.root}: the {cfg.split} split has at most {most} distinct questions in one domain; "
                        f"--shots {cfg.shots} + --comparisons {cfg.comparisons} need {need}")
    return pool


# ----------------------------------------------------------------------------------------------------------
# Generating answers


def answer_prompt(episode: Episode, shots_used: int, description: str | None) -> str:
    """The exact text a side's answer continued (bos not shown): the few-shot prompt of the shots that fit,
    then the response header, after the model's own description when it wrote one (personalize.respond)."""
    kept = episode.shots[len(episode.shots) - shots_used:] if shots_used else ()
    return render_prompt(kept, episode.target.question, description is not None) + \
        render_response("", description)[: -len("\n")]


class LocalAnswerer:
    """Answers from models loaded in this process: `personalize.answer`, as `generate` and `eval --winrate`
    produce them. One loaded model per distinct (directory, bos)."""

    def __init__(self, sides, device=None, **settings):
        from fspo_engine.engine.personalize import load_generator

        self._gens = {}
        for side in sides:
            key = (str(side.model_dir), side.bos)
            if key not in self._gens:
                self._gens[key] = load_generator(side.model_dir, device=device, bos=side.bos,
                                                 split_special_tokens=side.split_special_tokens, **settings)

    def generate_answers(self, side, episodes: list[Episode], seed: int) -> list[dict]:
        """`side`'s answer to each episode's target question after `side.shots` of its shots: dicts with
        `response`, `description` (None without one), `finish_reason`, `shots_used`, `prompt`."""
        from fspo_engine.engine.personalize import answer

        eps = _side_episodes(side, episodes)
        gen = dataclasses.replace(self._gens[(str(side.model_dir), side.bos)], seed=seed)
        out = answer(gen, eps, side.description)
        for ep, rec in zip(eps, out):
            rec["prompt"] = answer_prompt(ep, rec["shots_used"], rec["description"])
        return out


class RemoteAnswerer:
    """Answers from an OpenAI-compatible /v1/completions server (vLLM, SGLang, ...) through gen-data's client
    (data_gen/client.py `LLMClient.complete`). The server gets the very token ids `LocalAnswerer` would feed
    the model (this process keeps only the tokenizer), so an answer depends on where it was generated only
    as far as the server's numerics do. The server must serve the weights of `--model`."""

    def __init__(self, sides, url: str, model: str, *, max_tokens: int = 8192, max_new_tokens: int = 256,
                 max_description_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 concurrency: int = 16, client_factory: Callable[[], object] | None = None):
        from fspo_engine.engine.tokenizer import load_tokenizer

        try:
            from fspo_engine.data_gen.client import LLMClient
        except ImportError as exc:
            raise FspoError(f"--generator-url: generation on a server needs fspo_engine.data_gen.client ({exc}); "
                            "leave out --generator-url/--generator-model to generate with the local model") from None
        if len({(str(s.model_dir), s.bos) for s in sides}) > 1:
            raise FspoError("--generator-url serves one model: use --baseline zero-shot with it, or generate locally")
        if client_factory is None:
            try:
                import openai  # noqa: F401
            except ImportError:
                raise FspoError("--generator-url needs the openai package: pip install 'fspo-engine[llm]'") from None
            client_factory = lambda: LLMClient(model=model, base_urls=url, concurrency=concurrency)
        self.tokenizer = load_tokenizer(sides[0].model_dir, split_special_tokens=sides[0].split_special_tokens)
        self.bos = sides[0].bos
        self.settings = dict(max_tokens=max_tokens, max_new_tokens=max_new_tokens,
                             max_description_tokens=max_description_tokens, temperature=temperature, top_p=top_p)
        self._factory = client_factory
        self._client = None
        self._loop = None  # one event loop, in the thread that generates (the worker's)

    def generate_answers(self, side, episodes: list[Episode], seed: int) -> list[dict]:
        """As `LocalAnswerer.generate_answers`; `finish_reason` is "remote" (the server does not say)."""
        import asyncio

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._answers(_side_episodes(side, episodes), side.description, seed))

    async def _answers(self, eps: list[Episode], mode: str, seed: int) -> list[dict]:
        import asyncio

        from fspo_engine.engine.personalize import DESCRIPTION_HEADER, RESPONSE_HEADER

        if self._client is None:
            self._client = self._factory()
        s = self.settings
        sample = dict(stage="study", temperature=s["temperature"], top_p=s["top_p"])

        async def one(i: int, ep: Episode) -> dict:
            # personalize.Generator.describe then .respond, as token ids: description first (generated mode),
            # then the response after it; each prompt keeps the newest shots that fit the budget.
            desc = None
            budget = s["max_new_tokens"] + (s["max_description_tokens"] if mode == "generated" else 0)
            if mode == "generated":
                ids, _ = self._prompt(ep, True, budget)
                reply = await self._client.complete(ids + self.tokenizer.encode(DESCRIPTION_HEADER),
                                                    max_tokens=s["max_description_tokens"], seed=seed + i,
                                                    stop=[RESPONSE_HEADER.strip()], **sample)
                desc = " ".join(reply.text.split(RESPONSE_HEADER.strip())[0].split())
            ids, kept = self._prompt(ep, desc is not None, budget)
            prefix = render_response("", desc)[: -len("\n")]
            reply = await self._client.complete(ids + self.tokenizer.encode(prefix), max_tokens=s["max_new_tokens"],
                                                seed=seed + i, **sample)
            return {"response": reply.text.strip(), "description": desc, "finish_reason": "remote",
                    "shots_used": kept, "prompt": answer_prompt(ep, kept, desc)}

        return list(await asyncio.gather(*(one(i, ep) for i, ep in enumerate(eps))))

    def _prompt(self, ep: Episode, user_description: bool, budget: int) -> tuple[list[int], int]:
        """[bos] + the few-shot prompt's ids, oldest shots dropped until `budget` tokens fit (Generator._prompt)."""
        shots = list(ep.shots)
        head = [self.tokenizer.bos_id] if self.bos else []
        while True:
            ids = head + self.tokenizer.encode(render_prompt(shots, ep.target.question, user_description))
            if len(ids) + budget <= self.settings["max_tokens"]:
                return ids, len(shots)
            if not shots:
                raise FspoError(f"the zero-shot prompt ({len(ids)} tokens) plus {budget} generated tokens does "
                                f"not fit --max-tokens {self.settings['max_tokens']}")
            shots.pop(0)

    def close(self):
        if self._loop is not None:
            if self._client is not None:
                self._loop.run_until_complete(self._client.aclose())
            self._loop.close()


def _side_episodes(side, episodes: list[Episode]) -> list[Episode]:
    """The episodes as `side` sees them: its number of shots (the newest), no true description."""
    return [dataclasses.replace(ep, shots=ep.shots[max(0, len(ep.shots) - side.shots):] if side.shots else (),
                                description="") for ep in episodes]


class Worker(threading.Thread):
    """Generates pending answers in the background, one participant at a time, so the page stays responsive.
    The database is the queue: a restarted server picks up whatever was pending."""

    def __init__(self, study: Study, answerer, sides, log: Callable[[str], object] = print):
        super().__init__(name="study-generation", daemon=True)
        self.study, self.answerer, self.sides, self.log = study, answerer, sides, log
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.retry_after_s = 5.0

    def wake(self):
        self._wake.set()

    def stop(self, timeout: float | None = None):
        self._stopping.set()
        self._wake.set()
        self.join(timeout)

    def run(self):
        while not self._stopping.is_set():
            pid = self.study.next_pending()
            if pid is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                n = self.study.generate_for(pid, self.answerer, self.sides)
                self.log(f"study: generated {n} answer pairs for participant {pid}")
            except Exception as exc:  # noqa: BLE001 - counted on the comparisons (generate_for); keep serving
                self.log(f"study: generation for participant {pid} failed: {type(exc).__name__}: {exc}")
                self._stopping.wait(self.retry_after_s)
        if hasattr(self.answerer, "close"):
            self.answerer.close()


# ----------------------------------------------------------------------------------------------------------
# The report

BOOTSTRAP_RESAMPLES = 10_000


def study_report(db: str | os.PathLike, seed: int = 0) -> dict:
    """The study's numbers from its database (read-only): winrate of the personalised answers over the
    baseline's (ties half), ci95 by a bootstrap over participants, self-consistency, description fit, and
    one row per participant. A database without answers gives n = 0."""
    db = Path(db)
    if not db.is_file():
        raise FspoError(f"{db}: no such study database")
    conn = connect(db, readonly=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and not {"participants", "comparisons"} <= tables:
            raise FspoError(f"{db}: not an fspo-engine study database (tables: {', '.join(sorted(tables))})")
        config = {}
        if "meta" in tables:
            meta = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM meta")}
            config = json.loads(meta.get("config", "{}"))
        rows = _report_rows(conn) if tables else []
    except sqlite3.DatabaseError as exc:
        raise FspoError(f"{db}: not a readable study database ({exc})") from None
    finally:
        conn.close()
    return _summarize(rows, config, seed)


def _report_rows(conn) -> list[dict]:
    out = []
    for p in conn.execute("SELECT * FROM participants ORDER BY id").fetchall():
        pid = p["id"]
        winners = [r[0] for r in conn.execute("SELECT winner FROM comparisons WHERE participant_id = ? AND "
                                              "answered_at IS NOT NULL ORDER BY position", (pid,))]
        seconds = [r[0] for r in conn.execute("SELECT answered_at - shown_at FROM comparisons WHERE participant_id "
                                              "= ? AND answered_at IS NOT NULL", (pid,))]
        agrees = [r[0] for r in conn.execute("SELECT agrees FROM consistency WHERE participant_id = ? AND "
                                             "answered_at IS NOT NULL", (pid,))]
        fit = conn.execute("SELECT choice FROM description_fit WHERE participant_id = ? AND answered_at IS NOT NULL",
                           (pid,)).fetchone()
        onboarded = conn.execute("SELECT COUNT(answered_at) FROM onboarding WHERE participant_id = ?",
                                 (pid,)).fetchone()[0]
        failed = conn.execute("SELECT COUNT(*) FROM comparisons WHERE participant_id = ? AND status = 'failed'",
                              (pid,)).fetchone()[0]
        wins, ties, losses = winners.count("personalized"), winners.count("tie"), winners.count("baseline")
        n = len(winners)
        out.append({
            "participant": pid, "domain": p["domain"], "onboarding_answers": onboarded,
            "n": n, "wins": wins, "ties": ties, "losses": losses,
            "winrate": (wins + 0.5 * ties) / n if n else None,
            "self_consistency": {"agree": sum(agrees), "n": len(agrees)},
            "description_fits": None if fit is None else fit[0] == "yes",
            "median_seconds_per_comparison": float(np.median(seconds)) if seconds else None,
            "failed_generations": failed, "finished": p["finished_at"] is not None,
        })
    return out


def _summarize(rows: list[dict], config: dict, seed: int) -> dict:
    judged = [r for r in rows if r["n"]]
    wins, ties, losses = (sum(r[k] for r in rows) for k in ("wins", "ties", "losses"))
    n = wins + ties + losses
    agree, checks = sum(r["self_consistency"]["agree"] for r in rows), sum(r["self_consistency"]["n"] for r in rows)
    fits = [r["description_fits"] for r in rows if r["description_fits"] is not None]
    return {
        "winrate": (wins + 0.5 * ties) / n if n else None,
        "ci95": _cluster_bootstrap(judged, seed),
        "ci95_method": (f"percentile bootstrap over participants (clusters): {BOOTSTRAP_RESAMPLES} resamples of "
                        f"the participants with replacement, pooled winrate of each, seed {seed}; null with fewer "
                        "than 2 participants"),
        "n": n, "wins": wins, "ties": ties, "losses": losses,
        "participants": len(judged),
        "participants_started": len(rows),
        "participants_finished": sum(r["finished"] for r in rows),
        "self_consistency": {"agreement": agree / checks if checks else None, "agree": agree, "n": checks},
        "description_fit": {"rate": sum(fits) / len(fits) if fits else None, "yes": sum(fits), "n": len(fits)},
        "failed_generations": sum(r["failed_generations"] for r in rows),
        "baseline": config.get("baseline"), "model": config.get("model"), "data": config.get("data"),
        "shots": config.get("shots"),
        "per_participant": rows,
    }


def _cluster_bootstrap(rows: list[dict], seed: int) -> list[float] | None:
    """95% percentile interval of the pooled winrate when participants, not comparisons, are resampled
    (engine/intervals.py): one person's answers are correlated, so resampling comparisons would understate
    the uncertainty. None with fewer than 2 participants."""
    if len(rows) < 2:
        return None
    return ci95_of_clusters([r["wins"] + 0.5 * r["ties"] for r in rows], [r["n"] for r in rows],
                            resamples=BOOTSTRAP_RESAMPLES, seed=seed)


def write_report(report: dict, out_json: str | os.PathLike) -> list[Path]:
    """`out_json` and its plot (`.png` beside it), each written atomically; -> the paths."""
    out_json = Path(out_json)
    write_text_atomic(out_json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    png = out_json.with_suffix(".png")
    plot_report(report, png)
    return [out_json, png]


def plot_report(report: dict, out_png: Path):
    import matplotlib

    from fspo_engine.engine.metrics import save_figure  # it imports torch: only when a report is plotted

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(7.5, 3.4), gridspec_kw={"width_ratios": [1, 2.5]})
    for a in (ax, ax2):
        a.axhline(0.5, color="grey", lw=0.8, ls="--")
        a.set_ylim(0, 1)
    if report["n"]:
        ci = report["ci95"]
        err = None if ci is None else [[report["winrate"] - ci[0]], [ci[1] - report["winrate"]]]
        ax.bar([0], [report["winrate"]], yerr=err, capsize=5, color="#3b6ea5")
    else:
        ax.text(0, 0.5, "no answers yet", ha="center", va="center", color="grey")
    ax.set_xticks([0], [f"all\n(n={report['n']})"])
    ax.set_xlim(-0.8, 0.8)
    ax.set_ylabel("winrate of personalised (ties = 1/2)")
    rows = [r for r in report["per_participant"] if r["n"]]
    ax2.scatter(range(len(rows)), [r["winrate"] for r in rows], s=[20 + 8 * r["n"] for r in rows], color="#8fb3d9",
                edgecolor="#3b6ea5")
    ax2.set_xticks(range(len(rows)), [str(r["participant"]) for r in rows], fontsize=7)
    ax2.set_xlabel("participant (marker size ~ comparisons)")
    ax2.set_xlim(-0.8, max(len(rows), 1) - 0.2)
    sc = report["self_consistency"]["agreement"]
    fig.suptitle(f"{report['shots']}-shot personalised vs {report['baseline']}: {report['participants']} "
                 f"participants" + ("" if sc is None else f", self-consistency {sc:.2f}"), fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=100)


__all__ = ["CHOICES", "LocalAnswerer", "Participant", "Rejected", "RemoteAnswerer", "Study", "StudyConfig",
           "Worker", "answer_prompt", "connect", "init_db", "study_report", "write_report"]
