"""`iipad extract`: the frozen encoders' features of the test set and the K shots -> `RUN/features.h5`.

Every image is looked up in the feature store (docs/store.md) by the sha256 of its bytes; only
the missing ones go through the encoders (`encoding.encode_into_store`). `RUN/features.h5`
(`features_file`: its attributes, identity checks and metadata columns) is then written in one
go, atomically, with the fp16 features as virtual datasets into the store's segments (`--copy`:
a self-contained copy). An interrupted extract keeps every sealed store segment, so the rerun
encodes only what is still missing.

Under torchrun (distributed.py) the ranks hash and encode disjoint shards, each into its own
store writer, and rank 0 alone decides what is missing and writes features.h5 and the manifest
(docs/scale.md); a world of one is the single-process extract.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iipad_cli.artifacts import FEATURES_FILE, atomic_path, record_stage, sha256_file
from iipad_cli.checkpoints import load_backbone
from iipad_cli.config import BackboneSpec
from iipad_cli.data.layouts import Dataset, Sample, load_dataset
from iipad_cli.devices import bf16_units, describe_precision
from iipad_cli.distributed import (
    Launch,
    launch_from_env,
    process_group,
    rank_device,
    shard_range,
    stop_between_batches,
)
from iipad_cli.errors import IipadError
from iipad_cli.models.registry import get_spec
from iipad_cli.pipeline.extract import ExtractOptions, content_digest, default_run_dir, default_workers, listing_digest
from iipad_cli.runlock import run_lock
from iipad_cli.schema.features import SPLITS
from iipad_cli.schema.features_writer import write_features_file
from iipad_cli.stages.encoding import Throughput, backbone_key, bytes_per_image, encode_into_store, feature_shapes
from iipad_cli.stages.extract_ranks import HandedOver, RankReport, index_handed_over, rank_writer, sharded_content_keys
from iipad_cli.stages.features_file import (
    current_file,
    file_attrs,
    metadata_columns,
    refuse_other_options,
    weights_attrs,
)
from iipad_cli.store import BackboneKey, FeatureStore, Location, resolve_cache_dir
from iipad_cli.ui import log, progress
from iipad_cli.writes import HDF5_MARGIN_BYTES, require_space


@dataclass(frozen=True)
class _Decision:
    """Rank 0's answer after the store lookup, handed to every rank."""

    current: bool  # features.h5 is up to date: nothing to do
    key: BackboneKey | None
    missing: list[str]  # content sha256s to encode, in the order of the run's images
    attrs: dict[str, Any]  # features.h5's root attributes, with the weights and the store key


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
    held: contextlib.ExitStack,
    sealed: list[HandedOver],
) -> RankReport:
    """Load the backbone and encode this rank's shard of the missing images into its own store
    writer; a rank with an empty shard loads nothing. A rank on another node than rank 0 appends
    its sealed segments to `sealed` (also those sealed before an error) for rank 0 to index."""
    assert decision.key is not None
    # One split at a time, in the split's order, each split sharded in whole batches: the batches
    # (and so the fp16 features: batched matmuls round per batch) are the ones one process forms.
    shards: dict[str, list[str]] = {}
    for split in SPLITS:
        missing = [content for content in decision.missing if needed[content].split == split]
        shard = shard_range(len(missing), options.batch_size, launch.rank, launch.world_size)
        shards[split] = missing[shard.start : shard.stop]
    total = sum(len(contents) for contents in shards.values())
    if not total:
        return RankReport(launch.rank, str(device), 0, 0.0, 0.0, None)
    quiet = options.quiet or not launch.is_main
    precision = str(decision.attrs["precision"])
    backbone = load_backbone(spec, options.weights, device, precision)
    # Timed from here, as the encoding rate always was: loading the model is not encoding.
    started, cpu_started = time.perf_counter(), time.process_time()
    trunk = "shared by CLIP and the Q-Former" if backbone.trunk_shared else "not shared (Q-Former runs its own tower)"
    weights_note = " (random weights)" if decision.attrs["random_weights"] else ""
    log(f"backbone {spec.backbone_id}{weights_note} on {device}, {describe_precision(precision, device)}; ViT trunk {trunk}", quiet)
    workers = default_workers() if options.workers is None else options.workers
    label = "extract" if not launch.distributed else f"extract ({launch})"
    writer = rank_writer(store, decision.key, spec, launch, sealed, held)
    with progress(quiet) as bar, writer, stop_between_batches(launch) as check_stop:
        throughput = Throughput(bar, bar.add_task(label, total=total, rate=""), time.perf_counter())

        def on_batch(images: int) -> None:
            throughput.advance(images)
            check_stop()

        for contents in shards.values():
            encode_into_store(writer, [needed[c] for c in contents], contents, backbone, options.batch_size, workers, on_batch)
    return RankReport(
        launch.rank,
        str(device),
        total,
        time.perf_counter() - started,
        time.process_time() - cpu_started,
        backbone.trunk_shared,
        len(sealed),
    )


def run_extract(options: ExtractOptions) -> Path:
    """Features of the test set and the K shots per class, from the store; returns the run directory."""
    started = time.perf_counter()
    options.validate()
    launch = launch_from_env()
    device = rank_device(options.device, launch)
    quiet = options.quiet or not launch.is_main
    with process_group(launch, device) as group:
        dataset, spec, splits = group.collectively(lambda: _listing(options))
        listing = listing_digest(dataset)
        if len(set(group.gather(listing))) > 1:
            raise IipadError(
                f"{options.data}: the ranks list different images (files changing, or not the same path on every node)"
            )
        # Resolved for rank 0's device (auto: bf16 where it is fast); every rank then runs in it.
        precision = group.from_main(options.resolved_precision)
        attrs = file_attrs(options, dataset, spec, splits["train"], precision, listing)
        contents = sharded_content_keys(group, splits, options.batch_size)
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
            sealed: list[HandedOver] = []
            report: RankReport | None = None
            failure: str | None = None
            try:
                report = _encode_shard(store, decision, needed, spec, options, launch, device, held, sealed)
            except IipadError as error:
                failure = str(error)
            outcomes = group.gather((report, sealed, failure))
            # Rank 0 indexes the segments of ranks on other nodes also when a rank failed, so that
            # rerunning the command encodes only what is still missing; then every rank raises.
            group.collectively(lambda: index_handed_over(store, [s for _, s, _ in outcomes]) if launch.is_main else None)
            group.raise_first([f for _, _, f in outcomes])
            reports = [r for r, _, _ in outcomes if r is not None]
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
        refuse_other_options(final, attrs, dataset)
    attrs.update(weights_attrs(spec, options.weights))
    if final.is_file() and not options.force:
        refuse_other_options(final, attrs, dataset)
        reason = current_file(final, attrs, options.copy)
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
        require_space(store.index.path, len(missing) * bytes_per_image(shapes, 0) + HDF5_MARGIN_BYTES)
        # Before any rank seals a segment: rank 0 may index other nodes' segments for this key.
        store.index.ensure_backbone(key.digest, key.to_json(), shapes.by_field())
    if options.copy:  # the self-contained file must fit too
        rows = sum(len(samples) for samples in splits.values())
        require_space(final, rows * bytes_per_image(shapes, options.resolution) + HDF5_MARGIN_BYTES)
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
    reports: Sequence[RankReport],
    options: ExtractOptions,
    run_dir: Path,
    started: float,
    device: torch.device,
) -> None:
    """Rank 0, after every rank's writer is sealed: features.h5 (atomically) and the manifest."""
    assert decision.key is not None
    final = run_dir / FEATURES_FILE
    locations = store.lookup(decision.key, needed)
    lost = [needed[content].path for content in needed if content not in locations]
    if lost:
        raise IipadError(f"{lost[0]}: its features left the feature store while extract ran (cache cleared?); run extract again")
    store.check_segments(locations.values())
    sources: dict[str, list[Location]] = {split: [locations[c] for c in contents[split]] for split in SPLITS}
    columns = {split: metadata_columns(split, splits[split], options.resolution) for split in SPLITS}
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
        options=options.recorded(dataset, content_sha256=decision.attrs["content_sha256"]),
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
