"""`GenConfig`: every option of `gen-data` (and of `generate_dataset`), its defaults and its checks."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fspo_engine.data_gen.domains import DOMAIN_NAMES, get_domain
from fspo_engine.data_gen.errors import DataGenError

BACKENDS = ("template", "openai", "hf")
# user-views: a response for this user's view and one for a contrasting view, both written for (user, question);
# views: one set of views per question, shared by every user (the old mode); persona: written for this user vs
# for another user; both: shared views plus one written for this user.
RESPONSE_MODES = ("user-views", "views", "persona", "both")
SOURCES = ("llm", "template")  # --personas / --questions: or a FILE path
ABLATIONS = ("random-labels",)
# Preset defaults, applied to the options the caller left unset (None).
PRESET_DEFAULTS = {
    "quickstart": {"users": 2000, "prefs_per_user": 12, "label_noise": 0.0},
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
    users: int | None = None  # users per domain (200; 2000 with the quickstart preset, 600 with quickstart-easy)
    prefs_per_user: int | None = None  # preference pairs per user (16; 12 with quickstart, 24 with quickstart-easy)
    test_fraction: float = 0.2  # fraction of each domain's users in the unseen `test` split
    val_fraction: float = 0.0  # fraction in the `val` split (tuning); with held-out combinations, its own ones
    seed: int = 0
    label_noise: float | None = None  # template only: P(swap chosen/rejected) (0.02; 0 for quickstart)
    preset: str | None = None  # "quickstart" / "quickstart-easy": small-vocabulary reviews for the CPU quickstart
    # --- LLM backends (openai, hf) ---
    model: str | None = None  # model name (openai) or model directory (hf)
    base_url: str | None = None  # OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the environment variable holding the key
    gen_models: tuple[str, ...] = ()  # generator models used round-robin over views (default: model)
    judge_model: str | None = None  # judge model (default: model)
    personas: str | None = None  # llm (default for LLM backends) | template | FILE.jsonl (description, traits)
    persona_schema: str | None = None  # FILE.json of traits and topics per domain (default: the built-in one)
    questions: str | None = None  # llm (default for LLM backends) | template | FILE.jsonl (question, domain)
    questions_per_domain: int | None = None  # LLM questions per domain (default: each serves at most ~5 pairs)
    dedup_threshold: float = 0.7  # MinHash Jaccard at which two personas or questions are near-duplicates
    candidates: int = 4  # views per question (views and both modes)
    response_mode: str = "user-views"  # user-views | views | persona | both (see RESPONSE_MODES)
    persona_improvement: bool = True
    max_traits: int = 3  # traits persona improvement may add per user
    swap_control_fraction: float = 0.05  # kept pairs re-judged under another user's persona (label audit)
    min_prefs_per_user: int = 2  # users with fewer kept prefs are dropped (and counted)
    ablation: str | None = None  # random-labels: the same texts, each label a seeded coin flip
    temperature: float = 0.8  # generation temperature (the judge always uses 0)
    max_tokens: int = 256
    # --- run mechanics (do not change the output) ---
    concurrency: int = 256  # requests in flight at once, over all servers
    timeout_s: float = 60.0
    max_retries: int = 5  # retries on 429/5xx/timeouts/resets, exponential backoff, on another server if any
    backoff_s: float = 0.5  # first retry delay (doubles each retry, with jitter; a Retry-After header wins)
    backoff_max_s: float = 30.0  # longest delay between retries
    malformed_retries: int = 2  # new tries (new seed) at a reply that fails its schema, before it is dropped
    commit_every_s: float = 30.0  # seconds between commits of the finished prefix of users (resume points)
    cache_dir: str | None = None  # reply cache database (default OUT/.llm-cache)
    progress: bool = True
    overwrite: bool = False

    @property
    def generator_models(self) -> tuple[str, ...]:
        return self.gen_models or (self.model,)

    @property
    def llm(self) -> bool:
        return self.backend != "template"

    def resolved(self) -> GenConfig:
        defaults = {**DEFAULTS, **PRESET_DEFAULTS.get(self.preset or "", {})}
        if self.backend != "template":
            defaults["label_noise"] = 0.0  # the LLM judge labels; noise is a template-only knob
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **updates)
        cfg.domains = tuple(cfg.domains)
        cfg.gen_models = tuple(cfg.gen_models)
        source = "llm" if cfg.llm else "template"
        cfg.personas, cfg.questions = cfg.personas or source, cfg.questions or source
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
        need(0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        need(self.test_fraction + self.val_fraction < 1.0,
             f"--test-fraction + --val-fraction must leave training users, not {self.test_fraction + self.val_fraction}")
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
        need(self.ablation is None or self.ablation in ABLATIONS,
             f"--ablation must be one of {', '.join(ABLATIONS)}, not {self.ablation!r}")
        if not self.llm:
            for name in ("personas", "questions"):
                need(getattr(self, name) == "template",
                     f"--{name} {getattr(self, name)} needs an LLM backend (--backend openai|hf)")
            need(self.persona_schema is None, "--persona-schema needs --personas llm (an LLM backend)")
        else:
            for name in ("personas", "questions"):
                value = getattr(self, name)
                need(value in SOURCES or Path(value).is_file(),
                     f"--{name} must be llm, template or an existing JSONL file, not {value!r}")
            need(self.persona_schema is None or Path(self.persona_schema).is_file(),
                 f"--persona-schema: no such file: {self.persona_schema}")
            need(self.persona_schema is None or self.personas == "llm", "--persona-schema needs --personas llm")
            need(self.questions_per_domain is None or self.questions_per_domain >= 1,
                 f"--questions-per-domain must be >= 1, not {self.questions_per_domain}")
            need(0.0 < self.dedup_threshold <= 1.0, f"--dedup-threshold must be in (0, 1], not {self.dedup_threshold}")
            need(0.0 <= self.swap_control_fraction <= 1.0,
                 f"--swap-control-fraction must be in [0, 1], not {self.swap_control_fraction}")
            need(self.min_prefs_per_user >= 0, f"--min-prefs-per-user must be >= 0, not {self.min_prefs_per_user}")
            need(self.malformed_retries >= 0, f"--malformed-retries must be >= 0, not {self.malformed_retries}")
            need(self.backoff_s >= 0 and self.backoff_max_s >= 0, "--backoff and --backoff-max must be >= 0")
            need(self.commit_every_s > 0, f"--commit-every-s must be > 0, not {self.commit_every_s}")

    def generator_record(self) -> dict:
        """The output-determining options: written to the manifest and compared on resume."""
        # Not the server URLs: with several servers of one model any of them may answer a request, and a run
        # may resume on other servers (the reply cache is keyed by the request, not the server).
        keys = ["backend", "domains", "users", "prefs_per_user", "test_fraction", "seed", "preset"]
        if self.backend == "template":
            keys.append("label_noise")
        else:
            keys += [
                "model",
                "gen_models",
                "judge_model",
                "personas",
                "questions",
                "questions_per_domain",
                "dedup_threshold",
                "candidates",
                "response_mode",
                "persona_improvement",
                "max_traits",
                "swap_control_fraction",
                "min_prefs_per_user",
                "temperature",
                "max_tokens",
            ]
        record = {k: getattr(self, k) for k in keys}
        record = {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}
        if self.llm:
            # A file's name says little and may move: its content's digest is what decides the data.
            for name in ("personas", "questions"):
                if record[name] not in SOURCES:
                    record[name] = "file"
                    record[f"{name}_sha256"] = file_digest(getattr(self, name))
            record["persona_schema_sha256"] = file_digest(self.persona_schema) if self.persona_schema else None
        if self.ablation is not None:
            record["ablation"] = self.ablation
        if self.val_fraction:  # absent when 0, so datasets without a validation split keep their manifests
            record["val_fraction"] = self.val_fraction
        return {"name": "fspo-engine gen-data", "version": 1 if not self.llm else 2, **record}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: what the manifest records of a user-supplied file, compared on resume."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
