"""`iipad train RUN`: fit the prompt generator on RUN/features.h5 (see iipad_cli/stages/train.py)."""

from __future__ import annotations

import typer

from iipad_cli import options as o
from iipad_cli.commands import add
from iipad_cli.ui import print_path, read_run_dir_from_stdin
from iipad_cli.pipeline.train import TrainOptions


def train_command(options: TrainOptions, run_dir: o.RunDirArg = None) -> None:
    """Train the class-shared prompt generator; print the run directory.

    Reads only the train split of RUN/features.h5 and runs only the generator and the frozen
    text encoder. Writes RUN/generator.safetensors, RUN/train_log.csv (one row per step) and
    RUN/manual_prompts.safetensors (the encoded manual prompts, reused while they match).

    Example: iipad train runs/mvtec-1shot --preset paper --epochs 20 --seed 3
    """
    from iipad_cli.stages.train import train

    if run_dir is None:
        run_dir = read_run_dir_from_stdin()
    train(run_dir, options)
    print_path(run_dir)


def register(app: typer.Typer) -> None:
    add(app, "train", train_command)
