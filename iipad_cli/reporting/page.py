"""The report's HTML: one self-contained page (inline CSS, inline SVG, JPEGs as data: URIs).

Pure rendering: `render(Report) -> str`, no file or run access (`iipad_cli.reporting.report`
gathers the numbers). Nothing on the page refers to anything outside it: no scripts, no external
stylesheets, fonts or images, so it opens offline and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

from iipad_cli.reporting import svg_plots as svg

Curve = tuple[np.ndarray, np.ndarray]

CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1b1b1b; background: #f6f6f4; margin: 0; }
main { max-width: 1280px; margin: 0 auto; padding: 18px 24px 40px; }
h1 { font-size: 22px; margin: 4px 0 2px; }
h2 { font-size: 18px; margin: 0 0 8px; }
h3 { font-size: 14px; margin: 14px 0 6px; color: #333; }
.subtitle { color: #444; margin: 0 0 10px; }
.note { background: #fff4d6; border: 1px solid #e0c36a; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
section.card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 14px 16px; margin: 16px 0; }
table.metrics { border-collapse: collapse; font-variant-numeric: tabular-nums; width: 100%; }
table.metrics th, table.metrics td { padding: 4px 8px; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics thead th { background: #f0f0ee; font-weight: 600; white-space: normal; vertical-align: bottom; }
table.metrics tr.mean td { font-weight: 700; border-top: 2px solid #999; }
.caption { color: #555; font-size: 12px; margin-top: 6px; }
.plots { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.legend { font-size: 12px; color: #333; margin: 4px 0 0; display: flex; flex-wrap: wrap; gap: 4px 16px; }
.legend span { white-space: nowrap; }
.swatch { vertical-align: middle; margin-right: 4px; }
svg.plot { background: #fff; font: 10px system-ui, "DejaVu Sans", sans-serif; fill: #333; }
svg.plot .plot-title { font-size: 12px; font-weight: 600; fill: #1b1b1b; }
svg.plot .grid { stroke: #e6e6e6; stroke-width: 1; }
svg.plot .axes { fill: none; stroke: #888; stroke-width: 1; }
svg.plot .chance { stroke: #aaa; stroke-width: 1; stroke-dasharray: 2 3; }
svg.plot .marker { font-size: 10px; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px 20px; }
.gallery .column { flex: 1 1 480px; max-width: 600px; }
figure { margin: 0 0 12px; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; display: block; }
figcaption { font-size: 12px; color: #333; margin-top: 3px; max-width: 640px; }
.miss { color: #a33b00; font-weight: 600; }
.alarm { color: #005a8c; font-weight: 600; }
.missing { color: #777; font-style: italic; }
details summary { cursor: pointer; color: #444; }
ul.runs { margin: 4px 0; padding-left: 20px; }
code { font-size: 12px; }
"""


@dataclass(frozen=True)
class RunCurves:
    """One run's curves for one class; None where the class has no such curve (e.g. no masks)."""

    image_roc: Curve | None
    image_pr: Curve | None
    pixel_roc: Curve | None
    pixel_pr: Curve | None
    pro: Curve | None


@dataclass(frozen=True)
class Histogram:
    """One run's image scores of a class, split by test label, and the thresholds to draw."""

    run: str
    normal: np.ndarray
    anomalous: np.ndarray
    markers: tuple[svg.Marker, ...] = ()


@dataclass(frozen=True)
class GalleryItem:
    """A worst miss (anomalous, lowest score) or false alarm (normal, highest score) of a class."""

    kind: str  # "miss" or "false alarm"
    path: str
    score: float
    verdict: str  # what the label-free threshold says about it, or "" when the run has none
    jpeg: bytes | None  # the heatmap figure; None when the image could not be read
    problem: str = ""


@dataclass(frozen=True)
class ClassReport:
    name: str
    curves: tuple[RunCurves, ...]  # in run order
    histograms: tuple[Histogram, ...]
    gallery: tuple[GalleryItem, ...]


@dataclass(frozen=True)
class Report:
    title: str
    runs: tuple[str, ...]  # labels, in the order of the curves' colours
    table_header: tuple[str, ...]
    table_rows: tuple[tuple[str, ...], ...]  # the last row is the mean
    caption: str
    pro_limit: float
    classes: tuple[ClassReport, ...]
    gallery_note: str
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    footer: str = ""


# The two kinds of threshold a histogram can show, and what the legend says about each.
LABEL_FREE = ("#000000", False, "label-free threshold (from normal images only)")
F1_MAX = ("#777777", True, "F1-max threshold (chosen with the test labels: an upper bound, not usable in production)")


def label_free_marker(value: float) -> svg.Marker:
    return svg.Marker(value, f"label-free {value:.3g}", LABEL_FREE[0], LABEL_FREE[1])


def f1_max_marker(value: float) -> svg.Marker:
    return svg.Marker(value, f"F1-max {value:.3g}", F1_MAX[0], F1_MAX[1])


def colour_of(run_index: int) -> str:
    return svg.RUN_COLOURS[run_index % len(svg.RUN_COLOURS)]


def data_uri_jpeg(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _table(report: Report) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in report.table_header)
    rows = []
    for index, row in enumerate(report.table_rows):
        css = ' class="mean"' if index == len(report.table_rows) - 1 else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>")
    return (
        f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        f'<p class="caption">{escape(report.caption)}</p>'
    )


def _series(curves: Sequence[RunCurves], image: str, pixel: str) -> list[svg.Series]:
    lines = []
    for index, run in enumerate(curves):
        for attribute, dashed in ((image, False), (pixel, True)):
            curve = getattr(run, attribute)
            if curve is not None:
                lines.append(svg.Series(curve[0], curve[1], colour_of(index), dashed))
    return lines


def _legend(report: Report, has_pixel: bool) -> str:
    entries = [f"<span>{svg.swatch(colour_of(i))}{escape(run)}</span>" for i, run in enumerate(report.runs)]
    if len(report.runs) == 1:
        entries = []
    entries.append(f"<span>{svg.swatch('#444')}image level</span>")
    if has_pixel:
        entries.append(f"<span>{svg.swatch('#444', dashed=True)}pixel level</span>")
    return f'<div class="legend">{"".join(entries)}</div>'


def _histogram_legend(item: ClassReport) -> str:
    entries = [
        f"<span>{svg.box(svg.NORMAL_COLOUR)}normal test images</span>",
        f"<span>{svg.box(svg.ANOMALOUS_COLOUR)}anomalous test images</span>",
    ]
    styles = {(m.colour, m.dashed) for h in item.histograms for m in h.markers}
    for colour, dashed, description in (LABEL_FREE, F1_MAX):
        if (colour, dashed) in styles:
            entries.append(f"<span>{svg.swatch(colour, dashed)}{escape(description)}</span>")
    return f'<div class="legend">{"".join(entries)}</div>'


def _plots(report: Report, item: ClassReport) -> str:
    """One row: ROC, PR, PRO, then each run's histogram of image scores; the legends below."""
    histograms = [svg.histogram_plot(f"Image scores · {h.run}", h.normal, h.anomalous, h.markers) for h in item.histograms]
    has_curves = any(run.image_roc is not None or run.pixel_roc is not None for run in item.curves)
    if not has_curves:
        note = '<p class="missing">no ROC, PR or PRO curves: only one label among this class\'s test images</p>'
        return f'{note}<div class="plots">{"".join(histograms)}</div>{_histogram_legend(item)}'
    has_pixel = any(run.pixel_roc is not None for run in item.curves)
    plots = [
        svg.curve_plot("ROC", "false positive rate", "true positive rate", _series(item.curves, "image_roc", "pixel_roc"), diagonal=True),
        svg.curve_plot("Precision-recall (area = AP)", "recall", "precision", _series(item.curves, "image_pr", "pixel_pr")),
    ]
    pro = [svg.Series(run.pro[0], run.pro[1], colour_of(i), True) for i, run in enumerate(item.curves) if run.pro is not None]
    if pro:
        title = f"PRO up to FPR {report.pro_limit:g}"
        plots.append(svg.curve_plot(title, "false positive rate (pixels)", "per-region overlap", pro, x_max=report.pro_limit))
    else:
        plots.append('<p class="missing">no pixel curves: no masked anomalies in this class</p>')
    return f'<div class="plots">{"".join(plots + histograms)}</div>{_legend(report, has_pixel)}{_histogram_legend(item)}'


def _figure(entry: GalleryItem) -> str:
    css = "miss" if entry.kind == "miss" else "alarm"
    verdict = f" · {escape(entry.verdict)}" if entry.verdict else ""
    caption = f'<span class="{css}">{escape(entry.kind)}</span> · <code>{escape(entry.path)}</code> · score {entry.score:.4g}{verdict}'
    if entry.jpeg is None:
        return f'<figure><p class="missing">{escape(entry.problem)}</p><figcaption>{caption}</figcaption></figure>'
    alt = f"{entry.kind}: {entry.path}: image, anomaly map overlay, ground truth"
    return f'<figure><img src="{data_uri_jpeg(entry.jpeg)}" alt="{escape(alt)}"><figcaption>{caption}</figcaption></figure>'


def _gallery(item: ClassReport) -> str:
    """Two columns: the misses (anomalous images, lowest scores first) and the false alarms."""
    if not item.gallery:
        return ""
    columns = []
    for kind, heading in (("miss", "Worst misses (anomalous, lowest scores)"), ("false alarm", "Worst false alarms (normal, highest scores)")):
        figures = "".join(_figure(entry) for entry in item.gallery if entry.kind == kind)
        body = figures or '<p class="missing">none: no such test images in this class</p>'
        columns.append(f'<div class="column"><h3>{heading}</h3>{body}</div>')
    return f'<div class="gallery">{"".join(columns)}</div>'


def render(report: Report) -> str:
    """The whole page as one string (UTF-8 when written)."""
    notes = "".join(f'<p class="note">{escape(note)}</p>' for note in report.notes)
    runs = "".join(f"<li><code>{escape(run)}</code></li>" for run in report.runs)
    warnings = ""
    if report.warnings:
        items = "".join(f"<li>{escape(w)}</li>" for w in report.warnings)
        warnings = f"<details><summary>{len(report.warnings)} warning(s) from the evaluation</summary><ul>{items}</ul></details>"
    classes = []
    for item in report.classes:
        classes.append(
            f'<section class="card" id="class-{escape(item.name)}"><h2>{escape(item.name)}</h2>'
            f"{_plots(report, item)}{_gallery(item)}</section>"
        )
    index = " · ".join(f'<a href="#class-{escape(c.name)}">{escape(c.name)}</a>' for c in report.classes)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(report.title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>iipad report</h1><p class="subtitle">{escape(report.title)}</p>{notes}'
        f'<section class="card"><h2>Metrics</h2>{_table(report)}{warnings}'
        f'<h3>Runs</h3><ul class="runs">{runs}</ul><p class="caption">{escape(report.gallery_note)}</p>'
        f'<p class="caption">Classes: {index}</p></section>'
        f"{''.join(classes)}"
        f'<p class="caption">{escape(report.footer)}</p>'
        "</main></body></html>\n"
    )
