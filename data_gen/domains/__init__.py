"""Template domains: trait axes, question banks, response composition and scoring rules."""

from __future__ import annotations

from fspo_engine.data_gen.domains.base import Pair, Question, TemplateDomain
from fspo_engine.data_gen.domains.elix import Elix
from fspo_engine.data_gen.domains.reviews import QuickstartReviews, Reviews
from fspo_engine.data_gen.domains.roleplay import Roleplay
from fspo_engine.data_gen.errors import DataGenError

DOMAIN_NAMES = ("reviews", "elix", "roleplay")
PRESETS = ("quickstart",)


def get_domain(name: str, preset: str | None = None) -> TemplateDomain:
    """The template domain `name`; the quickstart preset swaps in the small-vocabulary reviews."""
    if preset is not None and preset not in PRESETS:
        raise DataGenError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if preset == "quickstart":
        if name != "reviews":
            raise DataGenError(f"the quickstart preset has only the reviews domain, not {name!r}")
        return QuickstartReviews()
    domains = {"reviews": Reviews, "elix": Elix, "roleplay": Roleplay}
    if name not in domains:
        raise DataGenError(f"unknown domain {name!r} (choose from {', '.join(DOMAIN_NAMES)})")
    return domains[name]()


__all__ = ["DOMAIN_NAMES", "PRESETS", "Pair", "Question", "TemplateDomain", "get_domain"]
