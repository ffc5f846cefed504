"""The files of `iipad predict`: its inputs (files, folders, patterns -> unique images and output
names) and its outputs (mask PNGs, each rank's part of predictions.csv, the merged CSV in input
order and predict.json)."""

from __future__ import annotations

import csv
import glob
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from iipad_cli.artifacts import atomic_path, provenance, write_json_atomic
from iipad_cli.data.layouts import is_image
from iipad_cli.distributed import Launch
from iipad_cli.errors import IipadError
from iipad_cli.thresholds import ANOMALOUS, NORMAL
from iipad_cli.ui import log

PREDICTIONS_CSV = "predictions.csv"
PREDICT_JSON = "predict.json"
# Each rank's rows go to predictions.csv.part-RRRRR-of-WWWWW until rank 0 merges them.
PART_INFIX = ".part-"
MASKS_DIR = "masks"
CSV_COLUMNS = (
    "path",
    "label",
    "image_score",
    "normalised_score",
    "category",
    "image_threshold",
    "pixel_threshold",
    "anomalous_pixel_fraction",
    "prompt_max",
    "visual_max",
    "p_normal",
    "retrieval_sim",
    "retrieved",
)


@dataclass(frozen=True)
class ShardOutcome:
    """What one rank did: its part of predictions.csv (rows in input order, no header)."""

    rank: int
    part: Path
    scored: int
    skipped: list[str]
    seconds: float
    cpu_seconds: float
    device: str
    settings: dict[str, Any]
    labels: dict[str, int]


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, directories (every image below, sorted) and glob patterns -> unique image paths."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if is_image(p))
            if not matches:
                raise IipadError(f"{path}: no images in this directory")
        elif path.exists():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise IipadError(f"{item}: no such file, and no file matches it as a pattern")
        found.extend(matches)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def output_names(paths: Sequence[Path]) -> list[str]:
    """The file stems, all prefixed with as many parent directories as needed (joined by "__")
    to make every name unique."""
    parts = [p.resolve().with_suffix("").parts for p in paths]
    depth = 1
    while depth <= max((len(x) for x in parts), default=1):
        names = ["__".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["__".join(x) for x in parts]


def write_mask_png(mask: np.ndarray, path: Path) -> None:
    """A binary mask as an 8-bit greyscale PNG: 255 anomalous, 0 normal (atomic)."""
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")


def part_path(out_dir: Path, launch: Launch) -> Path:
    return out_dir / f"{PREDICTIONS_CSV}{PART_INFIX}{launch.rank:05d}-of-{launch.world_size:05d}"


def merge_parts(csv_path: Path, parts: Sequence[Path]) -> None:
    """One predictions.csv from the ranks' parts, in rank order (= input order), written atomically;
    the parts (and any left by an interrupted run) are removed only after the rename."""
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as handle:
        csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n").writeheader()
        for part in parts:
            with part.open(newline="") as source:
                shutil.copyfileobj(source, handle)
    for leftover in csv_path.parent.glob(f"{PREDICTIONS_CSV}{PART_INFIX}*"):
        leftover.unlink(missing_ok=True)


def finish(
    run_dir: Path, out_dir: Path, outcomes: Sequence[ShardOutcome], launch: Launch, started: float, quiet: bool
) -> None:
    """Rank 0's share of the end: the merged predictions.csv, predict.json and the summary line."""
    scored = sum(o.scored for o in outcomes)
    skipped = [path for o in outcomes for path in o.skipped]
    merge_parts(out_dir / PREDICTIONS_CSV, [o.part for o in outcomes])
    seconds = max(o.seconds for o in outcomes)
    rate = scored / seconds if seconds > 0 else 0.0
    settings = outcomes[0].settings
    write_json_atomic(
        out_dir / PREDICT_JSON,
        {
            **provenance(),
            "run_dir": str(Path(run_dir).resolve()),
            **{key: value for key, value in settings.items() if key != "note"},
            "scored": scored,
            "labels": {label: sum(o.labels[label] for o in outcomes) for label in (ANOMALOUS, NORMAL)},
            "skipped": skipped,
            "seconds": round(time.perf_counter() - started, 3),
            "images_per_s": round(rate, 3),
            "world_size": launch.world_size,
            "ranks": [
                {
                    "rank": o.rank,
                    "device": o.device,
                    "scored": o.scored,
                    "seconds": round(o.seconds, 3),
                    "cpu_seconds": round(o.cpu_seconds, 3),
                }
                for o in outcomes
            ],
        },
    )
    ranks = f" on {launch.world_size} ranks" if launch.distributed else ""
    log(
        f"predicted {scored} images{ranks} in {seconds:.1f} s ({rate:.2f} images/s){settings['note']}, "
        f"skipped {len(skipped)} -> {out_dir}",
        quiet,
    )
