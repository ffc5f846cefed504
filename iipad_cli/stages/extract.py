"""`iipad extract`: run the frozen encoders once per image and cache everything in `RUN/features.h5`.

It is the only stage that touches the image encoders, so it is built for throughput (batched
forward under inference_mode, DataLoader workers decoding the next images while the model runs,
one shared ViT trunk for CLIP and the Q-Former when their weights agree) and for long runs that
get interrupted: images go to `features.h5.partial`, flushed batch by batch; a re-run with the
same options resumes after the last stored batch, and only a finished file is fsynced and renamed
to `features.h5`, so a partial file never replaces a complete one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress, TaskID
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import Dataset as TorchDataset

from iipad_cli import __version__
from iipad_cli.artifacts import FEATURES_FILE, SCHEMA_VERSION, atomic_path, record_stage, sha256_file
from iipad_cli.config import CLIP_MEAN, CLIP_STD, BackboneSpec
from iipad_cli.data.images import MASK_THRESHOLD, load_mask, preprocess_image
from iipad_cli.data.layouts import Dataset, Sample, load_dataset
from iipad_cli.data.shots import select_shots, shot_files
from iipad_cli.devices import bf16_units, describe_precision, resolve_device
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone
from iipad_cli.checkpoints import find_weights, load_backbone
from iipad_cli.models.registry import get_spec
from iipad_cli.pipeline.extract import ExtractOptions, default_run_dir, default_workers, listing_digest
from iipad_cli.runlock import run_lock
from iipad_cli.schema.features import (
    ATTR_DEFAULTS,
    FEATURE_FIELDS,
    FeatureShapes,
    FeaturesWriter,
    differing_attrs,
    read_attrs,
    read_split,
)
from iipad_cli.ui import log, progress
from iipad_cli.writes import HDF5_MARGIN_BYTES, require_space

PARTIAL_SUFFIX = ".partial"
# Longest wait for one batch from the decoding workers before giving up (a batch takes well under
# a second to decode; a worker whose hand-over failed would otherwise be waited for forever).
WORKER_TIMEOUT_S = 120


@dataclass(frozen=True)
class _Item:
    """One decoded image (or the one-line error that decoding it raised, carried to the main process)."""

    index: int
    image: torch.Tensor | None
    mask: np.ndarray | None
    error: str | None


@dataclass(frozen=True)
class _Batch:
    indices: list[int]
    images: torch.Tensor | None
    masks: np.ndarray | None
    error: str | None


class _ImageDataset(TorchDataset):
    """Decodes images (and test masks) in DataLoader workers.

    An IipadError inside a worker would reach the main process wrapped in a multi-line
    traceback, so it travels as data and is re-raised there as the original one-line message.
    """

    def __init__(self, samples: Sequence[Sample], start: int, image_size: int, resolution: int, masks: bool) -> None:
        self.samples = list(samples)
        self.start = start
        self.image_size = image_size
        self.resolution = resolution
        self.masks = masks

    def __len__(self) -> int:
        return len(self.samples) - self.start

    def __getitem__(self, position: int) -> _Item:
        index = self.start + position
        sample = self.samples[index]
        try:
            image, size = preprocess_image(sample.path, self.image_size)
            mask = None
            if self.masks:
                mask = np.zeros((self.resolution, self.resolution), dtype=bool)
                if sample.label and sample.mask_path is not None:
                    mask = load_mask(sample.mask_path, size, self.resolution)
        except IipadError as error:
            return _Item(index, None, None, str(error))
        return _Item(index, image, mask, None)


def _collate(items: list[_Item]) -> _Batch:
    indices = [item.index for item in items]
    for item in items:
        if item.error is not None:
            return _Batch(indices, None, None, item.error)
    images = torch.stack([item.image for item in items if item.image is not None])
    masks = np.stack([item.mask for item in items]) if items[0].mask is not None else None
    if get_worker_info() is not None:
        # A worker hands the batch over through shared memory (/dev/shm). Left to the queue's
        # feeder thread, a failure there (full /dev/shm, `ulimit -f`) is only printed and the
        # batch never arrives: the main process waited forever. Allocated here, the failure
        # travels to the main process as a one-line error instead.
        try:
            images.share_memory_()
        except (OSError, RuntimeError) as error:
            reason = str(error).splitlines()[0]
            return _Batch(
                indices,
                None,
                None,
                f"a DataLoader worker could not pass decoded images through shared memory ({reason}); "
                "free /dev/shm, raise `ulimit -f`, or rerun with --workers 0",
            )
    return _Batch(indices, images, masks, None)


def _batches(loader: DataLoader) -> Iterator[_Batch]:
    """The loader's batches; a worker that dies (OOM killer, signal) or stops delivering is one
    line within seconds (PyTorch checks its workers every 5 s), never a hang or a traceback."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            reason = str(error).splitlines()[0]
            if "DataLoader" not in reason:
                raise
            raise IipadError(
                f"image decoding failed: {reason} (out of memory, or /dev/shm full?); "
                "rerun to resume, with --workers 0 to decode in the main process"
            ) from None
        yield batch


def _weights_attrs(spec: BackboneSpec, weights_dir: Path | None) -> dict[str, Any]:
    """Sorted sha256 of the weight files (["random"] for seeded random weights), without loading them.

    It lets a re-run decide "nothing to do" or "other weights" before spending time on the model.
    """
    paths = find_weights(spec, weights_dir)
    if paths is None:
        return {"weights_sha256": ["random"], "random_weights": True}
    return {"weights_sha256": sorted([sha256_file(paths.clip), sha256_file(paths.qformer)]), "random_weights": False}


def _file_attrs(
    options: ExtractOptions, dataset: Dataset, spec: BackboneSpec, shots: Sequence[Sample], precision: str
) -> dict[str, Any]:
    """Root attributes of the features file, except the weight hashes (`_weights_attrs`)."""
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
        "samples_sha256": listing_digest(dataset),
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


def _refuse_other_options(path: Path, attrs: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """The stored attributes of `path`, or an IipadError when they differ from `attrs` in any identity key."""
    stored = read_attrs(path)
    changed = differing_attrs(stored, attrs)
    if changed:
        raise IipadError(_describe_difference(path, stored, attrs, changed, dataset))
    return stored


def _is_current(final: Path, partial: Path, attrs: dict[str, Any], force: bool, dataset: Dataset) -> bool:
    """True when `final` already holds these options' features; otherwise clears the way to (re)write.

    A complete file made with other options is refused unless `force` (it is replaced only once
    the new file is complete). A partial file with the same options is kept for resuming; one
    with other options is refused unless `force`, and one left unreadable by a crash is dropped.
    """
    if final.is_file() and not force:
        if _refuse_other_options(final, attrs, dataset).get("complete", False):
            return True
    if partial.is_file():
        stored = _readable_attrs(partial)
        if stored is None or force:
            partial.unlink()
        else:
            _refuse_other_options(partial, attrs, dataset)
    return False


def _readable_attrs(path: Path) -> dict[str, Any] | None:
    """Attributes of a partial file, or None when an interrupted write left it unreadable."""
    try:
        return read_attrs(path)
    except (IipadError, OSError, KeyError):
        return None


def _feature_shapes(spec: BackboneSpec) -> FeatureShapes:
    patches = spec.num_patches
    return FeatureShapes(
        cls_token=(2, spec.embed_dim),
        qformer=(spec.qformer.num_query_tokens, spec.qformer.hidden),
        vv=(len(spec.vv_layers), patches, spec.embed_dim),
        mem=(len(spec.memory_layers), patches, spec.vision_width),
    )


def _bytes_per_image(shapes: FeatureShapes, resolution: int) -> int:
    """fp16 features + the test mask + room for the strings and the chunk index, per image."""
    features = sum(2 * int(np.prod(shapes.of(name))) for name in FEATURE_FIELDS)
    return features + resolution * resolution + 1024


def _check_finite(features: dict[str, np.ndarray], samples: Sequence[Sample]) -> None:
    for name, values in features.items():
        finite = np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
        if not finite.all():
            bad = samples[int(np.argmin(finite))]
            raise IipadError(f"{bad.path}: non-finite {name} features (NaN/Inf, or beyond the fp16 range)")


@dataclass
class _Throughput:
    """Images done since the loop started, shown as images/s on the progress bar."""

    bar: Progress
    task: TaskID
    started: float
    images: int = 0

    @property
    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def advance(self, images: int) -> None:
        self.images += images
        self.bar.update(self.task, advance=images, rate=f"{self.rate:.2f} images/s")


def _extract_split(
    writer: FeaturesWriter,
    split: str,
    samples: Sequence[Sample],
    backbone: Backbone,
    options: ExtractOptions,
    throughput: _Throughput,
) -> None:
    start = writer.rows_written(split)
    if start >= len(samples):
        return
    data = _ImageDataset(samples, start, backbone.spec.image_size, options.resolution, masks=split == "test")
    workers = default_workers() if options.workers is None else options.workers
    loader = DataLoader(
        data,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        timeout=WORKER_TIMEOUT_S if workers else 0,
    )
    for batch in _batches(loader):
        if batch.error is not None:
            raise IipadError(batch.error)
        assert batch.images is not None
        batch_samples = [samples[i] for i in batch.indices]
        with torch.inference_mode():
            encoded = backbone.encode_images(batch.images.to(backbone.device))
        features = {name: getattr(encoded, name).to(torch.float16).cpu().numpy() for name in FEATURE_FIELDS}
        _check_finite(features, batch_samples)
        columns: dict[str, Any] = {
            "path": [s.rel_path for s in batch_samples],
            "cls": [s.cls for s in batch_samples],
            "defect": [s.defect for s in batch_samples],
            "label": np.array([s.label for s in batch_samples], dtype=np.uint8),
            **features,
        }
        if split == "test":
            assert batch.masks is not None
            columns["has_mask"] = np.array([s.has_mask for s in batch_samples], dtype=bool)
            columns["mask"] = batch.masks
        writer.append(split, columns)
        throughput.advance(len(batch_samples))


def run_extract(options: ExtractOptions) -> Path:
    """Extract features for the test set and the K shots per class; returns the run directory."""
    started = time.perf_counter()
    options.validate()
    dataset = load_dataset(options.data, options.layout, options.classes)
    shots = select_shots(dataset, options.shots, options.shot_policy, options.seed)
    spec = get_spec(options.backbone)
    device = resolve_device(options.device)
    precision = options.resolved_precision()
    attrs = _file_attrs(options, dataset, spec, shots, precision)
    run_dir = Path(options.output) if options.output is not None else default_run_dir(dataset.root, options.shots)
    final = run_dir / FEATURES_FILE
    partial = run_dir / (FEATURES_FILE + PARTIAL_SUFFIX)
    # Other options are reported before looking for weights, so "made with backbone tiny" is not
    # hidden behind "weights for vit-l-14 not found".
    if final.is_file() and not options.force:
        _refuse_other_options(final, attrs, dataset)
    attrs.update(_weights_attrs(spec, options.weights))
    with run_lock(run_dir, "extract"):
        if _is_current(final, partial, attrs, options.force, dataset):
            log(f"{final}: up to date (same options), nothing to do", options.quiet)
            return run_dir
        _extract_into(run_dir, options, dataset, shots, spec, attrs, started, device, precision)
    return run_dir


def _extract_into(
    run_dir: Path,
    options: ExtractOptions,
    dataset: Dataset,
    shots: Sequence[Sample],
    spec: BackboneSpec,
    attrs: dict[str, Any],
    started: float,
    device: torch.device,
    precision: str,
) -> None:
    """Encode what the partial file still lacks, then publish it as `features.h5` (run directory locked)."""
    final = run_dir / FEATURES_FILE
    partial = run_dir / (FEATURES_FILE + PARTIAL_SUFFIX)
    splits = {"train": list(shots), "test": list(dataset.test)}
    shapes = _feature_shapes(spec)
    total = sum(len(samples) for samples in splits.values())
    if not partial.is_file():  # checked before loading the encoders; a resume is checked below
        require_space(partial, total * _bytes_per_image(shapes, options.resolution) + HDF5_MARGIN_BYTES)
    backbone = load_backbone(spec, options.weights, device, precision)
    trunk = "shared by CLIP and the Q-Former" if backbone.trunk_shared else "not shared (Q-Former runs its own tower)"
    weights_note = " (random weights)" if attrs["random_weights"] else ""
    log(f"backbone {spec.backbone_id}{weights_note} on {device}, {describe_precision(precision, device)}; ViT trunk {trunk}", options.quiet)

    with FeaturesWriter(partial, {**attrs, "weights": backbone.weights}, shapes, options.resolution) as writer:
        remaining = sum(len(samples) - writer.rows_written(split) for split, samples in splits.items())
        # The rest of the file must fit, not just the next batch.
        require_space(partial, remaining * _bytes_per_image(shapes, options.resolution))
        if remaining < total:
            log(f"{partial}: resuming, {total - remaining} of {total} images already stored", options.quiet)
        with progress(options.quiet) as bar:
            throughput = _Throughput(bar, bar.add_task("extract", total=remaining, rate=""), time.perf_counter())
            for split, samples in splits.items():
                _extract_split(writer, split, samples, backbone, options, throughput)
        writer.mark_complete()
    seconds = time.perf_counter() - throughput.started
    rate = throughput.rate if throughput.images else 0.0
    with atomic_path(final) as tmp:
        os.replace(partial, tmp)
    log(f"extracted {throughput.images} images in {seconds:.1f} s ({rate:.2f} images/s) -> {final}", options.quiet)
    record_stage(
        run_dir,
        "extract",
        options=options.recorded(dataset),
        inputs={},
        outputs={FEATURES_FILE: sha256_file(final)},
        seconds=time.perf_counter() - started,
        extra={
            "images": throughput.images,
            "images_per_s": round(rate, 3),
            "trunk_shared": backbone.trunk_shared,
            "precision": precision,
            "bf16_units": bf16_units(device),
        },
    )

