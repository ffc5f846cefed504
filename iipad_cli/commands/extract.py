"""`iipad extract`: frozen-encoder features of a data set -> RUN/features.h5."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli.commands import user_errors


def parse_classes(text: str | None) -> tuple[str, ...] | None:
    """`--classes bottle,tire` -> ("bottle", "tire"); None keeps every class."""
    if text is None:
        return None
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    return names or None


def register(app: typer.Typer) -> None:
    @app.command("extract")
    @user_errors
    def extract_command(
        data: Annotated[Path, typer.Argument(help="Data set root (MVTec AD, VisA or Folder layout).")],
        shots: Annotated[int, typer.Option("--shots", "-k", help="Normal training images per class (K).")],
        output: Annotated[
            Optional[Path],
            typer.Option("--output", "-o", help="Run directory [default: runs/<data-dir-name>-<K>shot]."),
        ] = None,
        backbone: Annotated[str, typer.Option(help="Backbone id: vit-l-14 (real weights) or tiny (random weights).")] = "vit-l-14",
        weights: Annotated[
            Optional[Path], typer.Option(help="Directory with the backbone's weight files [default: $IIPAD_WEIGHTS].")
        ] = None,
        layout: Annotated[str, typer.Option(help="Data layout: auto, mvtec, visa or folder.")] = "auto",
        classes: Annotated[Optional[str], typer.Option(help="Comma-separated classes to keep, e.g. bottle,tire.")] = None,
        shot_policy: Annotated[
            str, typer.Option(help="random (seeded by --seed) or official (sorted train/good, indices 0, 3, 6, 9).")
        ] = "random",
        seed: Annotated[int, typer.Option(help="Seed of the random K-shot draw.")] = 0,
        resolution: Annotated[int, typer.Option(help="Side of the stored ground-truth masks (evaluation resolution).")] = 224,
        batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
        workers: Annotated[
            Optional[int], typer.Option(help="DataLoader processes decoding images (0 = in the main process) [default: min(2, CPUs)].")
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
        force: Annotated[bool, typer.Option("--force", help="Replace features made with other options.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
    ) -> None:
        """Run the frozen encoders once per image and cache the features; print the run directory.

        Stores the K shots per class and the whole test set (with ground-truth masks). An
        interrupted run resumes where it stopped; re-running with the same options does nothing;
        other options are refused unless --force.

        Example: iipad extract data/mvtec --shots 1 --backbone tiny -o runs/t --classes bottle,tire
        """
        from iipad_cli.stages.extract import ExtractOptions, run_extract

        run_dir = run_extract(
            ExtractOptions(
                data=data,
                shots=shots,
                output=output,
                backbone=backbone,
                weights=weights,
                layout=layout,
                classes=parse_classes(classes),
                shot_policy=shot_policy,
                seed=seed,
                resolution=resolution,
                batch_size=batch_size,
                workers=workers,
                device=device,
                force=force,
                quiet=quiet,
            )
        )
        typer.echo(str(run_dir))
