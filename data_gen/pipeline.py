"""`generate_dataset`: users, questions, response pairs and labels -> a fspo-prefs/1 directory.

    generate_dataset(out, **options)    # GenConfig's options (data_gen/config.py)
        finished_dataset / read_state   # nothing to do, or the unfinished run to resume, or a new one
        _generate                       # 1. (LLM) the question pool; every unit not done yet, pipelined,
                                        #    the finished prefix committed every --commit-every-s
        _prepare_manifest               # 2. the dataset's statistics, streamed from the files
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
  the same arguments continues after the last commit, so nothing is duplicated or lost; the requests of the
  units after it are answered from the reply cache. A directory with a manifest is always complete
  (data_gen/outdir.py keeps the directory's files).
- Throughput: units run concurrently with no barrier, so the client keeps `--concurrency` requests in
  flight over one or several servers whenever work exists (`_run_units`); memory is bounded by a window of
  units ahead of the commit point, and the statistics are streamed from the files.
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
import os
import random
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
    dumps,
    finalize,
    finished_dataset,
    locked_dir,
    new_state,
    read_committed,
    read_state,
    write_json_atomic,
    write_staged,
)
from fspo_engine.data_gen.personas import Holdout, derive_seed, test_indices, val_indices
from fspo_engine.data_gen.producers import LLMProducer, Made, TemplateProducer, Unit
from fspo_engine.data_gen.sources import (
    PersonaBook,
    TraitSchema,
    pool_size,
    question_pool,
    read_personas_file,
    read_questions_file,
)
from fspo_engine.data_gen.stats import DatasetStats, binary_entropy, mean_entropy, rate

FORMAT = "fspo-prefs/1"
TEMPLATE_COMMIT = 256  # template units between commits (they take microseconds: time alone would be too rare)


@dataclass
class GenResult:
    out_dir: Path
    manifest: dict
    elapsed_s: float  # this invocation only (a resumed run counts its own part)
    prefs_written: int  # by this invocation
    gen_stats: dict = field(default_factory=dict)  # the LLM client's statistics (gen_stats.json; empty for template)
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
    fresh_cache = not (out / ".llm-cache").exists()
    # Read the user's files and build the model (hf) or client before creating anything: a bad --personas,
    # --questions, --persona-schema or --model leaves no directory behind.
    inputs = Inputs.load(cfg)
    backend = make_client(cfg, out) if created and cfg.llm else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        with locked_dir(out):
            return _generate_locked(out, cfg, backend, inputs)
    except BaseException:
        if fresh_cache:
            _drop_empty_cache(out / ".llm-cache")
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: a failed first run leaves no empty directory either
        raise


def _drop_empty_cache(root: Path) -> None:
    """Remove a reply cache that holds no reply (a first run that failed at once); one with replies stays:
    they were paid for, and the corrected re-run reads them."""
    from fspo_engine.data_gen.cache import ReplyCache

    if not root.is_dir() or (root / ".." / STATE_DIR).exists():
        return
    cache = ReplyCache(root)
    try:
        empty = len(cache) == 0
    finally:
        cache.close()
    if empty:
        shutil.rmtree(root, ignore_errors=True)


def _generate_locked(out: Path, cfg: GenConfig, backend, inputs: Inputs) -> GenResult:
    """The pipeline's stages on the locked directory `out`; each one is resumed where a killed run left it."""
    generator = cfg.generator_record()
    manifest = finished_dataset(out, generator, cfg.overwrite)
    if manifest is not None:
        return GenResult(out, manifest, 0.0, 0)
    state = read_state(out, generator)  # an unfinished run of these arguments, or None
    n_units = len(cfg.domains) * cfg.users
    generating = state is None or (state["phase"] == "generating" and state["done"] < n_units)
    if generating and backend is None and cfg.llm:
        backend = make_client(cfg, out)  # before the state: a bad --model leaves none behind
    if state is None:
        state = new_state(out, generator)
    start, written = time.perf_counter(), 0
    try:
        if generating:  # 1. the units' users and preferences
            written = asyncio.run(_generate(out, cfg, state, backend, inputs))
        if state["phase"] == "generating":  # 2. the manifest, with the statistics of the files
            state = _prepare_manifest(cfg, state, out / STATE_DIR)
        manifest = finalize(out, state)  # 3. the files moved into place, the manifest last
    except BaseException:
        if state["phase"] == "generating" and state["done"] == 0:
            # Nothing was generated (a model-name typo answered 404, a dead server): a kept state would
            # only make the corrected command refuse to start ("unfinished run with other arguments").
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        raise
    return GenResult(out, manifest, time.perf_counter() - start, written, state.get("gen_stats", {}))


def make_client(cfg: GenConfig, out: Path):
    """The run's one LLM client (OpenAI-compatible servers, or a local HF model), replies cached under OUT."""
    from fspo_engine.data_gen.client import LLMClient

    return LLMClient(
        model=cfg.model,
        base_urls=cfg.base_url if cfg.backend == "openai" else None,
        api_key_env=cfg.api_key_env,
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        backoff_s=cfg.backoff_s,
        backoff_max_s=cfg.backoff_max_s,
        malformed_retries=cfg.malformed_retries,
        cache_dir=cfg.cache_dir or str(out / ".llm-cache"),
        run_seed=cfg.seed,
        hf_model_dir=cfg.model if cfg.backend == "hf" else None,
    )


def _units(cfg: GenConfig) -> tuple[int, callable]:
    """The number of units and the Unit of a place in the run: domain by domain, users in index order."""
    tests = {name: test_indices(cfg.seed, name, cfg.users, cfg.test_fraction) for name in cfg.domains}
    vals = {name: val_indices(cfg.seed, name, cfg.users, cfg.val_fraction, tests[name]) for name in cfg.domains}

    def unit(order: int) -> Unit:
        name, i = cfg.domains[order // cfg.users], order % cfg.users
        return Unit(name, i, "test" if i in tests[name] else "val" if i in vals[name] else "train", order)

    return len(cfg.domains) * cfg.users, unit


@dataclass
class Inputs:
    """What an LLM run reads from the user's files (or the package), read before anything is created."""

    schema: TraitSchema | None = None
    persona_file: list[tuple[str, dict]] | None = None
    question_file: dict[str, list[str]] | None = None

    @classmethod
    def load(cls, cfg: GenConfig) -> Inputs:
        if not cfg.llm:
            return cls()
        schema = None
        if cfg.personas == "llm" or cfg.questions == "llm":
            schema = TraitSchema.load(cfg.persona_schema, cfg.domains)
        persona_file = None
        if cfg.personas not in ("llm", "template"):
            persona_file = read_personas_file(cfg.personas)
            if len(persona_file) < cfg.users:
                raise DataGenError(
                    f"{cfg.personas}: holds {len(persona_file)} personas, fewer than --users {cfg.users}"
                )
        questions = None
        if cfg.questions not in ("llm", "template"):
            questions = read_questions_file(cfg.questions, cfg.domains)
        return cls(schema, persona_file, questions)


async def _generate(out: Path, cfg: GenConfig, state: dict, client, inputs: Inputs) -> int:
    """Stage 1: the units not done yet, pipelined (see `_run_units`). -> the preferences this invocation wrote."""
    domains = {name: get_domain(name, cfg.preset) for name in cfg.domains}
    heldout = {}
    for name, d in domains.items():
        test = d.heldout_combos(cfg.seed, cfg.test_fraction)
        heldout[name] = Holdout(test, d.val_combos(cfg.seed, cfg.val_fraction, test))
    state_dir = out / STATE_DIR
    try:
        # StateFiles first: opening it truncates the files to the last commit, and the LLM producer replays
        # the committed personas from them (a killed run's uncommitted tail would put the persona turn ahead
        # of the units still to run, and make their personas duplicates of themselves).
        with StateFiles(out, state) as files:
            if cfg.backend == "template":
                producer = TemplateProducer(cfg, domains, heldout)
            else:
                producer = await _llm_producer(cfg, domains, heldout, client, state_dir, state, inputs)
            return await _run_units(cfg, state, producer, files, client)
    finally:
        if client is not None:
            await client.aclose()


async def _llm_producer(cfg, domains, heldout, client, state_dir: Path, state: dict, inputs: Inputs) -> LLMProducer:
    """The LLM producer with its question pools (made once, before the first unit, and kept in the state) and
    each domain's PersonaBook replayed from the committed units."""
    questions = None
    if cfg.questions != "template":
        path = state_dir / "questions.jsonl"
        if state.get("questions_done"):
            questions = {d: [] for d in cfg.domains}
            for rec in read_committed(state_dir, "questions.jsonl"):
                questions[rec["domain"]].append(rec["question"])
        else:
            questions = await _question_pools(cfg, client, inputs)
            records = [{"domain": d, "question": q} for d in cfg.domains for q in questions[d]]
            os.replace(write_staged(path, [dumps(r) + "\n" for r in records]), path)
            state["questions_done"] = True
            state["counters"]["questions"] = len(records)
            write_json_atomic(state_dir / "state.json", state)
    dedup = cfg.dedup_threshold if cfg.personas == "llm" else None
    books = {d: PersonaBook(0, dedup_threshold=dedup, seed=cfg.seed, domain=d) for d in cfg.domains}
    replayed = 0
    for rec in read_committed(state_dir, "personas.jsonl"):  # truncated to the committed units by StateFiles
        books[rec["domain"]].replay(rec["persona"])
        replayed += 1
    if replayed != state["done"]:  # one line per committed unit: anything else is a damaged state
        raise DataGenError(f"{state_dir}: personas.jsonl holds {replayed} units, the state {state['done']}; "
                           "pass --overwrite to start over")
    return LLMProducer(
        cfg, domains, client, heldout=heldout, books=books, schema=inputs.schema, questions=questions,
        persona_file=inputs.persona_file,
    )


async def _question_pools(cfg: GenConfig, client, inputs: Inputs) -> dict[str, list[str]]:
    if cfg.questions != "llm":
        pools = {d: list(q) for d, q in inputs.question_file.items()}
    else:
        need = pool_size(cfg.users, cfg.prefs_per_user, cfg.questions_per_domain)
        made = await asyncio.gather(*(question_pool(client, cfg, inputs.schema, d, need) for d in cfg.domains))
        pools = {}
        for d, (pool, _) in zip(cfg.domains, made):
            if not pool:
                raise DataGenError(f"no usable question for domain {d!r}: every questions request failed")
            if len(pool) < need:
                print(f"warning: {d}: {len(pool)} distinct questions, fewer than the {need} asked for "
                      "(de-duplication and failed batches)", file=sys.stderr)
            pools[d] = pool
    # One seeded shuffle per domain: users take consecutive slots, so each question serves pairs of
    # users spread over the whole run rather than of neighbours.
    for d, pool in pools.items():
        random.Random(derive_seed(cfg.seed, d, "question-pool")).shuffle(pool)
    return pools


async def _run_units(cfg: GenConfig, state: dict, producer, files: StateFiles, client) -> int:
    """Every unit not done yet, with no barrier between chunks: units start in order while the client has
    work waiting for fewer than `concurrency` slots (so `concurrency` requests stay in flight whenever work
    exists) and at most `window` units are ahead of the commit point (memory stays flat). Finished units are
    appended in order; the finished contiguous prefix is committed every `commit_every_s` seconds and at the
    end, after the reply cache is flushed: a kill loses at most one commit window of work, and its requests
    are answered from the cache on the re-run."""
    n_units, unit_of = _units(cfg)
    counters = state["counters"]
    done = next_start = state["done"]
    # Template units are pure computation: one at a time, committed every TEMPLATE_COMMIT units as well.
    window = 1 if client is None else max(64, 2 * cfg.concurrency)
    running: dict[asyncio.Task, int] = {}
    finished: dict[int, Made] = {}
    progress = _Progress(cfg, n_units, done)
    invocation = {"started_units": done}
    state.setdefault("invocations", []).append(invocation)
    last_commit, committed, written = time.monotonic(), done, 0

    def commit():
        nonlocal last_commit, committed
        if client is not None:
            client.flush()
            invocation.update(client.stats())
        files.commit(done, first_error=state.get("first_error") or getattr(producer, "first_error", None))
        last_commit, committed = time.monotonic(), done

    try:
        while done < n_units:
            while (
                next_start < n_units
                and next_start - done < window
                and (client is None or client.waiting < cfg.concurrency)
            ):
                running[asyncio.ensure_future(producer.unit(unit_of(next_start)))] = next_start
                next_start += 1
            ended, _ = await asyncio.wait(
                running, timeout=None if client is None else 0.05, return_when=asyncio.FIRST_COMPLETED
            )
            for task in ended:
                finished[running.pop(task)] = task.result()  # a unit's error ends the run (after cleanup)
            while done in finished:
                made = finished.pop(done)
                unit = unit_of(done)
                persona = None if client is None else {"domain": unit.domain, "index": unit.index, "persona": made.persona}
                files.append(made.record, made.prefs, persona)
                for k, v in made.counters.items():
                    counters[k] = counters.get(k, 0) + v
                written += len(made.prefs)
                done += 1
                progress.update(1, written, done, client)
            if (
                done == n_units
                or time.monotonic() - last_commit >= cfg.commit_every_s
                or (client is None and done - committed >= TEMPLATE_COMMIT)
            ):
                commit()
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        if client is not None:
            client.flush()  # what was asked is kept for the re-run, even when this one failed
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
        self.t_start = self.last_line = self.last_post = time.monotonic()

    def update(self, users: int, written: int, done: int, client=None):
        self.bar.update(users)
        now = time.monotonic()
        if now - self.last_post < 0.5 and done != self.total:
            return
        self.last_post = now
        rate = written / max(now - self.t_start, 1e-9)
        post = {"prefs": written, "prefs/s": f"{rate:.0f}"}
        if client is not None:
            post["in flight"] = client.inflight
        self.bar.set_postfix(post)
        if self.plain and (now - self.last_line >= 30 or done == self.total):
            self.last_line = now
            extra = f", {client.inflight} requests in flight" if client is not None else ""
            print(f"gen-data {self.backend}: {done}/{self.total} users, {written} prefs, {rate:.0f} prefs/s{extra}",
                  file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()


def _prepare_manifest(cfg: GenConfig, state: dict, state_dir: Path) -> dict:
    c = state["counters"]
    stats_db = state_dir / "stats.sqlite"
    stats_db.unlink(missing_ok=True)  # a kill during an earlier pass left a partial one
    acc = DatasetStats(stats_db)
    n_users = n_prefs = n_test = n_val = 0
    try:
        for u in read_committed(state_dir, "users.jsonl"):
            acc.add_user(u)
            n_users += 1
            n_test += u["split"] == "test"
            n_val += u["split"] == "val"
        for p in read_committed(state_dir, "prefs.jsonl"):
            acc.add_pref(p)
            n_prefs += 1
        stats = acc.result() if n_prefs else {}
    finally:
        acc.close()
        stats_db.unlink(missing_ok=True)
    if not n_prefs:
        # Every unit is done, so a kept state would make the advised re-run fail the same way at once.
        shutil.rmtree(state_dir, ignore_errors=True)
        first = state.get("first_error")
        raise DataGenError(
            "no preferences were generated"
            + (f"; first problem: {first}" if first else "")
            + " (nothing was kept; fix the cause and re-run)"
        )
    stats["labels"] = _label_stats(cfg, c)
    counts = {"users": n_users, "prefs": n_prefs, "train_users": n_users - n_test - n_val, "test_users": n_test}
    if n_val:
        counts["val_users"] = n_val
    if cfg.questions not in (None, "template"):
        counts["questions"] = c.get("questions", 0)
    manifest = {
        "format": FORMAT,
        "domains": list(cfg.domains),
        "seed": cfg.seed,
        "generator": state["generator"],
        "counts": counts,
        "stats": stats,
    }
    if cfg.llm:
        state["gen_stats"] = _gen_stats(state, n_prefs)
    state.update(phase="finalizing", manifest=manifest)
    write_json_atomic(state_dir / "state.json", state)
    return state


def _label_stats(cfg: GenConfig, c: dict) -> dict:
    """The label audit (manifest stats.labels), from the counters the units summed."""
    if cfg.backend == "template":
        # The oracle description determines every label, so the only label entropy is the noise.
        h = round(binary_entropy(c.get("noise_flipped", 0) / max(c.get("pairs", 1), 1)), 4)
        out = {
            "label_entropy_before": h,
            "label_entropy_after": h,
            "persona_improvement": False,
            "noise_flipped": c.get("noise_flipped", 0),
        }
        if cfg.ablation:
            out["ablation"] = cfg.ablation
        return out
    hist = {k.removeprefix("kept_hist_"): v for k, v in c.items() if k.startswith("kept_hist_")}
    return {
        "ablation": cfg.ablation,
        "persona_improvement": cfg.persona_improvement and cfg.ablation is None,
        "label_entropy_before": mean_entropy(c.get("entropy_before_sum", 0.0), c.get("entropy_before_n", 0)),
        "label_entropy_after": mean_entropy(c.get("entropy_after_sum", 0.0), c.get("entropy_after_n", 0)),
        "pairs": c.get("pairs", 0),
        "labelled": c.get("labelled", 0),  # pairs given a label (the rates below are over these)
        "kept": c.get("kept", 0),  # labelled pairs of users who kept at least --min-prefs-per-user
        "persona_swap_change_rate": rate(c.get("swap_changed", 0), c.get("swap_n", 0)),
        "persona_swap_reversal_rate": rate(c.get("swap_reversed", 0), c.get("swap_n", 0)),
        "persona_swap_pairs": c.get("swap_n", 0),
        "position_flip_rate": rate(c.get("first_flip", 0), c.get("judged", 0)),
        "first_pass_tie_rate": rate(c.get("first_tie", 0), c.get("judged", 0)),
        "decided_after_refinement_rate": rate(c.get("decided_after_refinement", 0), c.get("labelled", 0)),
        "chosen_longer_rate": rate(c.get("chosen_longer", 0), c.get("labelled", 0)),
        "chosen_fits_rate": rate(c.get("chosen_fits", 0), c.get("labelled", 0))
        if cfg.response_mode == "user-views" else None,
        "traits_added": c.get("traits_added", 0),
        "users_refined": c.get("users_refined", 0),
        "kept_prefs_per_user_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        **{
            k: c.get(k, 0)
            for k in (
                "dropped_flip",
                "dropped_undecided",
                "dropped_malformed",
                "dropped_same_responses",
                "pairs_failed",
                "users_dropped_persona",
                "users_dropped_few_prefs",
            )
        },
    }


def _gen_stats(state: dict, kept: int) -> dict:
    """gen_stats.json: the client's statistics per invocation (a resumed run has several) and the totals."""
    invocations = [i for i in state.get("invocations", []) if "stages" in i]
    requests = sum(i["total"]["requests"] for i in invocations)
    last = invocations[-1] if invocations else {}
    return {
        "stages": last.get("stages", {}),  # the last invocation's (an uninterrupted run's only one)
        "total": last.get("total", {}),
        "servers": last.get("servers", {}),
        "invocations": invocations,
        "requests": requests,
        "requests_per_kept_pref": round(requests / kept, 4) if kept else None,
        "requests_lost_to_kill": sum(i["total"].get("reasked", 0) for i in invocations),
    }


SWAP_WARNING = 0.05  # a persona-swap change rate below this: labels that carry (almost) no personal signal
FLIP_WARNING = 0.2  # a position-flip rate above this: a judge that reads the order more than the content


def label_warnings(labels: dict) -> list[str]:
    """What the label audit says is wrong with the labels (also printed by gen-data's summary)."""
    out = []
    swap, flips = labels.get("persona_swap_change_rate"), labels.get("position_flip_rate")
    if swap is not None and swap < SWAP_WARNING:
        out.append(
            f"labels barely depend on the user: persona_swap_change_rate {swap} over "
            f"{labels.get('persona_swap_pairs')} re-judged pairs (the judge may ignore the persona; such labels "
            "carry no personal signal)"
        )
    if labels.get("ablation") is None and labels.get("kept", 1) and swap is None and "persona_swap_pairs" in labels:
        out.append("no pair was re-judged under another persona: raise --swap-control-fraction")
    if flips is not None and flips > FLIP_WARNING:
        out.append(
            f"the judge is position-biased: position_flip_rate {flips} (its verdict followed the order, not the "
            "content, on that share of pairs; those pairs are refined or dropped)"
        )
    return out


def format_summary(result: GenResult) -> str:
    """The human-readable statistics block printed by `gen-data`."""
    m = result.manifest
    s = m.get("stats", {})
    counts = m["counts"]
    val = f", {counts['val_users']} val" if counts.get("val_users") else ""
    lines = [
        f"dataset: {result.out_dir}  ({counts['users']} users, {counts['prefs']} prefs, "
        f"{counts['test_users']} test users{val})"
    ]
    for name, d in s.get("per_domain", {}).items():
        val = f" / {d['val_users']} val" if d.get("val_users") else ""
        lines.append(
            f"  {name}: {d['users']} users ({d['train_users']} train{val} / {d['test_users']} test), {d['prefs']} prefs"
        )
    lab = s.get("labels", {})
    if lab:
        lines.append(
            f"  label entropy (bits): before persona improvement {lab['label_entropy_before']}, "
            f"after {lab['label_entropy_after']}"
        )
        extra = {k: v for k, v in lab.items() if k not in ("label_entropy_before", "label_entropy_after")}
        lines.append("  labels: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    div, uu = s.get("diversity", {}), s.get("user_user", {})
    lines.append(
        f"  diversity: {div.get('distinct_personas')} distinct personas, {div.get('distinct_questions')} distinct "
        f"questions, {div.get('distinct_responses')} distinct responses; mean TF-IDF cosine "
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
    if result.gen_stats:
        g, t = result.gen_stats, result.gen_stats.get("total", {})
        lines.append(
            f"  LLM requests: {g.get('requests')} sent ({t.get('cache_hits')} answered from the cache this run), "
            f"{t.get('retries')} retries, {t.get('malformed')} malformed, tokens {t.get('tokens_in')} in / "
            f"{t.get('tokens_out')} out; {g.get('requests_per_kept_pref')} requests per kept pref; "
            f"mean {t.get('mean_inflight')} in flight (gen_stats.json)"
        )
    for warning in label_warnings(lab):
        lines.append(f"  warning: {warning}")
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


def plan(**options) -> dict:
    """What a run would ask before anything is sent (`gen-data --dry-run`): requests per stage, as a range
    where persona improvement decides (from none refined to every pair refined to --max-traits), and an
    estimate of tokens (prompt characters / 4 with typical field lengths; replies at --max-tokens)."""
    cfg = GenConfig(**options).resolved()
    cfg.validate()
    users = len(cfg.domains) * cfg.users
    pairs = users * cfg.prefs_per_user
    if not cfg.llm:
        return {"backend": cfg.backend, "users": users, "pairs": pairs, "stages": {}, "requests": [0, 0]}
    from fspo_engine.data_gen import prompts
    from fspo_engine.data_gen.sources import QUESTIONS_PER_REQUEST

    words = lambda n: " ".join(["word"] * n)  # noqa: E731 - ~5 characters a word, about 1.3 tokens
    typical = dict(description=words(90), question=words(25), view=words(30), a=words(120), b=words(120),
                   traits=words(80), domain_about=words(20), topic=words(4), count=10)

    def prompt_tokens(stage: str) -> int:
        text = " ".join(m["content"] for m in prompts.messages(stage, **typical))
        return round(len(text) / 4)

    stages: dict[str, tuple[int, int, str, int]] = {}  # stage: (min, max, prompt file, reply tokens)
    if cfg.questions == "llm":
        need = pool_size(cfg.users, cfg.prefs_per_user, cfg.questions_per_domain)
        n = len(cfg.domains) * -(-need * 5 // (4 * QUESTIONS_PER_REQUEST))
        stages["questions"] = (n, n, "questions", 40 * QUESTIONS_PER_REQUEST)
    if cfg.personas == "llm":
        stages["personas"] = (users, users * 4, "persona", 200)
    if cfg.response_mode == "user-views":
        stages["views"] = (pairs, pairs, "views", 120)
        stages["responses"] = (2 * pairs, 2 * pairs, "respond", cfg.max_tokens)
    elif cfg.response_mode == "persona":
        stages["responses"] = (2 * pairs, 2 * pairs, "persona_respond", cfg.max_tokens)
    else:
        q = min(pairs, stages.get("questions", (pairs,))[0] * QUESTIONS_PER_REQUEST)
        extra = pairs if cfg.response_mode == "both" else 0
        stages["views"] = (q, q, "shared_views", 60 * cfg.candidates)
        stages["responses"] = (q * cfg.candidates + extra, q * cfg.candidates + extra, "respond", cfg.max_tokens)
    if cfg.ablation is None:
        refine = cfg.max_traits if cfg.persona_improvement else 0
        stages["judge"] = (2 * pairs, 2 * pairs + users * refine * 2 * cfg.prefs_per_user + 2 * pairs, "judge", 40)
        if refine:
            stages["refine"] = (0, users * refine, "improve", 60)
        swap = round(2 * pairs * cfg.swap_control_fraction)
        stages["swap_control"] = (swap, swap, "judge", 40)
    out = {}
    for name, (lo, hi, prompt, reply) in stages.items():
        p = prompt_tokens(prompt)
        out[name] = {"requests": [lo, hi], "tokens_in": [lo * p, hi * p], "tokens_out": [lo * reply, hi * reply]}
    total = lambda key, i: sum(v[key][i] for v in out.values())  # noqa: E731
    return {
        "backend": cfg.backend,
        "users": users,
        "pairs": pairs,
        "stages": out,
        "requests": [total("requests", 0), total("requests", 1)],
        "tokens_in": [total("tokens_in", 0), total("tokens_in", 1)],
        "tokens_out": [total("tokens_out", 0), total("tokens_out", 1)],
    }


def format_plan(p: dict) -> str:
    lines = [f"plan: {p['users']} users, {p['pairs']} pairs, backend {p['backend']} (nothing was sent)"]
    if not p["stages"]:
        return "\n".join(lines + ["  no LLM requests: the template backend runs offline"])
    span = lambda r: f"{r[0]:,}" if r[0] == r[1] else f"{r[0]:,}-{r[1]:,}"  # noqa: E731
    lines.append(f"  {'stage':<14}{'requests':>22}{'tokens in':>28}{'tokens out':>28}")
    for name, v in p["stages"].items():
        lines.append(f"  {name:<14}{span(v['requests']):>22}{span(v['tokens_in']):>28}{span(v['tokens_out']):>28}")
    lines.append(f"  {'total':<14}{span(p['requests']):>22}{span(p['tokens_in']):>28}{span(p['tokens_out']):>28}")
    lines.append("  (ranges: from no persona refinement to every pair refined --max-traits times; tokens estimated)")
    return "\n".join(lines)
