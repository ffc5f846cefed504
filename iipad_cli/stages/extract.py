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

import contextlib
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
from iipad_cli.artifacts import FEATURES_FILE, SCHEMA_VERSION, atomic_path, record_stage, sha256_file
from iipad_cli.config import CLIP_MEAN, CLIP_STD, BackboneSpec
from iipad_cli.data.images import MASK_THRESHOLD, load_mask, oriented_size, preprocess_image
from iipad_cli.data.layouts import Dataset, Sample, load_dataset
from iipad_cli.data.shots import shot_files
from iipad_cli.distributed import (
    Group,
    Launch,
    launch_from_env,
    process_group,
    rank_device,
    shard_range,
    stop_between_batches,
)
from iipad_cli.devices import bf16_units, describe_precision
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
from iipad_cli.store.index import SegmentRecord
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


@dataclass(frozen=True)
class _Decision:
    """Rank 0's answer after the store lookup, handed to every rank."""

    current: bool  # features.h5 is up to date: nothing to do
    key: BackboneKey | None
    missing: list[str]  # content sha256s to encode, in the order of the run's images
    attrs: dict[str, Any]  # features.h5's root attributes, with the weights and the store key


@dataclass(frozen=True)
class _RankReport:
    """What one rank encoded (the manifest's `ranks` list)."""

    rank: int
    device: str
    images_encoded: int
    seconds: float
    cpu_seconds: float
    trunk_shared: bool | None
    # Sealed segments this rank left for rank 0 to index (a rank on another node than rank 0).
    sealed: tuple[tuple[SegmentRecord, list[str]], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "device": self.device,
            "images_encoded": self.images_encoded,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "trunk_shared": self.trunk_shared,
            "segments_indexed_by_rank_0": len(self.sealed),
        }


def _sharded_content_keys(group: Group, splits: dict[str, list[Sample]], batch_size: int) -> dict[str, list[str]]:
    """Every image's content sha256, each rank hashing a contiguous shard (reading 10^6 files is
    itself a job worth sharing), gathered in order on every rank."""
    flat = [sample for split in SPLITS for sample in splits[split]]
    shard = shard_range(len(flat), batch_size, group.launch.rank, group.launch.world_size)
    mine = group.collectively(lambda: content_keys(flat[shard.start : shard.stop]))
    keys = [key for part in group.gather(mine) for key in part]
    contents: dict[str, list[str]] = {}
    for split in SPLITS:
        contents[split], keys = keys[: len(splits[split])], keys[len(splits[split]) :]
    return contents


def _needed(splits: dict[str, list[Sample]], contents: dict[str, list[str]]) -> dict[str, Sample]:
    """Distinct contents in the order of the run's images (train, then test) -> their first sample."""
    needed: dict[str, Sample] = {}
    for split in SPLITS:
        for sample, content in zip(splits[split], contents[split]):
            needed.setdefault(content, sample)
    return needed


def _encode_shard(
    store: FeatureStore,
    decision: _Decision,
    needed: dict[str, Sample],
    spec: BackboneSpec,
    options: ExtractOptions,
    launch: Launch,
    device: torch.device,
) -> _RankReport:
    """Load the backbone and encode this rank's shard of the missing images into its own store
    writer; a rank with an empty shard loads nothing."""
    assert decision.key is not None
    # One split at a time, in the split's order, each split sharded in whole batches: the batches
    # (and so the fp16 features: batched matmuls round per batch) are the ones one process forms.
    shards: dict[str, list[str]] = {}
    for split in SPLITS:
        missing = [content for content in decision.missing if needed[content].split == split]
        shard = shard_range(len(missing), options.batch_size, launch.rank, launch.world_size)
        shards[split] = missing[shard.start : shard.stop]
    total = sum(len(contents) for contents in shards.values())
    started, cpu_started = time.perf_counter(), time.process_time()
    if not total:
        return _RankReport(launch.rank, str(device), 0, 0.0, 0.0, None)
    quiet = options.quiet or not launch.is_main
    precision = str(decision.attrs["precision"])
    backbone = load_backbone(spec, options.weights, device, precision)
    trunk = "shared by CLIP and the Q-Former" if backbone.trunk_shared else "not shared (Q-Former runs its own tower)"
    weights_note = " (random weights)" if decision.attrs["random_weights"] else ""
    log(f"backbone {spec.backbone_id}{weights_note} on {device}, {describe_precision(precision, device)}; ViT trunk {trunk}", quiet)
    workers = default_workers() if options.workers is None else options.workers
    label = "extract" if not launch.distributed else f"extract ({launch})"
    sealed: list[tuple[SegmentRecord, list[str]]] = []
    writer = _rank_writer(store, decision.key, spec, launch, sealed)
    with progress(quiet) as bar, writer, stop_between_batches(launch) as check_stop:
        throughput = _Throughput(bar, bar.add_task(label, total=total, rate=""), time.perf_counter())

        def on_batch(images: int) -> None:
            throughput.advance(images)
            check_stop()

        for contents in shards.values():
            encode_into_store(writer, [needed[c] for c in contents], contents, backbone, options.batch_size, workers, on_batch)
    return _RankReport(
        launch.rank,
        str(device),
        total,
        time.perf_counter() - started,
        time.process_time() - cpu_started,
        backbone.trunk_shared,
        tuple(sealed),
    )


def _rank_writer(
    store: FeatureStore, key: BackboneKey, spec: BackboneSpec, launch: Launch, sealed: list[tuple[SegmentRecord, list[str]]]
) -> StoreWriter:
    """This rank's own store writer. Ranks on rank 0's node index their sealed segments themselves
    (SQLite WAL: concurrent writers on one host); a rank on another node never opens the index (WAL
    needs every connection on one host) and appends its sealed segments to `sealed` for rank 0."""
    shapes = feature_shapes(spec)
    field_shapes = {name: shapes.of(name) for name in FEATURE_FIELDS}
    if launch.node == 0:
        return store.writer(key, field_shapes)

    def hand_to_rank_0(record: SegmentRecord, contents: list[str]) -> int:
        sealed.append((record, contents))
        return 0

    return StoreWriter(store, key, field_shapes, commit=hand_to_rank_0)


def run_extract(options: ExtractOptions) -> Path:
    """Features of the test set and the K shots per class, from the store; returns the run directory.

    Under torchrun (distributed.py) the ranks hash and encode disjoint shards, each into its own
    store writer, and rank 0 alone decides what is missing and writes features.h5 and the
    manifest; a world of one is the single-process extract.
    """
    started = time.perf_counter()
    options.validate()
    launch = launch_from_env()
    device = rank_device(options.device, launch)
    quiet = options.quiet or not launch.is_main
    with process_group(launch, device) as group:
        dataset, spec, splits = group.collectively(lambda: _listing(options))
        listings = set(group.gather(listing_digest(dataset)))
        if len(listings) > 1:
            raise IipadError(
                f"{options.data}: the ranks list different images (files changing, or not the same path on every node)"
            )
        # Resolved for rank 0's device (auto: bf16 where it is fast); every rank then runs in it.
        precision = group.from_main(options.resolved_precision)
        attrs = _file_attrs(options, dataset, spec, splits["train"], precision)
        contents = _sharded_content_keys(group, splits, options.batch_size)
        attrs["content_sha256"] = content_digest(splits, contents)
        run_dir = Path(options.output) if options.output is not None else default_run_dir(dataset.root, options.shots)
        final = run_dir / FEATURES_FILE
        needed = _needed(splits, contents)
        store = FeatureStore(resolve_cache_dir(options.cache))
        with contextlib.ExitStack() as held, store:
            # One writer per run directory (runlock.py): rank 0 holds the lock for every rank,
            # from before it reads features.h5 until the new one and the manifest are written.
            group.from_main(lambda: held.enter_context(run_lock(run_dir, "extract")))
            decision = group.from_main(lambda: _decide(store, final, attrs, spec, dataset, splits, needed, options))
            if decision.current:
                return run_dir
            assert decision.key is not None
            report = group.collectively(
                lambda: _encode_shard(store, decision, needed, spec, options, launch, device)
            )
            reports = group.gather(report)
            if decision.missing:
                seconds = max(r.seconds for r in reports)
                rate = len(decision.missing) / seconds if seconds > 0 else 0.0
                ranks = f" on {launch.world_size} ranks" if launch.distributed else ""
                log(f"encoded {len(decision.missing)} images{ranks} in {seconds:.1f} s ({rate:.2f} images/s) into {store.root}", quiet)
            # Collective, so no rank reports success before features.h5 exists, nor waits on a
            # rank 0 whose write failed.
            group.collectively(
                lambda: _write_run(
                    store, decision, needed, splits, contents, spec, dataset, reports, options, run_dir, started, device
                )
                if launch.is_main
                else None
            )
    return run_dir


def _listing(options: ExtractOptions) -> tuple[Dataset, BackboneSpec, dict[str, list[Sample]]]:
    dataset = load_dataset(options.data, options.layout, options.classes)
    return dataset, get_spec(options.backbone), options.splits(dataset)


def _decide(
    store: FeatureStore,
    final: Path,
    attrs: dict[str, Any],
    spec: BackboneSpec,
    dataset: Dataset,
    splits: dict[str, list[Sample]],
    needed: dict[str, Sample],
    options: ExtractOptions,
) -> _Decision:
    """Rank 0: refuse other options, stop when features.h5 is current, else look the images up and
    check, before any rank loads the encoders, that what is to be written fits on the disks."""
    attrs = dict(attrs)
    # Other options are reported before looking for weights, so "made with backbone tiny" is not
    # hidden behind "weights for vit-l-14 not found".
    if final.is_file() and not options.force:
        _refuse_other_options(final, attrs, dataset)
    attrs.update(_weights_attrs(spec, options.weights))
    if final.is_file() and not options.force:
        _refuse_other_options(final, attrs, dataset)
        reason = _current_file(final, attrs, options.copy)
        if reason is None:
            log(f"{final}: up to date (same options), nothing to do", options.quiet)
            return _Decision(current=True, key=None, missing=[], attrs=attrs)
        log(f"{final}: writing it again ({reason})", options.quiet)
    key = backbone_key(spec, attrs["weights_sha256"], str(attrs["precision"]))
    attrs["store_backbone_key"] = key.digest
    stored = store.lookup(key, needed)
    missing = [content for content in needed if content not in stored]
    shapes = feature_shapes(spec)
    if missing:
        # The new segments must fit beside the store's index.
        require_space(store.index.path, len(missing) * _bytes_per_image(shapes, 0) + HDF5_MARGIN_BYTES)
        # Before any rank seals a segment: rank 0 may index other nodes' segments for this key.
        store.index.ensure_backbone(key.digest, key.to_json(), {name: shapes.of(name) for name in FEATURE_FIELDS})
    if options.copy:  # the self-contained file must fit too
        rows = sum(len(samples) for samples in splits.values())
        require_space(final, rows * _bytes_per_image(shapes, options.resolution) + HDF5_MARGIN_BYTES)
    log(f"{len(needed)} distinct images: {len(needed) - len(missing)} in the feature store {store.root}, {len(missing)} to encode", options.quiet)
    return _Decision(current=False, key=key, missing=missing, attrs=attrs)


def _write_run(
    store: FeatureStore,
    decision: _Decision,
    needed: dict[str, Sample],
    splits: dict[str, list[Sample]],
    contents: dict[str, list[str]],
    spec: BackboneSpec,
    dataset: Dataset,
    reports: Sequence[_RankReport],
    options: ExtractOptions,
    run_dir: Path,
    started: float,
    device: torch.device,
) -> None:
    """Rank 0, after every rank's writer is sealed: features.h5 (atomically) and the manifest."""
    assert decision.key is not None
    final = run_dir / FEATURES_FILE
    for report in reports:
        for record, segment_contents in report.sealed:
            store.index.commit_segment(record, segment_contents)
    locations = store.lookup(decision.key, needed)
    lost = [needed[content].path for content in needed if content not in locations]
    if lost:
        raise IipadError(f"{lost[0]}: its features left the feature store while extract ran (cache cleared?); run extract again")
    store.check_segments(locations.values())
    sources: dict[str, list[Location]] = {split: [locations[c] for c in contents[split]] for split in SPLITS}
    columns = {split: _columns(split, splits[split], options.resolution) for split in SPLITS}
    with atomic_path(final) as tmp:
        write_features_file(tmp, decision.attrs, feature_shapes(spec), columns, sources, store.read if options.copy else None)
    log(f"-> {final}" + (" (self-contained copy)" if options.copy else " (virtual datasets into the feature store)"), options.quiet)
    encoded = len(decision.missing)
    seconds = max(r.seconds for r in reports)
    rates: dict[str, Any] = {}
    if encoded:
        rates["images_per_s"] = round(encoded / seconds, 3) if seconds > 0 else 0.0
        rates["trunk_shared"] = next(r.trunk_shared for r in reports if r.trunk_shared is not None)
    record_stage(
        run_dir,
        "extract",
        options=options.recorded(dataset),
        inputs={},
        outputs={FEATURES_FILE: sha256_file(final)},
        seconds=time.perf_counter() - started,
        extra={
            "images_encoded": encoded,
            "images_from_store": len(needed) - encoded,
            "feature_store": str(store.root),
            "store_backbone_key": decision.key.digest,
            "world_size": len(reports),
            "ranks": [report.to_json() for report in reports],
            **rates,
            "precision": decision.attrs["precision"],
            "bf16_units": bf16_units(device),
        },
    )
