"""The `metrics` stage declared: the evaluation options that change the numbers, and its outputs."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from iipad_cli import options as o
from iipad_cli.artifacts import METRICS_JSON
from iipad_cli.errors import UsageError
from iipad_cli.metrics import DEFAULT_PRO_LIMIT
from iipad_cli.pipeline.stage import Stage, one_of
from iipad_cli.reporting.columns import metric_keys


@dataclass(frozen=True)
class EvaluateOptions:
    """What changes the numbers (recorded in the manifest) plus output chatter."""

    resolution: o.EvalResolution = "224"
    image_score: o.ImageScore = "stored"
    pro_limit: o.ProLimit = DEFAULT_PRO_LIMIT
    pro_variant: o.ProVariant = "exact"
    force: o.described(o.Force, "Evaluate even if features.h5 changed after scoring.") = False
    quiet: o.described(o.Quiet, "No log lines or warnings on stderr.") = False

    def recorded(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("force", "quiet")}

    def metric_keys(self) -> tuple[str, ...]:
        return metric_keys(self.pro_variant)

    def validate(self) -> None:
        one_of("--resolution", self.resolution, ("224", "native"))
        one_of("--image-score", self.image_score, ("stored", "paper", "official"))
        one_of("--pro-variant", self.pro_variant, ("exact", "legacy"))
        if not 0.0 < self.pro_limit <= 1.0:
            raise UsageError(f"--pro-limit must be in (0, 1], got {self.pro_limit}")

    def key(self, run_dir: Path) -> dict[str, Any]:
        return self.recorded()

    def missing(self, run_dir: Path) -> Optional[str]:
        return None


def _run(run_dir: Path, options: EvaluateOptions) -> None:
    from iipad_cli.stages.evaluate import evaluate_run

    evaluate_run(run_dir, options)


METRICS = Stage("metrics", EvaluateOptions, _run, (METRICS_JSON,))
