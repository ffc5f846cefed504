"""Decisions with the label-free thresholds (tiny backbone, random weights, real fixtures): `score`
writes RUN/thresholds.json, `predict` writes labels, normalised scores, the thresholds used and a
binary mask per image, at the run's resolution or the image's own (`--resolution native`)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from iipad_cli.artifacts import MANIFEST_FILE, sha256_file
from iipad_cli.cli import app
from iipad_cli.schema.banks import load_banks
from iipad_cli.schema.thresholds import THRESHOLDS_FILE, load_thresholds
from iipad_cli.thresholds import category_thresholds

runner = CliRunner()
TIRE = "tire/test/cut/001.png"  # 600 x 800, not square
BOTTLE = "bottle/test/good/003.png"


def _invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def run(scored_run_2shot: Path) -> Path:
    return scored_run_2shot


def _predict(run: Path, inputs: list[str], out: Path, *extra: str) -> list[dict[str, str]]:
    code, stdout, stderr = _invoke("predict", str(run), *inputs, "-o", str(out), "--quiet", "--device", "cpu", *extra)
    assert code == 0, stderr
    assert stdout.strip() == str(out / "predictions.csv")
    with (out / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_score_writes_thresholds_and_records_them(run: Path) -> None:
    thresholds = load_thresholds(run / THRESHOLDS_FILE)
    assert thresholds.method == "leave-one-out" and len(thresholds.images) == 4
    images = thresholds.images
    assert thresholds.categories == category_thresholds(
        [i.image_score for i in images], [i.map_max for i in images], [i.category for i in images]
    )
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    assert manifest["stages"]["score"]["outputs"][THRESHOLDS_FILE] == sha256_file(run / THRESHOLDS_FILE)
    document = json.loads((run / THRESHOLDS_FILE).read_text())
    assert document["rule"]["z"] == 3.0 and "pooled" in document["rule"]["image"]


def test_predict_labels_normalised_scores_and_masks_follow_the_thresholds(
    run: Path, shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rows = _predict(run, [str(shared_data / "mvtec" / TIRE), str(shared_data / "mvtec" / BOTTLE)], out)
    document = json.loads((run / THRESHOLDS_FILE).read_text())
    banks = load_banks(run / "banks.safetensors")
    class_of = dict(zip(banks.paths, banks.classes))
    assert [r["path"] for r in rows] == [str(shared_data / "mvtec" / TIRE), str(shared_data / "mvtec" / BOTTLE)]
    for row in rows:
        category = class_of[row["retrieved"].split(";")[0]]
        values = document["categories"][category]
        score = float(row["image_score"])
        assert row["category"] == category
        assert float(row["image_threshold"]) == values["image_threshold"]
        assert float(row["pixel_threshold"]) == values["pixel_threshold"]
        assert row["label"] == ("anomalous" if score > values["image_threshold"] else "normal")
        expected = (score - values["image_mean"]) / (values["image_threshold"] - values["image_mean"])
        assert float(row["normalised_score"]) == pytest.approx(expected, rel=1e-12)
        name = Path(row["path"]).stem
        score_map = np.load(out / f"{name}.npy")
        assert score_map.shape == (224, 224)
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, score_map > values["pixel_threshold"])
        assert float(row["anomalous_pixel_fraction"]) == pytest.approx(float((score_map > values["pixel_threshold"]).mean()))
    recorded = json.loads((out / "predict.json").read_text())["thresholds"]
    assert recorded["categories"] == document["categories"] and recorded["image_override"] is None


def test_threshold_options_override_both_thresholds(run: Path, shared_data: Path, tmp_path: Path) -> None:
    document = json.loads((run / THRESHOLDS_FILE).read_text())
    above_every_mean = max(v["image_mean"] for v in document["categories"].values()) + 0.01
    out = tmp_path / "out"
    rows = _predict(
        run, [str(shared_data / "mvtec" / TIRE)], out, "--threshold", repr(above_every_mean), "--pixel-threshold", "0.5"
    )
    row = rows[0]
    mean = document["categories"][row["category"]]["image_mean"]
    score = float(row["image_score"])
    assert float(row["image_threshold"]) == above_every_mean and float(row["pixel_threshold"]) == 0.5
    assert row["label"] == ("anomalous" if score > above_every_mean else "normal")
    assert float(row["normalised_score"]) == pytest.approx((score - mean) / (above_every_mean - mean))
    mask = np.asarray(Image.open(out / "masks" / f"{Path(TIRE).stem}.png")) == 255
    assert np.array_equal(mask, np.load(out / f"{Path(TIRE).stem}.npy") > 0.5)


def test_a_threshold_below_a_normal_mean_is_refused(run: Path, shared_data: Path, tmp_path: Path) -> None:
    document = json.loads((run / THRESHOLDS_FILE).read_text())
    below = min(v["image_mean"] for v in document["categories"].values()) - 1.0
    code, _, stderr = _invoke(
        "predict", str(run), str(shared_data / "mvtec" / TIRE), "-o", str(tmp_path / "o"), "--threshold", repr(below)
    )
    assert code == 1 and "not above the normal mean" in stderr and len(stderr.strip().splitlines()) == 1


def test_native_resolution_maps_and_masks_have_the_image_size(run: Path, shared_data: Path, tmp_path: Path) -> None:
    at_224 = tmp_path / "r224"
    native = tmp_path / "native"
    _predict(run, [str(shared_data / "mvtec" / TIRE)], at_224)
    rows = _predict(run, [str(shared_data / "mvtec" / TIRE)], native, "--resolution", "native")
    name = Path(TIRE).stem
    width, height = Image.open(shared_data / "mvtec" / TIRE).size
    big = np.load(native / f"{name}.npy")
    assert big.shape == (height, width) == (800, 600)
    # Independent upsampling: torch's bilinear with pixel-centre alignment (align_corners=False).
    small = torch.from_numpy(np.load(at_224 / f"{name}.npy"))[None, None]
    expected = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.allclose(big, expected, atol=1e-5)
    mask = np.asarray(Image.open(native / "masks" / f"{name}.png")) == 255
    assert mask.shape == (800, 600) and np.array_equal(mask, big > float(rows[0]["pixel_threshold"]))
    assert json.loads((native / "predict.json").read_text())["resolution"] == "native"


def test_predict_needs_the_thresholds_file(run: Path, shared_data: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(THRESHOLDS_FILE))
    code, _, stderr = _invoke("predict", str(copy), str(shared_data / "mvtec" / TIRE), "-o", str(tmp_path / "o"))
    assert code == 1 and THRESHOLDS_FILE in stderr and "iipad score" in stderr


def test_score_adds_normal_images_to_the_calibration(run: Path, shared_data: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    extra = shared_data / "mvtec" / "bottle" / "test" / "good"
    code, _, stderr = _invoke("score", str(copy), "--normal", str(extra), "--quiet", "--device", "cpu")
    assert code == 0, stderr
    thresholds = load_thresholds(copy / THRESHOLDS_FILE)
    added = [i.path for i in thresholds.images if i.source == "--normal"]
    assert added == [str(p) for p in sorted(extra.iterdir())]
    assert len(thresholds.images) == 4 + len(added)


def _written_out_prf(truth: list[bool], predicted: list[bool]) -> tuple[float | None, float | None, float | None]:
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
    return precision, recall, f1


def _close(actual: float | None, expected: float | None) -> bool:
    return actual is None if expected is None else actual == pytest.approx(expected, rel=1e-12)


def test_metrics_report_precision_recall_f1_at_the_label_free_thresholds(run: Path, tmp_path: Path) -> None:
    import h5py

    code, stdout, stderr = _invoke("metrics", str(run), "--json", "--quiet")
    assert code == 0, stderr
    section = json.loads(stdout)["at_threshold"]
    thresholds = json.loads((run / THRESHOLDS_FILE).read_text())
    with h5py.File(run / "scores.h5", "r") as handle:
        names = [str(c) for c in handle["cls"].asstr()[()]]
        labels = handle["label"][()].tolist()
        scores = handle["image_score"][()].tolist()
        top1 = handle["retrieved"][:, 0].tolist()
        has_mask = handle["has_mask"][()].tolist()
        maps = handle["maps"][()]
    with h5py.File(run / "features.h5", "r") as handle:
        masks = handle["test"]["mask"][()]
    for name in ("bottle", "tire"):
        rows = [i for i, c in enumerate(names) if c == name]
        levels = [thresholds["categories"][thresholds["bank_classes"][top1[i]]] for i in rows]
        expected = _written_out_prf(
            [labels[i] == 1 for i in rows], [scores[i] > lv["image_threshold"] for i, lv in zip(rows, levels)]
        )
        cells = section["classes"][name]
        assert all(_close(cells[k], e) for k, e in zip(("image_precision", "image_recall", "image_f1"), expected))
        truth: list[bool] = []
        predicted: list[bool] = []
        for i, level in zip(rows, levels):
            if has_mask[i]:
                truth += masks[i].ravel().tolist()
                predicted += (maps[i].ravel() > level["pixel_threshold"]).tolist()
        expected = _written_out_prf(truth, predicted)
        assert all(_close(cells[k], e) for k, e in zip(("pixel_precision", "pixel_recall", "pixel_f1"), expected))
    code, stdout, _ = _invoke("metrics", str(run), "--csv", "--quiet")
    header = stdout.splitlines()[0].split(",")
    assert "image_f1_at_threshold" in header and "pixel_precision_at_threshold" in header
    # A second run of the same experiment (another training seed): metrics refuses a run given twice.
    other = tmp_path / "seed1"
    shutil.copytree(run, other)
    for step in (("train", str(other), "--seed", "1", "--epochs", "1", "--force"), ("bank", str(other)), ("score", str(other))):
        code, _, stderr = _invoke(*step, "--quiet", "--device", "cpu")
        assert code == 0, stderr
    code, stdout, _ = _invoke("metrics", str(other), "--json", "--quiet")
    other_f1 = json.loads(stdout)["at_threshold"]["mean"]["image_f1"]["value"]
    code, stdout, _ = _invoke("metrics", str(run), str(other), "--json", "--quiet")
    combined = json.loads(stdout)["at_threshold"]
    assert combined["mean"]["image_f1"]["per_run"] == [section["mean"]["image_f1"]["value"], other_f1]


def test_iipad_run_offers_the_normal_images_option() -> None:
    code, stdout, _ = _invoke("run", "--help")
    assert code == 0 and "--normal" in stdout


def test_the_threshold_table_shows_percent_and_the_classes_each_mean_covers(run: Path) -> None:
    import io

    from rich.console import Console

    from iipad_cli.reporting.decisions import to_table

    code, stdout, _ = _invoke("metrics", str(run), "--json", "--quiet")
    section = json.loads(stdout)["at_threshold"]
    buffer = io.StringIO()
    Console(file=buffer, width=250).print(to_table(section))
    mean_row = next(line for line in buffer.getvalue().splitlines() if line.startswith("│ mean"))
    cells = [cell.strip() for cell in mean_row.strip("│").split("│")][1:]
    for key, cell in zip(("image_precision", "image_recall", "image_f1", "pixel_precision", "pixel_recall", "pixel_f1"), cells):
        mean = section["mean"][key]
        expected = "n/a" if mean["value"] is None else f"{100 * mean['value']:.1f} ({mean['classes']}/{mean['of']})"
        assert cell == expected
