"""Command-line options declared once: Typer `Annotated` aliases shared by every command.

A stage's options dataclass (`iipad_cli/pipeline/`) annotates its fields with these aliases, and
the commands are built from those dataclasses (`iipad_cli/commands/__init__.py`), so an option's
flag, help text and parser live here and nowhere else. `described(alias, help)` keeps the flag and
type of an alias while saying what it means for one stage (what `--force` overrides differs).

This module imports Typer and the standard library only: `iipad --help` must stay fast.
"""

import copy
from pathlib import Path
from typing import Annotated, Any, Optional, get_args

import typer

# Typer shows a flag's type as `<bool>`, which reads as if `--force true` were accepted; an
# empty metavar leaves the type column blank for flags.
FLAG = ""


def described(alias: Any, help: str) -> Any:
    """`alias` (an `Annotated[type, typer.Option(...)]`) with another help text."""
    base, info = get_args(alias)
    info = copy.copy(info)
    info.help = help
    return Annotated[base, info]


class Names(tuple[str, ...]):
    """A comma-separated list of names on the command line (a plain `tuple` annotation would make
    Typer expect one value per element)."""


def parse_names(text: str) -> Optional[tuple[str, ...]]:
    """`--classes bottle,tire` -> ("bottle", "tire"); an empty list keeps every class."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    return names or None


Backbone = Annotated[str, typer.Option(help="Backbone id: vit-l-14 (real weights) or tiny (random weights).")]
Weights = Annotated[
    Optional[Path],
    typer.Option(help="Directory with the backbone's weight files (default: $IIPAD_WEIGHTS).", show_default=False),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Seed = Annotated[int, typer.Option(help="Seed of the K-shot draw and of training.")]
Shots = Annotated[int, typer.Option("--shots", "-k", help="Normal training images per class (K).")]
BatchSize = Annotated[int, typer.Option(help="Images per forward pass.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.", metavar=FLAG)]
Force = Annotated[bool, typer.Option("--force", help="Replace outputs made from other inputs or options.", metavar=FLAG)]
# `iipad cache info`, `iipad weights check`
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tab-separated lines.", metavar=FLAG)]
Preset = Annotated[str, typer.Option(help="Method preset: official (released code) or paper (equations).")]

DataArg = Annotated[Path, typer.Argument(help="Data set root (MVTec AD, VisA or Folder layout).", metavar="DATA")]
RunDirArg = Annotated[
    Optional[Path],
    typer.Argument(
        help="Run directory (from `iipad extract` or `iipad run`); read from stdin when omitted (`iipad extract ... | iipad train`).",
        metavar="[RUN]",
        show_default=False,
    ),
]
Output = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", help="Run directory (default: runs/<data-dir-name>-<K>shot).", show_default=False),
]

# the feature store (docs/store.md)
Cache = Annotated[
    Optional[Path],
    typer.Option(
        help="Feature store directory (default: $IIPAD_CACHE, else $XDG_CACHE_HOME/iipad, else ~/.cache/iipad).",
        show_default=False,
    ),
]

# extract
Copy = Annotated[
    bool,
    typer.Option(
        "--copy", help="Write a self-contained features.h5 (default: virtual datasets into the feature store).", metavar=FLAG
    ),
]
Layout = Annotated[str, typer.Option(help="Data layout: auto, mvtec, visa or folder.")]
Classes = Annotated[
    Optional[Names],
    typer.Option(
        parser=parse_names,
        metavar="A,B",
        help="Comma-separated classes to keep, e.g. bottle,tire (default: every class).",
        show_default=False,
    ),
]
ShotPolicy = Annotated[
    str, typer.Option(help="random (seeded by --seed) or official (sorted train/good, indices 0, 3, 6, 9).")
]
Precision = Annotated[
    str,
    typer.Option(
        help="Matmul precision of the image encoders: fp32 (the released code's numerics), bf16, or auto "
        "(bf16 where the device has bf16 units: CUDA capability >= 8.0, or CPU flags amx_bf16 / "
        "avx512_bf16; else fp32)."
    ),
]
MaskResolution = Annotated[int, typer.Option(help="Side of the stored ground-truth masks (evaluation resolution).")]
Workers = Annotated[
    Optional[int],
    typer.Option(
        help="DataLoader processes decoding images (0 = in the main process; default: min(2, CPUs)).",
        show_default=False,
    ),
]

# train
Epochs = Annotated[Optional[int], typer.Option(help="Training epochs (default: the preset's, 20).", show_default=False)]
LearningRate = Annotated[
    Optional[float], typer.Option(help="Adam learning rate (default: official 1e-5, paper 1e-3).", show_default=False)
]
WeightDecay = Annotated[
    Optional[float], typer.Option(help="Adam weight decay (default: official 1e-4, paper 0).", show_default=False)
]
Schedule = Annotated[
    Optional[str],
    typer.Option(
        help="LR schedule: official-cosine (rises to eta_min 0.05) or constant (default: the preset's).",
        show_default=False,
    ),
]
Prompts = Annotated[
    Optional[Path],
    typer.Option(
        help="JSON/YAML file with `normal` and `anomalous` sentence lists (default: built-in lists).", show_default=False
    ),
]

# score and predict
TopK = Annotated[
    Optional[int], typer.Option(help="Bank images retrieved per test image (default: the shot count K).", show_default=False)
]
Sigma = Annotated[float, typer.Option(help="Gaussian smoothing of the pixel maps, in pixels (0 = none).")]
Heatmaps = Annotated[
    bool, typer.Option("--heatmaps", help="Write one PNG per test image (image | overlay | ground truth).", metavar=FLAG)
]
HeatmapsDir = Annotated[
    Optional[Path],
    typer.Option(help="Where the heatmaps go (implies --heatmaps; default: RUN/heatmaps).", show_default=False),
]

# score: label-free thresholds
Normal = Annotated[
    Optional[list[str]],
    typer.Option(
        help="Extra normal images (files, directories or quoted globs; repeatable) for the label-free thresholds.",
        metavar="PATH",
        show_default=False,
    ),
]

# predict: decisions
Threshold = Annotated[
    Optional[float],
    typer.Option(help="Image-score threshold for every image (default: the run's label-free thresholds).", show_default=False),
]
PixelThreshold = Annotated[
    Optional[float],
    typer.Option(help="Map threshold of the masks (default: the run's label-free thresholds).", show_default=False),
]
PredictResolution = Annotated[
    str, typer.Option(help="224 (maps and masks at the run's resolution) or native (at each image's own size).")
]

# metrics
EvalResolution = Annotated[
    str, typer.Option(help="224 (stored maps and masks) or native (maps upsampled to each mask's size).")
]
ImageScore = Annotated[
    str, typer.Option(help="stored, paper (prompt_max + visual_max) or official (paper - p_normal - retrieval_sim).")
]
ProLimit = Annotated[float, typer.Option(help="FPR up to which AU-PRO is integrated (then divided by it).")]
ProVariant = Annotated[str, typer.Option(help="exact (MVTec AU-PRO) or legacy (released-code variant, not comparable).")]

# run
ShotsGrid = Annotated[
    str,
    typer.Option(
        "--shots",
        "-k",
        metavar="K[,K...]",
        help="Normal training images per class (K); several, e.g. 1,2,4, run the grid of every K and seed "
        "into RUN-<K>shot-seed<N>.",
    ),
]
Seeds = Annotated[
    Optional[str],
    typer.Option(
        help="Comma-separated seeds, e.g. 0,1,2: one run per seed in RUN-seed<N>, then mean ± std.", show_default=False
    ),
]
