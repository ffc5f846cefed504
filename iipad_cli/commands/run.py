"""`iipad run`: every stage in one command, skipping the ones whose outputs are current."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from iipad_cli.commands import add
from iipad_cli.pipeline.run_options import RunOptions
from iipad_cli.ui import log, print_path


def run_command(options: RunOptions) -> None:
    """Run extract, train, bank, score and metrics in order; print the run directory.

    A stage is skipped when RUN/manifest.json shows it already ran with the same options on
    inputs that still have the same sha256 and its outputs are intact. Every option of every
    stage is available; one that stages declare differently carries the stage's name
    (--train-batch-size). The metrics table goes to stderr; stdout gets only the run directory.

    A grid: --shots 1,2,4 --seeds 0,1,2 runs every (K, seed) pair into RUN-<K>shot-seed<N>
    (RUN-seed<N> for one K), prints one directory per line, a mean ± std table per K on
    stderr, and writes RUN-summary.csv. The feature store encodes each image once for the
    whole grid.

    Example: iipad run data/mvtec --shots 1,2,4 --seeds 0,1,2 -o runs/mvtec
    """
    from iipad_cli.pipeline.extract import default_run_dir
    from iipad_cli.stages import run as run_stage

    shots = run_stage.parse_ints("--shots", options.shots)
    if options.run_dir is None:
        # A grid's directories get their own -<K>shot suffix: runs/<data-dir-name>-<K>shot-seed<N>.
        grid_base = Path("runs") / Path(options.data).resolve().name
        options = replace(options, run_dir=default_run_dir(options.data, shots[0]) if len(shots) == 1 else grid_base)
    if options.seeds is None and len(shots) == 1:
        result = run_stage.run_pipeline(replace(options, shots=shots[0]))
        run_stage.show_table([result.run_dir])
        print_path(result.run_dir)
        return
    seeds = [options.seed] if options.seeds is None else run_stage.parse_seeds(options.seeds)
    results = run_stage.run_grid(options, shots, seeds)
    for runs in results.values():
        run_stage.show_table([result.run_dir for result in runs])
    summary = run_stage.write_summary(options.run_dir, results)
    log(f"summary of {sum(len(runs) for runs in results.values())} runs -> {summary}", options.quiet)
    for runs in results.values():
        for result in runs:
            print_path(result.run_dir)


def register(app: typer.Typer) -> None:
    add(app, "run", run_command, resumable=True)
