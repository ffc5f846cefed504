"""`iipad bank`: the category-aware banks (eqs. 13–14) -> RUN/banks.safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli.commands import user_errors


def register(app: typer.Typer) -> None:
    @app.command("bank")
    @user_errors
    def bank_command(
        run_dir: Annotated[Path, typer.Argument(help="Run directory with features.h5 and generator.safetensors.")],
        batch_size: Annotated[int, typer.Option(help="Shot images per generator + text-encoder pass.")] = 32,
        seed: Annotated[int, typer.Option(help="Recorded for provenance; banking is deterministic (eval mode).")] = 0,
        weights: Annotated[
            Optional[Path], typer.Option(help="Directory with the backbone's weight files (default: $IIPAD_WEIGHTS).")
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
        force: Annotated[
            bool, typer.Option("--force", help="Use a generator trained on another features file or backbone.")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
    ) -> None:
        """Build the category-aware banks from the shot images; print the run directory.

        Stores each shot image's Q-Former tokens, prompt embeddings and memory-layer patch tokens,
        all normalised. Class names are kept for reporting only.

        Example: iipad bank runs/mvtec-1shot
        """
        from iipad_cli.stages.bank import BankOptions, build_banks

        build_banks(
            run_dir,
            BankOptions(batch_size=batch_size, seed=seed, weights=weights, device=device, force=force, quiet=quiet),
        )
        typer.echo(str(run_dir))
