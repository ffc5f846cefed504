"""`iipad extract`: the frozen encoders' features of the test set and the K shots -> `RUN/features.h5`.

Every image is looked up in the feature store (docs/store.md) by the sha256 of its bytes; only
the missing ones go through the encoders (`encode_into_store`, which a torchrun rank can call on
its shard), which is built for throughput: batched forward under inference_mode, DataLoader
workers decoding the next images while the model runs, one shared ViT trunk for CLIP and the
Q-Former when their weights agree. `RUN/features.h5` is then written in one go, atomically, with
the fp16 features as virtual datasets into the store's segments (`--copy`: a self-contained
copy). An interrupted extract keeps every sealed store segment, so the rerun encodes only what
is still missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from rich.progress import Progress, TaskID
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import Dataset as TorchDataset

from iipad_cli import __version__
from iipad_cli.artifacts import FEATURES_FILE, SCHEMA_VERSION, atomic_path, record_stage, sha256_file, sha256_json
from iipad_cli.config import CLIP_MEAN, CLIP_STD, BackboneSpec
from iipad_cli.data.images import MASK_THRESHOLD, load_mask, oriented_size, preprocess_image
from iipad_cli.data.layouts import Dataset, Sample, load_dataset
from iipad_cli.data.shots import shot_files
from iipad_cli.devices import bf16_units, describe_precision, resolve_device
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone
from iipad_cli.checkpoints import find_weights, load_backbone
from iipad_cli.models.registry import get_spec
from iipad_cli.pipeline.extract import ExtractOptions, content_digest, content_keys, default_run_dir, default_workers, listing_digest
from iipad_cli.runlock import run_lock
from iipad_cli.schema.features import (
    ATTR_DEFAULTS,
    FEATURE_FIELDS,
    SPLITS,
    FeatureShapes,
    differing_attrs,
    missing_sources,
    read_attrs,
    read_split,
    write_features_file,
)
from iipad_cli.store import BackboneKey, FeatureStore, Location, StoreWriter, resolve_cache_dir
from iipad_cli.ui import log, progress
from iipad_cli.writes import HDF5_MARGIN_BYTES, require_space

# Longest wait for one batch from the decoding workers before giving up (a batch takes well under
# a second to decode; a worker whose hand-over failed would otherwise be waited for forever).
WORKER_TIMEOUT_S = 120


@dataclass(frozen=True)
class _Item:
    """One decoded image (or the one-line error that decoding it raised, carried to the main process)."""

    index: int
    image: torch.Tensor | None
    error: str | None


@dataclass(frozen=True)
class _Batch:
    indices: list[int]
    images: torch.Tensor | None
    error: str | None


class _ImageDataset(TorchDataset):
    """Decodes images in DataLoader workers.

    An IipadError inside a worker would reach the main process wrapped in a multi-line
    traceback, so it travels as data and is re-raised there as the original one-line message.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> _Item:
        try:
            image, _ = preprocess_image(self.samples[index].path, self.image_size)
        except IipadError as error:
            return _Item(index, None, str(error))
        return _Item(index, image, None)


def _collate(items: list[_Item]) -> _Batch:
    indices = [item.index for item in items]
    for item in items:
        if item.error is not None:
            return _Batch(indices, None, item.error)
    images = torch.stack([item.image for item in items if item.image is not None])
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
                f"a DataLoader worker could not pass decoded images through shared memory ({reason}); "
                "free /dev/shm, raise `ulimit -f`, or rerun with --workers 0",
            )
    return _Batch(indices, images, None)


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
    """The weight files and their sha256 (or the random seed), without loading them.

    It lets a re-run decide "nothing to do" or "other weights", and the store find every image,
    before any time is spent on the model (which is loaded only when an image is missing).
    """
    paths = find_weights(spec, weights_dir)
    if paths is None:
        return {"weights_sha256": ["random"], "random_weights": True, "weights": {"random": f"random(seed={spec.seed})"}}
    weights = {str(paths.clip): sha256_file(paths.clip), str(paths.qformer): sha256_file(paths.qformer)}
    return {"weights_sha256": sorted(weights.values()), "random_weights": False, "weights": weights}


def backbone_key(spec: BackboneSpec, weights_sha256: Sequence[str], precision: str) -> BackboneKey:
    """The store key of this backbone's features (docs/store.md)."""
    return BackboneKey.for_backbone(spec.backbone_id, spec.to_json(), list(weights_sha256), spec.image_size, precision)


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
    # The content digest covers the shots, so every option that draws other shots changes it too:
    # it is named only when it is the one difference (image bytes changed under the same names).
    changed = [key for key in changed if key != "content_sha256"] or changed
    if changed:
        raise IipadError(_describe_difference(path, stored, attrs, changed, dataset))
    return stored


def _current_file(final: Path, attrs: dict[str, Any], copy: bool) -> str | None:
    """Why `final` (same identity options, checked by the caller) must be written again, or None."""
    stored = read_attrs(final)
    if not stored.get("complete", False):
        return "incomplete"
    if bool(stored.get("virtual", False)) == copy:
        return "self-contained copy requested" if copy else "virtual file requested (no --copy)"
    with h5py.File(final, "r") as handle:
        gone = missing_sources(handle)
    return f"{len(gone)} store segments gone" if gone else None


def feature_shapes(spec: BackboneSpec) -> FeatureShapes:
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


def encode_into_store(
    writer: StoreWriter,
    samples: Sequence[Sample],
    contents: Sequence[str],
    backbone: Backbone,
    batch_size: int,
    workers: int,
    on_batch: Callable[[int], None] = lambda images: None,
) -> None:
    """Encode `samples` (whose file sha256s are `contents`) and add their fp16 features to the store.

    The seam for a distributed extract: each torchrun rank opens its own `store.writer(...)` and
    calls this on its shard; every writer seals its own segments, so ranks never share a file.
    """
    loader = DataLoader(
        _ImageDataset(samples, backbone.spec.image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        timeout=WORKER_TIMEOUT_S if workers else 0,
    )
    for batch in _batches(loader):
        if batch.error is not None:
            raise IipadError(batch.error)
        assert batch.images is not None
        with torch.inference_mode():
            encoded = backbone.encode_images(batch.images.to(backbone.device))
        features = {name: getattr(encoded, name).to(torch.float16).cpu().numpy() for name in FEATURE_FIELDS}
        _check_finite(features, [samples[i] for i in batch.indices])
        writer.add([contents[i] for i in batch.indices], features)
        on_batch(len(batch.indices))


def _columns(split: str, samples: Sequence[Sample], resolution: int) -> dict[str, Any]:
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


def _encode_missing(
    store: FeatureStore,
    key: BackboneKey,
    missing: dict[str, Sample],
    spec: BackboneSpec,
    options: ExtractOptions,
    random_weights: bool,
    precision: str,
) -> dict[str, Any]:
    """Load the backbone and encode the images the store lacks; returns the manifest's rate figures."""
    # Checked before loading the encoders: the new segments must fit beside the store's index.
    features_only = _bytes_per_image(feature_shapes(spec), 0)
    require_space(store.index.path, len(missing) * features_only + HDF5_MARGIN_BYTES)
    device = resolve_device(options.device)
    backbone = load_backbone(spec, options.weights, device, precision)
    trunk = "shared by CLIP and the Q-Former" if backbone.trunk_shared else "not shared (Q-Former runs its own tower)"
    weights_note = " (random weights)" if random_weights else ""
    log(f"backbone {spec.backbone_id}{weights_note} on {device}, {describe_precision(precision, device)}; ViT trunk {trunk}", options.quiet)
    workers = default_workers() if options.workers is None else options.workers
    shapes = feature_shapes(spec)
    with progress(options.quiet) as bar, store.writer(key, {name: shapes.of(name) for name in FEATURE_FIELDS}) as writer:
        throughput = _Throughput(bar, bar.add_task("extract", total=len(missing), rate=""), time.perf_counter())
        # One split at a time, in the split's order: with an empty store the batches are the ones a
        # run always formed, so its fp16 features (batched matmuls round per batch) do not change.
        for split in SPLITS:
            part = {content: sample for content, sample in missing.items() if sample.split == split}
            encode_into_store(writer, list(part.values()), list(part), backbone, options.batch_size, workers, throughput.advance)
    seconds = time.perf_counter() - throughput.started
    log(f"encoded {throughput.images} images in {seconds:.1f} s ({throughput.rate:.2f} images/s) into {store.root}", options.quiet)
    return {"images_per_s": round(throughput.rate, 3), "trunk_shared": backbone.trunk_shared}


def run_extract(options: ExtractOptions) -> Path:
    """Features of the test set and the K shots per class, from the store; returns the run directory."""
    started = time.perf_counter()
    options.validate()
    dataset = load_dataset(options.data, options.layout, options.classes)
    spec = get_spec(options.backbone)
    splits = options.splits(dataset)
    shots = splits["train"]
    precision = options.resolved_precision()
    attrs = _file_attrs(options, dataset, spec, shots, precision)
    attrs["content_sha256"] = content_digest(splits)
    run_dir = Path(options.output) if options.output is not None else default_run_dir(dataset.root, options.shots)
    final = run_dir / FEATURES_FILE
    # Other options are reported before looking for weights, so "made with backbone tiny" is not
    # hidden behind "weights for vit-l-14 not found".
    if final.is_file() and not options.force:
        _refuse_other_options(final, attrs, dataset)
    attrs.update(_weights_attrs(spec, options.weights))
    with run_lock(run_dir, "extract"):
        if final.is_file() and not options.force:
            _refuse_other_options(final, attrs, dataset)
            reason = _current_file(final, attrs, options.copy)
            if reason is None:
                log(f"{final}: up to date (same options), nothing to do", options.quiet)
                return run_dir
            log(f"{final}: writing it again ({reason})", options.quiet)

        key = backbone_key(spec, attrs["weights_sha256"], precision)
        attrs["store_backbone_key"] = key.digest
        contents = {split: content_keys(samples) for split, samples in splits.items()}
        needed: dict[str, Sample] = {}
        for split in SPLITS:
            for sample, content in zip(splits[split], contents[split]):
                needed.setdefault(content, sample)
        store = FeatureStore(resolve_cache_dir(options.cache))
        with store:
            stored = store.lookup(key, needed)
            missing = {content: sample for content, sample in needed.items() if content not in stored}
            log(f"{len(needed)} distinct images: {len(needed) - len(missing)} in the feature store {store.root}, {len(missing)} to encode", options.quiet)
            if options.copy:  # checked before any encoding: the self-contained file must fit too
                rows = sum(len(samples) for samples in splits.values())
                require_space(final, rows * _bytes_per_image(feature_shapes(spec), options.resolution) + HDF5_MARGIN_BYTES)
            rates = _encode_missing(store, key, missing, spec, options, attrs["random_weights"], precision) if missing else {}
            locations = store.lookup(key, needed)
            lost = [needed[content].path for content in needed if content not in locations]
            if lost:
                raise IipadError(f"{lost[0]}: its features left the feature store while extract ran (cache cleared?); run extract again")
            store.check_segments(locations.values())
            sources: dict[str, list[Location]] = {split: [locations[c] for c in contents[split]] for split in SPLITS}
            columns = {split: _columns(split, splits[split], options.resolution) for split in SPLITS}
            with atomic_path(final) as tmp:
                write_features_file(tmp, attrs, feature_shapes(spec), columns, sources, store.read if options.copy else None)
        log(f"-> {final}" + (" (self-contained copy)" if options.copy else " (virtual datasets into the feature store)"), options.quiet)
        record_stage(
            run_dir,
            "extract",
            options=options.recorded(dataset),
            inputs={},
            outputs={FEATURES_FILE: sha256_file(final)},
            seconds=time.perf_counter() - started,
            extra={
                "images_encoded": len(missing),
                "images_from_store": len(needed) - len(missing),
                "feature_store": str(store.root),
                "store_backbone_key": key.digest,
                **rates,
                "precision": precision,
                "bf16_units": bf16_units(resolve_device(options.device)),
            },
        )
    return run_dir
