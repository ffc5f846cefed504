"""A metrics document rendered as CSV or as a Rich table (in percent)."""

from __future__ import annotations

import csv
import io
from typing import Any

from rich.table import Table

from iipad_cli.reporting.columns import CAPTION, HEADERS
from iipad_cli.reporting.decisions import csv_columns
from iipad_cli.reporting.values import csv_value


def to_csv(document: dict[str, Any]) -> str:
    """One row per class and a `mean` row; multi-run documents get `_mean`/`_std` columns."""
    keys = document["metrics"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    multi = "runs" in document
    # Decisions at the label-free thresholds (reporting/decisions.py) follow as extra columns.
    section = document.get("at_threshold")
    extra_header, extra = csv_columns(section) if section else ([], {})
    blank = [""] * len(extra_header)
    if multi:
        writer.writerow(["class", *[f"{k}_{s}" for k in keys for s in ("mean", "std")], "runs", *extra_header])
        for name, cells in [*document["classes"].items(), ("mean", document["mean"])]:
            values = [csv_value(cells[k][s]) for k in keys for s in ("mean", "std")]
            writer.writerow([name, *values, len(document["runs"]), *extra.get(name, blank)])
    else:
        writer.writerow(["class", *keys, "images", "anomalous", *extra_header])
        for name, cells in document["classes"].items():
            writer.writerow([name, *[csv_value(cells[k]) for k in keys], cells["images"], cells["anomalous"], *extra.get(name, blank)])
        mean = document["mean"]
        writer.writerow(["mean", *[csv_value(mean[k]["value"]) for k in keys], "", "", *extra.get("mean", blank)])
        writer.writerow(["mean_classes_covered", *[mean[k]["classes"] for k in keys], "", "", *blank])
    return buffer.getvalue()


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def table_cells(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and the rows (classes, then `mean`) in percent; cells of several runs read
    `mean ± std`, the single-run mean says how many classes it covers. The Rich table and the
    HTML report both show these."""
    keys = document["metrics"]
    header = ["class", *[HEADERS[key] for key in keys]]
    multi = "runs" in document
    rows = [[name, *[_cell(cells[key], multi) for key in keys]] for name, cells in document["classes"].items()]
    mean = document["mean"]
    if multi:
        rows.append(["mean", *[_cell(mean[key], True) for key in keys]])
    else:
        rows.append(["mean", *[f"{_percent(mean[k]['value'])} ({mean[k]['classes']}/{mean[k]['of']})" for k in keys]])
    return header, rows


def to_table(document: dict[str, Any]) -> Table:
    """A Rich table of `table_cells`, the mean row in bold."""
    header, rows = table_cells(document)
    table = Table(title=document["title"], caption=CAPTION)
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right")
    for row in rows[:-1]:
        table.add_row(*row)
    table.add_row(*rows[-1], style="bold")
    return table


def _cell(value: Any, multi: bool) -> str:
    if not multi:
        return _percent(value)
    if value["mean"] is None:
        return "n/a"
    std = "" if value["std"] is None else f" ± {100 * value['std']:.1f}"
    return f"{_percent(value['mean'])}{std}"
