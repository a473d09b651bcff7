"""Configs shipped with fspo-engine: `fspo-engine train --config official` reads official.toml here."""
