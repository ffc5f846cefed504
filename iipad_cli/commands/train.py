"""`iipad train RUN`: fit the prompt generator on RUN/features.h5 (see iipad_cli/stages/train.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli.commands import user_errors


def register(app: typer.Typer) -> None:
    @app.command("train")
    @user_errors
    def train_command(
        run_dir: Annotated[Path, typer.Argument(help="Run directory holding features.h5 (from `iipad extract`).")],
        preset: Annotated[str, typer.Option(help="Method preset: official (released code) or paper (equations).")] = "official",
        epochs: Annotated[Optional[int], typer.Option(help="Epochs [default: the preset's, 20].")] = None,
        lr: Annotated[Optional[float], typer.Option(help="Adam learning rate [default: official 1e-5, paper 1e-3].")] = None,
        weight_decay: Annotated[
            Optional[float], typer.Option(help="Adam weight decay [default: official 1e-4, paper 0].")
        ] = None,
        schedule: Annotated[
            Optional[str],
            typer.Option(help="LR schedule: official-cosine (rises to eta_min 0.05) or constant [default: the preset's]."),
        ] = None,
        batch_size: Annotated[int, typer.Option(help="Images per optimizer step (the released code uses 1).")] = 1,
        seed: Annotated[int, typer.Option(help="Seed of initialisation, class order, noise and dropout.")] = 0,
        prompts: Annotated[
            Optional[Path],
            typer.Option(help="JSON/YAML file with `normal` and `anomalous` sentence lists [default: built-in lists]."),
        ] = None,
        weights: Annotated[
            Optional[Path], typer.Option(help="Directory with the backbone's weight files [default: $IIPAD_WEIGHTS].")
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
        force: Annotated[
            bool, typer.Option("--force", help="Replace a generator trained on another features file or backbone.")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
    ) -> None:
        """Train the class-shared prompt generator; print the run directory.

        Reads only the train split of RUN/features.h5 and runs only the generator and the frozen
        text encoder. Writes RUN/generator.safetensors, RUN/train_log.csv (one row per step) and
        RUN/manual_prompts.safetensors (the encoded manual prompts, reused while they match).

        Example: iipad train runs/mvtec-1shot --preset paper --epochs 20 --seed 3
        """
        from iipad_cli.stages.train import TrainOptions, train

        train(
            run_dir,
            TrainOptions(
                preset=preset,
                epochs=epochs,
                lr=lr,
                weight_decay=weight_decay,
                schedule=schedule,
                batch_size=batch_size,
                seed=seed,
                prompts=prompts,
                weights=weights,
                device=device,
                force=force,
                quiet=quiet,
            ),
        )
        typer.echo(str(run_dir))
