"""Small hand-written SVG plots for the HTML report: curves on [0, 1] axes and score histograms.

Why not matplotlib: the report needs three kinds of plot (curves, a two-colour histogram, vertical
threshold lines); written out they are ~200 lines, add no dependency and give crisp, small, text-
searchable vector graphics. Every coordinate is rounded to 0.1 px and curves are thinned to what
the plot's pixel grid can show (`thin`), so a pixel curve with 10⁵ vertices stays a few kB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

# Okabe-Ito: distinguishable by colour-blind readers and in grey. One colour per run.
RUN_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
NORMAL_COLOUR = "#0072B2"
ANOMALOUS_COLOUR = "#D55E00"

WIDTH, HEIGHT = 280, 230
LEFT, RIGHT, TOP, BOTTOM = 44, 10, 22, 38


@dataclass(frozen=True)
class Series:
    """One polyline: x and y in data units, a colour and whether it is dashed."""

    x: np.ndarray
    y: np.ndarray
    colour: str
    dashed: bool = False


@dataclass(frozen=True)
class Marker:
    """A labelled vertical line at `value` (a threshold in a histogram, the FPR limit in a PRO plot)."""

    value: float
    label: str
    colour: str = "#000000"
    dashed: bool = False


def thin(x: np.ndarray, y: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per run of points that fall in one of `columns` pixel columns, the first, lowest,
    highest and last point (in their order): at that width the drawing is unchanged, and a curve
    of any length has at most 4 x `columns` points. `x` must be nondecreasing."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size <= 4 * columns:
        return x, y
    span = x[-1] - x[0] if x[-1] > x[0] else 1.0
    column = np.floor((x - x[0]) / span * columns).astype(np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(column)) + 1]
    ends = np.r_[starts[1:], x.size] - 1
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, x.size]))
    by_y = np.lexsort((y, group))  # within each group, ascending y
    group_first = np.r_[0, np.flatnonzero(np.diff(group[by_y])) + 1]
    group_last = np.r_[group_first[1:], x.size] - 1
    keep = np.unique(np.concatenate((starts, ends, by_y[group_first], by_y[group_last])))
    return x[keep], y[keep]


def cut_at(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The polyline (x nondecreasing) up to x = x_max, the segment crossing it interpolated."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = int(np.searchsorted(x, x_max, side="right"))
    if inside == x.size or inside == 0:
        return x[:inside], y[:inside]
    x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
    y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    return np.r_[x[:inside], x_max], np.r_[y[:inside], y_cut]


def _number(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _tick_label(value: float) -> str:
    return f"{value:.3g}"


class _Axes:
    """Maps data coordinates to the plot area of a WIDTH x HEIGHT picture."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.plot_width = WIDTH - LEFT - RIGHT
        self.plot_height = HEIGHT - TOP - BOTTOM

    def px(self, x: np.ndarray | float) -> np.ndarray | float:
        return LEFT + (np.asarray(x) - self.x0) / (self.x1 - self.x0) * self.plot_width

    def py(self, y: np.ndarray | float) -> np.ndarray | float:
        return TOP + (1 - (np.asarray(y) - self.y0) / (self.y1 - self.y0)) * self.plot_height


def _frame(axes: _Axes, title: str, x_label: str, y_label: str, x_ticks: Sequence[float], y_ticks: Sequence[float]) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" class="plot">',
        f"<title>{escape(title)}</title>",
        f'<text x="{LEFT}" y="14" class="plot-title">{escape(title)}</text>',
    ]
    bottom, top = axes.py(axes.y0), axes.py(axes.y1)
    left, right = axes.px(axes.x0), axes.px(axes.x1)
    for tick in x_ticks:
        x = _number(float(axes.px(tick)))
        parts.append(f'<line x1="{x}" y1="{_number(top)}" x2="{x}" y2="{_number(bottom)}" class="grid"/>')
        parts.append(f'<text x="{x}" y="{_number(bottom + 13)}" text-anchor="middle">{_tick_label(tick)}</text>')
    for tick in y_ticks:
        y = _number(float(axes.py(tick)))
        parts.append(f'<line x1="{_number(left)}" y1="{y}" x2="{_number(right)}" y2="{y}" class="grid"/>')
        parts.append(f'<text x="{_number(left - 4)}" y="{y}" dy="3" text-anchor="end">{_tick_label(tick)}</text>')
    parts.append(f'<rect x="{_number(left)}" y="{_number(top)}" width="{_number(right - left)}" height="{_number(bottom - top)}" class="axes"/>')
    parts.append(f'<text x="{_number((left + right) / 2)}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(
        f'<text transform="translate(11 {_number((top + bottom) / 2)}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>'
    )
    return parts


def _marker(axes: _Axes, marker: Marker, row: int) -> list[str]:
    x = _number(float(axes.px(marker.value)))
    dash = ' stroke-dasharray="4 3"' if marker.dashed else ""
    top, bottom = axes.py(axes.y1), axes.py(axes.y0)
    anchor = "end" if float(axes.px(marker.value)) > LEFT + 0.6 * axes.plot_width else "start"
    offset = -3 if anchor == "end" else 3
    return [
        f'<line x1="{x}" y1="{_number(top)}" x2="{x}" y2="{_number(bottom)}" stroke="{marker.colour}" stroke-width="1.5"{dash}/>',
        f'<text x="{x}" dx="{offset}" y="{_number(top + 11 + 11 * row)}" text-anchor="{anchor}" fill="{marker.colour}" '
        f'class="marker" paint-order="stroke" stroke="#ffffff" stroke-width="3">{escape(marker.label)}</text>',
    ]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values inside [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        if raw <= multiple * step:
            step *= multiple
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def curve_plot(
    title: str,
    x_label: str,
    y_label: str,
    series: Sequence[Series],
    *,
    x_max: float = 1.0,
    diagonal: bool = False,
) -> str:
    """Curves on [0, x_max] x [0, 1]; `diagonal` draws the chance line of a ROC plot."""
    axes = _Axes((0.0, x_max), (0.0, 1.0))
    parts = _frame(axes, title, x_label, y_label, _ticks(0.0, x_max), [0, 0.25, 0.5, 0.75, 1.0])
    if diagonal:
        parts.append(f'<line x1="{LEFT}" y1="{_number(axes.py(0))}" x2="{_number(axes.px(x_max))}" y2="{_number(axes.py(x_max))}" class="chance"/>')
    for line in series:
        x, y = thin(*cut_at(line.x, line.y, x_max), 2 * axes.plot_width)
        points = " ".join(f"{_number(float(px))},{_number(float(py))}" for px, py in zip(axes.px(x), axes.py(y)))
        dash = ' stroke-dasharray="5 3"' if line.dashed else ""
        parts.append(f'<polyline points="{points}" fill="none" stroke="{line.colour}" stroke-width="1.6"{dash}/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_plot(
    title: str,
    normal: np.ndarray,
    anomalous: np.ndarray,
    markers: Sequence[Marker] = (),
    bins: int = 30,
) -> str:
    """Counts of normal and anomalous image scores on shared bins, overlaid, with vertical markers.

    The x range covers the scores and every marker, so a threshold outside the scores still shows.
    """
    normal, anomalous = np.asarray(normal, dtype=np.float64), np.asarray(anomalous, dtype=np.float64)
    values = np.concatenate((normal, anomalous, [m.value for m in markers if math.isfinite(m.value)]))
    low, high = float(values.min()), float(values.max())
    if not high > low:
        low, high = low - 0.5, high + 0.5
    margin = 0.02 * (high - low)
    low, high = low - margin, high + margin
    edges = np.linspace(low, high, bins + 1)
    normal_counts = np.histogram(normal, edges)[0]
    anomalous_counts = np.histogram(anomalous, edges)[0]
    top_count = max(int(normal_counts.max(initial=0)), int(anomalous_counts.max(initial=0)), 1)
    axes = _Axes((low, high), (0.0, top_count * 1.25))
    y_ticks = [t for t in _ticks(0, top_count, 4) if float(t).is_integer()]
    parts = _frame(axes, title, "image score", "images", _ticks(low, high, 4), y_ticks)
    for counts, colour in ((normal_counts, NORMAL_COLOUR), (anomalous_counts, ANOMALOUS_COLOUR)):
        for left_edge, right_edge, count in zip(edges[:-1], edges[1:], counts):
            if count == 0:
                continue
            x, y = axes.px(left_edge), axes.py(count)
            width, height = axes.px(right_edge) - x, axes.py(0) - y
            parts.append(
                f'<rect x="{_number(x)}" y="{_number(y)}" width="{_number(width)}" height="{_number(height)}" '
                f'fill="{colour}" fill-opacity="0.55"/>'
            )
    for row, marker in enumerate(m for m in markers if math.isfinite(m.value)):
        parts += _marker(axes, marker, row)
    parts.append("</svg>")
    return "".join(parts)


def swatch(colour: str, dashed: bool = False) -> str:
    """A short line sample for an HTML legend."""
    dash = ' stroke-dasharray="5 3"' if dashed else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="26" height="10" class="swatch" aria-hidden="true">'
        f'<line x1="1" y1="5" x2="25" y2="5" stroke="{colour}" stroke-width="2"{dash}/></svg>'
    )


def box(colour: str) -> str:
    """A filled square sample for an HTML legend."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="12" height="12" class="swatch" aria-hidden="true">'
        f'<rect width="12" height="12" fill="{colour}" fill-opacity="0.55"/></svg>'
    )
