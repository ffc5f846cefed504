"""Time and peak memory of the pixel metrics on MVTec-sized input, next to the legacy PRO and sklearn.

The five exact pixel metrics (AUROC, AP, F1-max, AU-PRO; the PRO curve) come from one streamed
pass (`metrics.pixel_counts`); scikit-learn needs the flattened maps for each of AUROC and AP.

Input: 1,725 synthetic maps at 224 x 224 (MVTec AD's test-set size), about 10 % anomalous with
1-3 elliptic blobs each, scores = smoothed noise + a bump on the blobs, stored as float16 as in
scores.h5 (`--dtype float32` for the native-resolution path). All maps are treated as ONE class,
the worst case (a real class is ~1/15 of it). Peak memory is tracemalloc's peak of allocations made
by the measured call (numpy reports to tracemalloc), i.e. on top of the input maps.

    python tests/bench/bench_metrics.py --json out.json [--images 1725] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from iipad_cli import metrics  # noqa: E402

SIZE = 224


def synthetic(images: int, dtype: str, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    maps, masks = [], []
    for _ in range(images):
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        if rng.random() < 0.1:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(20, SIZE - 20, 2)
                a, b = rng.integers(3, 25, 2)
                mask |= ((rows - r) / a) ** 2 + ((cols - c) / b) ** 2 <= 1
        noise = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)).astype(np.float32), 2)
        maps.append((noise + 0.3 * ndimage.gaussian_filter(mask.astype(np.float32), 3)).astype(dtype))
        masks.append(mask)
    return maps, masks


def measure(call: Callable[[], Any]) -> dict[str, Any]:
    tracemalloc.start()
    started = time.perf_counter()
    value = call()
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": round(seconds, 3), "peak_mib": round(peak / 2**20, 1), "value": float(value)}


def run(images: int, dtype: str) -> dict[str, Any]:
    maps, masks = synthetic(images, dtype)
    pixels = images * SIZE * SIZE
    anomalous = sum(bool(m.any()) for m in masks)

    def ours() -> float:
        counts = metrics.pixel_counts(maps, masks)
        results["iipad_pixel_auroc_value"] = metrics.pixel_auroc_from_counts(counts)
        return metrics.au_pro_from_counts(counts, 0.3)

    def ours_all() -> float:
        counts = metrics.pixel_counts(maps, masks)
        results["iipad_pixel_ap_value"] = metrics.average_precision_from_counts(counts)
        results["iipad_pixel_f1_max_value"] = metrics.f1_max_from_counts(counts).value
        metrics.pixel_auroc_from_counts(counts)
        return metrics.au_pro_from_counts(counts, 0.3)

    def flat() -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])

    def sklearn_auroc() -> float:
        return roc_auc_score(*flat())

    def sklearn_ap() -> float:
        return average_precision_score(*flat())

    def sklearn_f1_max() -> float:
        precision, recall, _ = precision_recall_curve(*flat())
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * precision * recall / (precision + recall)
        return float(np.max(f1[np.isfinite(f1)]))

    results: dict[str, Any] = {}
    timings = {
        "iipad pixel AUROC + AU-PRO (one shared pass)": measure(ours),
        "iipad pixel AUROC + AP + F1-max + AU-PRO (one shared pass)": measure(ours_all),
        "iipad pixel AUROC alone": measure(lambda: metrics.pixel_auroc(maps, masks)),
        "iipad AU-PRO alone": measure(lambda: metrics.au_pro(maps, masks)),
        "legacy PRO (released-code variant, not comparable)": measure(lambda: metrics.legacy_pro(maps, masks)),
        "sklearn roc_auc_score (flattened copy)": measure(sklearn_auroc),
        "sklearn average_precision_score (flattened copy)": measure(sklearn_ap),
        "sklearn precision_recall_curve -> F1-max (flattened copy)": measure(sklearn_f1_max),
    }
    return {
        "bench": "metrics",
        "images": images,
        "anomalous_images": anomalous,
        "pixels": pixels,
        "dtype": dtype,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.processor() or platform.machine(),
        "timings": timings,
        "pixel_auroc_abs_diff_vs_sklearn": abs(results["iipad_pixel_auroc_value"] - timings["sklearn roc_auc_score (flattened copy)"]["value"]),
        "pixel_ap_abs_diff_vs_sklearn": abs(results["iipad_pixel_ap_value"] - timings["sklearn average_precision_score (flattened copy)"]["value"]),
        "pixel_f1_max_abs_diff_vs_sklearn": abs(
            results["iipad_pixel_f1_max_value"] - timings["sklearn precision_recall_curve -> F1-max (flattened copy)"]["value"]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--images", type=int, default=1725)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args()
    result = run(args.images, args.dtype)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
