"""The options of `iipad report`, declared once: the command line is generated from these fields.

Kept apart from `reporting/report.py` so that building the command line imports no numpy/PIL.
"""

from dataclasses import dataclass
from typing import Annotated

import typer

from iipad_cli import options as o
from iipad_cli.errors import IipadError
from iipad_cli.pipeline.metrics import EvaluateOptions

DEFAULT_GALLERY = 3

Gallery = Annotated[int, typer.Option(help="Worst misses and worst false alarms shown per class, each (0: no gallery).")]


@dataclass(frozen=True)
class ReportOptions:
    gallery: Gallery = DEFAULT_GALLERY
    pro_limit: o.ProLimit = EvaluateOptions.pro_limit
    force: o.described(o.Force, "Report a run even if its features.h5 changed after scoring.") = False
    quiet: o.described(o.Quiet, "No log lines on stderr.") = False

    def validate(self) -> None:
        if self.gallery < 0:
            raise IipadError(f"--gallery must be 0 or more, got {self.gallery}")
        self.evaluation().validate()

    def evaluation(self) -> EvaluateOptions:
        """The metrics as the report shows them: the stored maps at the run's resolution and the
        stored image score (what the run's heatmaps and thresholds refer to)."""
        return EvaluateOptions(pro_limit=self.pro_limit, force=self.force, quiet=True)
