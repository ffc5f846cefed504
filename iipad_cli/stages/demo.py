"""`iipad demo`: procedurally generated demo data, the whole pipeline on it, and its summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iipad_cli.artifacts import HEATMAPS_DIR
from iipad_cli.stages.run import RunOptions, RunResult, load_metrics, run_pipeline, show_table
from iipad_cli.ui import err_console, log

DEMO_SHOTS = 2
DEMO_DEFAULT_EPOCHS = 5
DEMO_DATA_DIR = "data"
DEMO_REPORT = "report.html"


@dataclass(frozen=True)
class DemoResult:
    data_dir: Path
    run: RunResult
    heatmaps_dir: Path
    report: Path


def run_demo(
    out_dir: Path,
    *,
    backbone: str = "tiny",
    weights: Path | None = None,
    shots: int = DEMO_SHOTS,
    epochs: int | None = DEMO_DEFAULT_EPOCHS,
    seed: int = 0,
    device: str = "auto",
    quiet: bool = False,
    force: bool = False,
    cache: Path | None = None,
) -> DemoResult:
    """Build the procedurally generated demo data into OUT/data, run the pipeline on it and write
    the HTML report of the run to OUT/report.html.

    The run directory is `OUT/run-<backbone>`, so a random-weights demo and a real-weights one sit
    side by side. The data set is rebuilt every time (about a second, byte-identical for a seed),
    so cached stages stay current across demo invocations. The report is rewritten every time
    (a few seconds; the same bytes for the same run).

    The tiny demo runs on the CPU (`auto` means cpu for it: at this size a GPU adds nothing) with
    machine-independent kernels on one thread, so it prints the README's numbers on every x86-64
    machine (`iipad_cli/determinism.py`; docs/performance.md "Demo numbers").
    """
    from iipad_cli.demo_data import build_demo_dataset
    from iipad_cli.determinism import pin_cpu_kernels
    from iipad_cli.reporting.report import write_report
    from iipad_cli.reporting.report_options import ReportOptions

    if backbone == "tiny" and device == "auto":
        device = "cpu"
    if device == "cpu" and not pin_cpu_kernels():
        log("[yellow]warning:[/] CPU kernels could not be pinned in this process; the numbers may differ from the README's", quiet)

    out_dir = Path(out_dir)
    data_dir = out_dir / DEMO_DATA_DIR
    build_demo_dataset(data_dir, seed=seed)
    log(f"demo data (procedurally generated textures with synthetic defects): {data_dir}", quiet)
    options = RunOptions(
        data=data_dir,
        shots=shots,
        run_dir=out_dir / f"run-{backbone}",
        backbone=backbone,
        weights=weights,
        seed=seed,
        device=device,
        # fp32 everywhere: the demo's numbers must not depend on whether this CPU or GPU has bf16 units.
        precision="fp32",
        heatmaps=True,
        epochs=epochs,
        quiet=quiet,
        force=force,
        cache=cache,
    )
    result = run_pipeline(options)
    report = write_report([result.run_dir], out_dir / DEMO_REPORT, ReportOptions(quiet=quiet))
    return DemoResult(data_dir=data_dir, run=result, heatmaps_dir=result.run_dir / HEATMAPS_DIR, report=report)


def show_demo_summary(result: DemoResult) -> dict[str, Any]:
    """The demo's table on stderr, titled as a random-weights demonstration when it is one."""
    document = load_metrics(result.run.run_dir)
    if document["info"].get("random_weights"):
        err_console.print(
            "[bold]iipad demo — RANDOM-WEIGHTS DEMONSTRATION[/] (tiny backbone): a plumbing check of the "
            "whole pipeline, not IIPAD's accuracy; the defects are found by the visual memory bank "
            "comparing random-projection patch features with the normal shots.",
            highlight=False,
        )
    else:
        err_console.print(f"[bold]iipad demo[/] — backbone {document['info'].get('backbone_id')}", highlight=False)
    show_table([result.run.run_dir])
    err_console.print(f"heatmaps (image | anomaly map | ground truth): {result.heatmaps_dir}", highlight=False)
    err_console.print(f"report (curves, histograms, worst cases; open in a browser): {result.report}", highlight=False)
    err_console.print(f"data: {result.data_dir}  ·  run directory: {result.run.run_dir}", highlight=False)
    return document
