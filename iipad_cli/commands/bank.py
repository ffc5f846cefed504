"""`iipad bank`: the category-aware banks (eqs. 13–14) -> RUN/banks.safetensors."""

from __future__ import annotations

import typer

from iipad_cli import options as o
from iipad_cli.commands import command
from iipad_cli.pipeline.bank import BankOptions


def bank_command(run_dir: o.RunDirArg, options: BankOptions) -> None:
    """Build the category-aware banks from the shot images; print the run directory.

    Stores each shot image's Q-Former tokens, prompt embeddings and memory-layer patch tokens,
    all normalised. Class names are kept for reporting only.

    Example: iipad bank runs/mvtec-1shot
    """
    from iipad_cli.stages.bank import build_banks

    build_banks(run_dir, options)
    typer.echo(str(run_dir))


def register(app: typer.Typer) -> None:
    app.command("bank")(command(bank_command))
