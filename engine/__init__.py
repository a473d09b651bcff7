"""fspo_engine.engine: the model, data, training loop and evaluation.

Importing it (as `fspo_engine.cli` and `fspo_engine.data_gen` do first) takes the repository root off
`sys.path`. The repository's top-level folders are this project's subpackages (`kernels/` is
`fspo_engine.kernels`), and with the root on `sys.path` (`python -m ...` or `python -m pytest` run from it)
`kernels/` would shadow Hugging Face's `kernels` package, which transformers >= 5.25 imports. The editable
install finds our subpackages without the root on the path.
"""

import os as _os
import sys as _sys


def _drop_repository_root_from_sys_path() -> None:
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not _os.path.isfile(_os.path.join(root, "pyproject.toml")):
        return  # an installed copy: site-packages is not a repository root
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != root]


_drop_repository_root_from_sys_path()
