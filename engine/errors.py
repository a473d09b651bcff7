"""The one exception type for bad user input (files, configs, arguments)."""


class FspoError(Exception):
    """An error in what the user gave us: the CLI prints it as one line and exits 1, no traceback.

    Messages name the place first: `path:line: reason` for records, `path: reason` for files.
    """
