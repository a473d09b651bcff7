"""`fspo-engine`: the command-line entry point.

Each command lives in its own module of this package and is registered here. Commands raise
`FspoError` (engine) or `DataGenError` (data_gen) for bad input; `main` prints those as one line
on stderr and exits 1. Set FSPO_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import click


class _Group(click.Group):
    """A click group that turns user-input errors into one line and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - filtered below
            if os.environ.get("FSPO_DEBUG") or not _is_user_error(exc):
                raise
            rank = int(os.environ.get("RANK", "0") or 0)
            if rank and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                # Under torchrun every rank usually meets the same bad input: rank 0 reports it and exits, and
                # torchrun ends the other ranks within a second. An error only this rank met still shows.
                time.sleep(5)
                click.echo(f"error: [rank {rank}] {exc}", err=True)
                sys.exit(1)
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


def _is_user_error(exc: BaseException) -> bool:
    from fspo_engine.data_gen.errors import DataGenError
    from fspo_engine.engine.errors import FspoError

    return isinstance(exc, (FspoError, DataGenError, FileNotFoundError, FileExistsError, PermissionError,
                            IsADirectoryError, NotADirectoryError))


# The package's own folders (in a source checkout their parent also holds tests and a virtualenv).
_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                  for d in ("engine", "kernels", "data_gen", "cli", "benchmarks"))
_shown: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """Our own warnings (about the user's files and options) as one `warning: ...` line, once per process
    and, under torchrun, from rank 0 only; other libraries' warnings as Python shows them."""
    if not os.path.abspath(filename).startswith(_OWN_DIRS):
        return _default(message, category, filename, lineno, file, line)
    text = str(message)
    if text in _shown or int(os.environ.get("RANK", "0") or 0) != 0:
        return
    _shown.add(text)
    click.echo(f"warning: {text}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fspo-engine")
def cli():
    """fspo-engine: Few-Shot Preference Optimization of Llama models, with fused Triton kernels."""
    warnings.showwarning = _show_warning


def _register():
    # Imported here so `fspo-engine --help` stays fast: heavy imports happen inside each command.
    from fspo_engine.cli import commands

    for command in commands.ALL:
        cli.add_command(command)


_register()

if __name__ == "__main__":
    cli()
