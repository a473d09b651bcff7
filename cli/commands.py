"""The list of `fspo-engine` subcommands, one module each."""

from fspo_engine.cli.model_info import model_info

ALL = [model_info]
