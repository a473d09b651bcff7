"""fspo_engine.engine: the model, data, training loop and evaluation.

The repository's top-level folders are installed as subpackages of one namespace, `fspo_engine.*`
(pyproject.toml's package-dir). `kernels/` has no `__init__.py`: a namespace portion, so that run from the
repository root (where the root is on `sys.path`) a regular package named `kernels` elsewhere on the path,
such as Hugging Face's, which transformers imports, wins over our folder. Nothing here edits `sys.path`.
"""
