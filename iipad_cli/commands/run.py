"""`iipad run`: every stage in one command, skipping the ones whose outputs are current."""

from __future__ import annotations

from dataclasses import replace

import typer

from iipad_cli.commands import add
from iipad_cli.ui import print_path
from iipad_cli.pipeline.run_options import RunOptions


def run_command(options: RunOptions) -> None:
    """Run extract, train, bank, score and metrics in order; print the run directory.

    A stage is skipped when RUN/manifest.json shows it already ran with the same options on
    inputs that still have the same sha256 and its outputs are intact. Every option of every
    stage is available; one that stages declare differently carries the stage's name
    (--train-batch-size). The metrics table goes to stderr; stdout gets only the run directory
    (one per line with --seeds).

    Example: iipad run data/mvtec --shots 1 --seeds 0,1,2 -o runs/mvtec-1shot
    """
    from iipad_cli.pipeline.extract import default_run_dir
    from iipad_cli.stages import run as run_stage

    if options.run_dir is None:
        options = replace(options, run_dir=default_run_dir(options.data, options.shots))
    if options.seeds is None:
        result = run_stage.run_pipeline(options)
        run_stage.show_table([result.run_dir])
        print_path(result.run_dir)
        return
    results = run_stage.run_seeds(options, run_stage.parse_seeds(options.seeds))
    run_stage.show_table([result.run_dir for result in results])
    for result in results:
        print_path(result.run_dir)


def register(app: typer.Typer) -> None:
    add(app, "run", run_command, resumable=True)
