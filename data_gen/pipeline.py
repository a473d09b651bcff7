"""`generate_dataset`: users, questions, response pairs and labels -> a fspo-prefs/1 directory.

    generate_dataset(out, **options)    # GenConfig's options (data_gen/config.py)
        finished_dataset / read_state   # nothing to do, or the unfinished run to resume, or a new one
        _generate                       # 1. every unit not done yet, chunk by chunk, each chunk committed
        _prepare_manifest               # 2. the dataset's statistics, from the files
        finalize                        # 3. the files moved into place, the manifest written last

Work is a list of units, one per (domain, user index); a producer (data_gen/producers.py) makes a unit's
user and preference records. Every random choice about a unit comes from RNGs seeded by (seed, domain,
index) (see personas.py), so a unit's output does not depend on which run, chunk or resume point produced
it. That gives both guarantees of the issue:

- Reproducible: same seed and arguments -> byte-identical files with the template backend (JSON with
  sorted keys, floats rounded, no timestamps or timings in the manifest), and with an LLM backend whose
  server answers deterministically. The manifest holds only the contract's keys, the generator settings
  and statistics of the data itself; run bookkeeping that varies between equal runs (requests, cache
  hits, retries, tokens) goes to the sidecar `gen_stats.json`, written atomically beside it.
- Resumable: units are appended in order to `.gen-state/{users,prefs}.jsonl`, and a killed run re-run with
  the same arguments continues after the last committed chunk, so nothing is duplicated or lost; a
  directory with a manifest is always complete (data_gen/outdir.py keeps the directory's files).
- Overwrite keeps the old dataset: `--overwrite` discards only an unfinished run, and the old files stay
  whole and readable until `finalize` swaps the new ones in (see there for the one short window).
- Nothing partial, nothing foreign: the model (hf) or client is built before anything is created, a
  run that fails before generating any unit removes its state (so the corrected command just runs),
  users.jsonl/prefs.jsonl without a manifest of ours are not replaced without `--overwrite`, and an
  exclusive lock on the directory makes a second concurrent run on the same --out fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fspo_engine.data_gen.config import GenConfig
from fspo_engine.data_gen.domains import get_domain
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.outdir import (
    STATE_DIR,
    StateFiles,
    finalize,
    finished_dataset,
    locked_dir,
    new_state,
    read_state,
    write_json_atomic,
)
from fspo_engine.data_gen.personas import make_user, test_indices
from fspo_engine.data_gen.producers import LLMProducer, TemplateProducer, make_backend
from fspo_engine.data_gen.stats import binary_entropy, dataset_stats, mean_entropy

FORMAT = "fspo-prefs/1"


@dataclass
class GenResult:
    out_dir: Path
    manifest: dict
    elapsed_s: float  # this invocation only (a resumed run counts its own part)
    prefs_written: int  # by this invocation
    usage: dict = field(default_factory=dict)  # LLM token accounting (empty for template)
    imported: bool = False  # made by an importer, not generated

    @property
    def prefs_per_s(self) -> float:
        return self.prefs_written / self.elapsed_s if self.elapsed_s > 0 else 0.0


def generate_dataset(out_dir: str | os.PathLike, **options) -> GenResult:
    """Generate (or finish, or confirm) the dataset directory `out_dir`; see GenConfig for options.

    Example (what `fspo-engine quickstart` needs):
        generate_dataset("data/qs", preset="quickstart", users=2000, prefs_per_user=12, seed=0)
    Re-running with the same options resumes a killed run, or returns at once if it is complete;
    other options on a non-empty run directory are an error unless `overwrite=True`.
    """
    try:
        cfg = GenConfig(**options)
    except TypeError as exc:
        raise DataGenError(f"generate_dataset: {exc}") from None
    cfg = cfg.resolved()
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataGenError(f"{out}: exists and is not a directory")
    created = not out.exists()
    # Build the model (hf) or client before creating anything: a bad --model leaves no directory behind.
    backend = make_backend(cfg, out) if created and cfg.backend != "template" else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        with locked_dir(out):
            return _generate_locked(out, cfg, backend)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: a failed first run leaves no empty directory either
        raise


def _generate_locked(out: Path, cfg: GenConfig, backend) -> GenResult:
    """The pipeline's stages on the locked directory `out`; each one is resumed where a killed run left it."""
    generator = cfg.generator_record()
    manifest = finished_dataset(out, generator, cfg.overwrite)
    if manifest is not None:
        return GenResult(out, manifest, 0.0, 0)
    state = read_state(out, generator)  # an unfinished run of these arguments, or None
    n_units = len(cfg.domains) * cfg.users
    generating = state is None or (state["phase"] == "generating" and state["done"] < n_units)
    if generating and backend is None and cfg.backend != "template":
        backend = make_backend(cfg, out)  # before the state: a bad --model leaves none behind
    if state is None:
        state = new_state(out, generator)
    start, written = time.perf_counter(), 0
    try:
        if generating:  # 1. the units' users and preferences
            written = asyncio.run(_generate(out, cfg, state, backend))
        if state["phase"] == "generating":  # 2. the manifest, with the statistics of the files
            state = _prepare_manifest(cfg, state, out / STATE_DIR)
        manifest = finalize(out, state)  # 3. the files moved into place, the manifest last
    except BaseException:
        if state["phase"] == "generating" and state["done"] == 0:
            # Nothing was generated (a model-name typo answered 404, a dead server): a kept state would
            # only make the corrected command refuse to start ("unfinished run with other arguments").
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        raise
    return GenResult(out, manifest, time.perf_counter() - start, written, state.get("usage", {}))


async def _generate(out: Path, cfg: GenConfig, state: dict, backend) -> int:
    """Stage 1: the units not done yet, in chunks of users made concurrently, each chunk committed to the
    state. -> the preferences this invocation wrote."""
    domains = {name: get_domain(name, cfg.preset) for name in cfg.domains}
    heldout = {name: d.heldout_combos(cfg.seed, cfg.test_fraction) for name, d in domains.items()}
    tests = {name: test_indices(cfg.seed, name, cfg.users, cfg.test_fraction) for name in cfg.domains}
    units = [(name, i) for name in cfg.domains for i in range(cfg.users)]
    if cfg.backend == "template":
        producer = TemplateProducer(cfg, domains)
    else:
        producer = LLMProducer(cfg, domains, backend, heldout)
    chunk = cfg.chunk_users or (256 if cfg.backend == "template" else max(8, cfg.concurrency))
    counters = state["counters"]
    usage_before = dict(state.get("usage", {}))  # token accounting of earlier, killed invocations
    progress = _Progress(cfg, len(units), state["done"])
    written = 0
    try:
        with StateFiles(out, state) as files:
            while state["done"] < len(units):
                batch = units[state["done"] : state["done"] + chunk]
                users = []
                for name, i in batch:
                    split = "test" if i in tests[name] else "train"
                    users.append(make_user(domains[name], cfg.seed, i, split, heldout[name]))
                for record, prefs, unit_counters in await asyncio.gather(*(producer.unit(u) for u in users)):
                    files.append(record, prefs)
                    for k, v in unit_counters.items():
                        counters[k] = counters.get(k, 0) + v
                    written += len(prefs)
                llm = {}
                if isinstance(producer, LLMProducer):
                    usage = producer.backend.usage.as_dict()
                    llm = {"usage": {k: usage_before.get(k, 0) + v for k, v in usage.items()},
                           "first_error": state.get("first_error") or producer.first_error}
                files.commit(state["done"] + len(batch), **llm)
                progress.update(len(batch), written, state["done"])
    finally:
        await producer.aclose()
    progress.close()
    return written


class _Progress:
    """A tqdm bar of users on a terminal; in a log file (stderr not a terminal) a plain line every 30 s."""

    def __init__(self, cfg: GenConfig, total: int, done: int):
        from tqdm import tqdm

        self.backend, self.total = cfg.backend, total
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="user",
            disable=None if cfg.progress else True,  # None: no bar when stderr is not a terminal (a log file)
            file=sys.stderr,
            dynamic_ncols=True,
            desc=f"gen-data {cfg.backend}",
        )
        self.plain = cfg.progress and self.bar.disable
        self.t_start = self.last_line = time.monotonic()

    def update(self, users: int, written: int, done: int):
        self.bar.update(users)
        rate = written / max(time.monotonic() - self.t_start, 1e-9)
        self.bar.set_postfix(prefs=written, prefs_per_s=f"{rate:.0f}")
        if self.plain and (time.monotonic() - self.last_line >= 30 or done == self.total):
            self.last_line = time.monotonic()
            print(f"gen-data {self.backend}: {done}/{self.total} users, {written} prefs, {rate:.0f} prefs/s",
                  file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()


def _prepare_manifest(cfg: GenConfig, state: dict, state_dir: Path) -> dict:
    users = _read_jsonl(state_dir / "users.jsonl")
    prefs = _read_jsonl(state_dir / "prefs.jsonl")
    if not prefs:
        # Every unit is done, so a kept state would make the advised re-run fail the same way at once.
        shutil.rmtree(state_dir, ignore_errors=True)
        first = state.get("first_error")
        raise DataGenError(
            "no preferences were generated"
            + (f"; first problem: {first}" if first else "")
            + " (nothing was kept; fix the cause and re-run)"
        )
    c = state["counters"]
    stats = dataset_stats(users, prefs)
    if cfg.backend == "template":
        # The oracle description determines every label, so the only label entropy is the noise.
        h = round(binary_entropy(c.get("noise_flipped", 0) / max(c.get("pairs", 1), 1)), 4)
        stats["labels"] = {
            "label_entropy_before": h,
            "label_entropy_after": h,
            "persona_improvement": False,
            "noise_flipped": c.get("noise_flipped", 0),
        }
    else:
        stats["labels"] = {
            "label_entropy_before": mean_entropy(
                c.get("entropy_before_sum", 0.0), c.get("entropy_before_n", 0)
            ),
            "label_entropy_after": mean_entropy(c.get("entropy_after_sum", 0.0), c.get("entropy_after_n", 0)),
            "persona_improvement": cfg.persona_improvement,
            **{
                k: c.get(k, 0)
                for k in (
                    "pairs",
                    "traits_added",
                    "dropped_flip",
                    "dropped_undecided",
                    "dropped_malformed",
                    "questions_failed",
                    "users_skipped",
                )
            },
        }
    n_test = sum(u["split"] == "test" for u in users)
    manifest = {
        "format": FORMAT,
        "domains": list(cfg.domains),
        "seed": cfg.seed,
        "generator": state["generator"],
        "counts": {
            "users": len(users),
            "prefs": len(prefs),
            "train_users": len(users) - n_test,
            "test_users": n_test,
        },
        "stats": stats,
    }
    state.update(phase="finalizing", manifest=manifest)
    write_json_atomic(state_dir / "state.json", state)
    return state


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def format_summary(result: GenResult) -> str:
    """The human-readable statistics block printed by `gen-data`."""
    m = result.manifest
    s = m.get("stats", {})
    lines = [
        f"dataset: {result.out_dir}  ({m['counts']['users']} users, {m['counts']['prefs']} prefs, "
        f"{m['counts']['test_users']} test users)"
    ]
    for name, d in s.get("per_domain", {}).items():
        lines.append(
            f"  {name}: {d['users']} users ({d['train_users']} train / {d['test_users']} test), {d['prefs']} prefs"
        )
    if "labels" in s:
        lab = s["labels"]
        lines.append(
            f"  label entropy (bits): before persona improvement {lab['label_entropy_before']}, "
            f"after {lab['label_entropy_after']}"
        )
        extra = {k: v for k, v in lab.items() if k not in ("label_entropy_before", "label_entropy_after")}
        lines.append("  labels: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    div, uu = s.get("diversity", {}), s.get("user_user", {})
    lines.append(
        f"  response diversity: {div.get('distinct_responses')} distinct, mean TF-IDF cosine "
        f"{div.get('mean_pairwise_tfidf_cosine')} (chosen vs rejected {div.get('chosen_rejected_tfidf_cosine')})"
    )
    lines.append(
        f"  user-user disagreement on shared pairs: {uu.get('disagreement')} over {uu.get('shared_pairs')} pairs"
    )
    rw = s.get("response_words", {})
    lines.append(
        f"  response words: mean {rw.get('mean')} (min {rw.get('min')}, max {rw.get('max')}); "
        f"vocabulary {s.get('vocabulary_words')} words"
    )
    if result.usage:
        u = result.usage
        lines.append(
            f"  LLM usage: {u.get('calls')} calls ({u.get('cached_calls')} cached), {u.get('retries')} retries, "
            f"{u.get('malformed')} malformed, tokens {u.get('prompt_tokens')} in / {u.get('completion_tokens')} out"
        )
    if result.imported and result.prefs_written:
        lines.append(f"  imported {m['counts']['prefs']} prefs")
    elif result.prefs_written:
        lines.append(
            f"  throughput: {result.prefs_written} prefs in {result.elapsed_s:.2f} s "
            f"({result.prefs_per_s:.0f} prefs/s)"
        )
    else:
        lines.append("  nothing to do: the dataset was already complete")
    return "\n".join(lines)
