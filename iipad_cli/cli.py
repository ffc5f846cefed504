"""The `iipad` command line: one thin function per command (in `iipad_cli/commands/`).

Unix conventions (design.md §1): stdout carries only the machine-readable result, progress and
logs go to stderr; exit code 0 on success, 1 on a runtime error (IipadError, one line, no
traceback), 2 on bad usage.
"""

from __future__ import annotations

from typing import Annotated

import typer

from iipad_cli import __version__
from iipad_cli.commands import IipadGroup, report_error

app = typer.Typer(
    cls=IipadGroup,
    name="iipad",
    help="One-for-all few-shot anomaly detection (IIPAD, ICLR 2025): extract, train, bank, score, metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"iipad {__version__}")
        raise typer.Exit()


@app.callback()
def _check_launch(
    context: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True, metavar=""),
    ] = False,
) -> None:
    """Refuse, before any work, a single-process command started by torchrun with WORLD_SIZE > 1
    (distributed.py). Exit code 2 (bad usage); only rank 0 prints the line, not every rank."""
    from iipad_cli.distributed import UsageError, check_command, launch_from_env
    from iipad_cli.errors import IipadError
    from iipad_cli.ui import err_console

    try:
        launch = launch_from_env()
        check_command(context.invoked_subcommand or "", launch)
    except UsageError as error:
        if launch.is_main:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except IipadError as error:
        raise report_error(error) from None


# Importing the command modules registers their commands on `app`.
from iipad_cli.commands import register_all  # noqa: E402

register_all(app)


def main() -> None:
    # Errors are reported by the commands themselves (`iipad_cli.commands.command`).
    app()


if __name__ == "__main__":
    main()
