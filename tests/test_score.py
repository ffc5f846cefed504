"""End to end on the real fixtures with the `tiny` backbone (random weights): extract -> train ->
bank -> score -> predict, the artifact contracts, and the refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from iipad_cli.artifacts import BANKS_FILE, FEATURES_FILE, GENERATOR_FILE, SCORES_FILE, sha256_file
from iipad_cli.cli import app
from iipad_cli.models.backbone import Backbone
from iipad_cli.schema.banks import load_banks
from iipad_cli.schema.features import read_split
from iipad_cli.schema.generator import load_generator, save_generator
from iipad_cli.schema.scores import load_scores

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """bottle + tire, 1 shot each; one training epoch with two manual sentences per state."""
    root = tmp_path_factory.mktemp("score")
    run_dir = root / "run"
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"normal": ["a photo of a flawless object"], "anomalous": ["a photo of a damaged object"]}))
    steps = [
        ("extract", str(shared_data / "mvtec"), "--shots", "1", "--backbone", "tiny", "--classes", "bottle,tire",
         "--workers", "0", "-o", str(run_dir)),
        ("train", str(run_dir), "--epochs", "1", "--prompts", str(prompts)),
        ("bank", str(run_dir)),
        ("score", str(run_dir), "--heatmaps", "--batch-size", "8"),
    ]
    for step in steps:
        code, out, err = _invoke(*step, "--quiet", "--device", "cpu")
        assert code == 0, f"{step[0]} failed: {err}"
        assert out.strip() == str(run_dir)
    return run_dir


def _copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("heatmaps"))
    return target


def test_banks_hold_normalised_train_features(run: Path) -> None:
    banks = load_banks(run / BANKS_FILE)
    train = read_split(run / FEATURES_FILE, "train", ("path", "cls", "qformer", "mem"))
    assert banks.paths == list(train["path"]) and banks.classes == ["bottle", "tire"]
    assert set(load_file(str(run / BANKS_FILE))) == {"query", "prompt", "mem2", "mem4"}
    query = torch.from_numpy(train["qformer"]).double()
    expected = query / query.norm(dim=-1, keepdim=True)
    assert torch.allclose(banks.query.double(), expected, atol=1e-6)
    mem = torch.from_numpy(train["mem"]).double()
    for layer in range(2):
        expected = mem[:, layer] / mem[:, layer].norm(dim=-1, keepdim=True)
        assert torch.allclose(banks.mem[layer].double(), expected, atol=1e-6)
    assert banks.prompt.shape == (2, 2, 32)
    assert torch.allclose(banks.prompt.norm(dim=-1), torch.ones(2, 2), atol=1e-6)
    assert banks.metadata["generator_sha256"] == sha256_file(run / GENERATOR_FILE)


def test_scores_file_contract(run: Path) -> None:
    scores = load_scores(run / SCORES_FILE)
    test = read_split(run / FEATURES_FILE, "test", ("path", "cls", "label", "has_mask"))
    count = len(test["path"])
    assert scores.path == list(test["path"]) and scores.cls == list(test["cls"])
    assert (scores.label == test["label"]).all() and (scores.has_mask == test["has_mask"]).all()
    assert scores.maps.shape == (count, 224, 224) and scores.maps.dtype == np.float16
    assert scores.retrieved.shape == (count, 1) and scores.retrieved.dtype == np.int32
    assert np.isfinite(scores.maps).all()
    official = scores.prompt_max + scores.visual_max - scores.p_normal - scores.retrieval_sim
    assert np.allclose(scores.image_score, official, atol=1e-6)
    # Ā^p is a mean of probabilities, A^v a sum of two (1 - cos)/2 terms.
    assert ((scores.prompt_max >= 0) & (scores.prompt_max <= 1)).all()
    assert ((scores.visual_max >= 0) & (scores.visual_max <= 2)).all()
    attrs = scores.attrs
    assert attrs["top_k"] == 1 and attrs["shots"] == 1 and attrs["resolution"] == 224 and attrs["random_weights"]
    assert attrs["image_score_formula"] == "official" and json.loads(attrs["preset"])["name"] == "official"
    assert attrs["features_sha256"] == sha256_file(run / FEATURES_FILE)
    assert attrs["banks_sha256"] == sha256_file(run / BANKS_FILE)
    assert attrs["map_min"] == float(scores.maps.min()) and attrs["map_max"] == float(scores.maps.max())
    pngs = sorted((run / "heatmaps").rglob("*.png"))
    assert len(pngs) == count
    assert (run / "heatmaps" / "bottle" / "test" / "broken_large" / "000.png").is_file()


def test_retrieval_returns_the_test_images_own_class(run: Path) -> None:
    """A plumbing test: the `tiny` Q-Former has random weights, so its tokens carry little image
    content; bottle and tire (each a homogeneous set of very different photographs) still separate,
    which checks that retrieval indexes the bank rows it claims to. (magnetic_tile's crops vary more
    than the random tokens' class gap, so it is not used here.)"""
    scores = load_scores(run / SCORES_FILE)
    banks = load_banks(run / BANKS_FILE)
    retrieved = [[banks.classes[i] for i in row] for row in scores.retrieved]
    assert all(classes == [cls] for classes, cls in zip(retrieved, scores.cls))


def test_predict_reproduces_scores_and_skips_corrupt_images(run: Path, shared_data: Path, tmp_path: Path) -> None:
    scores = load_scores(run / SCORES_FILE)
    rel = "tire/test/cut/000.png"
    row = scores.path.index(rel)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    code, stdout, stderr = _invoke(
        "predict", str(run), str(shared_data / "mvtec" / rel), str(corrupt), "-o", str(out), "--quiet", "--device", "cpu"
    )
    assert code == 0, stderr
    assert stdout.strip() == str(out / "predictions.csv")
    assert "broken.png" in stderr
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["path"].endswith(rel)
    assert np.float32(float(rows[0]["image_score"])) == scores.image_score[row]
    banks = load_banks(run / BANKS_FILE)
    assert rows[0]["retrieved"] == banks.paths[int(scores.retrieved[row, 0])]
    amap = np.load(out / "000.npy")
    assert amap.shape == (224, 224) and amap.dtype == np.float32
    assert np.array_equal(amap.astype(np.float16), scores.maps[row])
    assert (out / "000.png").is_file()


def test_predict_reads_the_store_and_adds_new_images_to_it(
    run: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = load_scores(run / SCORES_FILE)
    rel = "bottle/test/broken_large/000.png"
    row = scores.path.index(rel)
    store = json.loads((run / "manifest.json").read_text())["stages"]["extract"]["feature_store"]

    def no_encoder(*_args, **_kwargs):
        raise AssertionError("an image the store holds must not be encoded")

    monkeypatch.setattr(Backbone, "encode_images", no_encoder)
    out = tmp_path / "from-store"
    code, _, stderr = _invoke("predict", str(run), str(shared_data / "mvtec" / rel), "-o", str(out), "--cache", store, "--device", "cpu")
    assert code == 0, stderr
    assert "1 of 1 images' features from the feature store" in stderr
    with (out / "predictions.csv").open() as handle:
        assert np.float32(float(next(csv.DictReader(handle))["image_score"])) == scores.image_score[row]
    assert np.array_equal(np.load(out / "000.npy").astype(np.float16), scores.maps[row])
    monkeypatch.undo()

    # A new image (a training image the run never scored): encoded once, then found.
    new = str(shared_data / "mvtec" / "tire" / "train" / "good" / "001.png")
    fresh = tmp_path / "fresh-store"
    first = _invoke("predict", str(run), new, "-o", str(tmp_path / "a"), "--cache", str(fresh), "--device", "cpu")
    assert first[0] == 0 and "0 of 1 images' features from the feature store" in first[2]
    monkeypatch.setattr(Backbone, "encode_images", no_encoder)
    second = _invoke("predict", str(run), new, "-o", str(tmp_path / "b"), "--cache", str(fresh), "--device", "cpu")
    assert second[0] == 0 and "1 of 1 images' features from the feature store" in second[2]
    assert (tmp_path / "a" / "001.npy").read_bytes() == (tmp_path / "b" / "001.npy").read_bytes()


def test_predict_fails_when_no_image_can_be_scored(run: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"junk")
    code, _, stderr = _invoke("predict", str(run), str(corrupt), "-o", str(tmp_path / "o"), "--quiet")
    assert code == 1 and "none of the 1 images" in stderr


def test_score_refuses_banks_from_another_generator(run: Path, tmp_path: Path) -> None:
    other = _copy_run(run, tmp_path / "other")
    generator, meta = load_generator(other / GENERATOR_FILE)
    with torch.no_grad():
        generator.normal_prefix.add_(1.0)
    meta.pop("generator_config")
    meta.pop("iipad_version", None)
    meta.pop("schema_version", None)
    save_generator(other / GENERATOR_FILE, generator, meta)
    code, _, stderr = _invoke("score", str(other), "--quiet")
    assert code == 1
    assert BANKS_FILE in stderr and "another generator.safetensors" in stderr


def test_score_refuses_a_generator_from_other_features(run: Path, tmp_path: Path) -> None:
    other = _copy_run(run, tmp_path / "other")
    with h5py.File(other / FEATURES_FILE, "a") as handle:
        handle.attrs["note"] = "edited after training"
    code, _, stderr = _invoke("score", str(other), "--quiet")
    assert code == 1 and GENERATOR_FILE in stderr and "features.h5" in stderr


def _self_contained(path: Path) -> None:
    """Replace a features.h5 whose features are virtual datasets into the shared store by a real copy,
    so that editing it cannot write into the store (as `iipad extract --copy` would write it)."""
    tmp = path.with_name("copy.h5")
    with h5py.File(path, "r") as source, h5py.File(tmp, "w") as target:
        target.attrs.update(dict(source.attrs))
        for split in source:
            group = target.create_group(split)
            group.attrs.update(dict(source[split].attrs))
            for name, dataset in source[split].items():
                group.create_dataset(name, data=dataset[...], dtype=dataset.dtype)
    tmp.replace(path)


def test_nan_features_name_the_image(run: Path, tmp_path: Path) -> None:
    other = _copy_run(run, tmp_path / "other")
    _self_contained(other / FEATURES_FILE)
    with h5py.File(other / FEATURES_FILE, "a") as handle:
        assert not handle["test"]["vv"].is_virtual
        handle["test"]["vv"][3, 1, 7, 0] = np.nan
        bad = handle["test"]["path"].asstr()[3]
    code, _, stderr = _invoke("score", str(other), "--quiet", "--force")
    assert code == 1 and bad in stderr and "NaN" in stderr
    assert not (other / (SCORES_FILE + ".tmp")).exists()


def test_predict_inputs_expand_directories_and_globs_and_names_stay_unique(tmp_path: Path) -> None:
    from iipad_cli.errors import IipadError
    from iipad_cli.stages.predict import expand_inputs, output_names

    for rel in ("a/good/000.png", "a/bad/000.png", "a/bad/001.jpg", "b/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = expand_inputs([str(tmp_path / "a"), str(tmp_path / "a" / "bad" / "*.png")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/bad/000.png", "a/bad/001.jpg", "a/good/000.png"]
    assert output_names(found) == ["bad__000", "bad__001", "good__000"]
    with pytest.raises(IipadError, match="no file matches"):
        expand_inputs([str(tmp_path / "missing" / "*.png")])
    with pytest.raises(IipadError, match="no images"):
        expand_inputs([str(tmp_path / "b")])


def test_precision_is_recorded_in_every_artifact(run: Path) -> None:
    from iipad_cli.schema.banks import read_banks_metadata
    from iipad_cli.schema.features import read_attrs
    from iipad_cli.schema.generator import read_generator_metadata
    from iipad_cli.schema.scores import read_scores_attrs

    precision = "fp32"  # the default
    extract = json.loads((run / "manifest.json").read_text())["stages"]["extract"]
    assert extract["options"]["precision"] == precision and extract["options"]["precision_requested"] == "fp32"
    assert extract["precision"] == precision
    assert read_attrs(run / FEATURES_FILE)["precision"] == precision
    assert read_generator_metadata(run / GENERATOR_FILE)["precision"] == precision
    assert read_banks_metadata(run / BANKS_FILE)["precision"] == precision
    assert read_scores_attrs(run / SCORES_FILE)["precision"] == precision


def test_predict_encodes_in_the_runs_precision_and_refuses_another(run: Path, shared_data: Path, tmp_path: Path) -> None:
    image = str(shared_data / "mvtec" / "tire" / "test" / "cut" / "000.png")
    precision, other = "fp32", "bf16"
    code, _, stderr = _invoke("predict", str(run), image, "-o", str(tmp_path / "same"), "--quiet", "--device", "cpu")
    assert code == 0, stderr
    assert json.loads((tmp_path / "same" / "predict.json").read_text())["precision"] == precision
    code, _, stderr = _invoke(
        "predict", str(run), image, "-o", str(tmp_path / "other"), "--precision", other, "--quiet", "--device", "cpu"
    )
    assert code == 1
    assert f"{run / FEATURES_FILE}: features computed in {precision}, not {other}" in stderr
    assert not (tmp_path / "other" / "predictions.csv").exists()
    code, _, stderr = _invoke(
        "predict", str(run), image, "-o", str(tmp_path / "forced"), "--precision", other, "--force", "--quiet", "--device", "cpu"
    )
    assert code == 0, stderr
    recorded = json.loads((tmp_path / "forced" / "predict.json").read_text())
    assert recorded["precision"] == other and recorded["features_precision"] == precision
