"""Does gen-data keep an OpenAI-compatible server full, and what does one request cost the client?

vLLM reaches its throughput only with many requests in flight, so at ~15 requests per kept preference
the client decides gen-data's wall time. Against a fake server in its own process (benchmarks/
fake_openai.py: continuous batching, latency = `--latency` to the first token + tokens / (`--throughput`
shared by the requests in flight)), or a real one (`--base-url`), at each `--concurrency` cap:

* `bare`: the client's floor: a semaphore of `cap` around single chat requests through the same
  LLMClient, no pipeline;
* `httpx`: the same loop on a bare httpx client with no SDK (fake server only): what a lighter HTTP path
  than the openai SDK would save in client CPU;
* `gen-data`: the real pipeline (`generate_dataset`, LLM personas and questions) at that cap.

Reported per row: req/s and tokens/s, mean and p95 requests in flight against the cap (time-weighted,
counted by the server over its busy span; by the client on a real server), client CPU per request
(getrusage of the client process; each row runs in its own process, apart from the server), peak RSS,
cache hit rate, requests per kept preference and projected hours per 1M preferences at the measured
rate. Then `--kill-at F`: gen-data in a subprocess, SIGKILLed after F of an uninterrupted run's requests,
rerun: the extra requests and time, and whether the output is byte-identical. Then peak RSS of the bare
loop and of gen-data at two sizes (`--rss-requests`), to show memory flat in the number of requests.

    fspo-engine bench gen-data [--latency 0.5] [--throughput 0] [--requests 2000] [--concurrency 64,256]
                               [--users 2xCAP] [--kill-at 0.5] [--rss-requests 10000,100000] [--base-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

DATA_FILES = ("users.jsonl", "prefs.jsonl", "manifest.json")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------ child runs
# Each measured run is its own process: its CPU time and peak RSS are its own, and the fake server's
# are not in them.
def _bare(job: dict) -> dict:
    """N single chat requests through LLMClient, `cap` at a time; the client samples its own in-flight."""
    from fspo_engine.data_gen.client import LLMClient

    async def go():
        client = LLMClient(model=job["model"], base_urls=job["url"], concurrency=job["cap"], max_retries=8)
        sem = asyncio.Semaphore(job["cap"])
        levels = [0] * (job["cap"] + 1)  # samples of client.inflight, for p95 on a real server

        async def one(i):
            try:
                await client.chat([{"role": "user", "content": f"bench request {i}: say something"}],
                                  stage="bare", max_tokens=job["max_tokens"], temperature=0.7)
            finally:
                sem.release()

        async def sample():
            while True:
                levels[min(client.inflight, job["cap"])] += 1
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        cpu0, t0 = _cpu_s(), time.perf_counter()
        tasks = set()
        for i in range(job["n"]):  # tasks made as slots free up: memory does not grow with n
            await sem.acquire()
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        sampler.cancel()
        await client.aclose()
        return {"wall_s": wall, "cpu_s": cpu, "client": client.stats(), "client_p95_inflight": _q(levels, 0.95)}

    return asyncio.run(go())


def _httpx(job: dict) -> dict:
    """The bare loop without the SDK: httpx posts and json parsing only (the lighter path's cost)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx

    async def go():
        shards = -(-job["cap"] // 32)  # pools of 32 as LLMClient uses: the pool scan is per pool
        per = -(-job["cap"] // shards)
        clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=per, max_keepalive_connections=per),
                                     timeout=60) for _ in range(shards)]
        sem = asyncio.Semaphore(job["cap"])
        url = job["url"].split(",")[0].rstrip("/") + "/chat/completions"

        async def one(i):
            try:
                body = {"model": job["model"], "max_tokens": job["max_tokens"], "temperature": 0.7,
                        "messages": [{"role": "user", "content": f"bench request {i}: say something"}]}
                r = await clients[i % shards].post(url, json=body)
                r.raise_for_status()
                r.json()["choices"][0]["message"]["content"]
            finally:
                sem.release()

        cpu0, t0 = _cpu_s(), time.perf_counter()
        tasks = set()
        for i in range(job["n"]):
            await sem.acquire()
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        for c in clients:
            await c.aclose()
        return {"wall_s": wall, "cpu_s": cpu}

    return asyncio.run(go())


def _gendata(job: dict) -> dict:
    import openai  # noqa: F401 - imported before the clock starts, as the bare loop's client is made before it

    from fspo_engine.data_gen.pipeline import generate_dataset

    cpu0, t0 = _cpu_s(), time.perf_counter()
    result = generate_dataset(job["out"], backend="openai", model=job["model"], base_url=job["url"],
                              personas="llm", questions="llm", users=job["users"],
                              prefs_per_user=job["prefs_per_user"], concurrency=job["cap"], seed=job["seed"],
                              progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    g = result.gen_stats
    return {"wall_s": wall, "cpu_s": cpu, "client": {k: g.get(k) for k in ("stages", "total", "servers")},
            "prefs": result.manifest.get("counts", {}).get("prefs", result.prefs_written),
            "requests_per_kept_pref": g.get("requests_per_kept_pref")}


CHILDREN = {"bare": _bare, "httpx": _httpx, "gendata": _gendata}


def _q(counts: list[int], q: float) -> int:
    total, seen = sum(counts), 0
    for level, c in enumerate(counts):
        seen += c
        if total and seen >= q * total:
            return level
    return 0


def _child(kind: str, job: dict) -> dict:
    """Run CHILDREN[kind](job) in a fresh Python process; its result plus its peak RSS."""
    proc = subprocess.run([sys.executable, "-m", "fspo_engine.benchmarks.bench_gen_data", "--child", kind,
                           json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the bench
class Servers:
    """The fake server processes (or the real --base-url): URLs, and the fake's counters."""

    def __init__(self, args, stack: ExitStack):
        from fspo_engine.benchmarks.fake_openai import spawn

        self.fakes = []
        if args.base_url:
            self.url, self.model = args.base_url, args.model
            return
        for _ in range(args.servers):
            self.fakes.append(stack.enter_context(spawn(ttft_s=args.latency, judge="consistent",
                                                        throughput_tok_s=args.throughput or None)))
        self.url, self.model = ",".join(f.base_url for f in self.fakes), "fake"

    def reset(self):
        for f in self.fakes:
            f.reset_stats()

    def stats(self) -> dict | None:
        """Summed over the fake servers: requests, tokens, in-flight mean and p95 (one server: exact)."""
        if not self.fakes:
            return None
        all_ = [f.stats() for f in self.fakes]
        return {"requests": sum(s["requests"] for s in all_), "tokens_out": sum(s["tokens_out"] for s in all_),
                "mean_inflight": sum(s["mean_inflight"] for s in all_),
                "p95_inflight": sum(s["p95_inflight"] for s in all_),
                "max_inflight": sum(s["max_inflight"] for s in all_)}


def _row(name: str, cap: int, res: dict, server: dict | None) -> dict:
    total = (res.get("client") or {}).get("total", {})
    requests = server["requests"] if server else total.get("requests", 0)
    wall = res["wall_s"]
    row = {
        "variant": name, "cap": cap, "requests": requests, "wall_s": round(wall, 3),
        "req_per_s": round(requests / wall, 1) if wall else 0.0,
        "tokens_per_s": round((server["tokens_out"] if server else total.get("tokens_out", 0)) / wall, 1),
        "mean_inflight": round(server["mean_inflight"] if server else total.get("mean_inflight", 0.0), 1),
        "p95_inflight": server["p95_inflight"] if server else res.get("client_p95_inflight"),
        "cpu_ms_per_request": round(1000 * res["cpu_s"] / max(1, requests), 3),
        "peak_rss_mb": round(res["rss_mb"], 1),
    }
    row["inflight_of_cap"] = round(row["mean_inflight"] / cap, 3)
    if total:
        asked = total.get("requests", 0) + total.get("cache_hits", 0)
        row["cache_hit_rate"] = round(total.get("cache_hits", 0) / asked, 4) if asked else 0.0
    if "requests_per_kept_pref" in res:
        rpp = res["requests_per_kept_pref"]
        row["prefs"] = res.get("prefs")
        row["requests_per_kept_pref"] = rpp
        row["hours_per_1M_prefs"] = round(rpp * 1e6 / row["req_per_s"] / 3600, 1) if rpp and row["req_per_s"] else None
    return row


def _gen_cmd(args, servers, cap: int, users: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "fspo_engine.cli.main", "gen-data", "--backend", "openai",
            "--base-url", servers.url, "--model", servers.model, "--personas", "llm", "--questions", "llm",
            "--users", str(users), "--prefs-per-user", str(args.prefs_per_user), "--concurrency", str(cap),
            "--seed", str(args.seed), "--no-progress", "--out", str(out)]


def _digest(out: Path) -> dict:
    return {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in DATA_FILES if (out / f).exists()}


def kill_and_resume(args, servers, cap: int, users: int, tmp: Path) -> dict:
    """Uninterrupted CLI run; a run SIGKILLed at `kill_at` of its requests; the same command again."""
    def timed(cmd, kill_after=None):
        servers.reset()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed = False
        while proc.poll() is None:
            if kill_after is not None and servers.stats()["requests"] >= kill_after:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
        _, err = proc.communicate()
        if not killed and proc.returncode != 0:
            raise SystemExit(f"gen-data failed:\n{err[-3000:]}")
        return time.perf_counter() - t0, servers.stats()["requests"], killed

    w0, r0, _ = timed(_gen_cmd(args, servers, cap, users, tmp / "whole"))
    cmd = _gen_cmd(args, servers, cap, users, tmp / "killed")
    w1, r1, killed = timed(cmd, kill_after=max(1, int(args.kill_at * r0)))
    w2, r2, _ = timed(cmd)
    lost = json.loads((tmp / "killed" / "gen_stats.json").read_text()).get("requests_lost_to_kill")
    return {"cap": cap, "kill_at": args.kill_at, "killed": killed, "requests_uninterrupted": r0,
            "requests_killed_run": r1, "requests_resume": r2, "extra_requests": r1 + r2 - r0,
            "extra_requests_share": round((r1 + r2 - r0) / r0, 4) if r0 else None,
            "reasked_counted_by_client": lost, "wall_uninterrupted_s": round(w0, 2),
            "wall_killed_plus_resume_s": round(w1 + w2, 2), "extra_time_s": round(w1 + w2 - w0, 2),
            "byte_identical": _digest(tmp / "whole") == _digest(tmp / "killed") and bool(_digest(tmp / "whole"))}


def run(args) -> dict:
    caps = [int(c) for c in args.concurrency.split(",")]
    result = {"args": vars(args), "cpus": os.cpu_count(), "rows": [], "kill": None, "rss": []}
    with ExitStack() as stack:
        servers = Servers(args, stack)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gen-data-")))
        common = {"url": servers.url, "model": servers.model, "max_tokens": args.max_tokens}

        def measure(kind, name, cap, job):
            servers.reset()
            res = _child(kind, job)
            row = _row(name, cap, res, servers.stats())
            result["rows"].append(row)
            print(f"  {name:9s} cap {cap:4d}: {row['req_per_s']:8.1f} req/s, in flight {row['mean_inflight']:6.1f} "
                  f"({row['inflight_of_cap']:.2f} of cap), {row['cpu_ms_per_request']:.2f} ms CPU/request",
                  flush=True)
            return row

        for cap in caps:
            measure("bare", "bare", cap, {**common, "cap": cap, "n": args.requests})
            if servers.fakes:
                measure("httpx", "httpx", cap, {**common, "cap": cap, "n": args.requests})
            if not args.no_gen_data:
                measure("gendata", "gen-data", cap, {**common, "cap": cap, "users": args.users or 2 * cap,
                                                     "prefs_per_user": args.prefs_per_user, "seed": args.seed,
                                                     "out": str(tmp / f"gd-{cap}")})
        gd = [r for r in result["rows"] if r["variant"] == "gen-data"]
        per_user = gd[0]["requests"] / (args.users or 2 * caps[0]) if gd else None
        if args.kill_at and gd and servers.fakes:
            print(f"  kill -9 at {args.kill_at} of the requests, then resume (cap {caps[0]})", flush=True)
            result["kill"] = kill_and_resume(args, servers, caps[0], args.users or 2 * caps[0], tmp)
        for n in [int(x) for x in args.rss_requests.split(",") if x]:
            cap = caps[-1]
            row = measure("bare", "bare", cap, {**common, "cap": cap, "n": n})
            entry = {"target_requests": n, "bare_rss_mb": row["peak_rss_mb"], "bare_requests": row["requests"]}
            if per_user and not args.no_gen_data:
                users = max(4, round(n / per_user))
                row = measure("gendata", "gen-data", cap, {**common, "cap": cap, "users": users,
                                                           "prefs_per_user": args.prefs_per_user,
                                                           "seed": args.seed, "out": str(tmp / f"rss-{n}")})
                entry.update(gen_data_rss_mb=row["peak_rss_mb"], gen_data_requests=row["requests"],
                             gen_data_users=users)
            result["rss"].append(entry)
    return result


def markdown(r: dict) -> str:
    a = r["args"]
    server = (f"real server {a['base_url']}" if a["base_url"] else
              f"{a['servers']} fake server process(es): {a['latency']} s to first token, "
              + (f"{a['throughput']:g} tokens/s shared" if a["throughput"] else "no decode time"))
    users = a["users"] or "2 x cap"
    lines = [f"{server}; bare loops of {a['requests']} requests of <= {a['max_tokens']} tokens; gen-data with "
             f"{users} users x {a['prefs_per_user']} prefs; {r['cpus']} CPUs", "",
             "| variant | cap | requests | req/s | tokens/s | mean in flight | p95 in flight | of cap | "
             "CPU ms/req | peak RSS MB | cache hits | req/kept pref | h per 1M prefs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    for row in r["rows"]:
        key = (row["variant"], row["cap"])
        if key in seen:  # the RSS runs are listed below
            continue
        seen.add(key)
        lines.append(
            f"| {row['variant']} | {row['cap']} | {row['requests']} | {row['req_per_s']:.0f} | "
            f"{row['tokens_per_s']:.0f} | {row['mean_inflight']:.1f} | {row['p95_inflight']} | "
            f"{row['inflight_of_cap']:.2f} | {row['cpu_ms_per_request']:.2f} | {row['peak_rss_mb']:.0f} | "
            f"{row.get('cache_hit_rate', '')} | {row.get('requests_per_kept_pref') or ''} | "
            f"{row.get('hours_per_1M_prefs') or ''} |")
    k = r["kill"]
    if k:
        lines += ["", f"kill -9 at {k['kill_at']} of {k['requests_uninterrupted']} requests (cap {k['cap']}), "
                  f"then the same command: {k['extra_requests']} extra requests "
                  f"({100 * (k['extra_requests_share'] or 0):.1f}%; the client counted "
                  f"{k['reasked_counted_by_client']} re-asked), {k['extra_time_s']} s extra "
                  f"({k['wall_killed_plus_resume_s']} s vs {k['wall_uninterrupted_s']} s); "
                  f"output byte-identical: {k['byte_identical']}"]
    if r["rss"]:
        lines += ["", "| requests (target) | bare loop peak RSS MB | gen-data requests | gen-data peak RSS MB |",
                  "|---:|---:|---:|---:|"]
        for e in r["rss"]:
            lines.append(f"| {e['target_requests']} | {e['bare_rss_mb']:.0f} | {e.get('gen_data_requests', '')} | "
                         f"{e.get('gen_data_rss_mb', '')} |")
    return "\n".join(lines)


def plot(r: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(x["variant"], x["cap"]): x for x in r["rows"]}
    caps = sorted({c for _, c in rows})
    variants = [v for v in ("bare", "httpx", "gen-data") if any(k[0] == v for k in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(caps))]
        axes[0].bar(xs, [rows.get((v, c), {}).get("inflight_of_cap", 0) for c in caps], width, label=v)
        axes[1].bar(xs, [rows.get((v, c), {}).get("cpu_ms_per_request", 0) for c in caps], width, label=v)
    for ax, title in zip(axes, ("mean in flight / cap", "client CPU ms / request")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(caps))], [f"cap {c}" for c in caps])
        ax.set_title(title)
    axes[0].axhline(1.0, color="gray", lw=0.5)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        job = json.loads(argv[2])
        res = CHILDREN[argv[1]](job)
        res["rss_mb"] = _rss_mb()
        print(json.dumps(res))
        return res
    p = argparse.ArgumentParser(prog="fspo-engine bench gen-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=float, default=0.5, help="fake server: seconds to the first token")
    p.add_argument("--throughput", type=float, default=0.0,
                   help="fake server: decode tokens/s shared by the requests in flight (0: no decode time)")
    p.add_argument("--servers", type=int, default=1, help="fake server processes (--base-url URL1,URL2 routing)")
    p.add_argument("--requests", type=int, default=2000, help="requests per bare loop")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of the bare loops' requests")
    p.add_argument("--concurrency", default="64,256", help="comma list of caps")
    p.add_argument("--users", type=int, default=None,
                   help="gen-data users (default 2 x the cap: enough work to fill it; ~23 requests per user)")
    p.add_argument("--prefs-per-user", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of requests at which gen-data is killed "
                   "(0: skip the resume measurement)")
    p.add_argument("--rss-requests", default="10000,100000",
                   help="sizes (requests) for the peak-RSS comparison at the last cap ('' to skip)")
    p.add_argument("--no-gen-data", action="store_true", help="only the bare loops (the client's floor)")
    p.add_argument("--base-url", default=None, help="a real OpenAI-compatible server (comma list) instead of the fake")
    p.add_argument("--model", default=None, help="model name on --base-url")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.base_url and not args.model:
        p.error("--base-url needs --model")
    if not 0 <= args.kill_at < 1 or args.requests < 1 or (args.users or 1) < 1 or args.servers < 1:
        p.error("--kill-at in [0, 1), --requests, --users and --servers >= 1")
    r = run(args)
    table = markdown(r)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gen-data.json").write_text(json.dumps(r, indent=2))
    (out / "gen-data.md").write_text(table + "\n")
    plot(r, out / "gen-data.png")
    print(f"\nwrote {out / 'gen-data.json'}, {out / 'gen-data.md'}, {out / 'gen-data.png'}")
    return r


if __name__ == "__main__":
    main()
