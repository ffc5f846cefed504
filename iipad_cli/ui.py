"""Console output: everything human-facing goes to stderr, stdout is for machine-readable results."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from iipad_cli.errors import UsageError

err_console = Console(stderr=True)


def progress(quiet: bool = False) -> Progress:
    """A stderr progress bar; `quiet` disables it (design.md §1 `--quiet`)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )


def print_path(path: Path) -> None:
    """A path on stdout for the next command of a pipe: one line, with `./` in front of a relative
    path that starts with a dash, so that no command reads it as an option."""
    text = str(path)
    print(f"./{text}" if text.startswith("-") else text, flush=True)


def read_run_dir_from_stdin() -> Path:
    """The run directory piped in by the previous stage (`iipad extract ... | iipad train`).

    The whole of stdin is the path, less one trailing newline (or NUL), so spaces, unicode and a
    leading dash survive; several lines are refused rather than guessed at.
    """
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("missing argument RUN: give the run directory, or pipe it in (`iipad extract ... | iipad train`)")
    text = sys.stdin.read()
    for end in ("\n", "\0"):
        text = text.removesuffix(end)
    if not text:
        raise UsageError("missing argument RUN: nothing was piped in (did the previous command fail?)")
    if "\n" in text or "\0" in text:
        count = len(text.replace("\0", "\n").splitlines())
        raise UsageError(f"stdin holds {count} run directories; give one as an argument (e.g. with a loop)")
    return Path(text)


def log(message: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(message, highlight=False, soft_wrap=True)


def warn(message: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
