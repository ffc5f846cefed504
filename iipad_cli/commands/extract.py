"""`iipad extract`: frozen-encoder features of a data set -> RUN/features.h5."""

from __future__ import annotations

import typer

from iipad_cli.commands import add
from iipad_cli.ui import print_path
from iipad_cli.pipeline.extract import ExtractOptions


def extract_command(options: ExtractOptions) -> None:
    """Run the frozen encoders once per image and cache the features; print the run directory.

    Stores the K shots per class and the whole test set (with ground-truth masks). An
    interrupted run resumes where it stopped; re-running with the same options does nothing;
    other options are refused unless --force.

    Example: iipad extract data/mvtec --shots 1 --backbone tiny -o runs/t --classes bottle,tire
    """
    from iipad_cli.stages.extract import run_extract

    print_path(run_extract(options))


def register(app: typer.Typer) -> None:
    add(app, "extract", extract_command, resumable=True)
