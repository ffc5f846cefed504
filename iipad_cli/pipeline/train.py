"""The `train` stage declared: its options, the preset they resolve to, and its currency key."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from iipad_cli import options as o
from iipad_cli.artifacts import GENERATOR_FILE
from iipad_cli.config import PRESETS, Preset, get_preset
from iipad_cli.errors import UsageError
from iipad_cli.pipeline.stage import Stage, at_least, device_name, one_of

SCHEDULES = ("official-cosine", "constant")


@dataclass(frozen=True)
class TrainOptions:
    """User options; None means "the preset's value". All of them are recorded."""

    preset: o.Preset = "official"
    epochs: o.Epochs = None
    lr: o.LearningRate = None
    weight_decay: o.WeightDecay = None
    schedule: o.Schedule = None
    batch_size: o.described(o.BatchSize, "Images per optimizer step (the released code uses 1).") = 1
    seed: o.described(o.Seed, "Seed of initialisation, class order, noise and dropout.") = 0
    prompts: o.Prompts = None
    weights: o.Weights = None
    device: o.Device = "auto"
    force: o.described(o.Force, "Replace a generator trained on another features file or backbone.") = False
    quiet: o.Quiet = False

    def validate(self) -> None:
        at_least("--batch-size", self.batch_size, 1)
        device_name(self.device)
        effective_preset(self)

    def key(self, run_dir: Path) -> dict[str, Any]:
        return recorded_options(self, effective_preset(self))

    def missing(self, run_dir: Path) -> Optional[str]:
        return None


def effective_preset(options: TrainOptions) -> Preset:
    """The named preset with the user's overrides applied (the values actually trained with)."""
    one_of("--preset", options.preset, tuple(PRESETS))
    preset = get_preset(options.preset)
    overrides: dict[str, Any] = {}
    if options.epochs is not None:
        at_least("--epochs", options.epochs, 1)
        overrides["epochs"] = options.epochs
    if options.lr is not None:
        if not options.lr > 0:
            raise UsageError(f"--lr must be positive, got {options.lr}")
        overrides["lr"] = options.lr
    if options.weight_decay is not None:
        at_least("--weight-decay", options.weight_decay, 0)
        overrides["weight_decay"] = options.weight_decay
    if options.schedule is not None:
        if options.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of: {', '.join(SCHEDULES)}, not {options.schedule!r}")
        overrides["schedule"] = options.schedule
    return dataclasses.replace(preset, **overrides)


def recorded_options(options: TrainOptions, preset: Preset) -> dict[str, Any]:
    """The training options that define the result, as recorded in the manifest and generator
    metadata; `iipad run` compares them to decide whether training is current."""
    return {
        "preset": options.preset,
        "epochs": preset.epochs,
        "lr": preset.lr,
        "weight_decay": preset.weight_decay,
        "schedule": preset.schedule,
        "eta_min": preset.eta_min,
        "batch_size": options.batch_size,
        "seed": options.seed,
        "prompts": str(options.prompts) if options.prompts else None,
    }


def _run(run_dir: Path, options: TrainOptions) -> None:
    from iipad_cli.stages.train import train

    train(run_dir, options)


TRAIN = Stage("train", TrainOptions, _run, (GENERATOR_FILE,), replace_needs_force=True)
