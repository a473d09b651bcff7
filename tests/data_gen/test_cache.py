"""data_gen/cache.py: one SQLite reply cache, batched writes, kill -9 safety, the sent log."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from fspo_engine.data_gen.cache import FILENAME, ReplyCache, request_key


def key(i: int) -> str:
    return request_key({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "attempt": 0})


def test_key_is_canonical_and_handles_lone_surrogates():
    a = request_key({"b": 1, "a": [1, 2]})
    assert a == request_key({"a": [1, 2], "b": 1}) and len(a) == 64
    assert request_key({"x": "\ud800"}) != request_key({"x": "\ud801"})


def test_put_get_roundtrip_before_and_after_flush(tmp_path):
    cache = ReplyCache(tmp_path, flush_rows=10**9, flush_s=1e9)
    assert cache.get(key(0)) is None
    cache.put(key(0), "héllo ✓", 3, 4)
    assert cache.get(key(0)) == ("héllo ✓", 3, 4)  # served from the queue
    cache.close()
    again = ReplyCache(tmp_path)
    assert again.get(key(0)) == ("héllo ✓", 3, 4) and len(again) == 1
    again.close()


def test_disabled_cache_is_a_no_op():
    cache = ReplyCache(None)
    cache.put(key(0), "x")
    assert cache.get(key(0)) is None and not cache.mark_sent(key(0)) and len(cache) == 0
    cache.flush()
    cache.close()


def test_100k_entries_in_a_handful_of_files(tmp_path):
    cache = ReplyCache(tmp_path / "c")
    keys = [key(i) for i in range(100_000)]
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        cache.mark_sent(k)
        cache.put(k, f"reply number {i} " * 8, 10, 20)
    cache.flush()
    written = time.perf_counter() - t0
    assert len(cache) == 100_000
    assert all(cache.get(keys[i]) == (f"reply number {i} " * 8, 10, 20) for i in range(0, 100_000, 997))
    assert cache.pending_sent() == 0  # every sent request was answered: the sent log is empty
    cache.close()
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files and len(files) <= 3 and all(f.startswith(FILENAME) for f in files), files
    print(f"100k puts + sent marks: {written:.2f} s")  # shown with -s; no timing assertion (STYLE.md)


def test_sent_log_counts_requests_asked_again_by_a_later_invocation(tmp_path):
    first = ReplyCache(tmp_path)
    assert not first.mark_sent(key(1)) and not first.mark_sent(key(2))
    first.put(key(1), "answered")
    first.flush()
    assert not first.mark_sent(key(2))  # asked twice by the same invocation: a retry, not a re-ask
    first.flush()
    assert first.pending_sent() == 1  # key(2) was in flight when the process "died"
    first._db.close()  # no close(): like a killed process, nothing more is written

    second = ReplyCache(tmp_path)
    assert second.get(key(1)) == ("answered", 0, 0)
    assert second.mark_sent(key(2))  # lost to the kill: asked again
    assert not second.mark_sent(key(3))
    second.put(key(2), "now answered")
    second.close()
    assert ReplyCache(tmp_path).pending_sent() == 1  # only key(3), never answered


_WRITER = """
import sys, time
from fspo_engine.data_gen.cache import ReplyCache, request_key
cache = ReplyCache(sys.argv[1], flush_rows=500, flush_s=1e9)
tag = sys.argv[2]
for i in range(int(sys.argv[3])):
    cache.put(request_key({"w": tag, "i": i}), tag * 200, i, i)
    if i == 5000:
        print("ready", flush=True)
cache.close()
print("done", flush=True)
"""


def test_kill_minus_9_mid_write_leaves_a_sound_database(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "k", "10000000"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(tmp_path / FILENAME)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n = db.execute("SELECT count(*) FROM replies").fetchone()[0]
    db.close()
    assert n >= 5000 and n % 500 == 0  # whole batches only: each commit is atomic
    cache = ReplyCache(tmp_path)
    assert cache.get(request_key({"w": "k", "i": 0})) == ("k" * 200, 0, 0)
    cache.close()


def test_two_processes_write_one_database(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag, "20000"],
                              stdout=subprocess.PIPE, text=True) for tag in "ab"]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip().endswith("done"), out
    cache = ReplyCache(tmp_path)
    assert len(cache) == 40_000
    cache.close()
