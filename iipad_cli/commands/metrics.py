"""`iipad metrics`: AUROC / AP / F1-max / AU-PRO per class and mean, as a table, JSON or CSV on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli.commands import add
from iipad_cli.errors import UsageError
from iipad_cli.pipeline.metrics import EvaluateOptions


def metrics_command(
    options: EvaluateOptions,
    runs: Annotated[
        Optional[list[Path]], typer.Argument(help="Run directories (several: mean ± std per cell).", metavar="RUN")
    ] = None,
    maps: Annotated[
        Optional[Path],
        typer.Option("--maps", help="Evaluate maps of any method: DIR/<cls>/test/<defect>/<stem>.{tiff,png,npy}."),
    ] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="MVTec-layout data root with the ground truth (with --maps).")] = None,
    scores: Annotated[
        Optional[Path],
        typer.Option("--scores", help="CSV with columns path,score for --maps (default: each map's maximum).", show_default=False),
    ] = None,
    table: Annotated[bool, typer.Option("--table", help="Rich table (the default when stdout is a terminal).", metavar="")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON document (docs/metrics.md; the default when stdout is not a terminal).", metavar="")
    ] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.", metavar="")] = False,
) -> None:
    """Image AUROC, AP and F1-max; pixel AUROC, AP and F1-max; AU-PRO (AP = sklearn step-wise average precision).

    Per class and the unweighted mean over classes; NaN classes are left out and the mean says how many it covers. Each run also gets RUN/metrics.json and RUN/metrics.csv (docs/metrics.md).

    Example: iipad metrics runs/a runs/b runs/c --table   (mean ± std over the runs)

    Example: iipad metrics --maps maps/ --data data/mvtec --csv
    """
    from iipad_cli.reporting.compare import check_comparable
    from iipad_cli.reporting.document import combine_runs
    from iipad_cli.reporting.maps import evaluate_maps
    from iipad_cli.reporting.render import to_csv, to_table
    from iipad_cli.stages.evaluate import evaluate_run

    if sum((table, as_json, as_csv)) > 1:
        raise UsageError("choose one of --table, --json, --csv")
    if maps is not None:
        if runs:
            raise UsageError("give either run directories or --maps, not both")
        if data is None:
            raise UsageError("--maps needs --data ROOT (the MVTec-layout ground truth)")
        document = evaluate_maps(maps, data, scores, options)
    elif not runs:
        raise UsageError("give at least one run directory, or --maps DIR --data ROOT")
    else:
        if len(runs) > 1:
            check_comparable(runs)
        documents = [evaluate_run(run, options) for run in runs]
        document = documents[0] if len(documents) == 1 else combine_runs(documents)
    if as_csv:
        sys.stdout.write(to_csv(document))
    elif as_json or (not table and not sys.stdout.isatty()):
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        from rich.console import Console

        console = Console(file=sys.stdout)
        console.print(to_table(document))
        if document.get("at_threshold"):
            from iipad_cli.reporting.decisions import to_table as threshold_table

            console.print(threshold_table(document["at_threshold"]))


def register(app: typer.Typer) -> None:
    add(app, "metrics", metrics_command)
