"""Synthetic preference data for FSPO: users, questions, response pairs, labels (standalone package).

    from fspo_engine.data_gen import generate_dataset
    generate_dataset("data/quickstart", preset="quickstart", seed=0)   # offline, deterministic
    generate_dataset("data/llm", backend="openai", model="m", base_url="http://127.0.0.1:8000/v1")

writes the fspo-prefs/1 directory of DESIGN.md (manifest.json, users.jsonl, prefs.jsonl).
`import_dataset` converts the released FSPO datasets into the same format.
"""

from fspo_engine.data_gen.config import GenConfig
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.importers import import_dataset
from fspo_engine.data_gen.pipeline import GenResult, format_summary, generate_dataset

__all__ = ["DataGenError", "GenConfig", "GenResult", "format_summary", "generate_dataset", "import_dataset"]
