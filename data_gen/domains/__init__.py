"""Template domains: trait axes, question banks, response composition and scoring rules."""

from __future__ import annotations

from fspo_engine.data_gen.domains.base import Pair, Question, TemplateDomain
from fspo_engine.data_gen.domains.elix import Elix
from fspo_engine.data_gen.domains.reviews import QuickstartEasyReviews, QuickstartReviews, Reviews
from fspo_engine.data_gen.domains.roleplay import Roleplay
from fspo_engine.data_gen.errors import DataGenError

DOMAIN_NAMES = ("reviews", "elix", "roleplay")
# Presets swap in a small-vocabulary variant of one domain (the CPU quickstart's).
PRESETS = {"quickstart": QuickstartReviews, "quickstart-easy": QuickstartEasyReviews}


def get_domain(name: str, preset: str | None = None) -> TemplateDomain:
    """The template domain `name`, or its small-vocabulary variant under a preset."""
    if preset is not None and preset not in PRESETS:
        raise DataGenError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if preset is not None:
        if name != PRESETS[preset].name:
            raise DataGenError(f"the {preset} preset has only the {PRESETS[preset].name} domain, not {name!r}")
        return PRESETS[preset]()
    domains = {"reviews": Reviews, "elix": Elix, "roleplay": Roleplay}
    if name not in domains:
        raise DataGenError(f"unknown domain {name!r} (choose from {', '.join(DOMAIN_NAMES)})")
    return domains[name]()


__all__ = ["DOMAIN_NAMES", "PRESETS", "Pair", "Question", "TemplateDomain", "get_domain"]
