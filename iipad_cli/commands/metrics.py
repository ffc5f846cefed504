"""`iipad metrics`: AUROC / AUPR / AU-PRO per class and mean, as a table, JSON or CSV on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from iipad_cli.commands import user_errors
from iipad_cli.errors import IipadError


def register(app: typer.Typer) -> None:
    @app.command("metrics")
    @user_errors
    def metrics_command(
        runs: Annotated[Optional[list[Path]], typer.Argument(help="Run directories (several: mean ± std per cell).")] = None,
        maps: Annotated[
            Optional[Path], typer.Option("--maps", help="Evaluate maps of any method: DIR/<cls>/test/<defect>/<stem>.{tiff,png,npy}.")
        ] = None,
        data: Annotated[Optional[Path], typer.Option("--data", help="MVTec-layout data root with the ground truth (with --maps).")] = None,
        scores: Annotated[
            Optional[Path], typer.Option("--scores", help="CSV with columns path,score for --maps (default: each map's maximum).")
        ] = None,
        table: Annotated[bool, typer.Option("--table", help="Rich table (the default when stdout is a terminal).")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="JSON document (docs/metrics.md; the default when stdout is not a terminal).")] = False,
        as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.")] = False,
        resolution: Annotated[str, typer.Option(help="224 (stored maps and masks) or native (maps upsampled to each mask's size).")] = "224",
        image_score: Annotated[
            str, typer.Option(help="stored, paper (prompt_max + visual_max) or official (paper - p_normal - retrieval_sim).")
        ] = "stored",
        pro_limit: Annotated[float, typer.Option(help="FPR up to which AU-PRO is integrated (then divided by it).")] = 0.3,
        pro_variant: Annotated[
            str, typer.Option(help="exact (MVTec AU-PRO) or legacy (released-code variant, not comparable).")
        ] = "exact",
        force: Annotated[bool, typer.Option("--force", help="Evaluate even if features.h5 changed after scoring.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No log lines or warnings on stderr.")] = False,
    ) -> None:
        """Image AUROC, image AUPR (sklearn step-wise average precision), pixel AUROC and AU-PRO.

        Per class and the unweighted mean over classes; NaN classes are left out and the mean says how many it covers. Each run also gets RUN/metrics.json and RUN/metrics.csv (docs/metrics.md).

        Example: iipad metrics runs/a runs/b runs/c --table   (mean ± std over the runs)

        Example: iipad metrics --maps maps/ --data data/mvtec --csv
        """
        from rich.console import Console

        from iipad_cli.stages import evaluate

        if sum((table, as_json, as_csv)) > 1:
            raise IipadError("choose one of --table, --json, --csv")
        options = evaluate.EvaluateOptions(
            resolution=resolution,  # type: ignore[arg-type]
            image_score=image_score,  # type: ignore[arg-type]
            pro_limit=pro_limit,
            pro_variant=pro_variant,  # type: ignore[arg-type]
            force=force,
            quiet=quiet,
        )
        if maps is not None:
            if runs:
                raise IipadError("give either run directories or --maps, not both")
            if data is None:
                raise IipadError("--maps needs --data ROOT (the MVTec-layout ground truth)")
            document = evaluate.evaluate_maps(maps, data, scores, options)
        elif not runs:
            raise IipadError("give at least one run directory, or --maps DIR --data ROOT")
        else:
            documents = [evaluate.evaluate_run(run, options) for run in runs]
            document = documents[0] if len(documents) == 1 else evaluate.combine_runs(documents)
        if as_csv:
            sys.stdout.write(evaluate.to_csv(document))
        elif as_json or (not table and not sys.stdout.isatty()):
            sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        else:
            Console(file=sys.stdout).print(evaluate.to_table(document))
