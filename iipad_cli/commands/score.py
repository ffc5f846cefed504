"""`iipad score`: anomaly maps and image scores of the test split -> RUN/scores.h5 (+ heatmaps)."""

from __future__ import annotations

import typer

from iipad_cli import options as o
from iipad_cli.commands import add
from iipad_cli.ui import print_path, read_run_dir_from_stdin
from iipad_cli.pipeline.score import ScoreOptions


def score_command(options: ScoreOptions, run_dir: o.RunDirArg = None) -> None:
    """Anomaly maps and image scores for the test split; print the run directory.

    Maps are eq. 18 upsampled and smoothed; the image score follows the preset, and all its
    components are stored in scores.h5.

    Example: iipad score runs/mvtec-1shot --heatmaps
    """
    from iipad_cli.stages.score import score_run

    if run_dir is None:
        run_dir = read_run_dir_from_stdin()
    score_run(run_dir, options)
    print_path(run_dir)


def register(app: typer.Typer) -> None:
    add(app, "score", score_command)
