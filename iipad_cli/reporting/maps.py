"""Metrics of any method's anomaly maps in the MVTec evaluation layout (`iipad metrics --maps`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from iipad_cli.errors import IipadError
from iipad_cli.pipeline.metrics import EvaluateOptions
from iipad_cli.reporting.document import ClassData, LazyMaps, build_document, title
from iipad_cli.reporting.inputs import image_size, read_mask, upsample

MAP_EXTENSIONS = (".tiff", ".tif", ".png", ".npy")



def load_map_file(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            values = np.load(path)
        else:
            with Image.open(path) as image:
                values = np.asarray(image)
    except (OSError, ValueError) as error:
        raise IipadError(f"{path}: unreadable anomaly map ({error})") from None
    values = np.squeeze(values)
    if values.ndim != 2:
        raise IipadError(f"{path}: an anomaly map must be 2-D, got shape {values.shape}")
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise IipadError(f"{path}: anomaly map contains NaN or Inf")
    return values


def read_scores_csv(path: Path) -> dict[str, float]:
    """`path,score` rows keyed by `<cls>/test/<defect>/<stem>` (any extension in `path` is dropped)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"path", "score"} <= set(reader.fieldnames):
                raise IipadError(f"{path}: needs the columns path,score")
            table = {}
            for line, row in enumerate(reader, start=2):
                try:
                    table[str(Path(row["path"]).with_suffix(""))] = float(row["score"])
                except ValueError:
                    raise IipadError(f"{path}:{line}: score {row['score']!r} is not a number") from None
            return table
    except OSError as error:
        raise IipadError(f"{path}: unreadable ({error})") from None


def evaluate_maps(maps_dir: Path, data_root: Path, scores_csv: Path | None, options: EvaluateOptions) -> dict[str, Any]:
    """Metrics of any method's maps in the MVTec evaluation layout `DIR/<cls>/test/<defect>/<stem>.*`.

    Ground truth is `ROOT/<cls>/ground_truth/<defect>/<stem>_mask.png` (good images: empty masks at
    the image's size); a map whose size differs from its image is upsampled bilinearly to it.
    """
    from iipad_cli.data.layouts import load_dataset

    options.validate()
    maps_dir, data_root = Path(maps_dir), Path(data_root)
    if not maps_dir.is_dir():
        raise IipadError(f"{maps_dir}: no such directory")
    dataset = load_dataset(data_root, "mvtec")
    found: dict[str, Path] = {}
    for path in sorted(maps_dir.glob("*/test/*/*")):
        if path.suffix.lower() in MAP_EXTENSIONS and path.is_file():
            key = str(path.relative_to(maps_dir).with_suffix(""))
            if key in found:
                raise IipadError(f"{path}: a second map for {key} (also {found[key].name})")
            found[key] = path
    if not found:
        raise IipadError(f"{maps_dir}: no maps found as <cls>/test/<defect>/<stem>.{{tiff,png,npy}}")
    samples = {str(Path(s.rel_path).with_suffix("")): s for s in dataset.test}
    unknown = [key for key in found if key not in samples]
    if unknown:
        raise IipadError(f"{found[unknown[0]]}: no test image {unknown[0]}.* in {data_root}")
    evaluated = {key.split("/")[0] for key in found}
    missing = [key for key, s in samples.items() if s.cls in evaluated and key not in found]
    if missing:
        raise IipadError(f"{maps_dir}: no map for test image {missing[0]} (every test image of a class needs one)")
    given = read_scores_csv(scores_csv) if scores_csv is not None else None
    classes = []
    for name in sorted(evaluated):
        keys = sorted(k for k in found if k.split("/")[0] == name)
        if given is not None:
            absent = [k for k in keys if k not in given]
            if absent:
                raise IipadError(f"{scores_csv}: no score for {absent[0]}")
            image_scores = np.array([given[k] for k in keys])
        else:
            image_scores = np.array([load_map_file(found[k]).max() for k in keys], dtype=np.float64)
        labels = np.array([samples[k].label for k in keys])

        def load_mask(i: int, keys: list[str] = keys) -> np.ndarray:
            sample = samples[keys[i]]
            return read_mask(sample.mask_path) if sample.mask_path is not None else np.zeros(image_size(sample.path), dtype=bool)

        def load_map(i: int, keys: list[str] = keys) -> np.ndarray:
            sample = samples[keys[i]]
            return upsample(load_map_file(found[keys[i]]), image_size(sample.mask_path or sample.path))

        pixel = bool(labels.any())
        classes.append(
            ClassData(
                name,
                labels,
                image_scores,
                LazyMaps(len(keys), load_map) if pixel else None,
                LazyMaps(len(keys), load_mask) if pixel else None,
            )
        )
    source = {"kind": "maps", "maps": str(maps_dir.resolve()), "data": str(data_root.resolve())}
    info = {"preset": None, "shots": None, "seed": None, "backbone_id": None, "random_weights": False, "data_root": str(data_root.resolve())}
    document = build_document(classes, options, source, info, "native")
    document["evaluation"]["image_score"] = "scores.csv" if scores_csv is not None else "map maximum"
    document["title"] = title(document)
    return document
