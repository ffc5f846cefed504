"""The inputs of the metrics of one run: RUN/scores.h5 checked against RUN/features.h5, per
class, at the stored resolution or upsampled to each ground-truth mask (`--resolution native`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from iipad_cli.artifacts import FEATURES_FILE, SCORES_FILE, require_file, sha256_file, shell_path
from iipad_cli.config import image_score
from iipad_cli.errors import IipadError
from iipad_cli.pipeline.metrics import EvaluateOptions
from iipad_cli.reporting.document import ClassData, LazyMaps


def image_scores(columns: dict[str, np.ndarray], formula: str) -> np.ndarray:
    """The stored score, or one recomputed from the stored components (design.md §2), in float64."""
    if formula == "stored":
        return columns["image_score"]
    prompt_max = columns["prompt_max"].astype(np.float64)
    return image_score(prompt_max, columns["visual_max"], columns["p_normal"], columns["retrieval_sim"], formula)


def upsample(score_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling to (H, W) with pixel-centre alignment (torch's align_corners=False)."""
    if score_map.shape == size:
        return score_map.astype(np.float32)
    image = Image.fromarray(score_map.astype(np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def read_mask(path: Path) -> np.ndarray:
    from iipad_cli.data.images import binarise_mask

    try:
        with Image.open(path) as image:
            return binarise_mask(image)
    except OSError as error:
        raise IipadError(f"{path}: unreadable mask ({error})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except OSError as error:
        raise IipadError(f"{path}: unreadable image ({error})") from None


def _native_ground_truth(data_root: str, layout: str, rel_paths: list[str]) -> list[tuple[Path | None, Path]]:
    """(mask path or None, image path) per row, resolved through the run's own data layout."""
    from iipad_cli.data.layouts import load_dataset

    dataset = load_dataset(Path(data_root), layout or "auto")
    by_path = {sample.rel_path: sample for sample in dataset.test}
    missing = [rel for rel in rel_paths if rel not in by_path]
    if missing:
        raise IipadError(f"{data_root}: test image {missing[0]} of the run is not in the data root any more")
    return [(by_path[rel].mask_path, by_path[rel].path) for rel in rel_paths]


def run_info(attrs: dict[str, Any]) -> dict[str, Any]:
    preset = attrs.get("preset", "")
    try:
        preset_name = json.loads(preset).get("name", preset) if isinstance(preset, str) else preset
    except ValueError:
        preset_name = preset
    return {
        "preset": preset_name,
        "shots": attrs.get("shots"),
        "seed": attrs.get("seed"),
        "backbone_id": attrs.get("backbone_id"),
        "random_weights": bool(attrs.get("random_weights", False)),
        "data_root": attrs.get("data_root"),
    }


def load_run(run_dir: Path, options: EvaluateOptions) -> tuple[list[ClassData], dict[str, Any], str, str]:
    """Classes of one run, checked against the features file the scores were made from.

    Returns the classes, scores.h5's attributes, the resolution label and features.h5's sha256
    (hashed once: it can be gigabytes)."""
    from iipad_cli.schema.features import load_features_attrs, read_split
    from iipad_cli.schema.scores import COMPONENTS, load_scores, read_scores_attrs

    scores_path = require_file(run_dir / SCORES_FILE, "score")
    features_path = require_file(run_dir / FEATURES_FILE, "extract")
    attrs = read_scores_attrs(scores_path)
    features_attrs = load_features_attrs(features_path)
    features_sha256 = sha256_file(features_path)
    if not options.force and attrs.get("features_sha256") != features_sha256:
        raise IipadError(f"{features_path}: changed after {scores_path.name} was made; run `iipad score {shell_path(run_dir)}` again (or --force)")
    stored = load_scores(scores_path)
    rel_paths, names = stored.path, stored.cls
    labels = stored.label.astype(np.int64)
    has_mask = stored.has_mask.astype(bool)
    columns = {name: getattr(stored, name) for name in COMPONENTS}
    maps = stored.maps
    truth = read_split(features_path, "test", ["path", "mask"])
    if list(truth["path"]) != rel_paths:
        raise IipadError(f"{scores_path}: its rows are not the test images of {features_path} in order; run `iipad score {shell_path(run_dir)}` again")
    if not np.isfinite(maps).all():
        raise IipadError(f"{scores_path}: maps contain NaN or Inf")
    scores = image_scores(columns, options.image_score)
    if not np.isfinite(scores).all():
        raise IipadError(f"{scores_path}: image scores ({options.image_score}) contain NaN or Inf")
    masks = np.asarray(truth["mask"], dtype=bool)
    native = _native_ground_truth(attrs["data_root"], features_attrs.get("layout", "auto"), rel_paths) if options.resolution == "native" else None

    classes = []
    for name in dict.fromkeys(names):
        rows = np.array([i for i, c in enumerate(names) if c == name])
        usable = rows[has_mask[rows]]
        pixel = bool(np.any(labels[usable] == 1))
        if not pixel:
            class_maps = class_masks = None
        elif native is None:
            class_maps, class_masks = list(maps[usable]), list(masks[usable])
        else:
            truth_files = [native[i] for i in usable]

            def load_mask(k: int, files: list[tuple[Path | None, Path]] = truth_files) -> np.ndarray:
                mask_path, image_path = files[k]
                return read_mask(mask_path) if mask_path is not None else np.zeros(image_size(image_path), dtype=bool)

            def load_map(k: int, rows: np.ndarray = usable, files: list[tuple[Path | None, Path]] = truth_files) -> np.ndarray:
                mask_path, image_path = files[k]
                size = image_size(mask_path if mask_path is not None else image_path)
                return upsample(maps[rows[k]], size)

            class_maps, class_masks = LazyMaps(usable.size, load_map), LazyMaps(usable.size, load_mask)
        classes.append(ClassData(name, labels[rows], scores[rows], class_maps, class_masks))
    resolution = f"{maps.shape[1]}x{maps.shape[2]}" if options.resolution == "224" else "native"
    return classes, attrs, resolution, features_sha256
