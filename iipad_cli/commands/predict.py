"""`iipad predict`: score new images with a trained run (maps, overlays, predictions.csv)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iipad_cli.commands import add
from iipad_cli.pipeline.predict import PredictOptions


def predict_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with generator and banks.", metavar="RUN")],
    images: Annotated[list[str], typer.Argument(help="Image files, directories or glob patterns.", metavar="IMAGES")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the maps, overlays and CSV.")],
    options: PredictOptions,
) -> None:
    """Score new images with a trained run; print the path of predictions.csv.

    Writes per image the map (.npy) and an overlay (.png). Unreadable images are reported on
    stderr and skipped.

    Example: iipad predict runs/mvtec-1shot 'photos/line3/*.png' -o out/line3
    """
    from iipad_cli.stages.predict import predict

    result = predict(run_dir, images, output, options)
    # Under torchrun only rank 0 prints the result (one line on stdout, not one per rank).
    if result.rank == 0:
        typer.echo(str(result.csv_path))


def register(app: typer.Typer) -> None:
    add(app, "predict", predict_command)
