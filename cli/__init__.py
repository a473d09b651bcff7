import fspo_engine.engine  # noqa: F401  (first: it takes the repository root off sys.path)
