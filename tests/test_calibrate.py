"""Calibration images for the label-free thresholds (tiny backbone, random weights, real fixtures):
leave-one-out for K >= 2, augmented views for K = 1, extra --normal images, and proof that the
thresholds never depend on the test split (its labels, masks or features)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from iipad_cli.artifacts import FEATURES_FILE
from iipad_cli.cli import app
from iipad_cli.models.anomaly import anomaly_scores, instance_prompts, retrieval_similarity
from iipad_cli.schema.features import FEATURE_FIELDS, read_split
from iipad_cli.stages import calibrate
from iipad_cli.stages._scoring import attach_banks, features_to_device, load_run_models
from iipad_cli.thresholds import category_thresholds, pooled_std

runner = CliRunner()
CPU = torch.device("cpu")


def _build_run(root: Path, data: Path, shots: int) -> Path:
    run_dir = root / f"run{shots}"
    steps = [
        (
            "extract",
            str(data / "mvtec"),
            "--shots",
            str(shots),
            "--backbone",
            "tiny",
            "--classes",
            "bottle,tire",
            "--workers",
            "0",
            "-o",
            str(run_dir),
        ),
        ("train", str(run_dir), "--epochs", "1"),
        ("bank", str(run_dir)),
    ]
    for step in steps:
        result = runner.invoke(app, [*step, "--quiet", "--device", "cpu"])
        assert result.exit_code == 0, f"{step[0]} failed: {result.stderr}"
    return run_dir


@pytest.fixture(scope="module")
def run2(scored_run_2shot: Path) -> Path:
    return scored_run_2shot


@pytest.fixture(scope="module")
def run1(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return _build_run(tmp_path_factory.mktemp("calibrate"), shared_data, 1)


def _models(run_dir: Path, force: bool = False):  # type: ignore[no-untyped-def]
    return attach_banks(load_run_models(run_dir, weights=None, device=CPU, force=force), force)


def _derive(run_dir: Path, normal: list[Path] | None = None, force: bool = False):  # type: ignore[no-untyped-def]
    return calibrate.derive_thresholds(
        _models(run_dir, force),
        run_dir / FEATURES_FILE,
        normal_paths=normal or [],
        top_k=2,
        resolution=224,
        sigma=4.0,
        batch_size=4,
        quiet=True,
    )


def test_leave_one_out_scores_each_shot_against_the_other_shots(run2: Path) -> None:
    models = _models(run2)
    thresholds = _derive(run2)
    train = read_split(run2 / FEATURES_FILE, "train", ("path", "cls", *FEATURE_FIELDS))
    assert thresholds.method == "leave-one-out" and thresholds.top_k == 1  # max(1, top_k − 1)
    assert [image.path for image in thresholds.images] == [str(p) for p in train["path"]]
    assert [image.category for image in thresholds.images] == [str(c) for c in train["cls"]]
    banks = models.banks
    for row, image in enumerate(thresholds.images):
        # The banks without row `row`, concatenated by hand (not through Banks.without).
        def drop(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
            return torch.cat([tensor.narrow(dim, 0, row), tensor.narrow(dim, row + 1, tensor.shape[dim] - row - 1)], dim=dim)

        features = features_to_device({name: train[name][row : row + 1] for name in FEATURE_FIELDS}, CPU)
        cls_token = features["cls_token"][:, models.preset.cls_token_variant]
        with torch.inference_mode():
            prompts = instance_prompts(models.generator, models.backbone.text_encoder, features["qformer"], cls_token)
            expected = anomaly_scores(
                query=features["qformer"],
                cls_token=cls_token,
                vv=features["vv"],
                mem=features["mem"],
                test_prompts=prompts,
                bank_query=drop(banks.query),
                bank_prompts=drop(banks.prompt),
                bank_mem=drop(banks.mem, 1),
                top_k=1,
                temperature=models.preset.temperature,
                formula=models.preset.image_score,
                resolution=224,
                sigma=4.0,
            )
        assert image.image_score == pytest.approx(float(expected.image_score[0]), abs=1e-6)
        assert image.map_max == pytest.approx(float(expected.maps[0].max()), abs=1e-6)


def test_recorded_thresholds_follow_the_rule_from_the_recorded_images(run2: Path) -> None:
    thresholds = _derive(run2)
    scores = [image.image_score for image in thresholds.images]
    names = [image.category for image in thresholds.images]
    assert thresholds.categories == category_thresholds(scores, [image.map_max for image in thresholds.images], names)
    assert thresholds.pooled_std == pytest.approx(pooled_std(scores, names))
    assert set(thresholds.categories) == {"bottle", "tire"}
    assert thresholds.bank_classes == ["bottle", "bottle", "tire", "tire"]


def test_thresholds_do_not_depend_on_the_test_split(run2: Path, tmp_path: Path) -> None:
    """Flip every test label, replace every test mask and every test feature: same thresholds."""
    before = _derive(run2)
    copy = tmp_path / "copy"
    shutil.copytree(run2, copy)
    rng = np.random.default_rng(0)
    with h5py.File(copy / FEATURES_FILE, "r+") as handle:
        test = handle["test"]
        test["label"][...] = 1 - test["label"][()]
        test["mask"][...] = rng.random(test["mask"].shape) > 0.5
        for name in FEATURE_FIELDS:
            test[name][...] = rng.normal(size=test[name].shape).astype(test[name].dtype)
    after = _derive(copy, force=True)  # force: features.h5 changed after training, on purpose
    assert after.categories == before.categories
    assert after.images == before.images


def test_one_shot_uses_six_augmented_views_of_each_shot(run1: Path) -> None:
    thresholds = _derive(run1)
    assert thresholds.method == "augmented views" and thresholds.top_k == 2
    train = read_split(run1 / FEATURES_FILE, "train", ("path", "cls"))
    expected = [
        (str(p), str(c), f"view {name}")
        for p, c in zip(train["path"], train["cls"])
        for name in (*calibrate.CORNERS, *calibrate.BRIGHTNESS)
    ]
    assert [(i.path, i.category, i.source) for i in thresholds.images] == expected
    assert len({i.image_score for i in thresholds.images}) == len(expected)  # six different images per shot


def test_corner_crops_and_brightness_views_written_out() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    views = dict(calibrate.augmented_views(image))
    # 15/16 of 48 x 32 = 45 x 30: the crop touching each corner.
    assert np.array_equal(np.asarray(views["crop-top-left"]), pixels[:30, :45])
    assert np.array_equal(np.asarray(views["crop-top-right"]), pixels[:30, 3:])
    assert np.array_equal(np.asarray(views["crop-bottom-left"]), pixels[2:, :45])
    assert np.array_equal(np.asarray(views["crop-bottom-right"]), pixels[2:, 3:])
    brighter = np.asarray(views["brighter"])
    darker = np.asarray(views["darker"])
    for y, x, c in [(0, 0, 0), (5, 7, 1), (31, 47, 2), (10, 20, 0)]:
        value = int(pixels[y, x, c])
        assert brighter[y, x, c] == min(255, round(value * 1.05))
        assert darker[y, x, c] == round(value * 0.95)


def test_extra_normal_images_take_the_category_of_their_top1_bank_image(run2: Path, shared_data: Path) -> None:
    train = read_split(run2 / FEATURES_FILE, "train", ("path",))
    used = {str(p) for p in train["path"]}
    extra = [
        p
        for p in sorted((shared_data / "mvtec" / "tire" / "train" / "good").iterdir())
        if f"tire/train/good/{p.name}" not in used
    ][:2]
    thresholds = _derive(run2, normal=extra)
    added = [image for image in thresholds.images if image.source == "--normal"]
    assert [image.path for image in added] == [str(p) for p in extra]
    models = _models(run2)
    features = calibrate.encode_for_scoring(
        models, [calibrate.normalise(calibrate.load_rgb(p), models.backbone.spec.image_size) for p in extra]
    )
    top1 = retrieval_similarity(features["qformer"], models.banks.query).argmax(dim=1)
    assert [image.category for image in added] == [models.banks.classes[int(i)] for i in top1]
