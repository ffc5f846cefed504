"""`iipad run --shots 1,2 --seeds 0,1`: the (K, seed) grid on the fixtures, each distinct image
encoded once, a repeated grid encoding nothing, RUN-summary.csv, and changed image bytes noticed."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from iipad_cli.artifacts import read_manifest
from iipad_cli.cli import app

ARGS = ["--backbone", "tiny", "--device", "cpu", "--epochs", "1", "--workers", "0", "-q"]
METRICS = ("image_auroc", "pixel_auroc")
GRID = ["--classes", "tile_a,tile_b", "--shots", "1,2", "--seeds", "0,1"]


def _run(*args: str):
    return CliRunner().invoke(app, ["run", *args, *ARGS])


def _used_files(run_dir: Path, data: Path) -> set[Path]:
    with h5py.File(run_dir / "features.h5", "r") as handle:
        return {data / p for split in ("train", "test") for p in handle[split]["path"].asstr()[...]}


@pytest.fixture(scope="module")
def grid(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("grid") / "RUN"
    result = _run(*GRID, str(shared_data / "visa"), "-o", str(out), "--cache", str(out.with_name("store")))
    assert result.exit_code == 0, result.output
    return out, result


def test_grid_directories_and_each_distinct_image_encoded_once(grid: tuple[Path, object], shared_data: Path) -> None:
    out, result = grid
    dirs = [out.with_name(f"RUN-{k}shot-seed{s}") for k in (1, 2) for s in (0, 1)]
    assert result.stdout.split() == [str(d) for d in dirs]
    entries = [read_manifest(d)["stages"]["extract"] for d in dirs]
    used = set().union(*(_used_files(d, shared_data / "visa") for d in dirs))
    distinct_contents = {hashlib.sha256(p.read_bytes()).hexdigest() for p in used}
    assert sum(e["images_encoded"] for e in entries) == len(used) == len(distinct_contents)
    for directory, entry in zip(dirs, entries):
        assert entry["images_encoded"] + entry["images_from_store"] == len(_used_files(directory, shared_data / "visa"))
        # No copy of the features in the run directory.
        with h5py.File(directory / "features.h5", "r") as handle:
            assert all(handle[s][f].is_virtual for s in ("train", "test") for f in ("cls_token", "qformer", "vv", "mem"))
    assert result.stderr.count("mean ± std over 2 runs") == 2


def test_summary_csv_holds_mean_and_std_per_shots_and_class(grid: tuple[Path, object]) -> None:
    out, _ = grid
    with (out.with_name("RUN-summary.csv")).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["shots"], r["class"]) for r in rows] == [
        ("1", "tile_a"), ("1", "tile_b"), ("1", "mean"), ("2", "tile_a"), ("2", "tile_b"), ("2", "mean")
    ]
    for row in rows:
        k = int(row["shots"])
        documents = [json.loads((out.with_name(f"RUN-{k}shot-seed{s}") / "metrics.json").read_text()) for s in (0, 1)]
        for metric in METRICS:
            if row["class"] == "mean":
                values = [d["mean"][metric]["value"] for d in documents]
            else:
                values = [d["classes"][row["class"]][metric] for d in documents]
            assert float(row[f"{metric}_mean"]) == pytest.approx(sum(values) / 2)
            assert float(row[f"{metric}_std"]) == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2))
        assert row["runs"] == "2"


def test_repeated_grid_encodes_nothing(grid: tuple[Path, object], shared_data: Path) -> None:
    out, _ = grid
    store = ["--cache", str(out.with_name("store"))]
    again = _run(*GRID, str(shared_data / "visa"), "-o", str(out), *store)
    assert again.exit_code == 0, again.output
    for k in (1, 2):
        for s in (0, 1):
            manifest = read_manifest(out.with_name(f"RUN-{k}shot-seed{s}"))
            assert manifest["stages"]["run"]["stages"]["extract"] == "skipped: current"
    # Into new run directories, the store serves every image.
    fresh = out.with_name("FRESH")
    third = _run(*GRID, str(shared_data / "visa"), "-o", str(fresh), *store)
    assert third.exit_code == 0, third.output
    for k in (1, 2):
        for s in (0, 1):
            assert read_manifest(fresh.with_name(f"FRESH-{k}shot-seed{s}"))["stages"]["extract"]["images_encoded"] == 0


def test_single_shots_value_keeps_seed_directories(shared_data: Path, tmp_path: Path) -> None:
    result = _run(str(shared_data / "visa"), "--classes", "tile_b", "--shots", "1", "--seeds", "0,1", "-o", str(tmp_path / "R"))
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "R-seed0"), str(tmp_path / "R-seed1")]
    assert (tmp_path / "R-summary.csv").read_text().startswith("shots,class,")


def test_bad_shots_list_is_one_line(shared_data: Path, tmp_path: Path) -> None:
    for shots, message in (("1,x", "--shots '1,x': expected comma-separated integers"), ("1,1", "--shots has repeated values")):
        result = _run(str(shared_data / "visa"), "--shots", shots, "--seeds", "0", "-o", str(tmp_path / "R"))
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_run_notices_changed_image_bytes(shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shared_data / "mvtec" / "bottle", data / "bottle")
    run_dir = tmp_path / "run"
    assert _run(str(data), "--shots", "1", "-o", str(run_dir)).exit_code == 0
    assert _run(str(data), "--shots", "1", "-o", str(run_dir)).exit_code == 0
    assert read_manifest(run_dir)["stages"]["run"]["stages"]["extract"] == "skipped: current"
    image = sorted((data / "bottle" / "test" / "good").iterdir())[1]
    pixels = np.asarray(Image.open(image).convert("RGB")).copy()
    pixels[-4:, -4:] = 0
    Image.fromarray(pixels).save(image)  # same name, new bytes
    result = _run(str(data), "--shots", "1", "-o", str(run_dir))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(run_dir)
    assert manifest["stages"]["run"]["stages"]["extract"].startswith("ran: option content_sha256 changed")
    assert manifest["stages"]["extract"]["images_encoded"] == 1
