"""`iipad score`: anomaly maps and image scores of the test split -> RUN/scores.h5 (+ heatmaps)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli.commands import user_errors


def register(app: typer.Typer) -> None:
    @app.command("score")
    @user_errors
    def score_command(
        run_dir: Annotated[Path, typer.Argument(help="Run directory with features, generator and banks.")],
        top_k: Annotated[
            Optional[int], typer.Option(help="Bank images retrieved per test image (default: the shot count K).")
        ] = None,
        sigma: Annotated[float, typer.Option(help="Gaussian smoothing of the pixel maps, in pixels (0 = none).")] = 4.0,
        heatmaps: Annotated[
            bool, typer.Option("--heatmaps", help="Write one PNG per test image (image | overlay | ground truth).")
        ] = False,
        heatmaps_dir: Annotated[
            Optional[Path], typer.Option(help="Where the heatmaps go (implies --heatmaps) (default: RUN/heatmaps).")
        ] = None,
        batch_size: Annotated[int, typer.Option(help="Test images per batch.")] = 32,
        seed: Annotated[int, typer.Option(help="Recorded for provenance; scoring is deterministic (eval mode).")] = 0,
        weights: Annotated[
            Optional[Path], typer.Option(help="Directory with the backbone's weight files (default: $IIPAD_WEIGHTS).")
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
        force: Annotated[
            bool, typer.Option("--force", help="Use banks or a generator made from other artifacts.")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
    ) -> None:
        """Anomaly maps and image scores for the test split; print the run directory.

        Maps are eq. 18 upsampled and smoothed; the image score follows the preset, and all its
        components are stored in scores.h5.

        Example: iipad score runs/mvtec-1shot --heatmaps
        """
        from iipad_cli.artifacts import HEATMAPS_DIR
        from iipad_cli.stages.score import ScoreOptions, score_run

        target = heatmaps_dir if heatmaps_dir is not None else (run_dir / HEATMAPS_DIR if heatmaps else None)
        score_run(
            run_dir,
            ScoreOptions(
                top_k=top_k,
                sigma=sigma,
                heatmaps=target,
                batch_size=batch_size,
                seed=seed,
                weights=weights,
                device=device,
                force=force,
                quiet=quiet,
            ),
        )
        typer.echo(str(run_dir))
