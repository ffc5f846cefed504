"""`iipad extract`: frozen-encoder features of a data set -> RUN/features.h5."""

from __future__ import annotations

import typer

from iipad_cli.commands import add
from iipad_cli.ui import print_path
from iipad_cli.pipeline.extract import ExtractOptions


def extract_command(options: ExtractOptions) -> None:
    """Run the frozen encoders once per image and cache the features; print the run directory.

    Covers the K shots per class and the whole test set (with ground-truth masks). Each
    image is looked up in the feature store by the sha256 of its bytes and only the missing
    ones are encoded; features.h5 points into the store unless --copy. An interrupted run
    keeps what it encoded; re-running with the same options does nothing; other options are
    refused unless --force. Under torchrun the ranks encode disjoint shards (docs/scale.md).

    Example: iipad extract data/mvtec --shots 1 --backbone tiny -o runs/t --classes bottle,tire
    """
    from iipad_cli.distributed import launch_from_env
    from iipad_cli.stages.extract import run_extract

    run_dir = run_extract(options)
    # Under torchrun only rank 0 prints the result (one line on stdout, not one per rank).
    if launch_from_env().is_main:
        print_path(run_dir)


def register(app: typer.Typer) -> None:
    add(app, "extract", extract_command, resumable=True)
