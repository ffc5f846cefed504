"""`iipad run`: extract → train → bank → score → metrics, skipping every stage that is current.

A stage is *current* when the manifest (`RUN/manifest.json`, written by each stage through
`artifacts.record_stage`) has an entry for it whose recorded options agree with the ones this run
would pass, whose outputs still exist with the recorded sha256, and whose inputs (the artifacts of
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from iipad_cli.artifacts import (
    BANKS_FILE,
    FEATURES_FILE,
    GENERATOR_FILE,
    HEATMAPS_DIR,
    METRICS_JSON,
    SCORES_FILE,
    read_manifest,
    record_stage,
    sha256_file,
)
from iipad_cli.errors import IipadError
from iipad_cli.ui import err_console, log

@dataclass(frozen=True)
class RunOptions:
    """Everything `iipad run` passes on to the stages (the shared options of design.md §1)."""

    data: Path
    shots: int
    run_dir: Path
    backbone: str = "vit-l-14"
    weights: Path | None = None
    preset: str = "official"
    seed: int = 0
    device: str = "auto"
    heatmaps: bool = False
    epochs: int | None = None
    quiet: bool = False
    force: bool = False


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


@dataclass(frozen=True)
class _Stage:
    name: str
    # The options that decide the stage's result, as the stage records them in the manifest.
    key_options: Callable[[RunOptions], dict[str, Any]]
    # Runs the stage; the flag says whether an earlier output of it exists (to be replaced).
    call: Callable[[RunOptions, bool], None]
    outputs: tuple[str, ...]
    # Outputs the manifest does not hash (the heatmap folder): why they are missing, or None.
    missing: Callable[[RunOptions], str | None] = lambda options: None


def _weights(options: RunOptions) -> str | None:
    return str(options.weights) if options.weights is not None else None


def _extract_options(options: RunOptions) -> dict[str, Any]:
    from iipad_cli.data.layouts import load_dataset
    from iipad_cli.stages.extract import listing_digest

    dataset = load_dataset(options.data)
    return {
        "data": str(dataset.root),
        # A data folder that gained or lost images (or masks) makes the features stale.
        "samples_sha256": listing_digest(dataset),
        "shots": options.shots,
        "backbone": options.backbone,
        "weights": _weights(options),
        "shot_policy": "random",
        "seed": options.seed,
        "resolution": 224,
    }


def _call_extract(options: RunOptions, replace_existing: bool) -> None:
    from iipad_cli.stages.extract import ExtractOptions, run_extract

    run_extract(
        ExtractOptions(
            data=options.data,
            shots=options.shots,
            output=options.run_dir,
            backbone=options.backbone,
            weights=options.weights,
            seed=options.seed,
            device=options.device,
            # Replacing a stale features.h5 needs force; a missing one may have a partial to resume.
            force=options.force or replace_existing,
            quiet=options.quiet,
        )
    )


def _train_stage_options(options: RunOptions, force: bool = False) -> Any:
    from iipad_cli.stages.train import TrainOptions

    return TrainOptions(
        preset=options.preset,
        epochs=options.epochs,
        seed=options.seed,
        weights=options.weights,
        device=options.device,
        force=force,
        quiet=options.quiet,
    )


def _train_options(options: RunOptions) -> dict[str, Any]:
    from iipad_cli.stages.train import effective_preset, recorded_options

    train_options = _train_stage_options(options)
    return recorded_options(train_options, effective_preset(train_options))


def _call_train(options: RunOptions, replace_existing: bool) -> None:
    from iipad_cli.stages.train import train

    # Retraining on new features is the point of rerunning; train refuses it without force.
    train(options.run_dir, _train_stage_options(options, force=options.force or replace_existing))


def _bank_options(options: RunOptions) -> dict[str, Any]:
    from iipad_cli.stages.bank import BankOptions

    return {"batch_size": BankOptions.batch_size, "seed": options.seed, "weights": _weights(options)}


def _call_bank(options: RunOptions, replace_existing: bool) -> None:
    from iipad_cli.stages.bank import BankOptions, build_banks

    build_banks(
        options.run_dir,
        BankOptions(seed=options.seed, weights=options.weights, device=options.device, force=options.force, quiet=options.quiet),
    )


def _heatmaps_dir(options: RunOptions) -> Path:
    return options.run_dir / HEATMAPS_DIR


def _score_options(options: RunOptions) -> dict[str, Any]:
    from iipad_cli.stages.score import ScoreOptions

    key: dict[str, Any] = {
        "top_k": options.shots,
        "sigma": ScoreOptions.sigma,
        "batch_size": ScoreOptions.batch_size,
        "seed": options.seed,
        "weights": _weights(options),
    }
    # Heatmaps only matter when asked for: a run without --heatmaps reuses scores that have them.
    if options.heatmaps:
        key["heatmaps"] = str(_heatmaps_dir(options))
    return key


def _missing_heatmaps(options: RunOptions) -> str | None:
    if options.heatmaps and not _heatmaps_dir(options).is_dir():
        return f"{HEATMAPS_DIR}/ missing"
    return None


def _call_score(options: RunOptions, replace_existing: bool) -> None:
    from iipad_cli.stages.score import ScoreOptions, score_run

    score_run(
        options.run_dir,
        ScoreOptions(
            heatmaps=_heatmaps_dir(options) if options.heatmaps else None,
            seed=options.seed,
            weights=options.weights,
            device=options.device,
            force=options.force,
            quiet=options.quiet,
        ),
    )


def _metrics_options(options: RunOptions) -> dict[str, Any]:
    from iipad_cli.stages.evaluate import EvaluateOptions

    return EvaluateOptions().recorded()


def _call_metrics(options: RunOptions, replace_existing: bool) -> None:
    from iipad_cli.stages.evaluate import EvaluateOptions, evaluate_run

    evaluate_run(options.run_dir, EvaluateOptions(force=options.force, quiet=options.quiet))


STAGES: tuple[_Stage, ...] = (
    _Stage("extract", _extract_options, _call_extract, (FEATURES_FILE,)),
    _Stage("train", _train_options, _call_train, (GENERATOR_FILE,)),
    _Stage("bank", _bank_options, _call_bank, (BANKS_FILE,)),
    _Stage("score", _score_options, _call_score, (SCORES_FILE,), _missing_heatmaps),
    _Stage("metrics", _metrics_options, _call_metrics, (METRICS_JSON,)),
)


def run_pipeline(options: RunOptions) -> RunResult:
    """Run the five stages in order into `options.run_dir`, skipping the current ones."""
    if options.shots < 1:
        raise IipadError(f"--shots must be at least 1, got {options.shots}")
    run_dir = Path(options.run_dir)
    options = replace(options, run_dir=run_dir)
    result = RunResult(run_dir=run_dir)
    started = time.perf_counter()
    upstream_ran = False
    for stage in STAGES:
        reason = "--force" if options.force else stage_staleness(run_dir, stage.name, stage.key_options(options))
        if reason is None:
            reason = stage.missing(options)
        if reason is None and upstream_ran:
            reason = "an earlier stage ran"
        if reason is None:
            log(f"[dim]{stage.name}: current, skipped[/]", options.quiet)
            result.outcomes.append(StageOutcome(stage.name, ran=False, reason="current"))
            continue
        log(f"[bold]{stage.name}[/]: running ({reason})", options.quiet)
        stage_started = time.perf_counter()
        stage.call(options, any((run_dir / name).is_file() for name in stage.outputs))
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
        raise IipadError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise IipadError(f"--seeds has repeated values: {seeds}")
    return [run_pipeline(replace(options, seed=seed, run_dir=seed_run_dir(options.run_dir, seed))) for seed in seeds]


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise IipadError(f"--seeds {text!r}: expected comma-separated integers such as 0,1,2") from None


def load_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise IipadError(f"{path}: cannot read the metrics document ({error})") from None


def metrics_document(run_dirs: list[Path]) -> dict[str, Any]:
    """The metrics of one run, or several runs combined into mean ± std by the metrics stage."""
    from iipad_cli.stages.evaluate import combine_runs

    documents = [load_metrics(run_dir) for run_dir in run_dirs]
    return documents[0] if len(documents) == 1 else combine_runs(documents)


def show_table(run_dirs: list[Path]) -> dict[str, Any]:
    """Print the metrics table of the run(s) on stderr (stdout is for the run directories)."""
    from iipad_cli.stages.evaluate import to_table

    document = metrics_document(run_dirs)
    err_console.print(to_table(document))
    return document


DEMO_SHOTS = 2
DEMO_DEFAULT_EPOCHS = 5
DEMO_DATA_DIR = "data"


@dataclass(frozen=True)
class DemoResult:
    data_dir: Path
    run: RunResult
    heatmaps_dir: Path


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
) -> DemoResult:
    """Build the procedurally generated demo data into OUT/data and run the pipeline on it.

    The run directory is `OUT/run-<backbone>`, so a random-weights demo and a real-weights one sit
    side by side. The data set is rebuilt every time (about a second, byte-identical for a seed),
    so cached stages stay current across demo invocations.
    """
    from iipad_cli.demo_data import build_demo_dataset

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
        heatmaps=True,
        epochs=epochs,
        quiet=quiet,
        force=force,
    )
    result = run_pipeline(options)
    return DemoResult(data_dir=data_dir, run=result, heatmaps_dir=result.run_dir / HEATMAPS_DIR)


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
    err_console.print(f"data: {result.data_dir}  ·  run directory: {result.run.run_dir}", highlight=False)
    return document
