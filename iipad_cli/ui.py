"""Console output: everything human-facing goes to stderr, stdout is for machine-readable results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


def log(message: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(message, highlight=False, soft_wrap=True)


def warn(message: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
