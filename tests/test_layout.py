"""The repository's top-level folders are fspo_engine's subpackages; run from the repository root they must
not shadow top-level packages of the same name (transformers >= 5.25 imports Hugging Face's `kernels`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_root_does_not_shadow_a_top_level_kernels_package():
    # `python -c` from the root puts the root (as "") first on sys.path, as `python -m pytest` does.
    probe = ("import importlib.util, sys; import fspo_engine.engine; "
             "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else 'none'); "
             "print(any(p in ('', '.') for p in sys.path))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    origin, root_on_path = res.stdout.split()
    assert origin == "none" or not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin
    assert root_on_path == "False"
    # Without the guard the root's kernels/ is what `import kernels` finds (the test can fail).
    res = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels').origin)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert Path(res.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), res.stdout
