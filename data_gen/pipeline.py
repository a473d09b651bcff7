"""`generate_dataset`: users, questions, response pairs and labels -> a fspo-prefs/1 directory.

Work is a list of units, one per (domain, user index). Every random choice about a unit comes from
RNGs seeded by (seed, domain, index) (see personas.py), so a unit's output does not depend on which
run, chunk or resume point produced it. That gives both guarantees of the issue:

- Reproducible: same seed and arguments -> byte-identical files with the template backend (JSON with
  sorted keys, floats rounded, no timestamps or timings in the manifest), and with an LLM backend whose
  server answers deterministically. The manifest holds only the contract's keys, the generator settings
  and statistics of the data itself; run bookkeeping that varies between equal runs (requests, cache
  hits, retries, tokens) goes to the sidecar `gen_stats.json`, written atomically beside it.
- Resumable: units are appended in order to `.gen-state/{users,prefs}.jsonl`; after every chunk the
  files are fsynced and `.gen-state/state.json` (units done + byte lengths of both files) is replaced
  atomically. A killed run re-run with the same arguments truncates the files to the recorded lengths
  (dropping a half-written chunk) and continues, so nothing is duplicated or lost. At the end the
  statistics are computed from the files, the files are moved into place and `manifest.json` is
  written last: a directory with a manifest is always complete.
- Overwrite keeps the old dataset: `--overwrite` discards only an unfinished run, and the old files stay
  whole and readable until `_finalize` swaps the new ones in (see there for the one short window).
- Nothing partial, nothing foreign: the model (hf) or client is built before anything is created, a
  run that fails before generating any unit removes its state (so the corrected command just runs),
  users.jsonl/prefs.jsonl without a manifest of ours are not replaced without `--overwrite`, and an
  exclusive lock on the directory makes a second concurrent run on the same --out fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fspo_engine.data_gen.backends import HFBackend, MalformedReply, OpenAIBackend

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs on one --out must then not overlap
    fcntl = None
from fspo_engine.data_gen.domains import DOMAIN_NAMES, TemplateDomain, get_domain
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.labeler import label_user
from fspo_engine.data_gen.personas import User, make_user, test_indices, user_rng
from fspo_engine.data_gen.prompts import (
    persona_messages,
    response_messages,
    valid_response,
    valid_views,
    views_messages,
)
from fspo_engine.data_gen.stats import binary_entropy, dataset_stats, mean_entropy

FORMAT = "fspo-prefs/1"
STATE_DIR = ".gen-state"
GEN_STATS = "gen_stats.json"  # sidecar: run bookkeeping of the last LLM run, not part of the dataset
BACKENDS = ("template", "openai", "hf")
RESPONSE_MODES = ("views", "persona", "both")
# Preset defaults, applied to the options the caller left unset (None).
PRESET_DEFAULTS = {
    "quickstart": {"users": 600, "prefs_per_user": 24, "label_noise": 0.0},
    "quickstart-easy": {"users": 600, "prefs_per_user": 24, "label_noise": 0.0},
}
DEFAULTS = {"users": 200, "prefs_per_user": 16, "label_noise": 0.02}
# Users per domain. The work list and the split are built up front (~100 B per user), and 10 million
# users is already days of LLM time: a larger value is a typo, not a plan.
MAX_USERS = 10_000_000
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the openai SDK's default when nothing is set


@dataclass
class GenConfig:
    """Everything `generate_dataset` accepts; each field is also a `gen-data` option."""

    backend: str = "template"  # template (offline, deterministic) | openai | hf
    domains: tuple[str, ...] = ("reviews",)  # any of reviews, elix, roleplay
    users: int | None = None  # users per domain (200; 600 with the quickstart preset)
    prefs_per_user: int | None = None  # preference pairs per user (16; 24 with quickstart)
    test_fraction: float = 0.2  # fraction of each domain's users in the unseen `test` split
    seed: int = 0
    label_noise: float | None = None  # template only: P(swap chosen/rejected) (0.02; 0 for quickstart)
    preset: str | None = None  # "quickstart" / "quickstart-easy": small-vocabulary reviews for the CPU quickstart
    # --- LLM backends (openai, hf) ---
    model: str | None = None  # model name (openai) or model directory (hf)
    base_url: str | None = None  # OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the environment variable holding the key
    gen_models: tuple[str, ...] = ()  # generator models used round-robin over views (default: model)
    judge_model: str | None = None  # judge model (default: model)
    candidates: int = 4  # views (responses) per question
    response_mode: str = "views"  # views | persona (user- vs other-persona-steered) | both
    persona_improvement: bool = True
    max_traits: int = 3  # traits persona improvement may add per user
    temperature: float = 0.8  # generation temperature (the judge always uses 0)
    max_tokens: int = 256
    # --- run mechanics (do not change the output) ---
    concurrency: int = 16  # requests in flight at once (openai)
    timeout_s: float = 60.0
    max_retries: int = 5  # retries on 429/5xx/timeouts, exponential backoff
    backoff_s: float = 0.5
    cache_dir: str | None = None  # reply cache (default OUT/.llm-cache)
    chunk_users: int | None = None  # users per checkpoint (256 template, max(8, concurrency) LLM)
    progress: bool = True
    overwrite: bool = False

    def resolved(self) -> GenConfig:
        defaults = {**DEFAULTS, **PRESET_DEFAULTS.get(self.preset or "", {})}
        if self.backend != "template":
            defaults["label_noise"] = 0.0  # the LLM judge labels; noise is a template-only knob
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **updates)
        cfg.domains = tuple(cfg.domains)
        cfg.gen_models = tuple(cfg.gen_models)
        if cfg.backend == "openai" and not cfg.base_url:
            # What the SDK would use: recorded so the manifest, the resume check and errors name the real server.
            cfg.base_url = os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL
        return cfg

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise DataGenError(message)

        need(
            self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}"
        )
        need(len(self.domains) > 0, "--domains is empty")
        need(
            len(set(self.domains)) == len(self.domains),
            f"--domains repeats a domain: {','.join(self.domains)}",
        )
        for d in self.domains:
            need(
                d in DOMAIN_NAMES, f"--domains: unknown domain {d!r} (choose from {', '.join(DOMAIN_NAMES)})"
            )
        if self.preset is not None:
            get_domain(self.domains[0], self.preset)  # raises for a bad preset/domain combination
            need(self.domains == ("reviews",), f"--preset {self.preset} generates only the reviews domain")
        need(isinstance(self.users, int) and self.users >= 1, f"--users must be >= 1, not {self.users}")
        need(self.users <= MAX_USERS, f"--users must be <= {MAX_USERS:,} per domain, not {self.users}")
        need(
            isinstance(self.prefs_per_user, int) and self.prefs_per_user >= 1,
            f"--prefs-per-user must be >= 1, not {self.prefs_per_user}",
        )
        need(0.0 <= self.test_fraction < 1.0, f"--test-fraction must be in [0, 1), not {self.test_fraction}")
        need(0.0 <= self.label_noise <= 0.5, f"--label-noise must be in [0, 0.5], not {self.label_noise}")
        if self.backend != "template":
            need(self.model is not None, f"--backend {self.backend} needs --model")
            need(
                self.label_noise == 0.0,
                "--label-noise applies to the template backend only (the LLM judge labels)",
            )
            need(self.candidates >= 2, f"--candidates must be >= 2, not {self.candidates}")
            need(
                self.response_mode in RESPONSE_MODES,
                f"--response-mode must be one of {', '.join(RESPONSE_MODES)}, not {self.response_mode!r}",
            )
            need(self.concurrency >= 1, f"--concurrency must be >= 1, not {self.concurrency}")
            need(self.timeout_s > 0, f"--timeout must be > 0, not {self.timeout_s}")
            need(self.max_retries >= 0, f"--max-retries must be >= 0, not {self.max_retries}")
            need(self.max_traits >= 0, f"--max-traits must be >= 0, not {self.max_traits}")
            need(self.max_tokens >= 1, f"--max-tokens must be >= 1, not {self.max_tokens}")
            need(self.temperature >= 0, f"--temperature must be >= 0, not {self.temperature}")
            need(
                self.response_mode != "persona" or self.users >= 2,
                "--response-mode persona needs --users >= 2",
            )
        need(self.chunk_users is None or self.chunk_users >= 1, "--chunk-users must be >= 1")

    def generator_record(self) -> dict:
        """The output-determining options: written to the manifest and compared on resume."""
        keys = ["backend", "domains", "users", "prefs_per_user", "test_fraction", "seed", "preset"]
        if self.backend == "template":
            keys.append("label_noise")
        else:
            keys += [
                "model",
                "base_url",
                "gen_models",
                "judge_model",
                "candidates",
                "response_mode",
                "persona_improvement",
                "max_traits",
                "temperature",
                "max_tokens",
            ]
        record = {k: getattr(self, k) for k in keys}
        record = {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}
        return {"name": "fspo-engine gen-data", "version": 1, **record}


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


# --- small file helpers --------------------------------------------------------------------------
def _dumps(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def json_text(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2) + "\n"


def write_staged(path: Path, chunks: Iterable[str]) -> Path:
    """Write `chunks` (UTF-8) to a new temp file beside `path`, fsynced; returns the temp file's path, for
    the caller to `os.replace` onto `path`. The file is created as `open(path, "w")` would create it:
    mode 0o666 less the umask (tempfile.mkstemp makes 0o600 files, which the rename would hand on to a
    dataset other users of the machine then cannot read). O_EXCL + a random name keep it unique."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def remove_stale_temps(out: Path, names: Iterable[str]) -> None:
    """Delete the temp files a killed run staged for `names` in `out` (one writer per directory)."""
    for name in names:
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: dict) -> None:
    os.replace(write_staged(path, [json_text(obj)]), path)


@contextlib.contextmanager
def locked_dir(out: Path):
    """Hold an exclusive lock on the directory `out` (flock on the directory's own fd) for a whole run.

    A second gen-data or import on the same --out then fails at once instead of interleaving its writes
    with ours. Locking the directory rather than a lock file leaves nothing behind, and the kernel drops
    the lock when the process dies (kill -9 included), so a stale lock cannot block a resume."""
    if fcntl is None:
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataGenError(f"{out}: another gen-data run is writing this directory") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def foreign_files(out: Path) -> list[str]:
    """Dataset file names in `out` that no manifest of ours vouches for (the user's own files)."""
    if (out / "manifest.json").exists() or (out / STATE_DIR).exists():
        return []
    return [name for name in ("users.jsonl", "prefs.jsonl") if (out / name).exists()]


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- producers: one unit (domain, user index) -> (user record | None, pref records, counters) ----
class TemplateProducer:
    def __init__(self, cfg: GenConfig, domains: dict[str, TemplateDomain]):
        self.cfg = cfg
        self.domains = domains

    async def unit(self, user: User):
        domain, cfg = self.domains[user.domain], self.cfg
        rng = user_rng(cfg.seed, user.domain, user.index, "prefs")
        prefs, flipped = [], 0
        for j in range(cfg.prefs_per_user):
            pair = domain.make_pair(user.traits, rng, cfg.label_noise)
            flipped += pair.flipped
            prefs.append(
                {
                    "pref_id": f"{user.user_id}-{j:04d}",
                    "user_id": user.user_id,
                    "question": pair.question,
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "domain": user.domain,
                    "axes": pair.axes,
                    "noise_flipped": pair.flipped,
                }
            )
        return user.record(), prefs, {"pairs": len(prefs), "noise_flipped": flipped}

    async def aclose(self):
        pass


class LLMProducer:
    """View-conditioned / persona-steered responses, judged per user with persona improvement."""

    def __init__(self, cfg: GenConfig, domains: dict[str, TemplateDomain], backend, heldout: dict):
        self.cfg = cfg
        self.domains = domains
        self.backend = backend
        self.heldout = heldout
        self._views: dict[str, asyncio.Future] = {}
        self.first_error: str | None = None

    def _note(self, exc: Exception) -> None:
        if self.first_error is None:
            self.first_error = str(exc)
            print(f"warning: {exc}", file=sys.stderr)

    async def _view_responses(self, question: str) -> list[str]:
        cfg, backend = self.cfg, self.backend
        models = cfg.gen_models or (cfg.model,)
        views = await backend.chat_json(
            views_messages(question, cfg.candidates),
            valid_views,
            what="views",
            model=models[0],
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
        )
        views = views[: cfg.candidates]
        replies = await asyncio.gather(
            *(
                backend.chat_json(
                    response_messages(question, view),
                    valid_response,
                    what="response",
                    model=models[i % len(models)],
                    temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens,
                )
                for i, view in enumerate(views)
            ),
            return_exceptions=True,
        )
        responses = []
        for r in replies:
            if isinstance(r, MalformedReply):
                self._note(r)
            elif isinstance(r, BaseException):
                raise r
            elif r not in responses:
                responses.append(r)
        if len(responses) < 2:
            raise MalformedReply(f"fewer than 2 usable responses for question {question[:60]!r}")
        return responses

    def view_responses(self, question: str):
        if question not in self._views:  # each question's views are generated once and shared
            self._views[question] = asyncio.ensure_future(self._view_responses(question))
        return asyncio.shield(self._views[question])

    async def persona_response(self, question: str, description: str) -> str:
        return await self.backend.chat_json(
            persona_messages(question, description),
            valid_response,
            what="persona response",
            model=(self.cfg.gen_models or (self.cfg.model,))[0],
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
        )

    async def _pair(self, user: User, question: str, draws: list[int]):
        cfg = self.cfg
        if cfg.response_mode == "persona":
            other_index = (user.index + 1 + draws[2] % (cfg.users - 1)) % cfg.users
            other = make_user(
                self.domains[user.domain], cfg.seed, other_index, "train", self.heldout[user.domain]
            )
            x, y = await asyncio.gather(
                self.persona_response(question, user.description),
                self.persona_response(question, other.description),
            )
            if x == y:
                return None
            return (question, x, y) if draws[0] % 2 else (question, y, x)
        cands = list(await self.view_responses(question))
        if cfg.response_mode == "both":
            own = await self.persona_response(question, user.description)
            cands += [own] if own not in cands else []
        i = draws[0] % len(cands)
        j = (i + 1 + draws[1] % (len(cands) - 1)) % len(cands)
        return question, cands[i], cands[j]

    async def unit(self, user: User):
        cfg = self.cfg
        rng = user_rng(cfg.seed, user.domain, user.index, "prefs")
        # All of this user's random draws happen before any await: order-independent under asyncio.
        plan = [
            (self.domains[user.domain].sample_question(rng).text, [rng.getrandbits(30) for _ in range(3)])
            for _ in range(cfg.prefs_per_user)
        ]
        built = await asyncio.gather(*(self._pair(user, q, d) for q, d in plan), return_exceptions=True)
        counters = {
            "pairs": 0,
            "questions_failed": 0,
            "dropped_flip": 0,
            "dropped_undecided": 0,
            "dropped_malformed": 0,
            "traits_added": 0,
            "users_skipped": 0,
            "entropy_before_sum": 0.0,
            "entropy_before_n": 0,
            "entropy_after_sum": 0.0,
            "entropy_after_n": 0,
        }
        pairs, slots = [], []
        for k, b in enumerate(built):
            if isinstance(b, MalformedReply):
                self._note(b)
                counters["questions_failed"] += 1
            elif isinstance(b, BaseException):
                raise b
            elif b is not None:
                pairs.append(b)
                slots.append(k)
        labels = await label_user(
            self.backend,
            user.description,
            pairs,
            improve=cfg.persona_improvement,
            max_traits=cfg.max_traits,
            model=cfg.judge_model or cfg.model,
        )
        prefs = []
        for k, (question, x, y), decision in zip(slots, pairs, labels.decisions):
            kind = decision.kind
            if kind in ("x", "y"):
                chosen, rejected = (x, y) if kind == "x" else (y, x)
                prefs.append(
                    {
                        "pref_id": f"{user.user_id}-{k:04d}",
                        "user_id": user.user_id,
                        "question": question,
                        "chosen": chosen,
                        "rejected": rejected,
                        "domain": user.domain,
                    }
                )
            else:
                counters[
                    {"flip": "dropped_flip", "tie": "dropped_undecided"}.get(kind, "dropped_malformed")
                ] += 1
        counters.update(
            pairs=len(pairs),
            traits_added=len(labels.added_traits),
            entropy_before_sum=sum(labels.entropy_before),
            entropy_before_n=len(labels.entropy_before),
            entropy_after_sum=sum(labels.entropy_after),
            entropy_after_n=len(labels.entropy_after),
        )
        if not prefs:
            counters["users_skipped"] = 1
            return None, [], counters
        record = user.record()
        record["description"] = labels.description  # the final, improved description
        record["traits"] = {**user.traits, **{f"added_{i + 1}": t for i, t in enumerate(labels.added_traits)}}
        return record, prefs, counters

    async def aclose(self):
        await self.backend.aclose()


def _make_backend(cfg: GenConfig, out: Path):
    cache_dir = cfg.cache_dir or str(out / ".llm-cache")
    if cfg.backend == "openai":
        return OpenAIBackend(
            model=cfg.model,
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
            cache_dir=cache_dir,
        )
    return HFBackend(cfg.model, cache_dir=cache_dir)


# --- the run ----------------------------------------------------------------------------------
def generate_dataset(out_dir: str | os.PathLike, **options) -> GenResult:
    """Generate (or finish, or confirm) the dataset directory `out_dir`; see GenConfig for options.

    Example (what `fspo-engine quickstart` needs):
        generate_dataset("data/qs", preset="quickstart", users=600, prefs_per_user=24, seed=0)
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
    backend = _make_backend(cfg, out) if created and cfg.backend != "template" else None
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
    generator = cfg.generator_record()
    state_dir = out / STATE_DIR
    manifest_path = out / "manifest.json"

    if cfg.overwrite:
        # Only an unfinished run is discarded now. The old dataset stays whole (and usable by train/score)
        # until _finalize swaps the new files in: a kill before then leaves it exactly as it was.
        shutil.rmtree(state_dir, ignore_errors=True)
    elif manifest_path.exists() and not state_dir.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise DataGenError(f"{manifest_path}: unreadable manifest ({exc}); pass --overwrite") from None
        if manifest.get("generator") != generator:
            raise DataGenError(f"{out}: already holds a dataset made with other arguments; pass --overwrite")
        return GenResult(out, manifest, 0.0, 0)
    elif foreign := foreign_files(out):
        raise DataGenError(
            f"{out}: holds {' and '.join(foreign)} without a gen-data manifest; pass --overwrite to replace"
        )
    state = None
    if (state_dir / "state.json").exists():
        try:
            state = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataGenError(f"{state_dir / 'state.json'}: unreadable ({exc}); pass --overwrite") from None
        if state.get("generator") != generator:
            raise DataGenError(f"{out}: holds an unfinished run with other arguments; pass --overwrite")
    n_units = len(cfg.domains) * cfg.users
    if state is None or (state["phase"] == "generating" and state["done"] < n_units):
        if backend is None and cfg.backend != "template":
            backend = _make_backend(cfg, out)  # before the state: a bad --model leaves none behind
    if state is None:
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir()
        state = {
            "generator": generator,
            "phase": "generating",
            "done": 0,
            "users_bytes": 0,
            "prefs_bytes": 0,
            "counters": {},
            "usage": {},
            "first_error": None,
        }
        write_json_atomic(state_dir / "state.json", state)
    try:
        return asyncio.run(_run(out, cfg, state, backend))
    except BaseException:
        if state["phase"] == "generating" and state["done"] == 0:
            # Nothing was generated (a model-name typo answered 404, a dead server): a kept state would
            # only make the corrected command refuse to start ("unfinished run with other arguments").
            shutil.rmtree(state_dir, ignore_errors=True)
        raise


async def _run(out: Path, cfg: GenConfig, state: dict, backend) -> GenResult:
    start = time.perf_counter()
    state_dir = out / STATE_DIR
    domains = {name: get_domain(name, cfg.preset) for name in cfg.domains}
    heldout = {name: d.heldout_combos(cfg.seed, cfg.test_fraction) for name, d in domains.items()}
    tests = {name: test_indices(cfg.seed, name, cfg.users, cfg.test_fraction) for name in cfg.domains}
    units = [(name, i) for name in cfg.domains for i in range(cfg.users)]
    written = 0
    producer = None
    if state["phase"] == "generating" and state["done"] < len(units):
        if cfg.backend == "template":
            producer = TemplateProducer(cfg, domains)
        else:
            producer = LLMProducer(cfg, domains, backend, heldout)
        try:
            written = await _generate(cfg, state, state_dir, units, domains, heldout, tests, producer)
        finally:
            await producer.aclose()
    if state["phase"] == "generating":
        state = _prepare_manifest(cfg, state, state_dir)
    manifest = _finalize(out, state)
    usage = state.get("usage", {})
    return GenResult(out, manifest, time.perf_counter() - start, written, usage)


async def _generate(cfg, state, state_dir, units, domains, heldout, tests, producer) -> int:
    from tqdm import tqdm

    users_path, prefs_path = state_dir / "users.jsonl", state_dir / "prefs.jsonl"
    # Drop whatever a killed run wrote after its last checkpoint.
    for path, size in ((users_path, state["users_bytes"]), (prefs_path, state["prefs_bytes"])):
        with open(path, "ab") as f:
            f.truncate(size)
    chunk = cfg.chunk_users or (256 if cfg.backend == "template" else max(8, cfg.concurrency))
    counters = state["counters"]
    usage_before = dict(state.get("usage", {}))  # token accounting of earlier, killed invocations
    written = 0
    bar = tqdm(
        total=len(units),
        initial=state["done"],
        unit="user",
        disable=None if cfg.progress else True,  # None: no bar when stderr is not a terminal (a log file)
        file=sys.stderr,
        dynamic_ncols=True,
        desc=f"gen-data {cfg.backend}",
    )
    plain = cfg.progress and bar.disable  # a log file gets a plain line at most every 30 s instead
    t_start = last_line = time.monotonic()
    with open(users_path, "ab") as fu, open(prefs_path, "ab") as fp:
        while state["done"] < len(units):
            batch = units[state["done"] : state["done"] + chunk]
            users = []
            for name, i in batch:
                split = "test" if i in tests[name] else "train"
                users.append(make_user(domains[name], cfg.seed, i, split, heldout[name]))
            results = await asyncio.gather(*(producer.unit(u) for u in users))
            for record, prefs, unit_counters in results:
                if record is not None:
                    fu.write((_dumps(record) + "\n").encode())
                fp.write("".join(_dumps(p) + "\n" for p in prefs).encode())
                for k, v in unit_counters.items():
                    counters[k] = counters.get(k, 0) + v
                written += len(prefs)
            for f in (fu, fp):
                f.flush()
                os.fsync(f.fileno())
            state.update(done=state["done"] + len(batch), users_bytes=fu.tell(), prefs_bytes=fp.tell())
            if isinstance(producer, LLMProducer):
                usage = producer.backend.usage.as_dict()
                state["usage"] = {k: usage_before.get(k, 0) + v for k, v in usage.items()}
                state["first_error"] = state.get("first_error") or producer.first_error
            write_json_atomic(state_dir / "state.json", state)
            bar.update(len(batch))
            rate = written / max(time.monotonic() - t_start, 1e-9)
            bar.set_postfix(prefs=written, prefs_per_s=f"{rate:.0f}")
            if plain and (time.monotonic() - last_line >= 30 or state["done"] == len(units)):
                last_line = time.monotonic()
                print(f"gen-data {cfg.backend}: {state['done']}/{len(units)} users, {written} prefs, "
                      f"{rate:.0f} prefs/s", file=sys.stderr, flush=True)
    bar.close()
    return written


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


def _finalize(out: Path, state: dict) -> dict:
    """Move the files into place and write the manifest last; safe to repeat after a kill.

    Three files cannot be replaced at once. So that no reader ever pairs new users with old prefs (or an
    old manifest with new files), the old manifest is removed first: readers refuse a directory without
    one (and a reader that was already reading sees its manifest replaced, and refuses too). Everything
    slow (writing, fsync) happens before that, leaving a window of three renames in which the directory
    has no manifest; a kill inside it leaves the state at "finalizing", and re-running the same gen-data
    command completes the swap."""
    state_dir = out / STATE_DIR
    remove_stale_temps(out, ["manifest.json", GEN_STATS])
    # Run bookkeeping (requests, cache hits, retries, tokens) differs between runs that make the same
    # data, so it lives beside the manifest, never in it; a template run leaves none (and no stale one).
    if state.get("usage"):
        write_json_atomic(out / GEN_STATS, {"usage": state["usage"]})
    else:
        (out / GEN_STATS).unlink(missing_ok=True)
    staged = write_staged(out / "manifest.json", [json_text(state["manifest"])])
    (out / "manifest.json").unlink(missing_ok=True)
    for name in ("users.jsonl", "prefs.jsonl"):
        if (state_dir / name).exists():
            os.replace(state_dir / name, out / name)
    os.replace(staged, out / "manifest.json")
    shutil.rmtree(state_dir, ignore_errors=True)
    return state["manifest"]


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
