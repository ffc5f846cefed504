"""`iipad predict`: score new images with a trained run (maps, overlays, predictions.csv)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli.commands import user_errors


def register(app: typer.Typer) -> None:
    @app.command("predict")
    @user_errors
    def predict_command(
        run_dir: Annotated[Path, typer.Argument(help="A run directory with generator and banks.")],
        images: Annotated[list[str], typer.Argument(help="Image files, directories or glob patterns.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the maps, overlays and CSV.")],
        top_k: Annotated[
            Optional[int], typer.Option(help="Bank images retrieved per image (default: as the run's score).")
        ] = None,
        sigma: Annotated[
            Optional[float], typer.Option(help="Gaussian smoothing in pixels (default: as the run's score, 4).")
        ] = None,
        batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
        weights: Annotated[
            Optional[Path], typer.Option(help="Directory with the backbone's weight files (default: $IIPAD_WEIGHTS).")
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
        force: Annotated[bool, typer.Option("--force", help="Use banks made from another generator.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
    ) -> None:
        """Score new images with a trained run; print the path of predictions.csv.

        Writes per image the map (.npy) and an overlay (.png). Unreadable images are reported on
        stderr and skipped.

        Example: iipad predict runs/mvtec-1shot 'photos/line3/*.png' -o out/line3
        """
        from iipad_cli.stages.predict import PredictOptions, predict

        result = predict(
            run_dir,
            images,
            output,
            PredictOptions(
                top_k=top_k, sigma=sigma, batch_size=batch_size, weights=weights, device=device, force=force, quiet=quiet
            ),
        )
        if result.rank == 0:
            typer.echo(str(result.csv_path))
