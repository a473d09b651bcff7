"""`GenConfig`: every option of `gen-data` (and of `generate_dataset`), its defaults and its checks."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from fspo_engine.data_gen.domains import DOMAIN_NAMES, get_domain
from fspo_engine.data_gen.errors import DataGenError

BACKENDS = ("template", "openai", "hf")
RESPONSE_MODES = ("views", "persona", "both")
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
