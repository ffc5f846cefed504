"""`iipad score`: anomaly maps and image scores for every test image -> RUN/scores.h5 (+ heatmaps).

The generator + text encoder give each test image its own prompts (one image at a time, so that
`predict` reproduces these scores bit for bit: batched CPU kernels round a row differently by its
position in the batch); retrieval picks the top-k bank images by Q-Former similarity, and eqs.
15–18 give the maps (batched, upsampled and smoothed on the device) and the preset's image score. Every component of the
image score is stored so the other formula can be evaluated without rescoring.

Before the test images, `score` derives the run's label-free thresholds from normal images only
(the shots, leave-one-out or augmented views, plus `--normal` images; `stages/calibrate.py`) with
the same top-k, σ and resolution, and writes them to RUN/thresholds.json beside scores.h5.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from iipad_cli.artifacts import (
    BANKS_FILE,
    FEATURES_FILE,
    GENERATOR_FILE,
    SCORES_FILE,
    provenance,
    record_stage,
    sha256_file,
)
from iipad_cli.data.images import resized_image
from iipad_cli.devices import resolve_device
from iipad_cli.errors import IipadError
from iipad_cli.pipeline.score import ScoreOptions
from iipad_cli.runlock import run_lock
from iipad_cli.schema.features import features_precision, read_split
from iipad_cli.schema.scores import load_scores, write_scores
from iipad_cli.schema.thresholds import THRESHOLDS_FILE, write_thresholds
from iipad_cli.stages._scoring import (
    attach_banks,
    check_finite_features,
    check_top_k,
    features_to_device,
    iter_feature_rows,
    load_run_models,
    score_features,
)
from iipad_cli.stages.calibrate import derive_thresholds
from iipad_cli.ui import err_console, log, progress
from iipad_cli.viz import heatmap_figure, save_png
from iipad_cli.writes import writable_directory

RANDOM_NOTE = " (random weights)"


def score_run(run_dir: Path, options: ScoreOptions) -> Path:
    """Write RUN/scores.h5 (and heatmaps when asked; run directory locked, checked writable
    first); returns its path."""
    with run_lock(run_dir, "score", create=False):
        return _score_run(Path(run_dir), options)


def _score_run(run_dir: Path, options: ScoreOptions) -> Path:
    started = time.perf_counter()
    options.validate()
    heatmaps = options.heatmaps_target(run_dir)
    if heatmaps is not None:
        writable_directory(heatmaps)  # before the scoring, not after it
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    models = attach_banks(load_run_models(run_dir, weights=options.weights, device=device, force=options.force), options.force)
    assert models.banks is not None
    attrs = models.features_attrs
    top_k = int(attrs["shots"]) if options.top_k is None else options.top_k
    check_top_k(top_k, len(models.banks))
    resolution = int(attrs["resolution"])
    features_path = run_dir / FEATURES_FILE
    normal_paths = _normal_images(tuple(options.normal or ()))
    thresholds = derive_thresholds(
        models,
        features_path,
        normal_paths=normal_paths,
        top_k=top_k,
        resolution=resolution,
        sigma=options.sigma,
        batch_size=options.batch_size,
        quiet=options.quiet,
    )
    meta = read_split(features_path, "test", ("path", "cls", "defect", "label", "has_mask"))
    paths = [str(p) for p in meta["path"]]
    random_weights = bool(attrs.get("random_weights", False))
    # Native HDF5 scalars (JSON only for the structured values) so readers need no decoding.
    file_attrs = {
        **provenance(),
        "preset": json.dumps(models.preset.to_json(), sort_keys=True),
        "bank_paths": json.dumps(models.banks.paths),
        "image_score_formula": models.preset.image_score,
        "backbone_id": str(attrs["backbone_id"]),
        "precision": features_precision(attrs),
        "random_weights": random_weights,
        "shots": int(attrs["shots"]),
        "seed": int(attrs.get("seed", 0)),
        "resolution": resolution,
        "top_k": top_k,
        "sigma": float(options.sigma),
        "data_root": str(attrs.get("data_root", "")),
        "features_sha256": models.features_sha,
        "generator_sha256": models.generator_sha,
        "banks_sha256": models.banks_sha,
    }
    out = run_dir / SCORES_FILE
    score_started = time.perf_counter()
    with write_scores(out, len(paths), resolution, top_k, file_attrs) as writer, progress(options.quiet) as bar:
        task = bar.add_task("score", total=len(paths), rate="")
        for start, stop, arrays in iter_feature_rows(features_path, "test", options.batch_size):
            names = paths[start:stop]
            features = features_to_device(arrays, device)
            check_finite_features(features, names, f"{features_path} (test)", run_dir)
            result = score_features(models, features, names, top_k=top_k, resolution=resolution, sigma=options.sigma)
            writer.append(
                {
                    "path": names,
                    "cls": meta["cls"][start:stop],
                    "defect": meta["defect"][start:stop],
                    "label": meta["label"][start:stop],
                    "has_mask": meta["has_mask"][start:stop],
                    "maps": result.maps.half().cpu().numpy(),
                    "image_score": result.image_score.cpu().numpy(),
                    "prompt_max": result.prompt_max.cpu().numpy(),
                    "visual_max": result.visual_max.cpu().numpy(),
                    "p_normal": result.p_normal.cpu().numpy(),
                    "retrieval_sim": result.retrieval_sim.cpu().numpy(),
                    "retrieved": result.retrieved.cpu().numpy(),
                }
            )
            elapsed = time.perf_counter() - score_started
            bar.update(task, advance=stop - start, rate=f"{stop / elapsed:.1f} img/s" if elapsed > 0 else "")
    score_seconds = time.perf_counter() - score_started
    rate = len(paths) / score_seconds if score_seconds > 0 else 0.0
    note = RANDOM_NOTE if random_weights else ""
    log(f"scored {len(paths)} test images in {score_seconds:.1f} s ({rate:.2f} images/s){note} -> {out}", options.quiet)
    write_thresholds(run_dir / THRESHOLDS_FILE, thresholds)
    written = 0
    if heatmaps is not None:
        written = write_heatmaps(run_dir, heatmaps, quiet=options.quiet)
    record_stage(
        run_dir,
        "score",
        options=options.recorded(run_dir, top_k),
        inputs={FEATURES_FILE: models.features_sha, GENERATOR_FILE: models.generator_sha, BANKS_FILE: models.banks_sha},
        outputs={SCORES_FILE: sha256_file(out), THRESHOLDS_FILE: sha256_file(run_dir / THRESHOLDS_FILE)},
        seconds=time.perf_counter() - started,
        extra={"images": len(paths), "images_per_s": round(rate, 3), "heatmaps": written, "normal_images": len(normal_paths)},
    )
    return out


def _normal_images(inputs: tuple[str, ...]) -> list[Path]:
    """`--normal` files, directories and globs, expanded as `predict` expands its inputs."""
    if not inputs:
        return []
    from iipad_cli.stages.predict_files import expand_inputs

    return expand_inputs(inputs)


def heatmap_name(rel_path: str) -> Path:
    """heatmaps/<class>/test/<defect>/<stem>.png: the data set's own tree, so names never collide."""
    return Path(rel_path).with_suffix(".png")


def write_heatmaps(run_dir: Path, directory: Path, quiet: bool = False) -> int:
    """One PNG per test image from scores.h5: image | map overlay | ground truth, one shared scale.

    The colour scale is the range of all the run's maps (scores.h5 `map_min`/`map_max`), so
    colours compare across images. An image that can no longer be read is reported and skipped.
    """
    run_dir = Path(run_dir)
    scores = load_scores(run_dir / SCORES_FILE)
    root = Path(str(scores.attrs["data_root"]))
    vmin, vmax = float(scores.attrs["map_min"]), float(scores.attrs["map_max"])
    note = RANDOM_NOTE if bool(scores.attrs["random_weights"]) else ""
    resolution = int(scores.maps.shape[1])
    written = 0
    with h5py.File(run_dir / FEATURES_FILE, "r") as features, progress(quiet) as bar:
        masks = features["test"]["mask"]
        stored_paths = features["test"]["path"].asstr()[()]
        task = bar.add_task("heatmaps", total=len(scores.path), rate="")
        for row, rel_path in enumerate(scores.path):
            if str(stored_paths[row]) != rel_path:
                raise IipadError(f"{run_dir / SCORES_FILE}: row {row} is {rel_path}, but {FEATURES_FILE} has {stored_paths[row]}")
            try:
                image = resized_image(root / rel_path, resolution)
            except IipadError as error:
                err_console.print(f"[yellow]warning:[/] heatmap skipped: {error}", highlight=False, soft_wrap=True)
                bar.update(task, advance=1)
                continue
            mask = masks[row] if bool(scores.has_mask[row]) else None
            title = f"{rel_path}  image score {float(scores.image_score[row]):.4g}{note}"
            figure = heatmap_figure(image, scores.maps[row].astype(np.float32), vmin, vmax, mask=mask, title=title)
            save_png(figure, Path(directory) / heatmap_name(rel_path))
            written += 1
            bar.update(task, advance=1)
    log(f"wrote {written} heatmaps -> {directory}", quiet)
    return written
