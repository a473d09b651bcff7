"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the LLM-backend tests.

It answers the pipeline's request kinds (the first line of the user message, "Task: ...") with a
tiny rule-based "model":
- views: three views, "brief", "lengthy" and "biased";
- respond: a response tagged with its view, e.g. "[brief] ...";
- judge: prefers the [brief] response if the description says "prefers brief answers" (and
  [lengthy] for "prefers lengthy answers"), otherwise "tie"; any pair with a [biased] response gets
  "A" whatever the order (a position-biased judge, so the pipeline must drop it as an order flip);
- improve persona: adds "They prefer brief answers."

Knobs: `delay_s` per request (so concurrency can build up), `script` (HTTP statuses returned, in
order, before normal answers), `raw` (200 bodies (bytes, content type) returned, in order, instead of
chat completions: broken proxies), `error_message` (the text of scripted errors, from the status and
the Authorization header), `reply` (override the content; None gives a null content), and counters
of what was seen.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    # The stdlib default listen backlog is 5: at --concurrency 64 the kernel refuses connections, the
    # client retries, and tests see retries no real server would cause.
    request_queue_size = 128


def rule_based_reply(messages: list[dict]) -> str:
    text = messages[-1]["content"]
    kind = text.splitlines()[0].removeprefix("Task: ").strip()
    if kind == "views":
        return json.dumps({"views": ["brief", "lengthy", "biased"]})
    if kind == "respond":
        question = re.search(r"Question: (.*)", text).group(1)
        view = re.search(r"taking this view: (.*)", text)
        tag = view.group(1).strip() if view else "persona"
        body = "ok." if tag == "brief" else "this is a long and careful answer with many words in it."
        return "```json\n" + json.dumps({"response": f"[{tag}] {body} ({question})"}) + "\n```"
    if kind == "judge":
        desc = re.search(r"User description: (.*)", text).group(1)
        a = re.search(r"Response A: (.*)", text).group(1)
        b = re.search(r"Response B: (.*)", text).group(1)
        if "[biased]" in a or "[biased]" in b:
            verdict = "A"
        elif "prefers brief answers" in desc.lower() or "prefer brief answers" in desc.lower():
            verdict = "A" if "[brief]" in a else "B" if "[brief]" in b else "tie"
        else:
            verdict = "tie"
        return json.dumps({"reason": "rule", "preferred": verdict})
    if kind == "improve persona":
        return json.dumps({"trait": "They prefer brief answers"})
    return json.dumps({"echo": text[:50]})


class FakeLLMServer:
    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.script: list[int] = []  # statuses to return before answering normally
        self.raw: list[tuple[bytes, str]] = []  # 200 bodies (bytes, content type) to return, in order
        self.error_message = lambda status, auth: f"scripted {status}"
        self.reply = rule_based_reply  # messages -> content string
        self.lock = threading.Lock()
        self.requests = 0  # HTTP requests received (including scripted failures)
        self.answered = 0
        self.inflight = 0
        self.max_inflight = 0
        self.kinds: dict[str, int] = {}
        self.auth_headers: set[str] = set()
        self.seen: list[tuple[str, str]] = []  # (model, last message) of every answered request
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                    server.auth_headers.add(self.headers.get("Authorization", ""))
                    status = server.script.pop(0) if server.script else 200
                    raw = server.raw.pop(0) if status == 200 and server.raw else None
                try:
                    time.sleep(server.delay_s)
                    if status != 200:
                        message = server.error_message(status, self.headers.get("Authorization", ""))
                        payload = {"error": {"message": message, "type": "test", "code": status}}
                        self._send(status, payload, {"Retry-After": "0"})
                        return
                    if raw is not None:
                        self._send_bytes(200, raw[0], raw[1])
                        return
                    content = server.reply(body["messages"])
                    kind = body["messages"][-1]["content"].splitlines()[0]
                    with server.lock:
                        server.answered += 1
                        server.kinds[kind] = server.kinds.get(kind, 0) + 1
                        server.seen.append((body["model"], body["messages"][-1]["content"]))
                    self._send(
                        200,
                        {
                            "id": "chatcmpl-test",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content},
                                }
                            ],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                        },
                    )
                finally:
                    with server.lock:
                        server.inflight -= 1

            def _send(self, status, payload, headers=None):
                self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_bytes(self, status, data, content_type, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
