"""Command modules: each defines thin module-level command functions and `register(app)`.

`command(func)` turns such a function into a Typer command: a parameter annotated with an options
dataclass (a stage's options, `RunOptions`) is expanded into that dataclass's fields, whose
`Annotated` Typer aliases (`iipad_cli/options.py`) are the option declarations, and the function
receives the dataclass built from them. It is also the CLI's one error handler: an IipadError, or
any failed write (full disk, read-only, permissions: `iipad_cli.writes`), becomes one line on
stderr and exit code 1, without a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, get_type_hints

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from iipad_cli.errors import IipadError, UsageError
from iipad_cli.ui import err_console
from iipad_cli.writes import hdf5_left_open, quiet_hdf5_write_errors, write_failure

# One entry per module in this package; the order is the order of `iipad --help`.
COMMAND_MODULES: tuple[str, ...] = ("extract", "train", "bank", "score", "metrics", "report", "run", "predict", "demo", "weights", "cache")


class _PlainHelpOption:
    """`--help` without a type column: Typer shows `<bool>` for it, as if `--help true` were valid."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class IipadGroup(_PlainHelpOption, TyperGroup):
    """The `iipad` and `iipad weights` groups."""


class IipadCommand(_PlainHelpOption, TyperCommand):
    """A command whose usage line names its arguments as the user types them (`RUN`, `[RUN]...`);
    Typer writes required ones in braces (`{run}`), which reads like literal syntax."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


def add(app: typer.Typer, name: str, func: Callable[..., Any], *, resumable: bool = False) -> None:
    """Register `func` (see `command`) as `app`'s command `name`."""
    app.command(name, cls=IipadCommand)(command(func, resumable=resumable))


def report_error(error: IipadError) -> typer.Exit:
    """Print the error as one line; the exit code is 2 for a UsageError, 1 otherwise."""
    code = 2 if isinstance(error, UsageError) else 1
    err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    if hdf5_left_open():
        # h5py's finalisers would crash the interpreter on the file a failed write left open.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return typer.Exit(code=code)


def _interrupted(resumable: bool) -> typer.Exit:
    if resumable:
        message = "interrupted; rerun the same command to resume (finished work is kept)"
    else:
        message = "interrupted; no artifact was replaced (each is written whole or not at all)"
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=130)


def command(func: Callable[..., Any], *, resumable: bool = False) -> Callable[..., Any]:
    """`func` as Typer sees it: options dataclasses expanded into their fields (and validated
    before anything runs), errors reported, Ctrl-C exit code 130 (docs/cli.md, exit codes).
    `resumable`: the command continues where it stopped when rerun (said on Ctrl-C)."""
    hints = get_type_hints(func, include_extras=True)
    expanded: dict[str, type] = {}
    params: list[inspect.Parameter] = []
    for name, parameter in inspect.signature(func).parameters.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            expanded[name] = annotation  # type: ignore[assignment]
            field_hints = get_type_hints(annotation, include_extras=True)
            for field in dataclasses.fields(annotation):
                default = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
                params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=field_hints[field.name]))
        else:
            params.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation))
    names = [p.name for p in params]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise TypeError(f"{func.__name__}: options declared twice: {sorted(duplicates)}")
    plain = [name for name in inspect.signature(func).parameters if name not in expanded]

    @functools.wraps(func)
    def wrapper(**values: Any) -> Any:
        arguments = {name: values[name] for name in plain}
        for name, cls in expanded.items():
            arguments[name] = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
        sys.unraisablehook = quiet_hdf5_write_errors
        try:
            for value in arguments.values():
                if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
                    value.validate()
            return func(**arguments)
        except KeyboardInterrupt:
            raise _interrupted(resumable) from None
        except IipadError as error:
            raise report_error(error) from None
        except (OSError, RuntimeError) as error:
            failure = write_failure(error)
            if failure is None:
                raise
            raise report_error(failure) from None

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def register_all(app: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"iipad_cli.commands.{name}").register(app)
