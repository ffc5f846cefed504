"""`iipad run`: a generic loop over the declared stages (`iipad_cli/pipeline/`), skipping every
stage that is current.

A stage is *current* when the manifest (`RUN/manifest.json`, written by each stage through
`artifacts.record_stage`) has an entry for it whose recorded options agree with the ones this run
would pass (the stage's `key`), whose outputs still exist with the recorded sha256, and whose inputs (the artifacts of
the stage before it, or the data set for `extract`) still hash to what the stage read. Anything
else reruns the stage, and a rerun stage changes its outputs' hashes, which makes the stages after
it stale in turn — so changing `--preset` reruns train, bank, score and metrics, never extract.

The stages are called as functions, not subprocesses, so one process holds the backbone and the
seeds; `--seeds 0,1,2` runs one shot draw per seed into sibling directories and aggregates them
with the metrics stage's multi-run table (mean ± std).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from iipad_cli.artifacts import METRICS_JSON, read_manifest, record_stage, sha256_file
from iipad_cli.errors import IipadError, UsageError
from iipad_cli.runlock import run_lock
from iipad_cli.pipeline import STAGES
from iipad_cli.pipeline.run_options import RunOptions, stage_options
from iipad_cli.ui import err_console, log

__all__ = ["RunOptions", "RunResult", "StageOutcome", "run_pipeline", "run_seeds", "stage_staleness"]


@dataclass
class StageOutcome:
    """What `iipad run` did with one stage, and why (shown on stderr, stored in the manifest)."""

    stage: str
    ran: bool
    reason: str
    seconds: float = 0.0


@dataclass
class RunResult:
    run_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)


def _jsonable(value: Any) -> Any:
    """The value as it reads back from the manifest (paths and tuples become strings and lists)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _resolve_input(run_dir: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else run_dir / path


def stage_staleness(run_dir: Path, stage: str, options: dict[str, Any]) -> str | None:
    """Why `stage` must run again in `run_dir`, or None when its recorded outputs are current.

    `options` holds only the options that change the stage's result; they are compared with the
    values the stage recorded, so a stage may record more (device, timing) without forcing reruns.
    """
    entry = read_manifest(run_dir).get("stages", {}).get(stage)
    if entry is None:
        return "not run yet"
    recorded = entry.get("options", {})
    for key, value in options.items():
        if key not in recorded:
            return f"option {key} not recorded"
        if _jsonable(recorded[key]) != _jsonable(value):
            return f"option {key} changed ({recorded[key]!r} -> {value!r})"
    for name, digest in entry.get("outputs", {}).items():
        path = run_dir / name
        if not path.is_file():
            return f"{name} missing"
        if sha256_file(path) != digest:
            return f"{name} changed since {stage} wrote it"
    for name, digest in entry.get("inputs", {}).items():
        # Inputs that are not files here (a deleted artifact, a digest of something else) are not
        # checked: a deleted artifact already makes the stage that writes it rerun, and every
        # stage after a rerun stage reruns too (`run_pipeline`).
        path = _resolve_input(run_dir, name)
        if path.is_file() and sha256_file(path) != digest:
            return f"input {name} changed"
    return None


def run_pipeline(options: RunOptions) -> RunResult:
    """Run the stages in order into `options.run_dir`, skipping the current ones.

    Every stage's options are built and checked before the first stage runs, so a bad value for
    a late stage does not surface after an hour of extraction.
    """
    run_dir = Path(options.run_dir)
    options = replace(options, run_dir=run_dir)
    planned = [(stage, stage_options(stage, options, run_dir)) for stage in STAGES]
    for _, stage_opts in planned:
        stage_opts.validate()
    # Held across the stages (each takes it again), so no other process writes the run between them.
    with run_lock(run_dir, "run"):
        return _run_stages(run_dir, options, planned)


def _run_stages(run_dir: Path, options: RunOptions, planned: list[tuple[Any, Any]]) -> RunResult:
    result = RunResult(run_dir=run_dir)
    started = time.perf_counter()
    upstream_ran = False
    for stage, stage_opts in planned:
        reason = "--force" if options.force else stage_staleness(run_dir, stage.name, stage_opts.key(run_dir))
        if reason is None:
            reason = stage_opts.missing(run_dir)
        if reason is None and upstream_ran:
            reason = "an earlier stage ran"
        if reason is None:
            log(f"[dim]{stage.name}: current, skipped[/]", options.quiet)
            result.outcomes.append(StageOutcome(stage.name, ran=False, reason="current"))
            continue
        log(f"[bold]{stage.name}[/]: running ({reason})", options.quiet)
        stage_started = time.perf_counter()
        if stage.replace_needs_force and any((run_dir / name).is_file() for name in stage.outputs):
            # Replacing a stale output is the point of rerunning; the stage refuses it without force.
            stage_opts = replace(stage_opts, force=True)
        stage.run(run_dir, stage_opts)
        upstream_ran = True
        result.outcomes.append(StageOutcome(stage.name, True, reason, round(time.perf_counter() - stage_started, 3)))
    record_stage(
        run_dir,
        "run",
        options=_jsonable(asdict(options)),
        inputs={},
        outputs={},
        seconds=time.perf_counter() - started,
        extra={"stages": {o.stage: ("ran: " + o.reason) if o.ran else "skipped: current" for o in result.outcomes}},
    )
    return result


def seed_run_dir(run_dir: Path, seed: int) -> Path:
    """The sibling directory of one shot draw in a `--seeds` sweep: `RUN-seed<N>`."""
    return run_dir.with_name(f"{run_dir.name}-seed{seed}")


def run_seeds(options: RunOptions, seeds: list[int]) -> list[RunResult]:
    """One full pipeline per seed (a different K-shot draw and training seed each)."""
    if not seeds:
        raise UsageError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds has repeated values: {seeds}")
    return [run_pipeline(replace(options, seed=seed, run_dir=seed_run_dir(options.run_dir, seed))) for seed in seeds]


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated integers such as 0,1,2") from None


def load_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise IipadError(f"{path}: cannot read the metrics document ({error})") from None


def metrics_document(run_dirs: list[Path]) -> dict[str, Any]:
    """The metrics of one run, or several runs combined into mean ± std by the metrics stage."""
    from iipad_cli.reporting.document import combine_runs

    documents = [load_metrics(run_dir) for run_dir in run_dirs]
    return documents[0] if len(documents) == 1 else combine_runs(documents)


def show_table(run_dirs: list[Path]) -> dict[str, Any]:
    """Print the metrics table of the run(s) on stderr (stdout is for the run directories)."""
    from iipad_cli.reporting.render import to_table

    document = metrics_document(run_dirs)
    err_console.print(to_table(document))
    return document
