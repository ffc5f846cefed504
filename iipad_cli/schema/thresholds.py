"""`RUN/thresholds.json`: the label-free thresholds `iipad score` derives from normal images only.

The document records which images the thresholds come from (path, category, how each was scored),
the rule and its constant, the values per category, and what they were computed with (retrieval k,
σ, resolution, the image-score formula, the generator and banks hashes). `predict` and `metrics`
read it; `docs/scoring.md` describes the rule.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iipad_cli.artifacts import THRESHOLDS_FILE, require_file, write_json_atomic
from iipad_cli.errors import IipadError
from iipad_cli.thresholds import CategoryThreshold

__all__ = ["THRESHOLDS_FILE", "CalibrationImage", "Levels", "Thresholds", "load_thresholds", "write_thresholds"]
SCHEMA = "iipad-thresholds/1"
RULE = {
    "category": "class of the image's top-1 retrieved bank image (calibration shots: their own class)",
    "image": "mean of the category's normal scores + z × pooled within-category standard deviation",
    "pixel": "largest value of the category's normal calibration maps",
    "decision": "anomalous when the value is strictly above the threshold",
    "normalised_score": "(score − category's normal mean) / (image threshold − normal mean)",
}


@dataclass(frozen=True)
class CalibrationImage:
    """One normal image scored for the thresholds: `source` says how (leave-one-out, a view, --normal)."""

    path: str
    category: str
    source: str
    image_score: float
    map_max: float


@dataclass(frozen=True)
class Levels:
    """What decides for one image: its category, that category's normal mean, and the thresholds."""

    category: str
    normal_mean: float
    image: float
    pixel: float


@dataclass(frozen=True)
class Thresholds:
    method: str
    z: float
    pooled_std: float
    categories: dict[str, CategoryThreshold]
    images: list[CalibrationImage]
    bank_classes: list[str]
    image_score_formula: str
    top_k: int
    sigma: float
    resolution: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def category_of(self, top1_index: int) -> str:
        """The category of an image whose best-retrieved bank row is `top1_index`."""
        return self.bank_classes[top1_index]

    def levels(self, top1_index: int, image_override: float | None = None, pixel_override: float | None = None) -> Levels:
        """The thresholds that decide for an image whose best-retrieved bank row is `top1_index`:
        its category's, or the user's `--threshold` / `--pixel-threshold` where given."""
        category = self.category_of(top1_index)
        values = self.categories[category]
        return Levels(
            category=category,
            normal_mean=values.image_mean,
            image=values.image_threshold if image_override is None else image_override,
            pixel=values.pixel_threshold if pixel_override is None else pixel_override,
        )

    def check_image_override(self, threshold: float, path: Path) -> None:
        """A `--threshold` must lie above every category's normal mean (the normalised score's 0)."""
        for name, values in self.categories.items():
            if not threshold > values.image_mean:
                raise IipadError(
                    f"--threshold {threshold:g} is not above the normal mean {values.image_mean:.6g} of category "
                    f"{name} ({path}); the normalised score needs a threshold above it"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "rule": {**RULE, "z": self.z},
            "method": self.method,
            "pooled_std": self.pooled_std,
            "categories": {name: asdict(value) for name, value in self.categories.items()},
            "images": [asdict(image) for image in self.images],
            "bank_classes": self.bank_classes,
            "image_score_formula": self.image_score_formula,
            "top_k": self.top_k,
            "sigma": self.sigma,
            "resolution": self.resolution,
            "provenance": self.provenance,
        }


def write_thresholds(path: Path, thresholds: Thresholds) -> None:
    write_json_atomic(path, thresholds.to_json())


def load_thresholds(path: Path) -> Thresholds:
    """Read thresholds.json; a missing, unreadable or foreign file is a one-line error."""
    require_file(path, "score")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise IipadError(f"{path}: unreadable thresholds document ({error})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise IipadError(f"{path}: not an iipad thresholds document (schema is not {SCHEMA})")
    try:
        return Thresholds(
            method=str(data["method"]),
            z=float(data["rule"]["z"]),
            pooled_std=float(data["pooled_std"]),
            categories={name: CategoryThreshold(**value) for name, value in data["categories"].items()},
            images=[CalibrationImage(**image) for image in data["images"]],
            bank_classes=[str(name) for name in data["bank_classes"]],
            image_score_formula=str(data["image_score_formula"]),
            top_k=int(data["top_k"]),
            sigma=float(data["sigma"]),
            resolution=int(data["resolution"]),
            provenance=dict(data.get("provenance", {})),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise IipadError(f"{path}: malformed thresholds document ({type(error).__name__}: {error})") from None
