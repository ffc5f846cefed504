"""`iipad metrics`, as information: precision, recall and F1 of the decisions a run would make in
production, at its label-free thresholds (RUN/thresholds.json, derived by `score` from normal
images only; docs/scoring.md). The test labels only count the decisions here; they never set a
threshold. Numpy and h5py only (metrics hold no torch).

Each test image is decided with the thresholds of its category, the class of its top-1 retrieved
bank image (scores.h5 `retrieved[:, 0]`), exactly as `predict` decides; pixel decisions use the same
category's pixel threshold on every pixel of the maps the pixel metrics use (224 or native).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from iipad_cli.reporting.values import csv_value, mean_row, number
from iipad_cli.schema.thresholds import THRESHOLDS_FILE, Thresholds, load_thresholds
from iipad_cli.thresholds import DecisionCounts, decision_counts, pixel_decision_counts, precision_recall_f1

IMAGE_KEYS = ("image_precision", "image_recall", "image_f1")
PIXEL_KEYS = ("pixel_precision", "pixel_recall", "pixel_f1")
KEYS = IMAGE_KEYS + PIXEL_KEYS
LABELS = {
    "image_precision": "image precision",
    "image_recall": "image recall",
    "image_f1": "image F1",
    "pixel_precision": "pixel precision",
    "pixel_recall": "pixel recall",
    "pixel_f1": "pixel F1",
}
NOTE = (
    "information: decisions at the run's label-free thresholds (RUN/thresholds.json, from normal "
    "images only; never tuned on test labels), each image by the thresholds of its category"
)


def _ratios(counts: DecisionCounts, prefix: str) -> dict[str, Any]:
    precision, recall, f1 = precision_recall_f1(counts)
    return {
        f"{prefix}_precision": number(precision),
        f"{prefix}_recall": number(recall),
        f"{prefix}_f1": number(f1),
        f"{prefix}_counts": {
            "tp": counts.true_positive,
            "fp": counts.false_positive,
            "fn": counts.false_negative,
            "tn": counts.true_negative,
        },
    }


def class_decisions(
    labels: np.ndarray,
    image_scores: np.ndarray | None,
    image_thresholds: np.ndarray,
    maps: Sequence[np.ndarray] | None,
    masks: Sequence[np.ndarray] | None,
    pixel_thresholds: Sequence[float],
) -> dict[str, Any]:
    """One class's image and pixel precision/recall/F1 at per-image thresholds (None where not
    available: no image scores for these thresholds, or no masks)."""
    result: dict[str, Any] = {key: None for key in KEYS}
    if image_scores is not None:
        result.update(_ratios(decision_counts(labels, image_scores, image_thresholds), "image"))
    if maps is not None and masks is not None:
        result.update(_ratios(pixel_decision_counts(maps, masks, pixel_thresholds), "pixel"))
    return result


def threshold_section(
    run_dir: Path,
    scores_h5: Path,
    classes: Sequence[Any],
    image_score: str,
    warn: Callable[[str], None],
) -> dict[str, Any] | None:
    """The `at_threshold` block of a run's metrics document, or None when the run has no thresholds.

    `classes` are the metrics' per-class inputs (name, labels, image_scores, maps, masks in the row
    order of scores.h5, maps only for rows with masks); `image_score` the metrics' --image-score.
    """
    from iipad_cli.schema.scores import read_scores_columns

    path = Path(run_dir) / THRESHOLDS_FILE
    if not path.is_file():
        warn(f"{path}: missing (a run scored before label-free thresholds existed); no decisions at the threshold")
        return None
    thresholds: Thresholds = load_thresholds(path)
    columns = read_scores_columns(scores_h5, ("cls", "has_mask", "retrieved"))
    names = columns["cls"]
    has_mask = columns["has_mask"].astype(bool)
    top1 = columns["retrieved"][:, 0].astype(np.int64)
    comparable = image_score in ("stored", thresholds.image_score_formula)
    if not comparable:
        warn(
            f"--image-score {image_score}: the run's thresholds are for its {thresholds.image_score_formula} score; "
            "image decisions at the threshold are left out"
        )
    levels = [thresholds.levels(int(index)) for index in top1]
    per_class: dict[str, Any] = {}
    for data in classes:
        rows = np.array([i for i, name in enumerate(names) if name == data.name])
        usable = rows[has_mask[rows]]
        per_class[data.name] = class_decisions(
            data.labels,
            data.image_scores if comparable else None,
            np.array([levels[i].image for i in rows]),
            data.maps,
            data.masks,
            [levels[i].pixel for i in usable],
        )
    mean = mean_row(per_class, KEYS)
    return {
        "note": NOTE,
        "thresholds": str(path.resolve()),
        "method": thresholds.method,
        "metrics": list(KEYS),
        "labels": LABELS,
        "classes": per_class,
        "mean": mean,
    }


def combine_threshold_sections(sections: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Several runs' blocks -> mean, sample std and per-run values per (class, key); None if any run lacks one."""
    if not sections or any(section is None for section in sections):
        return None
    present = [section for section in sections if section is not None]
    names = list(dict.fromkeys(name for section in present for name in section["classes"]))

    def cell(per_run: list[float | None]) -> dict[str, Any]:
        values = [v for v in per_run if v is not None]
        return {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values),
            "per_run": per_run,
        }

    return {
        "note": NOTE,
        "thresholds": [section["thresholds"] for section in present],
        "method": sorted({section["method"] for section in present}),
        "metrics": list(KEYS),
        "labels": LABELS,
        "classes": {
            name: {key: cell([section["classes"].get(name, {}).get(key) for section in present]) for key in KEYS}
            for name in names
        },
        "mean": {key: cell([section["mean"][key]["value"] for section in present]) for key in KEYS},
    }


def csv_columns(section: dict[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """Columns to append to the metrics CSV: their header and, per row name (classes, `mean`), the cells;
    `_mean`/`_std` pairs for several runs."""
    multi = "per_run" in next(iter(section["mean"].values()))
    header = [f"{k}_at_threshold{'_' + s if multi else ''}" for k in KEYS for s in (("mean", "std") if multi else ("",))]
    cells: dict[str, list[str]] = {}
    for name, values in [*section["classes"].items(), ("mean", section["mean"])]:
        if multi:
            cells[name] = [csv_value(values[k][s]) for k in KEYS for s in ("mean", "std")]
        else:
            cells[name] = [csv_value(values[k]["value"] if name == "mean" else values[k]) for k in KEYS]
    return header, cells


def to_table(section: dict[str, Any]) -> Table:
    """The block as a Rich table in percent (`mean ± std` for several runs)."""
    multi = "per_run" in next(iter(section["mean"].values()))
    table = Table(title="at the label-free threshold (information)", caption=NOTE)
    table.add_column("class")
    for key in KEYS:
        table.add_column(LABELS[key], justify="right")
    for name, cells in [*section["classes"].items(), ("mean", section["mean"])]:
        row = []
        for key in KEYS:
            cell = cells[key]
            if multi:
                text = "n/a" if cell["mean"] is None else f"{100 * cell['mean']:.1f}"
                if cell["mean"] is not None and cell["std"] is not None:
                    text += f" ± {100 * cell['std']:.1f}"
            elif name == "mean":
                value = cell["value"]
                text = "n/a" if value is None else f"{100 * value:.1f} ({cell['classes']}/{cell['of']})"
            else:
                text = "n/a" if cell is None else f"{100 * cell:.1f}"
            row.append(text)
        table.add_row(name, *row, style="bold" if name == "mean" else None)
    return table
