"""fspo_engine.cli: the `fspo-engine` click group (main.py) and one module per command."""
