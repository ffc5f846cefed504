"""`iipad bank`: the category-aware banks (eqs. 13–14) -> RUN/banks.safetensors."""

from __future__ import annotations

import typer

from iipad_cli import options as o
from iipad_cli.commands import add
from iipad_cli.ui import print_path, read_run_dir_from_stdin
from iipad_cli.pipeline.bank import BankOptions


def bank_command(options: BankOptions, run_dir: o.RunDirArg = None) -> None:
    """Build the category-aware banks from the shot images; print the run directory.

    Stores each shot image's Q-Former tokens, prompt embeddings and memory-layer patch tokens,
    all normalised. Class names are kept for reporting only.

    Example: iipad bank runs/mvtec-1shot
    """
    from iipad_cli.stages.bank import build_banks

    if run_dir is None:
        run_dir = read_run_dir_from_stdin()
    build_banks(run_dir, options)
    print_path(run_dir)


def register(app: typer.Typer) -> None:
    add(app, "bank", bank_command)
