"""`iipad report`: one self-contained HTML page of one or more runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iipad_cli.commands import add
from iipad_cli.reporting.report_options import ReportOptions


def report_command(
    options: ReportOptions,
    runs: Annotated[list[Path], typer.Argument(help="Run directories (several: mean ± std, one curve per run).", metavar="RUN")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
) -> None:
    """Metrics table, ROC / PR / PRO curves, score histograms and the worst cases, in one HTML file.

    The page is self-contained (inline CSS and SVG, images as data: URIs; nothing is fetched), so it opens offline and can be mailed or archived. Per class: ROC and precision-recall curves at image and pixel level and the PRO curve (one line per run); a histogram of the normal and anomalous test images' scores with the label-free threshold (when `iipad score` derived one) and the F1-max threshold; the heatmaps of the lowest-scored anomalous images (misses) and highest-scored normal images (false alarms) of the first run. The numbers are those of `iipad metrics` at the stored resolution with the stored image score; nothing is written into the runs. Prints the report's path on stdout.

    Example: iipad report runs/a-seed0 runs/a-seed1 runs/a-seed2 -o report.html
    """
    from iipad_cli.reporting.report import write_report

    typer.echo(str(write_report(runs, output, options)))


def register(app: typer.Typer) -> None:
    add(app, "report", report_command)
