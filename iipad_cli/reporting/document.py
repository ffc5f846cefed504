"""Metrics documents: per-class values of one source, the mean over classes, and several runs
combined into mean ± std. The document is plain JSON-able data (docs/metrics.md); `render` turns
it into a table or CSV.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from iipad_cli import metrics
from iipad_cli.errors import IipadError
from iipad_cli.pipeline.metrics import EvaluateOptions
from iipad_cli.reporting.columns import IMAGE_AP, IMAGE_AUROC, IMAGE_F1_MAX, LABELS, PIXEL_AP, PIXEL_AUROC, PIXEL_F1_MAX, SCHEMA
from iipad_cli.reporting.decisions import combine_threshold_sections
from iipad_cli.reporting.values import mean_row, number
from iipad_cli.ui import log


class LazyMaps:
    """An indexable sequence that builds each map or mask on access (the metrics stream it twice)."""

    def __init__(self, count: int, load: Callable[[int], np.ndarray]) -> None:
        self.count = count
        self.load = load

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        return self.load(index)


@dataclass
class ClassData:
    """One class's inputs; `maps`/`masks` are None when its anomalies have no masks."""

    name: str
    labels: np.ndarray
    image_scores: np.ndarray
    maps: Sequence[np.ndarray] | None
    masks: Sequence[np.ndarray] | None


def evaluate_class(data: ClassData, options: EvaluateOptions, warn: Callable[[str], None]) -> dict[str, Any]:
    """The metric values of one class (None = NaN or not available) and its image counts."""
    pro_key = options.metric_keys()[-1]
    values: dict[str, float | None] = {
        IMAGE_AUROC: number(metrics.roc_auc(data.labels, data.image_scores)),
        IMAGE_AP: number(metrics.average_precision(data.labels, data.image_scores)),
        IMAGE_F1_MAX: number(metrics.f1_max(data.labels, data.image_scores).value),
        PIXEL_AUROC: None,
        PIXEL_AP: None,
        PIXEL_F1_MAX: None,
        pro_key: None,
    }
    anomalous = int(data.labels.sum())
    if values[IMAGE_AUROC] is None:
        warn(f"class {data.name}: only one label among its {data.labels.size} test images; image metrics are NaN")
    if data.maps is None or data.masks is None:
        if anomalous:
            warn(f"class {data.name}: no ground-truth masks for its anomalies; image metrics only")
    else:
        # One streamed pass over the maps serves every exact pixel metric (iipad_cli/metrics/pixels.py).
        counts = metrics.pixel_counts(data.maps, data.masks)
        values[PIXEL_AUROC] = number(metrics.pixel_auroc_from_counts(counts))
        values[PIXEL_AP] = number(metrics.average_precision_from_counts(counts))
        values[PIXEL_F1_MAX] = number(metrics.f1_max_from_counts(counts).value)
        if options.pro_variant == "exact":
            values[pro_key] = number(metrics.au_pro_from_counts(counts, options.pro_limit))
        else:
            values[pro_key] = number(metrics.legacy_pro(data.maps, data.masks, options.pro_limit))
        if values[PIXEL_AUROC] is None or values[pro_key] is None:
            warn(f"class {data.name}: no anomalous or no normal pixels; pixel metrics are NaN")
    return {**values, "images": int(data.labels.size), "anomalous": anomalous, "pixel_metrics": data.maps is not None}


def build_document(
    classes: list[ClassData], options: EvaluateOptions, source: dict[str, Any], info: dict[str, Any], resolution: str
) -> dict[str, Any]:
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log(f"[yellow]warning:[/] {message}", options.quiet)

    per_class = {data.name: evaluate_class(data, options, warn) for data in classes}
    mean = mean_row(per_class, options.metric_keys())
    return {
        "schema": SCHEMA,
        "source": source,
        "info": info,
        "evaluation": {
            "resolution": resolution,
            "image_score": options.image_score,
            "pro_limit": options.pro_limit,
            "pro_variant": options.pro_variant,
        },
        "metrics": list(options.metric_keys()),
        "labels": {key: LABELS[key] for key in options.metric_keys()},
        "classes": per_class,
        "mean": mean,
        "warnings": warnings,
    }


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two runs."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def combine_runs(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs -> mean, sample std and per-run values per (class, metric) and for the mean row."""
    keys = documents[0]["metrics"]
    if any(d["metrics"] != keys or d["evaluation"] != documents[0]["evaluation"] for d in documents):
        raise IipadError("runs were evaluated with different metric options; evaluate them together in one call")
    names = list(dict.fromkeys(name for d in documents for name in d["classes"]))

    def cell(per_run: list[float | None]) -> dict[str, Any]:
        present = [v for v in per_run if v is not None]
        return {"mean": float(np.mean(present)) if present else None, "std": _std(present), "n": len(present), "per_run": per_run}

    classes = {
        name: {key: cell([d["classes"].get(name, {}).get(key) for d in documents]) for key in keys} for name in names
    }
    mean = {key: cell([d["mean"][key]["value"] for d in documents]) for key in keys}
    info = {
        field: sorted({json_value(d["info"].get(field)) for d in documents}, key=str)
        for field in ("preset", "shots", "seed", "backbone_id", "random_weights")
    }
    combined = {
        "schema": SCHEMA,
        "runs": [d["source"].get("run") for d in documents],
        "info": info,
        "evaluation": documents[0]["evaluation"],
        "metrics": keys,
        "labels": documents[0]["labels"],
        "classes": classes,
        "mean": mean,
        "warnings": [f"{d['source'].get('run')}: {w}" for d in documents for w in d["warnings"]],
        "per_run": documents,
        "at_threshold": combine_threshold_sections([d.get("at_threshold") for d in documents]),
    }
    combined["title"] = title(combined)
    return combined


def json_value(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _joined(value: Any) -> str:
    return "/".join(str(v) for v in value) if isinstance(value, list) else str(value)


def title(document: dict[str, Any]) -> str:
    """Preset, shots, seed(s), backbone, "random weights", resolution and PRO variant, in words."""
    info, evaluation = document["info"], document["evaluation"]
    parts = []
    if document.get("source", {}).get("kind") == "maps":
        parts.append(f"maps {document['source']['maps']}")
    else:
        seeds = info["seed"]
        parts += [
            f"preset {_joined(info['preset'])}",
            f"{_joined(info['shots'])}-shot",
            f"seed{'s' if isinstance(seeds, list) and len(seeds) > 1 else ''} {_joined(seeds)}",
            f"backbone {_joined(info['backbone_id'])}",
        ]
        random_weights = info["random_weights"]
        if random_weights is True or (isinstance(random_weights, list) and True in random_weights):
            parts.append("random weights")
        if "runs" in document:
            parts.append(f"mean ± std over {len(document['runs'])} runs")
    parts.append(f"pixel metrics at {evaluation['resolution']}")
    parts.append(f"image score {evaluation['image_score']}")
    if evaluation["pro_variant"] == "legacy":
        parts.append("PRO: legacy (released-code variant, not comparable)")
    else:
        parts.append(f"AU-PRO up to FPR {evaluation['pro_limit']:g}")
    return "iipad metrics — " + " · ".join(parts)
