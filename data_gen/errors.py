"""The one exception type for bad input to the data generator (data_gen imports nothing from engine)."""


class DataGenError(Exception):
    """Bad arguments or unreadable input files: printed by the CLI as one line, exit 1, no traceback."""
