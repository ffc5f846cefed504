"""The options of `iipad predict` (not a pipeline stage: it reads a finished run, writes elsewhere)."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from iipad_cli import options as o
from iipad_cli.pipeline.score import DEFAULT_BATCH
from iipad_cli.pipeline.stage import at_least, device_name, one_of

if TYPE_CHECKING:
    import torch


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
    precision: Annotated[
        Optional[str],
        typer.Option(
            help="Matmul precision of the image encoders: auto, fp32 or bf16 (default: the precision of the "
            "run's features; another one needs --force).",
            show_default=False,
        ),
    ] = None
    force: o.described(
        o.Force, "Use banks made from another generator, or encode in another precision than the run's features."
    ) = False
    quiet: o.Quiet = False
    cache: o.described(
        o.Cache,
        "Feature store to read from and to add the new images' features to (without it: read from "
        "$IIPAD_CACHE, else $XDG_CACHE_HOME/iipad, else ~/.cache/iipad, and add nothing).",
    ) = None

    def validate(self) -> None:
        at_least("--batch-size", self.batch_size, 1)
        one_of("--resolution", self.resolution, ("224", "native"))
        device_name(self.device)
        if self.precision is not None:
            from iipad_cli.devices import PRECISIONS

            one_of("--precision", self.precision, PRECISIONS)

    def resolved_precision(self, device: "torch.device") -> Optional[str]:
        """"fp32"/"bf16" for an explicit --precision on `device`; None = as the run's features."""
        if self.precision is None:
            return None
        from iipad_cli.devices import resolve_precision

        return resolve_precision(self.precision, device)
