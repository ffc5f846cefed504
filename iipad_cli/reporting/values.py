"""How metric values are written, the same way in the metrics document and in its decisions at
the label-free thresholds: None (JSON null) for NaN or a missing value, "nan" in CSV, and the
mean of each metric over the classes that have a value."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from iipad_cli import metrics


def number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def csv_value(value: float | None) -> str:
    return "nan" if value is None else repr(float(value))


def mean_row(per_class: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Per metric: the mean over the classes with a value, how many had one, and of how many."""
    mean: dict[str, Any] = {}
    for key in keys:
        value, covered = metrics.nan_mean([math.nan if c[key] is None else c[key] for c in per_class.values()])
        mean[key] = {"value": number(value), "classes": covered, "of": len(per_class)}
    return mean
