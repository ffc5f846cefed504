"""Label-free thresholds for a run: score normal images only, the way a test image is scored.

Which normal images (the rule itself is in `iipad_cli/thresholds.py`):

* **K >= 2 shots per class: leave-one-out.** Each shot is scored against the banks without it,
  retrieving max(1, top_k − 1) bank images: at test time an image retrieves (ideally) the K shots
  of its class, and with one shot left out K − 1 of them remain. Its category is its own class.
* **K = 1: augmented views.** Leaving the only shot out would leave its class without a bank image,
  so each shot is re-encoded in six mild, label-preserving views (four corner crops of 15/16 of each
  side, 5 % brighter, 5 % darker; no flips or rotations, which are defects for some parts such as
  MVTec's metal_nut) and scored against the full banks with the run's top-k. Category: the shot's class.
* **`--normal DIR...`**: extra normal images are encoded and scored against the full banks; their
  category is the class of their top-1 retrieved bank image, as for any image at prediction time.

Only the train split of features.h5 and the user's normal images are read: nothing here can see
a test image or a test label. The shots' scores are somewhat optimistic (the prompt generator
was trained on them), which docs/scoring.md states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from iipad_cli.data.images import load_rgb, normalise
from iipad_cli.errors import IipadError
from iipad_cli.models.anomaly import AnomalyOutput
from iipad_cli.schema.features import FEATURE_FIELDS, read_split
from iipad_cli.schema.thresholds import CalibrationImage, Thresholds
from iipad_cli.stages._scoring import (
    RunModels,
    check_finite_features,
    check_top_k,
    encode_for_scoring,
    features_to_device,
    score_features,
)
from iipad_cli.thresholds import Z, category_thresholds, pooled_std
from iipad_cli.ui import log

LEAVE_ONE_OUT = "leave-one-out"
AUGMENTED_VIEWS = "augmented views"
NORMAL_SOURCE = "--normal"
CROP_FRACTION = 15 / 16
BRIGHTNESS = {"brighter": 1.05, "darker": 0.95}
CORNERS = {"crop-top-left": (0, 0), "crop-top-right": (1, 0), "crop-bottom-left": (0, 1), "crop-bottom-right": (1, 1)}


def corner_crop(image: Image.Image, corner: tuple[int, int], fraction: float = CROP_FRACTION) -> Image.Image:
    """The (fraction·W) × (fraction·H) crop touching the given corner ((0, 0) top left, (1, 1) bottom right)."""
    width, height = image.size
    crop_w, crop_h = round(width * fraction), round(height * fraction)
    left = (width - crop_w) * corner[0]
    top = (height - crop_h) * corner[1]
    return image.crop((left, top, left + crop_w, top + crop_h))


def scale_brightness(image: Image.Image, factor: float) -> Image.Image:
    """Every channel value × factor, rounded half to even and clipped to 0..255."""
    values = np.asarray(image, dtype=np.float64) * factor
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="RGB")


def augmented_views(image: Image.Image) -> list[tuple[str, Image.Image]]:
    """The six deterministic views of a K = 1 shot, named."""
    views = [(name, corner_crop(image, corner)) for name, corner in CORNERS.items()]
    views += [(name, scale_brightness(image, factor)) for name, factor in BRIGHTNESS.items()]
    return views


def loo_top_k(top_k: int) -> int:
    return max(1, top_k - 1)


def _calibration_image(path: str, category: str, source: str, output: AnomalyOutput, row: int) -> CalibrationImage:
    return CalibrationImage(
        path=path,
        category=category,
        source=source,
        image_score=float(output.image_score[row]),
        map_max=float(output.maps[row].max()),
    )


def leave_one_out(
    models: RunModels, features_path: Path, *, top_k: int, resolution: int, sigma: float
) -> list[CalibrationImage]:
    """Each shot of features.h5:train scored against the banks without it."""
    assert models.banks is not None
    train = read_split(features_path, "train", ("path", "cls", *FEATURE_FIELDS))
    paths = [str(p) for p in train["path"]]
    if list(models.banks.paths) != paths:
        raise IipadError(f"{features_path}: the train split is not the banks' images in order; re-run `iipad bank`")
    k = loo_top_k(top_k)
    check_top_k(k, len(paths) - 1)
    images = []
    for row, path in enumerate(paths):
        reduced = dataclasses.replace(models, banks=models.banks.without(row))
        features = features_to_device(
            {name: np.asarray(train[name][row : row + 1]) for name in FEATURE_FIELDS}, models.device
        )
        check_finite_features(features, [path], f"{features_path} (train)")
        output = score_features(reduced, features, [path], top_k=k, resolution=resolution, sigma=sigma)
        images.append(_calibration_image(path, str(train["cls"][row]), LEAVE_ONE_OUT, output, 0))
    return images


def view_scores(
    models: RunModels, features_path: Path, data_root: Path, *, top_k: int, resolution: int, sigma: float
) -> list[CalibrationImage]:
    """The augmented views of every shot, scored against the full banks."""
    assert models.banks is not None
    train = read_split(features_path, "train", ("path", "cls"))
    image_size = models.backbone.spec.image_size
    images = []
    for rel_path, cls in zip(train["path"], train["cls"]):
        views = augmented_views(load_rgb(data_root / str(rel_path)))
        names = [f"{rel_path}#{name}" for name, _ in views]
        features = encode_for_scoring(models, [normalise(view, image_size) for _, view in views])
        check_finite_features(features, names, "calibration views")
        output = score_features(models, features, names, top_k=top_k, resolution=resolution, sigma=sigma)
        images += [
            _calibration_image(str(rel_path), str(cls), f"view {name}", output, row) for row, (name, _) in enumerate(views)
        ]
    return images


def normal_scores(
    models: RunModels, paths: Sequence[Path], *, top_k: int, resolution: int, sigma: float, batch_size: int
) -> list[CalibrationImage]:
    """Extra normal images, scored against the full banks; category = class of the top-1 bank image."""
    assert models.banks is not None
    image_size = models.backbone.spec.image_size
    images = []
    for start in range(0, len(paths), batch_size):
        batch = list(paths[start : start + batch_size])
        names = [str(p) for p in batch]
        features = encode_for_scoring(models, [normalise(load_rgb(p), image_size) for p in batch])
        check_finite_features(features, names, NORMAL_SOURCE)
        output = score_features(models, features, names, top_k=top_k, resolution=resolution, sigma=sigma)
        for row, name in enumerate(names):
            category = models.banks.classes[int(output.retrieved[row, 0])]
            images.append(_calibration_image(name, category, NORMAL_SOURCE, output, row))
    return images


def derive_thresholds(
    models: RunModels,
    features_path: Path,
    *,
    normal_paths: Sequence[Path],
    top_k: int,
    resolution: int,
    sigma: float,
    batch_size: int,
    quiet: bool = False,
) -> Thresholds:
    """Score the normal calibration images and apply the rule of `iipad_cli/thresholds.py`."""
    assert models.banks is not None
    attrs = models.features_attrs
    shots = int(attrs["shots"])
    if shots >= 2:
        method = LEAVE_ONE_OUT
        images = leave_one_out(models, features_path, top_k=top_k, resolution=resolution, sigma=sigma)
    else:
        method = AUGMENTED_VIEWS
        images = view_scores(
            models, features_path, Path(str(attrs["data_root"])), top_k=top_k, resolution=resolution, sigma=sigma
        )
    if normal_paths:
        images += normal_scores(models, normal_paths, top_k=top_k, resolution=resolution, sigma=sigma, batch_size=batch_size)
    scores = [image.image_score for image in images]
    names = [image.category for image in images]
    try:
        categories = category_thresholds(scores, [image.map_max for image in images], names)
    except ValueError as error:
        raise IipadError(f"{features_path}: no label-free threshold: {error}; add normal images with --normal DIR") from None
    log(
        f"label-free thresholds from {len(images)} normal images ({method}"
        f"{f' + {len(normal_paths)} --normal' if normal_paths else ''}) for {len(categories)} categories",
        quiet,
    )
    return Thresholds(
        method=method,
        z=Z,
        pooled_std=pooled_std(scores, names),
        categories=categories,
        images=images,
        bank_classes=list(models.banks.classes),
        image_score_formula=models.preset.image_score,
        top_k=loo_top_k(top_k) if method == LEAVE_ONE_OUT else top_k,
        sigma=sigma,
        resolution=resolution,
        provenance={
            "generator_sha256": models.generator_sha,
            "banks_sha256": models.banks_sha,
            "features_sha256": models.features_sha,
            "normal_images": len(normal_paths),
            "calibration_top_k_rule": "max(1, top_k - 1) for leave-one-out, top_k otherwise",
            "score_top_k": top_k,
        },
    )
