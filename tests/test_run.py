"""`iipad run` and `iipad demo`: the whole pipeline, stage skipping by the manifest, --seeds."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iipad_cli import digests
from iipad_cli.artifacts import METRICS_JSON, read_manifest, record_stage, sha256_file
from iipad_cli.cli import app
from iipad_cli.pipeline import EXTRACT
from iipad_cli.pipeline.run_options import stage_options
from iipad_cli.stages import run as run_stage
from iipad_cli.stages.run import RunOptions, RunResult, parse_seeds, stage_staleness

STAGES = ("extract", "train", "bank", "score", "metrics")
# `iipad demo`'s defaults, spelled out so `iipad run` can be asked for exactly the same run.
BASE_ARGS = ["--shots", "2", "--backbone", "tiny", "--device", "cpu", "--quiet"]
DEMO_RUN_ARGS = [*BASE_ARGS, "--epochs", "5", "--heatmaps"]
# A copied run's heatmaps path differs, which would rerun score; so the copies are run without.
COPY_ARGS = [*BASE_ARGS, "--epochs", "5"]


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _stage_entries(run_dir: Path) -> dict[str, str]:
    return {name: entry["finished_at"] for name, entry in read_manifest(run_dir)["stages"].items() if name in STAGES}


def _last_run_stages(run_dir: Path) -> dict[str, str]:
    return read_manifest(run_dir)["stages"]["run"]["stages"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("demo")
    result = _invoke(["demo", "-o", str(out), "--device", "cpu"])
    return out, result


def test_demo_end_to_end(demo: tuple[Path, object]) -> None:
    out, result = demo
    run_dir = out / "run-tiny"
    assert result.stdout.strip() == str(run_dir)
    assert "RANDOM-WEIGHTS DEMONSTRATION" in result.stderr
    assert "random weights" in result.stderr
    assert str(run_dir / "heatmaps") in result.stderr
    for name in ("features.h5", "generator.safetensors", "banks.safetensors", "scores.h5", METRICS_JSON):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "heatmaps").rglob("*.png"))) == 30
    document = json.loads((run_dir / METRICS_JSON).read_text())
    assert document["info"]["random_weights"] is True
    assert sorted(document["classes"]) == ["granite", "weave", "wood"]
    assert all(stage == "ran: not run yet" for stage in _last_run_stages(run_dir).values())
    assert (out / "report.html").is_file() and str(out / "report.html") in result.stderr


def test_demo_report_renders_in_a_browser(demo: tuple[Path, object], tmp_path: Path) -> None:
    """`iipad demo` writes demo/report.html: each class's curves, histogram and 3 + 3 worst cases."""
    from test_report import assert_renders, parse

    report = demo[0] / "report.html"
    html = report.read_text(encoding="utf-8")
    assert all(f'id="class-{name}"' in html for name in ("granite", "weave", "wood"))
    assert len(parse(html).images) == 3 * (3 + 3)
    assert "random weights" in html
    assert_renders(report, tmp_path)


def test_demo_defects_are_found_with_random_weights(demo: tuple[Path, object]) -> None:
    """A sanity floor, far below what the demo prints (pixel AUROC ≈ 0.92, image AUROC ≈ 0.93):
    random-projection patch features still separate the painted defects from the textures."""
    document = json.loads((demo[0] / "run-tiny" / METRICS_JSON).read_text())
    assert document["mean"]["pixel_auroc"]["value"] > 0.7
    assert document["mean"]["image_auroc"]["value"] > 0.7


def test_second_run_redoes_nothing_and_gives_the_same_metrics(demo: tuple[Path, object]) -> None:
    out, _ = demo
    run_dir = out / "run-tiny"
    before = _stage_entries(run_dir)
    metrics_before = sha256_file(run_dir / METRICS_JSON)
    result = _invoke(["run", str(out / "data"), "-o", str(run_dir), *DEMO_RUN_ARGS])
    assert result.stdout.strip() == str(run_dir)
    assert _stage_entries(run_dir) == before
    assert _last_run_stages(run_dir) == {stage: "skipped: current" for stage in STAGES}
    assert sha256_file(run_dir / METRICS_JSON) == metrics_before
    assert "AUROC" in result.stderr and "F1-max" in result.stderr  # the table (headers wrap at 80 columns)


def test_a_cached_run_reads_each_file_at_most_once(demo: tuple[Path, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage lists features.h5 as an input or output; a cached run hashes it once in all."""
    out, _ = demo
    run_dir = out / "run-tiny"
    for path in run_dir.rglob("*"):
        if path.is_file():  # old enough for the digest cache to trust (see digests.RACY_NS)
            stamp = path.stat().st_mtime_ns - 60_000_000_000
            os.utime(path, ns=(stamp, stamp))
    reads: Counter = Counter()
    real = digests.read_digest

    def counting(path: Path) -> str:
        reads[Path(path).resolve()] += 1
        return real(path)

    digests.clear_memory()
    monkeypatch.setattr(digests, "read_digest", counting)
    _invoke(["run", str(out / "data"), "-o", str(run_dir), *DEMO_RUN_ARGS])
    digests.clear_memory()
    assert _last_run_stages(run_dir) == {stage: "skipped: current" for stage in STAGES}
    assert reads[(run_dir / "features.h5").resolve()] == 1
    assert max(reads.values()) == 1, reads


def test_changing_the_preset_reruns_train_bank_score_and_metrics_only(demo: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = demo
    run_dir = tmp_path / "copy"
    shutil.copytree(out / "run-tiny", run_dir)
    before = _stage_entries(run_dir)
    # One epoch keeps the test short; the preset is the first option train reports as changed.
    _invoke(["run", str(out / "data"), "-o", str(run_dir), *BASE_ARGS, "--epochs", "1", "--preset", "paper"])
    after = _stage_entries(run_dir)
    assert after["extract"] == before["extract"]
    assert _last_run_stages(run_dir)["extract"] == "skipped: current"
    assert all(_last_run_stages(run_dir)[stage].startswith("ran:") for stage in ("train", "bank", "score", "metrics"))
    assert "option preset changed" in _last_run_stages(run_dir)["train"]
    assert read_manifest(run_dir)["stages"]["train"]["options"]["preset"] == "paper"
    assert json.loads((run_dir / METRICS_JSON).read_text())["info"]["preset"] == "paper"


def test_a_deleted_output_reruns_only_its_stage(demo: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = demo
    run_dir = tmp_path / "copy"
    shutil.copytree(out / "run-tiny", run_dir)
    (run_dir / METRICS_JSON).unlink()
    _invoke(["run", str(out / "data"), "-o", str(run_dir), *COPY_ARGS])
    stages = _last_run_stages(run_dir)
    assert stages["metrics"] == f"ran: {METRICS_JSON} missing"
    assert all(stages[stage] == "skipped: current" for stage in ("extract", "train", "bank", "score"))


def test_deleted_heatmaps_rerun_score(demo: tuple[Path, object]) -> None:
    """The heatmap folder is not hashed in the manifest, so it is checked for by name."""
    out, _ = demo
    run_dir = out / "run-tiny"
    shutil.rmtree(run_dir / "heatmaps")
    _invoke(["run", str(out / "data"), "-o", str(run_dir), *DEMO_RUN_ARGS])
    stages = _last_run_stages(run_dir)
    assert stages["score"] == "ran: heatmaps/ missing"
    assert all(stages[stage] == "skipped: current" for stage in ("extract", "train", "bank"))
    assert len(list((run_dir / "heatmaps").rglob("*.png"))) == 30


def test_new_images_in_the_data_make_extract_stale(demo: tuple[Path, object]) -> None:
    out, _ = demo
    options = RunOptions(data=out / "data", shots=2, run_dir=out / "run-tiny", backbone="tiny", epochs=5)
    extract = stage_options(EXTRACT, options, options.run_dir)
    assert stage_staleness(options.run_dir, "extract", extract.key(options.run_dir)) is None
    extra = out / "data" / "wood" / "test" / "good" / "999.png"
    shutil.copy(out / "data" / "wood" / "test" / "good" / "000.png", extra)
    try:
        reason = stage_staleness(options.run_dir, "extract", extract.key(options.run_dir))
    finally:
        extra.unlink()
    assert reason is not None and reason.startswith("option samples_sha256 changed")


def test_seeds_run_sibling_directories_and_print_mean_and_std(
    demo: tuple[Path, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--seeds runs one pipeline per seed in RUN-seed<N> and combines their metrics.

    The pipeline itself is replaced by a copy of the demo's metrics (the demo test covers the
    real one), which keeps this test about the sweep: directories, seeds, stdout, the table.
    """
    metrics = (demo[0] / "run-tiny" / METRICS_JSON).read_text()
    calls: list[RunOptions] = []

    def fake_pipeline(options: RunOptions) -> RunResult:
        calls.append(options)
        options.run_dir.mkdir(parents=True)
        (options.run_dir / METRICS_JSON).write_text(metrics)
        return RunResult(run_dir=options.run_dir)

    monkeypatch.setattr(run_stage, "run_pipeline", fake_pipeline)
    base = tmp_path / "sweep"
    result = _invoke(["run", "data", "--shots", "1", "-o", str(base), "--backbone", "tiny", "--seeds", "0,1", "--quiet"])
    dirs = [tmp_path / "sweep-seed0", tmp_path / "sweep-seed1"]
    assert result.stdout.split() == [str(d) for d in dirs]
    assert [(c.seed, c.run_dir, c.shots) for c in calls] == [(0, dirs[0], 1), (1, dirs[1], 1)]
    assert "mean ± std over 2 runs" in " ".join(result.stderr.split())
    assert not base.exists()


def _entry(run_dir: Path, stage: str, inputs: dict[str, str], outputs: list[str], options: dict) -> None:
    record_stage(
        run_dir, stage, options=options, inputs=inputs, outputs={n: sha256_file(run_dir / n) for n in outputs}, seconds=0.0
    )


def test_staleness_reasons(tmp_path: Path) -> None:
    """Each way a stage can be out of date, against a hand-written manifest."""
    (tmp_path / "a.bin").write_bytes(b"input")
    (tmp_path / "b.bin").write_bytes(b"output")
    assert stage_staleness(tmp_path, "s", {}) == "not run yet"
    _entry(tmp_path, "s", {"a.bin": sha256_file(tmp_path / "a.bin")}, ["b.bin"], {"preset": "official", "path": Path("x")})
    assert stage_staleness(tmp_path, "s", {"preset": "official", "path": Path("x")}) is None
    assert stage_staleness(tmp_path, "s", {"preset": "official"}) is None
    assert stage_staleness(tmp_path, "s", {"preset": "paper"}) == "option preset changed ('official' -> 'paper')"
    assert stage_staleness(tmp_path, "s", {"epochs": 3}) == "option epochs not recorded"
    (tmp_path / "a.bin").write_bytes(b"other input")
    assert stage_staleness(tmp_path, "s", {}) == "input a.bin changed"
    (tmp_path / "a.bin").unlink()
    assert stage_staleness(tmp_path, "s", {}) is None
    (tmp_path / "b.bin").write_bytes(b"edited output")
    assert stage_staleness(tmp_path, "s", {}) == "b.bin changed since s wrote it"
    (tmp_path / "b.bin").unlink()
    assert stage_staleness(tmp_path, "s", {}) == "b.bin missing"


def test_parse_seeds() -> None:
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    result = CliRunner().invoke(app, ["run", "x", "--shots", "1", "--seeds", "0,a"])
    assert result.exit_code == 2  # bad usage
    assert "--seeds '0,a'" in result.stderr
