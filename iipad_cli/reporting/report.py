"""`iipad report`: one or more runs' metrics, curves, score histograms and worst cases in one HTML file.

Everything comes from what the runs already hold: scores.h5 (maps, image scores, retrieval), the
ground truth in features.h5, thresholds.json when `score` derived label-free thresholds, and the
test images under the run's data root (for the gallery's heatmaps only). Numbers are the same
as `iipad metrics` (the same evaluation code) at the stored resolution with the stored image
score; nothing is written into the runs. No torch: this is reporting.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iipad_cli import __version__, metrics
from iipad_cli.artifacts import FEATURES_FILE, SCORES_FILE, write_text_atomic
from iipad_cli.data.images import resized_image
from iipad_cli.errors import IipadError
from iipad_cli.reporting import page
from iipad_cli.reporting.columns import CAPTION
from iipad_cli.reporting.document import ClassData, build_document, combine_runs, title
from iipad_cli.reporting.inputs import load_run, run_info
from iipad_cli.reporting.render import table_cells
from iipad_cli.reporting.report_options import ReportOptions
from iipad_cli.schema.thresholds import THRESHOLDS_FILE, Thresholds, load_thresholds
from iipad_cli.thresholds import image_label
from iipad_cli.ui import log
from iipad_cli.viz import heatmap_figure

RANDOM_WEIGHTS_NOTE = (
    "These scores come from a backbone with random weights (tiny): the report checks the plumbing, "
    "it does not show the method's accuracy."
)
JPEG_QUALITY = 85


@dataclass
class _Run:
    """One run as the report needs it."""

    directory: Path
    label: str
    document: dict[str, Any]
    classes: list[ClassData]
    attrs: dict[str, Any]
    label_free: Thresholds | None  # None when the run has no thresholds.json (or one for another score)


def _label_free_thresholds(run_dir: Path, image_score_formula: str) -> Thresholds | None:
    """The label-free thresholds `iipad score` wrote to RUN/thresholds.json, or None.

    They are drawn only when derived for the same image-score formula as the stored scores (always
    the case for a run `score` wrote in one go)."""
    path = run_dir / THRESHOLDS_FILE
    if not path.is_file():
        return None
    thresholds = load_thresholds(path)
    return thresholds if thresholds.image_score_formula == image_score_formula else None


def _run_labels(directories: Sequence[Path]) -> list[str]:
    """Directory names, or full paths where two runs share a name."""
    names = [d.resolve().name for d in directories]
    return [name if names.count(name) == 1 else str(d.resolve()) for name, d in zip(names, directories)]


def _load(directories: Sequence[Path], options: ReportOptions) -> list[_Run]:
    runs = []
    for directory, label in zip(directories, _run_labels(directories)):
        evaluation = options.evaluation()
        classes, attrs, resolution, _ = load_run(directory, evaluation)
        source = {"kind": "run", "run": str(directory.resolve())}
        document = build_document(classes, evaluation, source, run_info(attrs), resolution)
        document["title"] = title(document)
        formula = str(attrs.get("image_score_formula", ""))
        runs.append(_Run(directory, label, document, classes, attrs, _label_free_thresholds(directory, formula)))
        log(f"report: read {directory}", options.quiet)
    return runs


def _curves(data: ClassData | None) -> page.RunCurves:
    """A run's curves of one class (all None where the class is not in that run)."""
    if data is None:
        return page.RunCurves(None, None, None, None, None)
    labels = np.asarray(data.labels)
    image = metrics.rank_counts(labels, data.image_scores) if 0 < labels.sum() < labels.size else None
    pixel = metrics.pixel_counts(data.maps, data.masks) if data.maps is not None and data.masks is not None else None
    if pixel is not None and (pixel.num_positives == 0 or pixel.num_negatives == 0):
        pixel = None
    return page.RunCurves(
        image_roc=metrics.roc_curve(image) if image is not None else None,
        image_pr=metrics.pr_curve(image) if image is not None else None,
        pixel_roc=metrics.roc_curve(pixel) if pixel is not None else None,
        pixel_pr=metrics.pr_curve(pixel) if pixel is not None else None,
        pro=metrics.pro_curve(pixel) if pixel is not None and pixel.num_regions else None,
    )


def _histogram(run: _Run, data: ClassData) -> page.Histogram:
    labels = np.asarray(data.labels)
    markers = []
    # The class's own category: the threshold its images meet when they retrieve their own class.
    if run.label_free is not None and data.name in run.label_free.categories:
        markers.append(page.label_free_marker(run.label_free.categories[data.name].image_threshold))
    best = metrics.f1_max(labels, data.image_scores)
    if not math.isnan(best.threshold):
        markers.append(page.f1_max_marker(best.threshold))
    scores = np.asarray(data.image_scores, dtype=np.float64)
    return page.Histogram(run.label, scores[labels == 0], scores[labels == 1], tuple(markers))


def _gallery(run: _Run, count: int) -> dict[str, list[page.GalleryItem]]:
    """Per class: the `count` lowest-scored anomalous and `count` highest-scored normal images."""
    if count == 0:
        return {}
    from iipad_cli.schema.features import read_split
    from iipad_cli.schema.scores import load_scores

    scores = load_scores(run.directory / SCORES_FILE)
    masks = read_split(run.directory / FEATURES_FILE, "test", ["mask"])["mask"]
    root = Path(str(scores.attrs["data_root"]))
    vmin, vmax = float(scores.attrs["map_min"]), float(scores.attrs["map_max"])
    resolution = int(scores.maps.shape[1])
    labels = np.asarray(scores.label)
    image_scores = np.asarray(scores.image_score, dtype=np.float64)
    names = np.asarray(scores.cls)
    gallery: dict[str, list[page.GalleryItem]] = {}
    for name in dict.fromkeys(scores.cls):
        rows = np.flatnonzero(names == name)
        anomalous = rows[labels[rows] == 1]
        normal = rows[labels[rows] == 0]
        # Stable sorts: equal scores keep the test-set order, so the gallery is reproducible.
        misses = anomalous[np.argsort(image_scores[anomalous], kind="stable")][:count]
        alarms = normal[np.argsort(-image_scores[normal], kind="stable")][:count]
        items = []
        for kind, chosen in (("miss", misses), ("false alarm", alarms)):
            for row in chosen:
                verdict = _verdict(run.label_free, int(scores.retrieved[row, 0]), float(image_scores[row]))
                rel_path = scores.path[row]
                try:
                    image = resized_image(root / rel_path, resolution)
                except IipadError as error:
                    items.append(page.GalleryItem(kind, rel_path, float(image_scores[row]), verdict, None, f"no heatmap: {error}"))
                    continue
                mask = masks[row] if bool(scores.has_mask[row]) else None
                figure = heatmap_figure(image, scores.maps[row].astype(np.float32), vmin, vmax, mask=mask)
                buffer = io.BytesIO()
                # JPEG: these are photographs with a colour overlay; a PNG of one is ~4x larger.
                figure.save(buffer, format="JPEG", quality=JPEG_QUALITY)
                items.append(page.GalleryItem(kind, rel_path, float(image_scores[row]), verdict, buffer.getvalue()))
        gallery[name] = items
    return gallery


def _verdict(label_free: Thresholds | None, retrieved_top1: int, score: float) -> str:
    """What the label-free threshold of the image's category (the class of its top-1 retrieved
    bank image, as `predict` decides) says about it; "" without thresholds."""
    if label_free is None:
        return ""
    levels = label_free.levels(retrieved_top1)
    judged = image_label(score, levels.image)
    return f"judged {judged} by the label-free threshold {levels.image:.4g} of category {levels.category}"


def build(directories: Sequence[Path], options: ReportOptions) -> page.Report:
    """The report's content for the runs given (several: mean ± std in the table, one curve per run)."""
    options.validate()
    if not directories:
        raise IipadError("give at least one run directory")
    directories = [Path(d) for d in directories]
    runs = _load(directories, options)
    documents = [run.document for run in runs]
    document = documents[0] if len(documents) == 1 else combine_runs(documents)
    header, rows = table_cells(document)
    gallery = _gallery(runs[0], options.gallery)
    names = list(dict.fromkeys(data.name for run in runs for data in run.classes))
    classes = []
    for name in names:
        per_run = [next((d for d in run.classes if d.name == name), None) for run in runs]
        classes.append(
            page.ClassReport(
                name=name,
                curves=tuple(_curves(data) for data in per_run),  # by run index: a run's colour is fixed
                histograms=tuple(_histogram(run, data) for run, data in zip(runs, per_run) if data is not None),
                gallery=tuple(gallery.get(name, [])),
            )
        )
    random_weights = any(bool(run.attrs.get("random_weights", False)) for run in runs)
    has_thresholds = any(run.label_free is not None for run in runs)
    gallery_note = (
        f"Gallery: the {options.gallery} lowest-scored anomalous images (misses) and the {options.gallery} "
        f"highest-scored normal images (false alarms) of each class in run {runs[0].label}; heatmaps on the "
        "run's shared colour scale (image | anomaly-map overlay | ground truth)."
        if options.gallery
        else "Gallery: off (--gallery 0)."
    )
    if not has_thresholds:
        gallery_note += " The runs hold no label-free thresholds (thresholds.json), so none are drawn."
    return page.Report(
        title=document["title"],
        runs=tuple(run.label for run in runs),
        table_header=tuple(header),
        table_rows=tuple(tuple(row) for row in rows),
        caption=CAPTION,
        pro_limit=options.pro_limit,
        classes=tuple(classes),
        gallery_note=gallery_note,
        notes=(RANDOM_WEIGHTS_NOTE,) if random_weights else (),
        warnings=tuple(document["warnings"]),
        footer=f"Written by iipad {__version__}: a self-contained file (inline CSS and SVG, JPEG images as data: URIs).",
    )


def write_report(directories: Sequence[Path], output: Path, options: ReportOptions) -> Path:
    """Build the report and write it atomically to `output` (UTF-8).

    The output path is checked before any run is read, so a typo costs no work."""
    started = time.perf_counter()
    output = Path(output)
    if output.is_dir():
        raise IipadError(f"{output}: is a directory; name the report's file, e.g. -o {output / 'report.html'}")
    if not output.parent.is_dir():
        raise IipadError(f"{output.parent}: no such directory for the report")
    html = page.render(build(directories, options))
    try:
        write_text_atomic(output, html)
    except OSError as error:
        raise IipadError(f"{output}: cannot write the report ({error.strerror or error})") from None
    seconds = time.perf_counter() - started
    log(f"report: {output} ({len(html.encode('utf-8')) / 1024:.0f} KiB) in {seconds:.1f} s", options.quiet)
    return output
