"""The study page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, installed by
.ci/run) driven by selenium. A participant clicks through onboarding, the consistency checks, the comparisons
(waiting on the "preparing answers" page, whose script polls) and the description question; the database
and the report then hold exactly those clicks. Every page is saved as a PNG under the test's tmp dir and, when
FSPO_ARTIFACTS is set, copied to $FSPO_ARTIFACTS/study/.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_study import COMPARISONS, GEN, SHOTS, participant_id, rows, study_files

from fspo_engine.engine.study import LocalAnswerer, Study, StudyConfig, Worker, study_report
from fspo_engine.engine.study_server import StudyServer


def _browser():
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs Chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,860",
                "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    # The driver's path is given, so selenium never goes looking for (or downloading) one.
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture
def browser():
    b = _browser()
    yield b
    b.quit()


class Slow:
    """An answerer that takes a while, as a real model does: the participant meets "Preparing answers…"."""

    def __init__(self, answerer, seconds: float = 2.0):
        self.answerer, self.seconds = answerer, seconds

    def generate_answers(self, side, episodes, seed):
        time.sleep(self.seconds)
        return self.answerer.generate_answers(side, episodes, seed)


@pytest.fixture
def served(tmp_path_factory, tmp_path):
    from fspo_engine.engine.episodes import load_dataset
    from fspo_engine.engine.winrate import plan_sides

    files = study_files(tmp_path_factory)
    sides = plan_sides(str(files.run), "zero-shot", SHOTS, None)
    config = StudyConfig(model=str(files.run), data=str(files.data), shots=SHOTS, comparisons=COMPARISONS, **GEN)
    study = Study(tmp_path / "study.sqlite", config, load_dataset(files.data), sides[0].description)
    worker = Worker(study, Slow(LocalAnswerer(sides, device="cpu", **GEN)), sides, log=lambda msg: None)
    study.on_onboarded = worker.wake
    worker.start()
    server = StudyServer(study, "127.0.0.1", 0).start()
    yield study, server.url
    server.stop()
    worker.stop(timeout=30)
    study.close()


def click_and_wait(browser, element_id: str):
    """Click, then wait until another page has replaced this one and loaded. The old page is marked with a
    global that a new document does not have (Chromium may answer a check on a replaced node with an
    inspector error rather than "stale element", so selenium's staleness_of is not enough)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("window.__studyOldPage = true")
    browser.find_element(By.ID, element_id).click()
    WebDriverWait(browser, 30, poll_frequency=0.05, ignored_exceptions=[WebDriverException]).until(
        lambda d: d.execute_script("return !window.__studyOldPage && document.readyState === 'complete'"))


def wait_while_preparing(browser):
    """The "preparing" page reloads itself (study.js) once the next question is ready."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 120, poll_frequency=0.1, ignored_exceptions=[WebDriverException]).until(
        lambda d: d.execute_script("return document.readyState === 'complete' && document.body.dataset.page")
        != "preparing")


def _text(el) -> str:
    return " ".join(el.text.split())


def test_a_participant_clicks_through_the_study(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    study, url = served
    shots_dir = tmp_path / "screens"
    shots_dir.mkdir()
    page = lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-page")
    saved = []

    def screenshot(name):
        path = shots_dir / f"{len(saved):02d}-{name}.png"
        browser.save_screenshot(str(path))
        saved.append(path)

    browser.get(url)
    screenshot("landing")
    click_and_wait(browser, "start")
    clicks = []  # (page, item, choice, texts shown)
    seen_preparing = False
    while page() != "done":
        kind = page()
        screenshot(kind)
        if kind == "preparing":
            seen_preparing = True
            wait_while_preparing(browser)
            continue
        item = browser.find_element(By.NAME, "item").get_attribute("value")
        if kind == "preference":
            choice = "AB"[len(clicks) % 2]
            shown = (_text(browser.find_element(By.ID, "question")),
                     _text(browser.find_element(By.CSS_SELECTOR, "#option-A .text")),
                     _text(browser.find_element(By.CSS_SELECTOR, "#option-B .text")))
        elif kind == "comparison":
            choice = ("A", "B", "tie")[len(clicks) % 3]
            shown = (_text(browser.find_element(By.ID, "question")),
                     _text(browser.find_element(By.CSS_SELECTOR, "#option-A .text")),
                     _text(browser.find_element(By.CSS_SELECTOR, "#option-B .text")))
        else:
            assert kind == "description", kind
            choice, shown = "yes", (_text(browser.find_element(By.ID, "description")),)
        clicks.append((kind, item, choice, shown))
        click_and_wait(browser, f"choose-{choice}")
    screenshot("done")

    # The database holds exactly the clicks, each against what the page showed.
    db = study.db
    pid = participant_id(db, browser.get_cookie("fspo_study")["value"])
    norm = lambda s: " ".join(s.split())
    by_item = {}
    for table in ("onboarding", "consistency", "comparisons", "description_fit"):
        for r in rows(db, table, "WHERE participant_id = ?", (pid,)):
            by_item[r["item"]] = (table, r)
    assert len(by_item) == len(clicks) == SHOTS + 1 + COMPARISONS + 1  # one consistency check at 3 shots
    for _, item, choice, shown in clicks:
        table, r = by_item[item]
        assert r["choice"] == choice and r["answered_at"] is not None and r["shown_at"] <= r["answered_at"]
        if table == "onboarding":
            assert shown == (norm(r["question"]), norm(r["option_a"]), norm(r["option_b"]))
        elif table == "consistency":
            assert shown[1:] == (norm(r["option_a"]), norm(r["option_b"]))
        elif table == "comparisons":
            ours, theirs = norm(r["personalized"]), norm(r["baseline"])
            assert shown == ((norm(r["question"]), ours, theirs) if r["personalized_side"] == "A"
                             else (norm(r["question"]), theirs, ours))
        else:
            assert table == "description_fit" and shown == (norm(r["description"]),)
    assert [k for k, *_ in clicks[:SHOTS]] == ["preference"] * SHOTS
    assert seen_preparing  # and its script took the participant on when the answers were ready

    # The report counts those clicks and nothing else.
    rep = study_report(db)
    winners = [by_item[item][1]["winner"] for kind, item, *_ in clicks if kind == "comparison"]
    assert rep["n"] == COMPARISONS and rep["participants"] == 1
    assert (rep["wins"], rep["ties"], rep["losses"]) == (winners.count("personalized"), winners.count("tie"),
                                                         winners.count("baseline"))
    assert rep["description_fit"] == {"rate": 1.0, "yes": 1, "n": 1}
    assert rep["self_consistency"]["n"] == 1

    out = os.environ.get("FSPO_ARTIFACTS")
    if out:
        dest = Path(out) / "study"
        dest.mkdir(parents=True, exist_ok=True)
        for path in saved:
            shutil.copy(path, dest / path.name)
    assert all(p.stat().st_size > 1000 for p in saved)
