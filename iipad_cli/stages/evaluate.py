"""`iipad metrics`: per-class and mean metrics of one or more runs, or of any method's maps.

The numbers come from `iipad_cli.metrics` (exact definitions; docs/metrics.md). This module finds
the inputs (RUN/scores.h5 + the ground truth in RUN/features.h5, or a directory of maps in the
MVTec evaluation layout), builds one JSON-able document per source, aggregates several runs into
mean ± std, and renders the document as a Rich table or CSV. NaN never reaches JSON: it is
written as null, and a cell is only NaN for the reasons docs/metrics.md lists.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from rich.table import Table

from iipad_cli import metrics
from iipad_cli.artifacts import (
    FEATURES_FILE,
    METRICS_CSV,
    METRICS_JSON,
    SCORES_FILE,
    record_stage,
    require_file,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from iipad_cli.errors import IipadError
from iipad_cli.ui import log

SCHEMA = "iipad-metrics/1"
IMAGE_AUROC = "image_auroc"
IMAGE_AP = "image_aupr_sklearn_stepwise_ap"
PIXEL_AUROC = "pixel_auroc"
AU_PRO = "au_pro"
LEGACY_PRO = "legacy_pro_released_code_not_comparable"
LABELS = {
    IMAGE_AUROC: "image AUROC",
    IMAGE_AP: "image AUPR (sklearn step-wise AP)",
    PIXEL_AUROC: "pixel AUROC",
    AU_PRO: "AU-PRO (MVTec definition)",
    LEGACY_PRO: "PRO legacy (released-code variant, not comparable)",
}
CAPTION = (
    "values in %; n/a = NaN (one label in the class) or no masks; "
    "AUPR = sklearn average_precision_score (step-wise average precision, no interpolation)"
)
MAP_EXTENSIONS = (".tiff", ".tif", ".png", ".npy")

Resolution = Literal["224", "native"]
ImageScore = Literal["stored", "paper", "official"]
ProVariant = Literal["exact", "legacy"]


@dataclass(frozen=True)
class EvaluateOptions:
    """What changes the numbers (recorded in the manifest) plus output chatter."""

    resolution: Resolution = "224"
    image_score: ImageScore = "stored"
    pro_limit: float = metrics.DEFAULT_PRO_LIMIT
    pro_variant: ProVariant = "exact"
    force: bool = False
    quiet: bool = False

    def recorded(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("force", "quiet")}

    def metric_keys(self) -> tuple[str, ...]:
        pro = AU_PRO if self.pro_variant == "exact" else LEGACY_PRO
        return (IMAGE_AUROC, IMAGE_AP, PIXEL_AUROC, pro)

    def validate(self) -> None:
        if self.resolution not in ("224", "native"):
            raise IipadError(f"--resolution must be 224 or native, not {self.resolution!r}")
        if self.image_score not in ("stored", "paper", "official"):
            raise IipadError(f"--image-score must be stored, paper or official, not {self.image_score!r}")
        if self.pro_variant not in ("exact", "legacy"):
            raise IipadError(f"--pro-variant must be exact or legacy, not {self.pro_variant!r}")
        if not 0.0 < self.pro_limit <= 1.0:
            raise IipadError(f"--pro-limit must be in (0, 1], got {self.pro_limit}")


class LazyMaps:
    """An indexable sequence that builds each map or mask on access (the metrics stream it twice)."""

    def __init__(self, count: int, load: Callable[[int], np.ndarray]) -> None:
        self.count = count
        self.load = load

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        return self.load(index)


@dataclass
class ClassData:
    """One class's inputs; `maps`/`masks` are None when its anomalies have no masks."""

    name: str
    labels: np.ndarray
    image_scores: np.ndarray
    maps: Sequence[np.ndarray] | None
    masks: Sequence[np.ndarray] | None


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def evaluate_class(data: ClassData, options: EvaluateOptions, warn: Callable[[str], None]) -> dict[str, Any]:
    """The metric values of one class (None = NaN or not available) and its image counts."""
    pro_key = options.metric_keys()[3]
    values: dict[str, float | None] = {
        IMAGE_AUROC: _number(metrics.roc_auc(data.labels, data.image_scores)),
        IMAGE_AP: _number(metrics.average_precision(data.labels, data.image_scores)),
        PIXEL_AUROC: None,
        pro_key: None,
    }
    anomalous = int(data.labels.sum())
    if values[IMAGE_AUROC] is None:
        warn(f"class {data.name}: only one label among its {data.labels.size} test images; image metrics are NaN")
    if data.maps is None or data.masks is None:
        if anomalous:
            warn(f"class {data.name}: no ground-truth masks for its anomalies; image metrics only")
    else:
        counts = metrics.pixel_counts(data.maps, data.masks)
        values[PIXEL_AUROC] = _number(metrics.pixel_auroc_from_counts(counts))
        if options.pro_variant == "exact":
            values[pro_key] = _number(metrics.au_pro_from_counts(counts, options.pro_limit))
        else:
            values[pro_key] = _number(metrics.legacy_pro(data.maps, data.masks, options.pro_limit))
        if values[PIXEL_AUROC] is None or values[pro_key] is None:
            warn(f"class {data.name}: no anomalous or no normal pixels; pixel metrics are NaN")
    return {**values, "images": int(data.labels.size), "anomalous": anomalous, "pixel_metrics": data.maps is not None}


def _document(
    classes: list[ClassData], options: EvaluateOptions, source: dict[str, Any], info: dict[str, Any], resolution: str
) -> dict[str, Any]:
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log(f"[yellow]warning:[/] {message}", options.quiet)

    per_class = {data.name: evaluate_class(data, options, warn) for data in classes}
    mean: dict[str, Any] = {}
    for key in options.metric_keys():
        value, covered = metrics.nan_mean([math.nan if c[key] is None else c[key] for c in per_class.values()])
        mean[key] = {"value": _number(value), "classes": covered, "of": len(per_class)}
    return {
        "schema": SCHEMA,
        "source": source,
        "info": info,
        "evaluation": {
            "resolution": resolution,
            "image_score": options.image_score,
            "pro_limit": options.pro_limit,
            "pro_variant": options.pro_variant,
        },
        "metrics": list(options.metric_keys()),
        "labels": {key: LABELS[key] for key in options.metric_keys()},
        "classes": per_class,
        "mean": mean,
        "warnings": warnings,
    }


def _image_scores(columns: dict[str, np.ndarray], formula: ImageScore) -> np.ndarray:
    """The stored score, or one recomputed from the stored components (design.md §2)."""
    if formula == "stored":
        return columns["image_score"]
    paper = columns["prompt_max"].astype(np.float64) + columns["visual_max"]
    if formula == "paper":
        return paper
    return paper - columns["p_normal"] - columns["retrieval_sim"]


def _upsample(score_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling to (H, W) with pixel-centre alignment (torch's align_corners=False)."""
    if score_map.shape == size:
        return score_map.astype(np.float32)
    image = Image.fromarray(score_map.astype(np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def _read_mask(path: Path) -> np.ndarray:
    from iipad_cli.data.images import binarise_mask

    try:
        with Image.open(path) as image:
            return binarise_mask(image)
    except OSError as error:
        raise IipadError(f"{path}: unreadable mask ({error})") from None


def _image_size(path: Path) -> tuple[int, int]:
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


def _run_info(attrs: dict[str, Any]) -> dict[str, Any]:
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


def _load_run(run_dir: Path, options: EvaluateOptions) -> tuple[list[ClassData], dict[str, Any], str, str]:
    """Classes of one run, checked against the features file the scores were made from.

    Returns the classes, scores.h5's attributes, the resolution label and features.h5's sha256
    (hashed once: it can be gigabytes)."""
    import h5py

    from iipad_cli.schema.features import load_features_attrs, read_split
    from iipad_cli.schema.scores import COMPONENTS, read_scores_attrs

    scores_path = require_file(run_dir / SCORES_FILE, "score")
    features_path = require_file(run_dir / FEATURES_FILE, "extract")
    attrs = read_scores_attrs(scores_path)
    features_attrs = load_features_attrs(features_path)
    features_sha256 = sha256_file(features_path)
    if not options.force and attrs.get("features_sha256") != features_sha256:
        raise IipadError(f"{features_path}: changed after {scores_path.name} was made; run `iipad score` again (or --force)")
    with h5py.File(scores_path, "r") as handle:
        rel_paths = [str(p) for p in handle["path"].asstr()[()]]
        names = [str(c) for c in handle["cls"].asstr()[()]]
        labels = handle["label"][()].astype(np.int64)
        has_mask = handle["has_mask"][()].astype(bool)
        columns = {name: handle[name][()] for name in COMPONENTS}
        maps = handle["maps"][()]
    truth = read_split(features_path, "test", ["path", "mask"])
    if list(truth["path"]) != rel_paths:
        raise IipadError(f"{scores_path}: its rows are not the test images of {features_path} in order; run `iipad score` again")
    if not np.isfinite(maps).all():
        raise IipadError(f"{scores_path}: maps contain NaN or Inf")
    scores = _image_scores(columns, options.image_score)
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
                return _read_mask(mask_path) if mask_path is not None else np.zeros(_image_size(image_path), dtype=bool)

            def load_map(k: int, rows: np.ndarray = usable, files: list[tuple[Path | None, Path]] = truth_files) -> np.ndarray:
                mask_path, image_path = files[k]
                size = _image_size(mask_path if mask_path is not None else image_path)
                return _upsample(maps[rows[k]], size)

            class_maps, class_masks = LazyMaps(usable.size, load_map), LazyMaps(usable.size, load_mask)
        classes.append(ClassData(name, labels[rows], scores[rows], class_maps, class_masks))
    resolution = f"{maps.shape[1]}x{maps.shape[2]}" if options.resolution == "224" else "native"
    return classes, attrs, resolution, features_sha256


def evaluate_run(run_dir: Path, options: EvaluateOptions) -> dict[str, Any]:
    """Metrics of one run; writes RUN/metrics.json and RUN/metrics.csv and records the stage."""
    options.validate()
    run_dir = Path(run_dir)
    started = time.perf_counter()
    classes, attrs, resolution, features_sha256 = _load_run(run_dir, options)
    source = {"kind": "run", "run": str(run_dir.resolve())}
    document = _document(classes, options, source, _run_info(attrs), resolution)
    document["title"] = title(document)
    write_json_atomic(run_dir / METRICS_JSON, document)
    write_text_atomic(run_dir / METRICS_CSV, to_csv(document))
    seconds = time.perf_counter() - started
    images = sum(c["images"] for c in document["classes"].values())
    log(f"metrics: {run_dir} — {images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.1f} images/s)", options.quiet)
    record_stage(
        run_dir,
        "metrics",
        options=options.recorded(),
        inputs={SCORES_FILE: sha256_file(run_dir / SCORES_FILE), FEATURES_FILE: features_sha256},
        outputs={METRICS_JSON: sha256_file(run_dir / METRICS_JSON), METRICS_CSV: sha256_file(run_dir / METRICS_CSV)},
        seconds=seconds,
        extra={"images_per_second": images / max(seconds, 1e-9)},
    )
    return document


def _load_map_file(path: Path) -> np.ndarray:
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


def _read_scores_csv(path: Path) -> dict[str, float]:
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
    given = _read_scores_csv(scores_csv) if scores_csv is not None else None
    classes = []
    for name in sorted(evaluated):
        keys = sorted(k for k in found if k.split("/")[0] == name)
        if given is not None:
            absent = [k for k in keys if k not in given]
            if absent:
                raise IipadError(f"{scores_csv}: no score for {absent[0]}")
            image_scores = np.array([given[k] for k in keys])
        else:
            image_scores = np.array([_load_map_file(found[k]).max() for k in keys], dtype=np.float64)
        labels = np.array([samples[k].label for k in keys])

        def load_mask(i: int, keys: list[str] = keys) -> np.ndarray:
            sample = samples[keys[i]]
            return _read_mask(sample.mask_path) if sample.mask_path is not None else np.zeros(_image_size(sample.path), dtype=bool)

        def load_map(i: int, keys: list[str] = keys) -> np.ndarray:
            sample = samples[keys[i]]
            return _upsample(_load_map_file(found[keys[i]]), _image_size(sample.mask_path or sample.path))

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
    document = _document(classes, options, source, info, "native")
    document["evaluation"]["image_score"] = "scores.csv" if scores_csv is not None else "map maximum"
    document["title"] = title(document)
    return document


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two runs."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def combine_runs(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs -> mean, sample std and per-run values per (class, metric) and for the mean row."""
    keys = documents[0]["metrics"]
    if any(d["metrics"] != keys or d["evaluation"] != documents[0]["evaluation"] for d in documents):
        raise IipadError("runs were evaluated with different metric options; evaluate them together in one call")
    names = list(dict.fromkeys(name for d in documents for name in d["classes"]))

    def cell(per_run: list[float | None]) -> dict[str, Any]:
        present = [v for v in per_run if v is not None]
        return {"mean": float(np.mean(present)) if present else None, "std": _std(present), "n": len(present), "per_run": per_run}

    classes = {
        name: {key: cell([d["classes"].get(name, {}).get(key) for d in documents]) for key in keys} for name in names
    }
    mean = {key: cell([d["mean"][key]["value"] for d in documents]) for key in keys}
    info = {
        field: sorted({json_value(d["info"].get(field)) for d in documents}, key=str)
        for field in ("preset", "shots", "seed", "backbone_id", "random_weights")
    }
    combined = {
        "schema": SCHEMA,
        "runs": [d["source"].get("run") for d in documents],
        "info": info,
        "evaluation": documents[0]["evaluation"],
        "metrics": keys,
        "labels": documents[0]["labels"],
        "classes": classes,
        "mean": mean,
        "warnings": [f"{d['source'].get('run')}: {w}" for d in documents for w in d["warnings"]],
        "per_run": documents,
    }
    combined["title"] = title(combined)
    return combined


def json_value(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _joined(value: Any) -> str:
    return "/".join(str(v) for v in value) if isinstance(value, list) else str(value)


def title(document: dict[str, Any]) -> str:
    """Preset, shots, seed(s), backbone, "random weights", resolution and PRO variant, in words."""
    info, evaluation = document["info"], document["evaluation"]
    parts = []
    if document.get("source", {}).get("kind") == "maps":
        parts.append(f"maps {document['source']['maps']}")
    else:
        seeds = info["seed"]
        parts += [
            f"preset {_joined(info['preset'])}",
            f"{_joined(info['shots'])}-shot",
            f"seed{'s' if isinstance(seeds, list) and len(seeds) > 1 else ''} {_joined(seeds)}",
            f"backbone {_joined(info['backbone_id'])}",
        ]
        random_weights = info["random_weights"]
        if random_weights is True or (isinstance(random_weights, list) and True in random_weights):
            parts.append("random weights")
        if "runs" in document:
            parts.append(f"mean ± std over {len(document['runs'])} runs")
    parts.append(f"pixel metrics at {evaluation['resolution']}")
    parts.append(f"image score {evaluation['image_score']}")
    if evaluation["pro_variant"] == "legacy":
        parts.append("PRO: legacy (released-code variant, not comparable)")
    else:
        parts.append(f"AU-PRO up to FPR {evaluation['pro_limit']:g}")
    return "iipad metrics — " + " · ".join(parts)


def to_csv(document: dict[str, Any]) -> str:
    """One row per class and a `mean` row; multi-run documents get `_mean`/`_std` columns."""
    keys = document["metrics"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    multi = "runs" in document
    if multi:
        writer.writerow(["class", *[f"{k}_{s}" for k in keys for s in ("mean", "std")], "runs"])
        for name, cells in [*document["classes"].items(), ("mean", document["mean"])]:
            writer.writerow([name, *[_csv(cells[k][s]) for k in keys for s in ("mean", "std")], len(document["runs"])])
    else:
        writer.writerow(["class", *keys, "images", "anomalous"])
        for name, cells in document["classes"].items():
            writer.writerow([name, *[_csv(cells[k]) for k in keys], cells["images"], cells["anomalous"]])
        mean = document["mean"]
        writer.writerow(["mean", *[_csv(mean[k]["value"]) for k in keys], "", ""])
        writer.writerow(["mean_classes_covered", *[mean[k]["classes"] for k in keys], "", ""])
    return buffer.getvalue()


def _csv(value: float | None) -> str:
    return "nan" if value is None else repr(float(value))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def to_table(document: dict[str, Any]) -> Table:
    """A Rich table in percent; cells of several runs read `mean ± std`."""
    keys = document["metrics"]
    table = Table(title=document["title"], caption=CAPTION)
    table.add_column("class")
    for key in keys:
        table.add_column(LABELS[key], justify="right")
    multi = "runs" in document
    for name, cells in document["classes"].items():
        table.add_row(name, *[_cell(cells[key], multi) for key in keys])
    if multi:
        table.add_row("mean", *[_cell(document["mean"][key], True) for key in keys], style="bold")
    else:
        mean = document["mean"]
        table.add_row(
            "mean",
            *[f"{_percent(mean[k]['value'])} ({mean[k]['classes']}/{mean[k]['of']} classes)" for k in keys],
            style="bold",
        )
    return table


def _cell(value: Any, multi: bool) -> str:
    if not multi:
        return _percent(value)
    if value["mean"] is None:
        return "n/a"
    std = "" if value["std"] is None else f" ± {100 * value['std']:.1f}"
    return f"{_percent(value['mean'])}{std}"
