"""`iipad predict`: score new images with a trained run.

Each image is preprocessed with the run's backbone spec (data/images.py, as `extract` does), encoded
by the run's frozen backbone (its weight hashes must equal the ones in features.h5), rounded to the
fp16 that features.h5 stores, and scored against the run's banks by the same function `score`
uses — so an image of the run's test split gets exactly its map and score from scores.h5. An
image whose bytes the feature store (docs/store.md) already holds for the run's backbone key is
not encoded again; the images it encodes are added to the store only when `--cache` names one
(otherwise nothing but the outputs is written).

Each image is then decided with the run's label-free thresholds (RUN/thresholds.json, made by
`score` from normal images only; `--threshold` / `--pixel-threshold` override them): its category
is the class of its top-1 retrieved bank image, its label is `anomalous` when its image score is
above the category's image threshold, its normalised score is 0 at the category's normal mean and
1 at the threshold, and its mask is the map above the pixel threshold.

Writes into OUT, per image, `<name>.npy` (the float32 map at the run's resolution, or at the
image's own size with `--resolution native`), `masks/<name>.png` (the binary mask at the same
size) and `<name>.png` (image | overlay with a colour bar), plus `predictions.csv` and
`predict.json` (provenance and the thresholds used).
A corrupt image is reported on stderr and skipped; the others are still scored. Images stream
through (decode -> encode or look up -> score -> files), batch by batch.

Under torchrun (distributed.py) every rank loads the run's models, scores a contiguous shard of
whole batches (the batches one process would form, so the numbers are the same) and streams its
CSV rows to `predictions.csv.part-R-of-W`; rank 0 then concatenates the parts in rank order, which
is the input order, into one `predictions.csv` (atomically) and writes `predict.json`.
"""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from iipad_cli.artifacts import SCORES_FILE, atomic_path
from iipad_cli.data.images import preprocess_image, resized_image
from iipad_cli.distributed import (
    Launch,
    launch_from_env,
    process_group,
    rank_device,
    shard_range,
)
from iipad_cli.errors import IipadError
from iipad_cli.pipeline.predict import PredictOptions
from iipad_cli.pipeline.score import DEFAULT_SIGMA
from iipad_cli.reporting.inputs import upsample
from iipad_cli.schema.features import features_precision
from iipad_cli.schema.scores import read_scores_attrs
from iipad_cli.schema.thresholds import THRESHOLDS_FILE, Thresholds, load_thresholds
from iipad_cli.stages._scoring import (
    RunModels,
    attach_banks,
    check_top_k,
    load_run_models,
    score_features,
)
from iipad_cli.stages.encoding import feature_shapes
from iipad_cli.stages.predict_files import (
    CSV_COLUMNS,
    MASKS_DIR,
    PREDICTIONS_CSV,
    ShardOutcome,
    expand_inputs,
    finish,
    output_names,
    part_path,
    write_mask_png,
)
from iipad_cli.stages.score import RANDOM_NOTE
from iipad_cli.stages.stored_features import batch_features, store_key
from iipad_cli.store import FeatureStore, content_sha256, resolve_cache_dir
from iipad_cli.thresholds import (
    ANOMALOUS,
    NORMAL,
    binary_mask,
    image_label,
    normalised_score,
)
from iipad_cli.ui import err_console, log, progress
from iipad_cli.viz import heatmap_figure, save_png
from iipad_cli.writes import writable_directory


@dataclass(frozen=True)
class PredictResult:
    out_dir: Path
    scored: int
    skipped: list[str]
    csv_path: Path
    # Under torchrun only rank 0 prints the result (one line on stdout, not one per rank).
    rank: int = 0


def _defaults(models: RunModels, options: PredictOptions) -> tuple[int, float, tuple[float, float] | None]:
    """top-k and σ: explicit, else the ones the run's scores.h5 was made with, else K and 4; and
    the run's map range (the scale of its test heatmaps, so overlays compare with them)."""
    scores_path = models.run_dir / SCORES_FILE
    stored = read_scores_attrs(scores_path) if scores_path.is_file() else {}
    top_k = options.top_k if options.top_k is not None else int(stored.get("top_k", models.features_attrs["shots"]))
    sigma = options.sigma if options.sigma is not None else float(stored.get("sigma", DEFAULT_SIGMA))
    scale = (float(stored["map_min"]), float(stored["map_max"])) if stored else None
    return top_k, sigma, scale


def run_thresholds(
    models: RunModels, options: PredictOptions, top_k: int, sigma: float, resolution: int, quiet: bool
) -> Thresholds:
    """The run's label-free thresholds, checked against the generator and banks in use, with the
    `--threshold` override validated; warns when predict's top-k, σ or resolution differ from
    the ones the thresholds were derived with."""
    path = models.run_dir / THRESHOLDS_FILE
    thresholds = load_thresholds(path)
    used = (("generator", models.generator_sha), ("banks", models.banks_sha))
    stale = [name for name, sha in used if thresholds.provenance.get(f"{name}_sha256") != sha]
    if stale and not options.force:
        raise IipadError(f"{path}: derived with another {stale[0]} file; run `iipad score` again (or --force)")
    if options.threshold is not None:
        thresholds.check_image_override(options.threshold, path)
    calibrated = (int(thresholds.provenance.get("score_top_k", thresholds.top_k)), thresholds.sigma, thresholds.resolution)
    if calibrated != (top_k, sigma, resolution):
        log(
            f"[yellow]warning:[/] {path} was derived with top-k {calibrated[0]}, σ {calibrated[1]:g}, "
            f"resolution {calibrated[2]}; predicting with top-k {top_k}, σ {sigma:g}, resolution {resolution}",
            quiet,
        )
    return thresholds


def _predict_shard(
    run_dir: Path,
    paths: Sequence[Path],
    names: Sequence[str],
    shard: range,
    out_dir: Path,
    options: PredictOptions,
    device: torch.device,
    launch: Launch,
) -> ShardOutcome:
    """Score the images at positions `shard`, streaming each batch's maps, overlays and CSV rows to
    disk, so memory does not grow with the number of images."""
    quiet = options.quiet or not launch.is_main
    models = attach_banks(
        load_run_models(
            run_dir,
            weights=options.weights,
            device=device,
            force=options.force,
            hash_features=False,
            precision=options.resolved_precision(device),
        ),
        options.force,
    )
    assert models.banks is not None
    top_k, sigma, scale = _defaults(models, options)
    check_top_k(top_k, len(models.banks))
    attrs = models.features_attrs
    spec = models.backbone.spec
    resolution = int(attrs["resolution"])
    thresholds = run_thresholds(models, options, top_k, sigma, resolution, quiet)
    note = RANDOM_NOTE if bool(attrs.get("random_weights", False)) else ""
    labels_count = {ANOMALOUS: 0, NORMAL: 0}
    scored = 0
    skipped: list[str] = []
    part = part_path(out_dir, launch)
    started, cpu_started = time.perf_counter(), time.process_time()
    label = "predict" if not launch.distributed else f"predict ({launch})"
    # Ranks on other nodes than rank 0 leave the store alone: its SQLite index (WAL) serves one host.
    key = store_key(models) if launch.node == 0 else None
    store = FeatureStore(resolve_cache_dir(options.cache))
    # Images stream through; their features are kept only when asked for with --cache.
    adds = key is not None and options.cache is not None
    from_store = 0
    with (
        store,
        store.writer(key, feature_shapes(spec).by_field()) if adds else contextlib.nullcontext() as features_writer,
        atomic_path(part) as tmp,
        tmp.open("w", newline="") as handle,
        progress(quiet) as bar,
    ):
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        task = bar.add_task(label, total=len(shard), rate="")
        for start in range(shard.start, shard.stop, options.batch_size):
            stop = min(start + options.batch_size, shard.stop)
            batch_paths, batch_names, batch_sizes, images, contents = [], [], [], [], []
            for path, name in zip(paths[start:stop], names[start:stop]):
                try:
                    tensor, size = preprocess_image(path, spec.image_size)
                    content = content_sha256(path)
                except IipadError as error:
                    err_console.print(f"[yellow]skipped:[/] {error}", highlight=False, soft_wrap=True)
                    skipped.append(str(path))
                    continue
                batch_paths.append(path)
                batch_names.append(name)
                batch_sizes.append(size)
                images.append(tensor)
                contents.append(content)
            if images:
                labels = [str(p) for p in batch_paths]
                stored = store.lookup(key, contents) if key else {}
                store.check_segments(stored.values())
                # fp16, as features.h5 stores them: the run's test images were scored from those.
                features = batch_features(models, images, contents, stored, store, features_writer, labels)
                from_store += sum(content in stored for content in contents)
                result = score_features(models, features, labels, top_k=top_k, resolution=resolution, sigma=sigma)
                for row, (path, name, (width, height)) in enumerate(zip(batch_paths, batch_names, batch_sizes)):
                    amap = result.maps[row].float().cpu().numpy()
                    saved = amap if options.resolution == "224" else upsample(amap, (height, width))
                    with atomic_path(out_dir / f"{name}.npy") as npy, open(npy, "wb") as npy_handle:
                        np.save(npy_handle, saved)
                    score = float(result.image_score[row])
                    levels = thresholds.levels(int(result.retrieved[row, 0]), options.threshold, options.pixel_threshold)
                    label = image_label(score, levels.image)
                    labels_count[label] += 1
                    normalised = normalised_score(score, levels.normal_mean, levels.image)
                    mask = binary_mask(saved, levels.pixel)
                    write_mask_png(mask, out_dir / MASKS_DIR / f"{name}.png")
                    vmin, vmax = scale if scale is not None else (float(amap.min()), float(amap.max()))
                    figure = heatmap_figure(
                        resized_image(path, resolution), amap, vmin, vmax, show_mask=False,
                        title=f"{path.name}  {label} (normalised score {normalised:.3g}, image score {score:.4g}){note}",
                    )
                    save_png(figure, out_dir / f"{name}.png")
                    writer.writerow(
                        {
                            "path": str(path),
                            "label": label,
                            "image_score": repr(score),
                            "normalised_score": repr(normalised),
                            "category": levels.category,
                            "image_threshold": repr(levels.image),
                            "pixel_threshold": repr(levels.pixel),
                            "anomalous_pixel_fraction": repr(float(mask.mean())),
                            "prompt_max": repr(float(result.prompt_max[row])),
                            "visual_max": repr(float(result.visual_max[row])),
                            "p_normal": repr(float(result.p_normal[row])),
                            "retrieval_sim": repr(float(result.retrieval_sim[row])),
                            "retrieved": ";".join(models.banks.paths[int(i)] for i in result.retrieved[row]),
                        }
                    )
                scored += len(batch_paths)
            elapsed = time.perf_counter() - started
            bar.update(task, completed=stop - shard.start, rate=f"{scored / elapsed:.1f} img/s" if elapsed > 0 else "")
    log(f"{from_store} of {scored} images' features from the feature store {store.root}, the others encoded", quiet)
    settings = {
        "backbone_id": str(attrs["backbone_id"]),
        "random_weights": bool(attrs.get("random_weights", False)),
        "preset": models.preset.name,
        "image_score_formula": models.preset.image_score,
        "top_k": top_k,
        "sigma": sigma,
        "resolution": resolution if options.resolution == "224" else "native",
        "thresholds": {
            "file": str(models.run_dir.resolve() / THRESHOLDS_FILE),
            "method": thresholds.method,
            "rule": thresholds.to_json()["rule"],
            "categories": {name: asdict(values) for name, values in thresholds.categories.items()},
            "image_override": options.threshold,
            "pixel_override": options.pixel_threshold,
        },
        "generator_sha256": models.generator_sha,
        "banks_sha256": models.banks_sha,
        "precision": models.backbone.precision,
        "features_precision": features_precision(models.features_attrs),
        "overlay_scale": list(scale) if scale is not None else "per image",
        "note": note,
    }
    return ShardOutcome(
        rank=launch.rank,
        part=part,
        scored=scored,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        device=str(device),
        settings=settings,
        labels=labels_count,
    )


def predict(run_dir: Path, inputs: Sequence[str], out_dir: Path, options: PredictOptions) -> PredictResult:
    """Score `inputs` with the run; under torchrun each rank scores a contiguous shard of whole
    batches and rank 0 merges the ranks' rows into one predictions.csv in input order."""
    started = time.perf_counter()
    options.validate()
    launch = launch_from_env()
    device = rank_device(options.device, launch)
    out_dir = Path(out_dir)
    with process_group(launch, device) as group:
        paths = group.from_main(lambda: expand_inputs(inputs))
        names = output_names(paths)
        shard = shard_range(len(paths), options.batch_size, launch.rank, launch.world_size)
        # Checked before the models load, not when the first map is written.
        group.collectively(lambda: writable_directory(out_dir))
        (out_dir / MASKS_DIR).mkdir(parents=True, exist_ok=True)
        outcome = group.collectively(
            lambda: _predict_shard(run_dir, paths, names, shard, out_dir, options, device, launch)
        )
        outcomes = group.gather(outcome)
        scored = sum(o.scored for o in outcomes)
        if scored == 0:
            raise IipadError(f"none of the {len(paths)} images could be scored")
        # Collective, so no rank reports success before predictions.csv exists, nor waits on a
        # rank 0 whose merge failed.
        group.collectively(
            lambda: finish(run_dir, out_dir, outcomes, launch, started, options.quiet) if launch.is_main else None
        )
    skipped = [path for o in outcomes for path in o.skipped]
    return PredictResult(out_dir=out_dir, scored=scored, skipped=skipped, csv_path=out_dir / PREDICTIONS_CSV, rank=launch.rank)
