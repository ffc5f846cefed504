"""The options of `iipad predict` (not a pipeline stage: it reads a finished run, writes elsewhere)."""

from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from iipad_cli import options as o
from iipad_cli.pipeline.score import DEFAULT_BATCH
from iipad_cli.pipeline.stage import at_least, one_of


@dataclass(frozen=True)
class PredictOptions:
    """`top_k`/`sigma` None = what the run's `score` used (scores.h5), else K and 4."""

    top_k: o.described(o.TopK, "Bank images retrieved per image (default: as the run's score).") = None
    sigma: Annotated[
        Optional[float],
        typer.Option(help="Gaussian smoothing in pixels (default: as the run's score, 4).", show_default=False),
    ] = None
    threshold: o.Threshold = None
    pixel_threshold: o.PixelThreshold = None
    resolution: o.PredictResolution = "224"
    batch_size: o.BatchSize = DEFAULT_BATCH
    weights: o.Weights = None
    device: o.Device = "auto"
    force: o.described(o.Force, "Use banks made from another generator.") = False
    quiet: o.Quiet = False
    cache: o.Cache = None

    def validate(self) -> None:
        at_least("--batch-size", self.batch_size, 1)
        one_of("--resolution", self.resolution, ("224", "native"))
