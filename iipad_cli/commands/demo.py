"""`iipad demo`: the whole pipeline offline, on procedurally generated textures with synthetic defects."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iipad_cli import options as o
from iipad_cli.commands import add
from iipad_cli.ui import print_path


def demo_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the demo data and run.")] = Path("runs/demo"),
    backbone: o.described(o.Backbone, "tiny (random weights, offline) or vit-l-14 (needs --weights or $IIPAD_WEIGHTS).") = "tiny",
    weights: o.Weights = None,
    shots: o.described(o.Shots, "Normal training images per class (1-4).") = 2,
    epochs: Annotated[int, typer.Option(help="Training epochs (the demo trains briefly).")] = 5,
    seed: o.described(o.Seed, "Seed of the generated data, the shot draw and training.") = 0,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
    force: o.described(o.Force, "Rerun every stage even when its outputs are current.") = False,
) -> None:
    """Build a small MVTec-layout data set and run the whole pipeline on it, offline.

    The data are procedurally generated textures (wood grain, a woven grid, speckled granite)
    with synthetic scratches, holes, stains and foreign objects and their exact masks, written
    to OUTPUT/data; nothing is downloaded. With the default tiny backbone the weights are
    random, so the table is a plumbing check (the memory bank still finds the defects), not
    the method's accuracy. With the tiny backbone `--device auto` means the CPU, with
    machine-independent kernels, so the table is the same on every x86-64 machine. Also writes
    OUTPUT/report.html (`iipad report` of the run: curves, score histograms and the worst cases;
    open it in a browser). Prints the run directory on stdout; the table and where the heatmaps
    and the report are go to stderr.
    """
    from iipad_cli.stages.demo import run_demo, show_demo_summary

    result = run_demo(
        output, backbone=backbone, weights=weights, shots=shots, epochs=epochs, seed=seed, device=device, quiet=quiet, force=force
    )
    show_demo_summary(result)
    print_path(result.run.run_dir)


def register(app: typer.Typer) -> None:
    add(app, "demo", demo_command, resumable=True)
