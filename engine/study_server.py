"""The study's web page over the standard library's `http.server` (engine/study.py holds the state).

Why no web framework: the page is five server-rendered forms and one poll. `ThreadingHTTPServer` serves
them, one thread per request, so the page answers while a worker thread generates; SQLite serialises the
writes. Every page works without JavaScript; study_page/study.js only stops double submits and polls while
answers are being prepared. CSS and JS come from the package (no CDN: the machine may be offline).

Routes
    GET  /            landing page (a participant with a cookie goes on to /study)
    POST /start       a new participant: sets their token cookie
    GET  /p/TOKEN     resume with a token on another browser (sets the cookie)
    GET  /study       the participant's next step
    POST /answer      one answer: fields csrf, item, choice
    GET  /status      {"state": ...}: what comes next, for the "preparing answers" poll
    GET  /static/...  study.css, study.js

Security: the token lives in an HttpOnly, SameSite=Strict cookie (and the participant's own resume link);
every POST carries the participant's CSRF token (a double-submit nonce before they exist); every answer is
checked against what that participant was shown (study.Study.submit); pages send a strict
Content-Security-Policy (scripts and styles from this server only) and are not cached.
"""

from __future__ import annotations

import html
import json
import re
import secrets
import signal
import socket
import sys
import threading
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from string import Template
from urllib.parse import parse_qs, urlsplit

from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.study import Participant, Rejected, Study

PAGE_DIR = Path(__file__).parent / "study_page"
STATIC = {"study.css": "text/css; charset=utf-8", "study.js": "text/javascript; charset=utf-8"}
COOKIE = "fspo_study"
START_COOKIE = "fspo_start"
MAX_BODY = 16 * 1024
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_TOKEN_IN_PATH = re.compile(r"/p/[^ ?]+")


class StudyServer:
    """The HTTP server of one study, bound at construction (so a busy port fails before anything else)."""

    def __init__(self, study: Study, host: str = "127.0.0.1", port: int = 8080):
        handler = type("StudyHandler", (_Handler,), {"study": study, "page": _page_template(),
                                                      "static": {n: (PAGE_DIR / n).read_bytes() for n in STATIC}})
        server_cls = type("StudyHTTPServer", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True})
        try:
            self.httpd = server_cls((host, port), handler)
        except OSError as exc:
            raise FspoError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> StudyServer:
        """Serve from a background thread (tests, notebooks); `stop` ends it."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="study-http", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()


def serve(study: Study, worker, host: str, port: int, log=print):
    """Serve until SIGINT or SIGTERM, with `worker` generating answers; then stop cleanly (the database is
    checkpointed into one file)."""
    server = StudyServer(study, host, port)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    worker.start()
    counts = study.counts()
    log(f"study: serving {server.url} (database {study.db}: {counts['participants']} participants, "
        f"{counts['pending']} answers pending); Ctrl-C stops")
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.httpd.server_close()
        worker.stop(timeout=10)
        study.close()
        log("study: stopped")


def _page_template() -> Template:
    return Template((PAGE_DIR / "page.html").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# Requests


class _Handler(BaseHTTPRequestHandler):
    study: Study
    page: Template
    static: dict[str, bytes]
    server_version = "fspo-study"
    sys_version = ""
    timeout = 60  # seconds a client may take to send a request: a stalled one frees its thread

    # --- plumbing -------------------------------------------------------------------------------------
    def log_request(self, code="-", size="-"):
        pass  # one line per request would drown the terminal (and must never show a token)

    def log_message(self, format, *args):
        sys.stderr.write("study: " + _TOKEN_IN_PATH.sub("/p/…", format % args) + "\n")

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        for k, v in {**HEADERS, "Content-Type": ctype, "Content-Length": str(len(body)), **(headers or {})}.items():
            if isinstance(v, list):
                for item in v:
                    self.send_header(k, item)
            else:
                self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _html(self, status: int, page: str, title: str, body: str, head: str = "", cookies: list[str] = ()):
        text = self.page.substitute(title=html.escape(title), page=page, body=body, head=head)
        self._send(status, text.encode("utf-8"), "text/html; charset=utf-8",
                   {"Set-Cookie": list(cookies)} if cookies else None)

    def _redirect(self, where: str, cookies: list[str] = ()):
        headers = {"Location": where}
        if cookies:
            headers["Set-Cookie"] = list(cookies)
        self._send(303, b"", "text/plain; charset=utf-8", headers)

    def _error(self, status: int, message: str):
        self._html(status, "error", "Study", f"<h1>Sorry</h1><p class='notice'>{html.escape(message)}</p>"
                                             "<p><a href='/study'>Back to the study</a></p>")

    def _cookies(self) -> dict[str, str]:
        try:
            jar = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return {}
        return {k: m.value for k, m in jar.items()}

    def _participant(self) -> tuple[str | None, Participant | None]:
        token = self._cookies().get(COOKIE)
        return token, self.study.participant(token)

    def _form(self) -> dict[str, str] | None:
        """The POSTed form (each field once), or None after answering the error."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "a form must say its length")
            return None
        if int(length) > MAX_BODY:
            self._error(413, "form too large")
            return None
        body = self.rfile.read(int(length))
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            self._error(415, "expected a form (application/x-www-form-urlencoded)")
            return None
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            self._error(400, "malformed form")
            return None
        if any(len(v) != 1 for v in fields.values()):
            self._error(400, "a field was sent twice")
            return None
        return {k: v[0] for k, v in fields.items()}

    def _guard(self, fn):
        try:
            fn()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the server; the participant sees a 500
            self.log_message("error on %s %s: %s: %s", self.command, self.path, type(exc).__name__, exc)
            try:
                self._error(500, "the server failed on this request; please reload the page")
            except OSError:
                pass

    # --- routes -----------------------------------------------------------------------------------------
    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self):
        path = urlsplit(self.path).path
        if path == "/":
            return self._landing()
        if path == "/study":
            return self._study()
        if path == "/status":
            _, p = self._participant()
            if p is None:
                return self._send(403, b'{"error": "no participant"}', "application/json")
            return self._send(200, json.dumps({"state": self.study.state(p)}).encode(), "application/json")
        if path.startswith("/p/"):
            token = path[3:]
            if self.study.participant(token) is None:
                return self._error(404, "no study with this link")
            return self._redirect("/study", [_cookie(COOKIE, token, 30 * 86400)])
        if path.startswith("/static/") and path[8:] in STATIC:
            return self._send(200, self.static[path[8:]], STATIC[path[8:]], {"Cache-Control": "max-age=300"})
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        return self._error(404, "no such page")

    def _post(self):
        path = urlsplit(self.path).path
        if path not in ("/start", "/answer"):
            return self._error(404, "no such page")
        form = self._form()
        if form is None:
            return
        if path == "/start":
            return self._start(form)
        _, p = self._participant()
        if p is None:
            return self._error(403, "no participant: start the study from its first page")
        if not p.check_csrf(form.get("csrf")):
            return self._error(403, "this form is stale or was not sent by the study page; please reload")
        try:
            self.study.submit(p, form.get("item"), form.get("choice"))
        except Rejected as exc:
            return self._error(exc.status, str(exc))
        self._redirect("/study")

    def _landing(self):
        _, p = self._participant()
        if p is not None:
            return self._redirect("/study")
        nonce = secrets.token_urlsafe(16)
        cfg = self.study.config
        body = f"""<h1>A study of personalised answers</h1>
<div class="notice">
<p>First you will see {cfg.shots} questions, each with two responses: pick the one <em>you</em> prefer.
From your picks, a language model learns what you like.</p>
<p>Then, for {cfg.comparisons} new questions, you will see two answers side by side and say which suits you
better (or that they are about the same). A few questions may come back: answer as you feel at the time.</p>
<p>No name or other personal data is asked. You can close the tab and come back later in the same browser.</p>
</div>
<form method="post" action="/start" class="choices">
<input type="hidden" name="start" value="{nonce}">
<p><button type="submit" id="start">Start</button></p>
</form>"""
        self._html(200, "landing", "Preference study", body, cookies=[_cookie(START_COOKIE, nonce, 3600)])

    def _start(self, form):
        _, p = self._participant()
        if p is not None:  # a second click, or a participant who came back to the first page
            return self._redirect("/study")
        nonce = self._cookies().get(START_COOKIE)
        if not nonce or not secrets.compare_digest(nonce.encode(), form.get("start", "").encode()):
            return self._error(403, "this form is stale or was not sent by the study page; please reload it")
        token, _ = self.study.new_participant()
        self._redirect("/study", [_cookie(COOKIE, token, 30 * 86400), _cookie(START_COOKIE, "", 0)])

    def _study(self):
        token, p = self._participant()
        if p is None:
            return self._redirect("/")
        view = self.study.current(p)
        kind = view["kind"]
        head = ""
        if kind in ("onboarding", "consistency"):
            body = _pair_page(view, p, "Which response do you prefer?", "Pick the response you would rather get.",
                              [("A", "I prefer A"), ("B", "I prefer B")], tie=None)
        elif kind == "comparisons":
            body = _pair_page(view, p, "Which answer suits you better?",
                              "Two answers to a question. Pick the one you would rather get, from what you showed "
                              "you like.", [("A", "A is better"), ("B", "B is better")], tie=("tie", "About the same"))
        elif kind == "description_fit":
            body = f"""{_progress(view)}<h1>One last question</h1>
<p class="hint">From your choices, the model described you like this:</p>
<div class="question" id="description">{html.escape(view["description"])}</div>
<form method="post" action="/answer" class="choices">{_hidden(view, p)}
<p>Does this fit you? <button type="submit" name="choice" value="yes" id="choose-yes">Yes</button>
<button type="submit" name="choice" value="no" id="choose-no" class="secondary">No</button></p>
</form>"""
        elif kind == "preparing":
            head = '<noscript><meta http-equiv="refresh" content="4"></noscript>'
            body = f"""{_progress(view)}<h1>Preparing answers…</h1>
<p class="notice"><span class="spinner"></span>The model is writing answers for you from your choices. This page
goes on by itself when they are ready.</p>"""
        else:
            body = """<h1>Thank you!</h1><p class="notice" id="done">You have answered every question of the
study. You may close this page.</p>"""
        body += f"""<footer>Your resume link (keep it private): <code>http://{html.escape(self.headers.get('Host', ''))}/p/{html.escape(token)}</code></footer>"""
        page = {"onboarding": "preference", "consistency": "preference", "comparisons": "comparison",
                "description_fit": "description"}.get(kind, kind)  # a check looks like any other pair
        self._html(200, page, "Preference study", body, head)


def _cookie(name: str, value: str, max_age: int) -> str:
    return f"{name}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict"


def _hidden(view: dict, p: Participant) -> str:
    return (f'<input type="hidden" name="csrf" value="{html.escape(p.csrf)}">'
            f'<input type="hidden" name="item" value="{html.escape(view["item"])}">')


def _progress(view: dict) -> str:
    # A <progress> element, not a styled bar: the CSP allows no inline style attributes.
    return (f'<div class="progress">Step {view["step"]} of {view["steps"]}'
            f'<progress value="{view["step"] - 1}" max="{max(view["steps"], 1)}"></progress></div>')


def _pair_page(view: dict, p: Participant, title: str, hint: str, buttons, tie) -> str:
    """A question and two responses side by side, one button under each (and a tie button)."""
    cols = []
    for (value, label), text in zip(buttons, (view["option_a"], view["option_b"])):
        cols.append(f"""<div class="option" id="option-{value}"><h2>{value}</h2>
<div class="text">{html.escape(text or "")}</div>
<button type="submit" name="choice" value="{value}" id="choose-{value}">{label}</button></div>""")
    tie_html = "" if tie is None else \
        f'<div class="tie"><button type="submit" name="choice" value="{tie[0]}" id="choose-{tie[0]}" ' \
        f'class="secondary">{tie[1]}</button></div>'
    return f"""{_progress(view)}<h1>{title}</h1><p class="hint">{hint}</p>
<div class="question" id="question">{html.escape(view["question"])}</div>
<form method="post" action="/answer" class="choices">{_hidden(view, p)}
<div class="options">{"".join(cols)}</div>{tie_html}
</form>"""


__all__ = ["StudyServer", "serve"]
