"""`iipad metrics` as a pipeline stage: evaluate one run and write RUN/metrics.json and .csv.

The computation lives in `iipad_cli/reporting/` (inputs, per-class document, rendering); this
module writes the files and records the stage in the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iipad_cli.artifacts import (
    FEATURES_FILE,
    METRICS_CSV,
    METRICS_JSON,
    SCORES_FILE,
    record_stage,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from iipad_cli.errors import IipadError
from iipad_cli.pipeline.metrics import EvaluateOptions
from iipad_cli.reporting.decisions import threshold_section
from iipad_cli.reporting.document import build_document, title
from iipad_cli.reporting.inputs import load_run, run_info
from iipad_cli.reporting.render import to_csv
from iipad_cli.runlock import run_lock
from iipad_cli.ui import log, warn


def _warner(document: dict[str, Any], quiet: bool) -> Callable[[str], None]:
    """A warning goes into the document's warnings and to stderr, as the metrics' own do."""

    def warn(message: str) -> None:
        document["warnings"].append(message)
        log(f"[yellow]warning:[/] {message}", quiet)

    return warn


def evaluate_run(run_dir: Path, options: EvaluateOptions) -> dict[str, Any]:
    """Metrics of one run; writes RUN/metrics.json and RUN/metrics.csv and records the stage
    (or warns, when they cannot be written: the caller prints the numbers all the same)."""
    options.validate()
    run_dir = Path(run_dir)
    started = time.perf_counter()
    classes, attrs, resolution, features_sha256 = load_run(run_dir, options)
    source = {"kind": "run", "run": str(run_dir.resolve())}
    document = build_document(classes, options, source, run_info(attrs), resolution)
    document["at_threshold"] = threshold_section(
        run_dir, run_dir / SCORES_FILE, classes, options.image_score, _warner(document, options.quiet)
    )
    document["title"] = title(document)
    seconds = time.perf_counter() - started
    images = sum(c["images"] for c in document["classes"].values())
    log(f"metrics: {run_dir} — {images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.1f} images/s)", options.quiet)
    try:
        _save(run_dir, document, options, features_sha256, seconds)
    except IipadError as error:
        # The numbers still go to stdout; only the files beside the run are missing.
        warn(f"results not saved: {error}")
    return document


def _save(run_dir: Path, document: dict[str, Any], options: EvaluateOptions, features_sha256: str, seconds: float) -> None:
    """metrics.json, metrics.csv and the manifest entry, under the run directory's lock."""
    images = sum(c["images"] for c in document["classes"].values())
    with run_lock(run_dir, "metrics", create=False):
        write_json_atomic(run_dir / METRICS_JSON, document)
        write_text_atomic(run_dir / METRICS_CSV, to_csv(document))
        record_stage(
            run_dir,
            "metrics",
            options=options.recorded(),
            inputs={SCORES_FILE: sha256_file(run_dir / SCORES_FILE), FEATURES_FILE: features_sha256},
            outputs={METRICS_JSON: sha256_file(run_dir / METRICS_JSON), METRICS_CSV: sha256_file(run_dir / METRICS_CSV)},
            seconds=seconds,
            extra={"images_per_second": images / max(seconds, 1e-9)},
        )
