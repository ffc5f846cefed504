"""The `score` stage declared: its options, their checks, its currency key and its outputs."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from iipad_cli import options as o
from iipad_cli.artifacts import FEATURES_FILE, HEATMAPS_DIR, SCORES_FILE, THRESHOLDS_FILE
from iipad_cli.pipeline.stage import Stage, at_least, device_name, weights_text

# Gaussian smoothing of the maps in pixels (reference-implementation.md), shared with predict.
DEFAULT_SIGMA = 4.0
# Images per generator + text-encoder pass in bank, score and predict.
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class ScoreOptions:
    """`top_k=None` = the shot count K; heatmaps are written when `heatmaps` or `heatmaps_dir`."""

    top_k: o.TopK = None
    sigma: o.Sigma = DEFAULT_SIGMA
    heatmaps: o.Heatmaps = False
    heatmaps_dir: o.HeatmapsDir = None
    normal: o.Normal = None
    batch_size: o.described(o.BatchSize, "Test images per batch.") = DEFAULT_BATCH
    seed: o.described(o.Seed, "Recorded for provenance; scoring is deterministic (eval mode).") = 0
    weights: o.Weights = None
    device: o.Device = "auto"
    force: o.described(o.Force, "Use banks or a generator made from other artifacts.") = False
    quiet: o.Quiet = False

    def validate(self) -> None:
        at_least("--batch-size", self.batch_size, 1)
        at_least("--sigma", self.sigma, 0)
        device_name(self.device)

    def heatmaps_target(self, run_dir: Path) -> Optional[Path]:
        """Where the heatmaps go, or None for none."""
        if self.heatmaps_dir is not None:
            return self.heatmaps_dir
        return Path(run_dir) / HEATMAPS_DIR if self.heatmaps else None

    def recorded(self, run_dir: Path, top_k: int) -> dict[str, Any]:
        """The options as RUN/manifest.json records them (`top_k` resolved, the heatmap folder)."""
        recorded = {name: value for name, value in asdict(self).items() if name != "heatmaps_dir"}
        target = self.heatmaps_target(run_dir)
        return {
            **recorded,
            "top_k": top_k,
            "heatmaps": str(target) if target is not None else None,
            "normal": list(self.normal or []),
            "weights": weights_text(self.weights),
        }

    def key(self, run_dir: Path) -> dict[str, Any]:
        from iipad_cli.schema.features import load_features_attrs

        top_k = self.top_k
        if top_k is None:
            top_k = int(load_features_attrs(Path(run_dir) / FEATURES_FILE)["shots"])
        key: dict[str, Any] = {
            "top_k": top_k,
            "sigma": self.sigma,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "weights": weights_text(self.weights),
        }
        # Extra normal images change the label-free thresholds (thresholds.json).
        key["normal"] = list(self.normal or [])
        # Heatmaps only matter when asked for: a run without them reuses scores that have them.
        target = self.heatmaps_target(run_dir)
        if target is not None:
            key["heatmaps"] = str(target)
        return key

    def missing(self, run_dir: Path) -> Optional[str]:
        """The heatmap folder is not hashed in the manifest, so it is checked for by name."""
        target = self.heatmaps_target(run_dir)
        if target is not None and not target.is_dir():
            return f"{target.name}/ missing"
        return None


def _run(run_dir: Path, options: ScoreOptions) -> None:
    from iipad_cli.stages.score import score_run

    score_run(run_dir, options)


SCORE = Stage("score", ScoreOptions, _run, (SCORES_FILE, THRESHOLDS_FILE))
