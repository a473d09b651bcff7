"""fspo-engine study: participants at once without mixing, every forged or repeated answer refused with nothing
written, CSRF, the shots a participant gave reaching the personalised prompt, kill -9 of a serving process
then restart with nothing lost, the report on empty and filled databases, the CLI contract and its errors.

The page is driven over HTTP here (tests/engine/test_study_browser.py drives it in a real browser). Everything
runs on a tiny run trained for one step: the answers are noise, the plumbing is what is tested.
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from fspo_engine.engine.study import (
    LocalAnswerer,
    Study,
    StudyConfig,
    Worker,
    answer_prompt,
    study_report,
    write_report,
)
from fspo_engine.engine.study_server import StudyServer

SHOTS, COMPARISONS = 3, 3
GEN = dict(max_tokens=2048, max_new_tokens=12, max_description_tokens=8)
TABLES = ("participants", "onboarding", "consistency", "comparisons", "description_fit")

# --------------------------------------------------------------------------------------------- fixtures
ITEMS = ("phone laptop backpack novel chair lamp kettle bicycle tent camera headphones blender jacket watch "
         "printer sofa desk mug umbrella keyboard").split()
ASKS = ("What do you think of the {}?", "Would you recommend the {}?", "Review the {} for other shoppers.")


def _reply(item: str, upbeat: bool, short: bool) -> str:
    core = f"The {item} is great: well made and a pleasure to use" if upbeat else \
        f"The {item} is disappointing: it feels cheap and wears out fast"
    if short:
        return core + "."
    return core + (f", and after a month of daily use I would buy it again. The details of this {item} are right."
                   if upbeat else f", and after a month of daily use I regret it. The details of this {item} are wrong.")


def write_study_dataset(root: Path, users: int = 12, test_users: int = 4, prefs_per_user: int = 10) -> Path:
    """Readable review pairs: each user likes upbeat or critical, short or long reviews; each pair contrasts
    one of the two. The last `test_users` users are the test split (the study's pairs and questions)."""
    rng = random.Random(0)
    questions = [a.format(i) for i in ITEMS for a in ASKS]
    us, ps = [], []
    for u in range(users):
        up, short = u % 2 == 0, u % 4 < 2
        uid = f"u{u:02d}"
        us.append({"user_id": uid, "domain": "reviews", "split": "test" if u >= users - test_users else "train",
                   "description": f"likes {'upbeat' if up else 'critical'}, {'short' if short else 'long'} reviews",
                   "traits": {"sentiment": "upbeat" if up else "critical", "length": "short" if short else "long"}})
        for k, q in enumerate(rng.sample(questions, prefs_per_user)):
            item = next(i for i in ITEMS if f" {i}" in q)
            axis = rng.choice(["sentiment", "length"])
            chosen = _reply(item, up, short)
            rejected = _reply(item, not up if axis == "sentiment" else up, not short if axis == "length" else short)
            ps.append({"pref_id": f"{uid}-{k}", "user_id": uid, "question": q, "chosen": chosen, "rejected": rejected})
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"format": "fspo-prefs/1", "domains": ["reviews"], "seed": 0,
                                                    "generator": {}, "counts": {"users": users, "prefs": len(ps)}}))
    (root / "users.jsonl").write_text("".join(json.dumps(x) + "\n" for x in us))
    (root / "prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ps))
    return root


def study_files(tmp_path_factory) -> SimpleNamespace:
    """The dataset and a tiny run trained one step with user descriptions, built once per session (the browser
    test uses them too)."""
    from click.testing import CliRunner

    from fspo_engine.cli.main import cli

    root = tmp_path_factory.getbasetemp() / "study-shared"
    files = SimpleNamespace(data=root / "data", run=root / "run")
    if not (root / "ready").is_file():
        write_study_dataset(files.data)
        res = CliRunner().invoke(cli, [
            "train", "--data", str(files.data), "--out", str(files.run), "--stage", "pref-ft", "--max-steps", "1",
            "--shots", "1-3", "--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=1",
            "--set", "model.vocab_size=400", "--set", "batch.episodes=4", "--set", "data.max_tokens=1024",
            "--set", "data.user_description=true", "--set", "run.progress=false"])
        assert res.exit_code == 0, res.output
        (root / "ready").touch()
    return files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fspo_engine.engine.episodes import load_dataset
    from fspo_engine.engine.winrate import plan_sides

    files = study_files(tmp_path_factory)
    sides = plan_sides(str(files.run), "zero-shot", SHOTS, None)
    assert sides[0].description == "generated"  # the run wrote descriptions: the fit question is asked
    return SimpleNamespace(data=files.data, run=files.run, dataset=load_dataset(files.data), sides=sides,
                           answerer=LocalAnswerer(sides, device="cpu", **GEN))


@contextmanager
def serving(db: Path, model, data, dataset, sides, answerer, baseline: str = "zero-shot"):
    """A study served in this process on a free port, with its generation worker."""
    config = StudyConfig(model=str(model), data=str(data), shots=SHOTS, comparisons=COMPARISONS, baseline=baseline,
                         **GEN)
    study = Study(db, config, dataset, sides[0].description)
    worker = Worker(study, answerer, sides, log=lambda msg: None)
    study.on_onboarded = worker.wake
    worker.start()
    server = StudyServer(study, "127.0.0.1", 0).start()
    try:
        yield SimpleNamespace(study=study, url=server.url, db=study.db)
    finally:
        server.stop()
        worker.stop(timeout=30)
        study.close()


@pytest.fixture
def served(env, tmp_path):
    with serving(tmp_path / "study.sqlite", env.run, env.data, env.dataset, env.sides, env.answerer) as s:
        yield s


# ---------------------------------------------------------------------------------------- an HTTP participant
class Participant:
    """One browser: a cookie jar, the page it is on, and every answer it gave ((kind, item, choice) in order)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.page = ""
        self.given: list[tuple[str, str, str]] = []

    def request(self, path: str, fields: dict | None = None, raw: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str]:
        data = raw if raw is not None else None if fields is None else urllib.parse.urlencode(fields).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    @property
    def token(self) -> str:
        return next(c.value for c in self.jar if c.name == "fspo_study")

    def start(self):
        _, page = self.request("/")
        nonce = re.search(r'name="start" value="([^"]+)"', page).group(1)
        status, self.page = self.request("/start", {"start": nonce})
        assert status == 200 and self.kind != "landing"
        return self

    @property
    def kind(self) -> str:
        return re.search(r'data-page="([^"]+)"', self.page).group(1)

    def field(self, name: str) -> str:
        return re.search(rf'name="{name}" value="([^"]+)"', self.page).group(1)

    def answer(self, choice: str):
        item = self.field("item")
        status, page = self.request("/answer", {"csrf": self.field("csrf"), "item": item, "choice": choice})
        assert status == 200, page
        self.given.append((self.kind, item, choice))
        self.page = page

    def wait_ready(self, timeout: float = 120):
        deadline = time.time() + timeout
        while self.kind == "preparing":
            assert time.time() < deadline, "answers never became ready"
            time.sleep(0.2)
            _, self.page = self.request("/study")

    def run(self, pick, until: str = "done"):
        """Answer with pick(kind, step) until the page is `until`."""
        while self.kind != until:
            self.wait_ready()
            if self.kind == until:
                break
            self.answer(pick(self.kind, len(self.given)))


def pick_pattern(kind: str, step: int) -> str:
    return {"preference": "AB"[step % 2], "comparison": ("A", "B", "tie")[step % 3], "description": "no"}[kind]


def rows(db, table: str, where: str = "", args=()) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} {where}", args)]
    finally:
        conn.close()


def dump(db) -> dict:
    return {t: rows(db, t) for t in TABLES}


def participant_id(db, token: str) -> int:
    (p,) = rows(db, "participants", "WHERE token_hash = ?", (hashlib.sha256(token.encode()).hexdigest(),))
    return p["id"]


def answers_in_db(db, pid: int) -> list[tuple[str, str, str]]:
    """(page kind, item, choice) of every answer stored for participant `pid`, in the order given."""
    out = []
    for table, kind in (("onboarding", "preference"), ("consistency", "preference"), ("comparisons", "comparison"),
                        ("description_fit", "description")):
        for r in rows(db, table, "WHERE participant_id = ? AND answered_at IS NOT NULL", (pid,)):
            out.append((r["answered_at"], (kind, r["item"], r["choice"])))
    return [x for _, x in sorted(out)]


# ------------------------------------------------------------------------------------------------ tests
def test_two_participants_at_once_do_not_mix(served):
    a, b = Participant(served.url).start(), Participant(served.url).start()
    assert a.token != b.token
    errors = []

    def go(p, pick):
        try:
            p.run(pick)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(a, pick_pattern)),
               threading.Thread(target=go, args=(b, lambda kind, step: pick_pattern(kind, step + 1)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    pa, pb = participant_id(served.db, a.token), participant_id(served.db, b.token)
    assert answers_in_db(served.db, pa) == a.given
    assert answers_in_db(served.db, pb) == b.given
    # shots + checks + comparisons + the description question, each answered once
    n_checks = StudyConfig("m", "d", shots=SHOTS).n_checks
    assert len(a.given) == len(b.given) == SHOTS + n_checks + COMPARISONS + 1
    # The database never holds a token, only its hash.
    assert a.token not in json.dumps(dump(served.db))
    # Each one's pairs come from the dataset, without a repeated question.
    for pid in (pa, pb):
        qs = [r["question"] for r in rows(served.db, "onboarding", "WHERE participant_id = ?", (pid,))] + \
             [r["question"] for r in rows(served.db, "comparisons", "WHERE participant_id = ?", (pid,))]
        assert len(qs) == len(set(qs)) == SHOTS + COMPARISONS


def test_the_personalised_prompt_holds_the_participants_own_picks(served, env):
    p = Participant(served.url).start()
    p.run(pick_pattern)
    pid = participant_id(served.db, p.token)
    onboarding = rows(served.db, "onboarding", "WHERE participant_id = ? ORDER BY position", (pid,))
    for comp in rows(served.db, "comparisons", "WHERE participant_id = ?", (pid,)):
        assert comp["status"] == "ready" and comp["description"] is not None
        prompt = comp["personalized_prompt"]
        for o in onboarding:
            picked, other = (o["option_a"], o["option_b"]) if o["choice"] == "A" else (o["option_b"], o["option_a"])
            assert f"## Preferred Response \n{picked}\n## Dispreferred Response \n{other}\n" in prompt
        assert prompt.endswith(f"## User Description\n{comp['description']}\n## Preferred Response \n")
        assert "# Example" not in comp["baseline_prompt"]  # the zero-shot baseline sees no shots
        winner = "tie" if comp["choice"] == "tie" else \
            "personalized" if comp["choice"] == comp["personalized_side"] else "baseline"
        assert comp["winner"] == winner
    # The answers are the engine's: generating again from the stored shots gives the stored text.
    from fspo_engine.engine.dataset import Preference
    from fspo_engine.engine.episodes import Episode
    from fspo_engine.engine.study import _shot

    comp = rows(served.db, "comparisons", "WHERE participant_id = ? ORDER BY position", (pid,))[0]
    seed = rows(served.db, "participants", "WHERE id = ?", (pid,))[0]["seed"] % 2**31
    shots = tuple(_shot(pid, o) for o in onboarding)
    ep = Episode("x", "x", shots, Preference("t", "x", comp["question"], "", ""), len(shots))
    (again,) = env.answerer.generate_answers(env.sides[0], [ep], seed)
    assert again["response"] == comp["personalized"] and again["description"] == comp["description"]
    assert answer_prompt(ep, len(shots), again["description"]) == comp["personalized_prompt"]
    # Consistency: the same pair, sides swapped; agreement means the same response picked again.
    for c in rows(served.db, "consistency", "WHERE participant_id = ?", (pid,)):
        (o,) = [o for o in onboarding if o["id"] == c["onboarding_id"]]
        assert (c["option_a"], c["option_b"]) == (o["option_b"], o["option_a"])
        assert c["agrees"] == int(c["choice"] != o["choice"])


def test_forged_repeated_and_foreign_ids_are_refused_and_nothing_is_written(served):
    a, b = Participant(served.url).start(), Participant(served.url).start()
    first = a.field("item")
    a.answer("A")
    unseen = rows(served.db, "onboarding", "WHERE participant_id = ? AND shown_at IS NULL",
                  (participant_id(served.db, a.token),))[0]["item"]
    before = dump(served.db)
    csrf = a.field("csrf")
    cases = [
        ({"csrf": csrf, "item": first, "choice": "B"}, 409),  # repeated: already answered
        ({"csrf": csrf, "item": unseen, "choice": "A"}, 409),  # never shown to them
        ({"csrf": csrf, "item": b.field("item"), "choice": "A"}, 404),  # another participant's question
        ({"csrf": csrf, "item": "A" * 16, "choice": "A"}, 404),  # made up
        ({"csrf": csrf, "item": "'; DROP TABLE onboarding; --", "choice": "A"}, 400),
        ({"csrf": csrf, "item": a.field("item"), "choice": "tie"}, 400),  # no tie in onboarding
        ({"csrf": csrf, "item": a.field("item"), "choice": "C"}, 400),
        ({"csrf": csrf, "choice": "A"}, 400),
    ]
    for fields, status in cases:
        got, _ = a.request("/answer", fields)
        assert got == status, (fields, got)
    # The same field twice, a huge body, not a form: refused too.
    assert a.request("/answer", raw=f"csrf={csrf}&item={a.field('item')}&choice=A&choice=B".encode())[0] == 400
    assert a.request("/answer", raw=b"x" * 20000)[0] == 413
    assert a.request("/answer", raw=json.dumps({"csrf": csrf}).encode(),
                     headers={"Content-Type": "application/json"})[0] == 415
    assert dump(served.db) == before
    # b answering with a's page state changes nothing of a's either, and b's own answer still works.
    assert b.request("/answer", {"csrf": b.field("csrf"), "item": a.field("item"), "choice": "A"})[0] == 404
    b.answer("B")
    assert dump(served.db)["onboarding"] != before["onboarding"]


def test_posts_need_the_participants_csrf_token(served):
    a, b = Participant(served.url).start(), Participant(served.url).start()
    before = dump(served.db)
    item = a.field("item")
    assert a.request("/answer", {"item": item, "choice": "A"})[0] == 403  # missing
    assert a.request("/answer", {"csrf": "x" * 32, "item": item, "choice": "A"})[0] == 403  # wrong
    assert a.request("/answer", {"csrf": b.field("csrf"), "item": item, "choice": "A"})[0] == 403  # b's
    stranger = Participant(served.url)  # no cookie: not a participant
    assert stranger.request("/answer", {"csrf": a.field("csrf"), "item": item, "choice": "A"})[0] == 403
    _, landing = stranger.request("/")
    assert stranger.request("/start", {"start": "forged-nonce"})[0] == 403  # the start form's nonce
    assert stranger.request("/status")[0] == 403
    assert dump(served.db) == before
    assert 'action="/start"' in landing and len(rows(served.db, "participants")) == 2
    # Cookies are HttpOnly and SameSite=Strict; pages forbid foreign scripts and framing.
    resp = urllib.request.urlopen(served.url, timeout=30)
    assert "SameSite=Strict" in resp.headers["Set-Cookie"] and "HttpOnly" in resp.headers["Set-Cookie"]
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert not re.search(r'(src|href)="(https?:)?//', landing)  # no external assets


def test_resume_link_and_unknown_pages(served):
    a = Participant(served.url).start()
    a.answer("A")
    again = Participant(served.url)  # another browser, with the participant's link
    status, page = again.request(f"/p/{a.token}")
    assert status == 200 and again.token == a.token
    again.page = page
    assert again.field("item") == a.field("item")  # the same next question
    assert again.request("/p/" + "x" * 32)[0] == 404
    assert again.request("/nope")[0] == 404
    assert again.request("/static/../study.py")[0] == 404


def test_report_on_empty_and_filled_databases(served, tmp_path):
    # A database just created by `serve`, and an empty file: reports with n = 0.
    for db in (served.db, tmp_path / "empty.sqlite"):
        Path(db).touch()
        rep = study_report(db)
        assert rep["n"] == 0 and rep["winrate"] is None and rep["participants"] == 0 and rep["ci95"] is None
        paths = write_report(rep, tmp_path / "r0.json")
        assert json.loads(paths[0].read_text())["n"] == 0 and paths[1].stat().st_size > 0
    people = [Participant(served.url).start() for _ in range(3)]
    for i, p in enumerate(people):
        p.run(lambda kind, step, i=i: pick_pattern(kind, step + i))
    rep = study_report(served.db)
    wins = ties = n = agree = checks = 0
    for p in people:
        pid = participant_id(served.db, p.token)
        comps = rows(served.db, "comparisons", "WHERE participant_id = ?", (pid,))
        wins += sum(c["winner"] == "personalized" for c in comps)
        ties += sum(c["winner"] == "tie" for c in comps)
        n += len(comps)
        cons = rows(served.db, "consistency", "WHERE participant_id = ?", (pid,))
        agree, checks = agree + sum(c["agrees"] for c in cons), checks + len(cons)
        row = next(r for r in rep["per_participant"] if r["participant"] == pid)
        assert row["n"] == COMPARISONS and row["description_fits"] is False  # pick_pattern says "no"
    assert rep["n"] == n == 3 * COMPARISONS and rep["participants"] == 3
    assert rep["winrate"] == pytest.approx((wins + 0.5 * ties) / n)
    assert rep["self_consistency"] == {"agreement": agree / checks, "agree": agree, "n": checks}
    assert rep["description_fit"] == {"rate": 0.0, "yes": 0, "n": 3}
    lo, hi = rep["ci95"]
    assert lo <= rep["winrate"] <= hi and "participants" in rep["ci95_method"]
    assert study_report(served.db) == rep  # the bootstrap is seeded


def test_cluster_bootstrap_resamples_participants_not_comparisons():
    from fspo_engine.engine.study import _summarize

    def person(pid, wins, losses):
        return {"participant": pid, "n": wins + losses, "wins": wins, "ties": 0, "losses": losses,
                "self_consistency": {"agree": 0, "n": 0}, "description_fits": None, "failed_generations": 0,
                "finished": True}

    # Two people who disagree completely: 40 comparisons look decisive, 2 participants do not.
    rep = _summarize([person(1, 20, 0), person(2, 0, 20)], {}, seed=0)
    assert rep["winrate"] == 0.5 and rep["n"] == 40
    assert rep["ci95"][0] <= 0.01 and rep["ci95"][1] >= 0.99
    # Many people who agree: a tight interval.
    rep = _summarize([person(i, 4, 1) for i in range(30)], {}, seed=0)
    assert rep["ci95"] == [pytest.approx(0.8), pytest.approx(0.8)]


def test_a_model_directory_and_another_model_as_the_baseline(env, tmp_path):
    """--model takes a plain HF directory (no descriptions: no description question); --baseline DIR answers
    with the same shots as the personalised side."""
    from helpers import make_tiny_model_dir

    from fspo_engine.engine.winrate import plan_sides

    hf = make_tiny_model_dir(tmp_path / "hf", vocab_size=320)
    for model, baseline in ((hf, "zero-shot"), (env.run, str(hf))):
        sides = plan_sides(str(model), baseline, SHOTS, None)
        with serving(tmp_path / f"{model.name}.sqlite", model, env.data, env.dataset, sides,
                     LocalAnswerer(sides, device="cpu", **GEN), baseline=baseline) as s:
            p = Participant(s.url).start()
            p.run(pick_pattern)
            comps = rows(s.db, "comparisons")
            kinds = [k for k, *_ in p.given]
        assert len(comps) == COMPARISONS and all(c["status"] == "ready" for c in comps)
        if model == hf:
            assert "description" not in kinds and all(c["description"] is None for c in comps)
            assert all("# Example" not in c["baseline_prompt"] for c in comps)
        else:
            assert kinds[-1] == "description" and all(c["baseline_description"] is None for c in comps)
            assert all(c["baseline_prompt"].count("# Example") == SHOTS for c in comps)  # the same shots


def test_a_database_keeps_its_study_settings(env, tmp_path):
    config = StudyConfig(model=str(env.run), data=str(env.data), shots=SHOTS, comparisons=COMPARISONS, **GEN)
    Study(tmp_path / "s.sqlite", config, env.dataset, "generated")
    Study(tmp_path / "s.sqlite", config, env.dataset, "generated")  # the same study: fine
    from fspo_engine.engine.errors import FspoError

    with pytest.raises(FspoError, match="other settings.*shots"):
        Study(tmp_path / "s.sqlite", StudyConfig(model=str(env.run), data=str(env.data), shots=SHOTS + 1,
                                                 comparisons=COMPARISONS, **GEN), env.dataset, "generated")


# ---------------------------------------------------------------------------- the CLI, as a real process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(env, db: Path, port: int, log: Path, *extra) -> subprocess.Popen:
    """`fspo-engine study serve` exactly as the contract writes it, waited for until it answers."""
    cmd = [sys.executable, "-m", "fspo_engine.cli.main", "study", "serve", "--model", str(env.run), "--data",
           str(env.data), "--db", str(db), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]
                assert b"<!doctype html>" in r.read()[:100]
                return proc
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "the server never answered"
            time.sleep(0.2)


@pytest.mark.slow
def test_kill9_mid_study_then_restart_loses_nothing(env, tmp_path):
    db, log, port = tmp_path / "F.sqlite", tmp_path / "serve.log", free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_serve(env, db, port, log)
    try:
        p = Participant(url).start()
        config = StudyConfig("m", "d")  # the contract's defaults: 8 shots, 10 comparisons
        for _ in range(config.shots):  # onboarding done: generation starts in the background...
            p.answer("AB"[len(p.given) % 2])
        proc.kill()  # ...and the server dies at once (SIGKILL), likely mid-generation
        proc.wait(timeout=30)
        pid = participant_id(db, p.token)
        assert answers_in_db(db, pid) == p.given
        before = dump(db)

        proc = start_serve(env, db, port, log)
        assert dump(db)["onboarding"] == before["onboarding"]
        q = Participant(url)  # the tab was closed: the participant comes back with their link
        _, q.page = q.request(f"/p/{p.token}")
        q.given = list(p.given)
        q.run(pick_pattern)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answers_in_db(db, pid) == q.given
    assert len(q.given) == config.shots + config.n_checks + config.comparisons + 1
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0  # checkpointed on stop

    from click.testing import CliRunner

    from fspo_engine.cli.main import cli

    out = tmp_path / "R.json"
    res = CliRunner().invoke(cli, ["study", "report", "--db", str(db), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    winners = [c["winner"] for c in rows(db, "comparisons")]
    assert rep["n"] == config.comparisons == len(winners)
    assert rep["winrate"] == pytest.approx((winners.count("personalized") + 0.5 * winners.count("tie")) / len(winners))
    assert out.with_suffix(".png").stat().st_size > 0


def cli(*args):
    from click.testing import CliRunner

    from fspo_engine.cli.main import cli as main

    res = CliRunner().invoke(main, list(map(str, args)))
    return SimpleNamespace(code=res.exit_code, err=res.stderr, out=res.stdout)


def test_bad_input_is_one_line(env, tmp_path):
    base = ["study", "serve", "--model", env.run, "--data", env.data, "--db", tmp_path / "s.sqlite", "--port", "0"]
    not_db = tmp_path / "not.sqlite"
    not_db.write_text("hello, not a database " * 100)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        (["study", "serve", "--model", tmp_path / "nope", "--data", env.data, "--db", tmp_path / "a.sqlite"],
         "not a model directory"),
        (["study", "serve", "--model", env.run, "--data", tmp_path / "nodata", "--db", tmp_path / "a.sqlite"],
         "not a dataset directory"),
        (["study", "serve", "--model", env.run, "--data", env.data, "--db", not_db], "not"),
        (["study", "serve", "--model", env.run, "--data", env.data, "--db", tmp_path / "no" / "s.sqlite"],
         "does not exist"),
        (base + ["--shots", "30"], "distinct questions"),
        (base + ["--generator-url", "http://127.0.0.1:9/v1"], "go together"),
        (base + ["--baseline", "oracle-description"], "oracle-description"),
        (base + ["--baseline", tmp_path / "nope"], "not a model directory"),
        (base[:-1] + [str(busy.getsockname()[1])], "cannot listen"),
        (["study", "report", "--db", tmp_path / "missing.sqlite", "--out", tmp_path / "r.json"], "no such"),
        (["study", "report", "--db", not_db, "--out", tmp_path / "r.json"], "not"),
    ]
    try:
        for args, message in cases:
            res = cli(*args)
            assert res.code == 1, (args, res.out, res.err)
            lines = res.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, res.err)
            assert "Traceback" not in res.err
    finally:
        busy.close()
    assert not (tmp_path / "r.json").exists()


def test_remote_generation_sends_the_local_paths_prompt_ids(env):
    """--generator-url: the server gets exactly the token ids the local model would continue (description
    first, then the response after it); the real client also runs end to end over a local HF transport."""
    client = pytest.importorskip("fspo_engine.data_gen.client", reason="data_gen/client.py (issue 25) not here")
    from fspo_engine.engine.dataset import Preference
    from fspo_engine.engine.episodes import Episode, render_prompt
    from fspo_engine.engine.study import RemoteAnswerer
    from fspo_engine.engine.tokenizer import load_tokenizer

    sent = []

    class Recorder:
        async def complete(self, prompt, *, stage, max_tokens, seed, temperature, top_p, stop=None):
            sent.append({"prompt": prompt, "stop": stop, "max_tokens": max_tokens, "seed": seed})
            return client.Reply(" likes short reviews \n## Preferred Response" if stop else " Fine. ")

        async def aclose(self):
            pass

    shots = (Preference("s1", "p", "Would you recommend the lamp?", "Yes.", "No, and here is why."),
             Preference("s2", "p", "Review the mug.", "A solid mug.", "Meh."))
    ep = Episode("p/1", "p", shots, Preference("t", "p", "What do you think of the tent?", "", ""), 2)
    remote = RemoteAnswerer(env.sides, "http://127.0.0.1:9/v1", "m", client_factory=Recorder, **GEN)
    (out,) = remote.generate_answers(env.sides[0], [ep], 7)
    tok = load_tokenizer(env.sides[0].model_dir)
    head = [tok.bos_id] + tok.encode(render_prompt(shots, ep.target.question, True))
    assert sent[0] == {"prompt": head + tok.encode("## User Description\n"), "stop": ["## Preferred Response"],
                       "max_tokens": GEN["max_description_tokens"], "seed": 7}
    assert sent[1]["prompt"] == head + tok.encode("## User Description\nlikes short reviews\n## Preferred Response \n")
    assert out["description"] == "likes short reviews" and out["response"] == "Fine."
    assert out["prompt"] == answer_prompt(ep, 2, "likes short reviews")  # the text LocalAnswerer records too
    sent.clear()
    remote.generate_answers(env.sides[1], [ep], 7)  # the zero-shot baseline: no shots in either request
    zero = [tok.bos_id] + tok.encode(render_prompt((), ep.target.question, True))
    assert [r["prompt"][:len(zero)] for r in sent] == [zero, zero]
    remote.close()

    real = RemoteAnswerer(env.sides, None, "m", **GEN,
                          client_factory=lambda: client.LLMClient(model="m", hf_model_dir=env.sides[0].model_dir))
    (out,) = real.generate_answers(env.sides[0], [ep], 7)
    assert isinstance(out["response"], str) and isinstance(out["description"], str)
    real.close()
