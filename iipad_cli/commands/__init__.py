"""Command modules: each defines `register(app)` adding its thin Typer command(s)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from iipad_cli.errors import IipadError
from iipad_cli.ui import err_console

F = TypeVar("F", bound=Callable[..., Any])

# One entry per module in this package; the order is the order of `iipad --help`.
COMMAND_MODULES: tuple[str, ...] = ("extract", "train", "bank", "score", "metrics", "run", "predict", "demo", "weights")


def user_errors(func: F) -> F:
    """Report an IipadError as one line on stderr and exit with code 1, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except IipadError as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def register_all(app: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"iipad_cli.commands.{name}").register(app)
