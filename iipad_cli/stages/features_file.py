"""A run's `features.h5` as `extract` decides it: its root attributes (the identity a rerun is
compared with), the refusal of other options, whether an existing file is current, and the
per-image metadata columns (paths, classes, labels, ground-truth masks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from iipad_cli import __version__
from iipad_cli.artifacts import SCHEMA_VERSION, sha256_file
from iipad_cli.checkpoints import find_weights
from iipad_cli.config import CLIP_MEAN, CLIP_STD, BackboneSpec
from iipad_cli.data.images import MASK_THRESHOLD, load_mask, oriented_size
from iipad_cli.data.layouts import Dataset, Sample
from iipad_cli.data.shots import shot_files
from iipad_cli.errors import IipadError
from iipad_cli.pipeline.extract import ExtractOptions
from iipad_cli.schema.features import ATTR_DEFAULTS, differing_attrs, missing_sources, read_attrs, read_split


def weights_attrs(spec: BackboneSpec, weights_dir: Path | None) -> dict[str, Any]:
    """The weight files and their sha256 (or the random seed), without loading them.

    It lets a re-run decide "nothing to do" or "other weights", and the store find every image,
    before any time is spent on the model (which is loaded only when an image is missing).
    """
    paths = find_weights(spec, weights_dir)
    if paths is None:
        return {"weights_sha256": ["random"], "random_weights": True, "weights": {"random": f"random(seed={spec.seed})"}}
    weights = {str(paths.clip): sha256_file(paths.clip), str(paths.qformer): sha256_file(paths.qformer)}
    return {"weights_sha256": sorted(weights.values()), "random_weights": False, "weights": weights}


def file_attrs(
    options: ExtractOptions, dataset: Dataset, spec: BackboneSpec, shots: Sequence[Sample], precision: str, samples_sha256: str
) -> dict[str, Any]:
    """Root attributes of the features file, except the weight hashes (`weights_attrs`);
    `samples_sha256` is the data set's `listing_digest`, which the caller has computed already."""
    files = {cls: [asdict(f) for f in entries] for cls, entries in shot_files(shots).items()}
    return {
        "schema_version": SCHEMA_VERSION,
        "iipad_version": __version__,
        "backbone_id": spec.backbone_id,
        "backbone_spec": spec.to_json(),
        "vv_layers": list(spec.vv_layers),
        "memory_layers": list(spec.memory_layers),
        "image_size": spec.image_size,
        "grid_size": spec.grid_size,
        "precision": precision,
        "resolution": options.resolution,
        "shots": options.shots,
        "seed": options.seed,
        "shot_policy": options.shot_policy,
        "data_root": str(dataset.root),
        "layout": dataset.layout,
        "classes": list(dataset.classes),
        "shots_files": files,
        "samples_sha256": samples_sha256,
        "num_train": len(shots),
        "num_test": len(dataset.test),
        "preprocessing": {
            "image": f"EXIF transpose, RGB, squash to {spec.image_size}x{spec.image_size} bicubic, /255, CLIP mean/std",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "mask": f"> 0, bilinear to {options.resolution}x{options.resolution} on 0/255, >= {MASK_THRESHOLD}/255",
        },
    }


def _listing_change(path: Path, dataset: Dataset) -> str:
    """"the file list changed: N removed (first), M added" between a features file and the data."""
    stored = {split: set(read_split(path, split, ["path"])["path"]) for split in ("train", "test")}
    current = {sample.rel_path for sample in (*dataset.train, *dataset.test)}
    removed = sorted((stored["train"] | stored["test"]) - current)
    added = sorted({sample.rel_path for sample in dataset.test} - stored["test"])
    if not removed and not added:
        return "the file list changed (images that are neither its shots nor its test images)"
    parts = [f"{len(removed)} removed" + (f" ({removed[0]}{', ...' if len(removed) > 1 else ''})" if removed else "")]
    parts.append(f"{len(added)} added" + (f" ({added[0]}{', ...' if len(added) > 1 else ''})" if added else ""))
    return "the file list changed: " + ", ".join(parts)


def _describe_difference(path: Path, stored: dict[str, Any], expected: dict[str, Any], keys: list[str], dataset: Dataset) -> str:
    if keys == ["samples_sha256"]:
        return f"{path}: {_listing_change(path, dataset)} since it was made; pass --force to extract again"
    key = keys[0]
    more = f" (and {', '.join(keys[1:])})" if len(keys) > 1 else ""
    return f"{path}: made with {key} {stored.get(key, ATTR_DEFAULTS.get(key))!r}, not {expected[key]!r}{more}; pass --force to replace it"


def refuse_other_options(path: Path, attrs: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """The stored attributes of `path`, or an IipadError when they differ from `attrs` in any identity key."""
    stored = read_attrs(path)
    changed = differing_attrs(stored, attrs)
    # The content digest covers the shots, so every option that draws other shots changes it too:
    # it is named only when it is the one difference (image bytes changed under the same names).
    changed = [key for key in changed if key != "content_sha256"] or changed
    if changed:
        raise IipadError(_describe_difference(path, stored, attrs, changed, dataset))
    return stored


def current_file(final: Path, attrs: dict[str, Any], copy: bool) -> str | None:
    """Why `final` (same identity options, checked by the caller) must be written again, or None."""
    stored = read_attrs(final)
    if not stored.get("complete", False):
        return "incomplete"
    if bool(stored.get("virtual", False)) == copy:
        return "self-contained copy requested" if copy else "virtual file requested (no --copy)"
    with h5py.File(final, "r") as handle:
        gone = missing_sources(handle)
    return f"{len(gone)} store segments gone" if gone else None


def metadata_columns(split: str, samples: Sequence[Sample], resolution: int) -> dict[str, Any]:
    """The per-image metadata of a split; the test split with its ground truth at `resolution`."""
    columns: dict[str, Any] = {
        "path": [s.rel_path for s in samples],
        "cls": [s.cls for s in samples],
        "defect": [s.defect for s in samples],
        "label": np.array([s.label for s in samples], dtype=np.uint8),
    }
    if split == "test":
        masks = np.zeros((len(samples), resolution, resolution), dtype=bool)
        for row, sample in enumerate(samples):
            if sample.label and sample.mask_path is not None:
                masks[row] = load_mask(sample.mask_path, oriented_size(sample.path), resolution)
        columns["has_mask"] = np.array([s.has_mask for s in samples], dtype=bool)
        columns["mask"] = masks
    return columns
