"""`iipad extract` end to end with the tiny backbone (random weights): schema, exactness, the feature
store (virtual datasets, --copy, resume from the store), errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer
from PIL import Image
from torchvision import transforms
from typer.testing import CliRunner

from iipad_cli.commands import extract as extract_command
from iipad_cli.config import CLIP_MEAN, CLIP_STD
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone
from iipad_cli.schema.features import check_features_compatible, read_attrs, read_split
from iipad_cli.stages.extract import ExtractOptions, run_extract
from iipad_cli.store import FeatureStore, resolve_cache_dir

FEATURES = ("cls_token", "qformer", "vv", "mem")
REFERENCE = transforms.Compose(
    [
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ]
)


def _cli() -> typer.Typer:
    """The extract command on its own app (a callback keeps it a subcommand, as in the full CLI)."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """iipad"""

    extract_command.register(app)
    return app


def _invoke(*args: str):
    return CliRunner().invoke(_cli(), ["extract", *args])


def _options(data: Path, out: Path, **changes) -> ExtractOptions:
    # fp32 (the default, stated): these tests compare stored features bit for bit with a direct
    # fp32 forward; test_bf16_* below cover the bf16 path.
    base = ExtractOptions(data=data, shots=1, output=out, backbone="tiny", workers=0, device="cpu", precision="fp32", quiet=True)
    return replace(base, **changes)


def _reference_mask(path: Path | None, resolution: int) -> np.ndarray:
    """Ground truth written out independently: > 0, PIL bilinear of the 0/255 image, v / 255 >= 0.5."""
    if path is None:
        return np.zeros((resolution, resolution), dtype=bool)
    binary = (np.asarray(Image.open(path).convert("L")) > 0).astype(np.uint8) * 255
    resized = np.asarray(Image.fromarray(binary).resize((resolution, resolution), Image.BILINEAR), dtype=np.float64)
    return resized / 255 >= 0.5


def _direct(backbone: Backbone, root: Path, paths: list[str]) -> dict[str, np.ndarray]:
    """The model's output for each image alone, from the released code's preprocessing."""
    rows: dict[str, list[np.ndarray]] = {name: [] for name in FEATURES}
    with torch.inference_mode():
        for rel in paths:
            image = REFERENCE(Image.open(root / rel).convert("RGB"))[None]
            out = backbone.encode_images(image)
            for name in FEATURES:
                rows[name].append(getattr(out, name)[0].to(torch.float16).numpy())
    return {name: np.stack(values) for name, values in rows.items()}


def _tiny() -> Backbone:
    from iipad_cli.models.registry import build_random_backbone, get_spec

    return build_random_backbone(get_spec("tiny"))


def _all_datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {f"{split}/{name}": handle[split][name][...] for split in ("train", "test") for name in handle[split]}


def test_every_fixture_extracts_with_the_schema(shared_data: Path, tmp_path: Path) -> None:
    expected_classes = {"mvtec": ["bottle", "magnetic_tile", "tire"], "visa": ["tile_a", "tile_b"]}
    for name, classes in expected_classes.items():
        result = _invoke(str(shared_data / name), "-k", "1", "--backbone", "tiny", "-o", str(tmp_path / name), "--workers", "0", "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == str(tmp_path / name)
        path = tmp_path / name / "features.h5"
        attrs = read_attrs(path)
        assert attrs["complete"] is True and attrs["backbone_id"] == "tiny" and attrs["random_weights"] is True
        assert attrs["classes"] == classes and attrs["layout"] == name and attrs["shots"] == 1
        assert attrs["vv_layers"] == [2, 3, 4, 5] and attrs["memory_layers"] == [2, 4]
        assert (attrs["image_size"], attrs["grid_size"], attrs["resolution"]) == (224, 16, 224)
        assert attrs["data_root"] == str(shared_data / name) and attrs["shot_policy"] == "random" and attrs["seed"] == 0
        assert attrs["backbone_spec"]["backbone_id"] == "tiny" and attrs["weights"] == {"random": "random(seed=0)"}
        train = read_split(path, "train")
        test = read_split(path, "test")
        n_train, n_test = len(train["path"]), len(test["path"])
        assert n_train == len(classes) and train["cls"] == classes
        assert [e["rel_path"] for c in classes for e in attrs["shots_files"][c]] == train["path"]
        for c in classes:
            for entry in attrs["shots_files"][c]:
                assert entry["sha256"] == hashlib.sha256((shared_data / name / entry["rel_path"]).read_bytes()).hexdigest()
        shapes = {"cls_token": (2, 32), "qformer": (16, 32), "vv": (4, 256, 32), "mem": (2, 256, 64)}
        for split, n in (("train", n_train), ("test", n_test)):
            group = train if split == "train" else test
            for feature, shape in shapes.items():
                assert group[feature].shape == (n, *shape) and group[feature].dtype == np.float16
            assert group["label"].dtype == np.uint8 and len(group["defect"]) == n
        assert set(train) == {"path", "cls", "defect", "label", *FEATURES}
        assert test["mask"].shape == (n_test, 224, 224) and test["mask"].dtype == bool
        assert test["has_mask"].dtype == bool and test["has_mask"].all()
        assert train["label"].tolist() == [0] * n_train
        for i, rel in enumerate(test["path"]):
            anomalous = test["label"][i] == 1
            assert anomalous == (test["defect"][i] != "good")
            if name == "mvtec":
                mask_path = shared_data / name / rel.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
            else:
                mask_path = shared_data / name / rel.replace("/Images/", "/Masks/").replace(".JPG", ".png")
            expected = _reference_mask(mask_path if anomalous else None, 224)
            assert np.array_equal(test["mask"][i], expected), rel
            assert test["mask"][i].any() == bool(anomalous), rel
        cache = (tmp_path / "iipad-cache").resolve()
        with h5py.File(path, "r") as handle:
            # No copy of the features: virtual datasets into the store's segments.
            for split in ("train", "test"):
                for feature in FEATURES:
                    dataset = handle[split][feature]
                    assert dataset.is_virtual
                    assert all(Path(source.file_name).is_relative_to(cache / "segments") for source in dataset.virtual_sources())
            assert handle["test/path"].dtype == h5py.string_dtype()
        feature_bytes = sum(read_split(path, split, FEATURES)[f].nbytes for split in ("train", "test") for f in FEATURES)
        assert path.stat().st_size < feature_bytes / 4
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        entry = manifest["stages"]["extract"]
        assert entry["outputs"]["features.h5"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["images_encoded"] + entry["images_from_store"] == n_train + n_test

        copied = tmp_path / f"{name}-copy" / "features.h5"
        run_extract(_options(shared_data / name, copied.parent, copy=True))
        assert json.loads((copied.parent / "manifest.json").read_text())["stages"]["extract"]["images_encoded"] == 0
        with h5py.File(copied, "r") as handle:
            assert not handle["test/vv"].is_virtual
            assert handle["test/vv"].chunks == (1, 1, 256, 32) and handle["test/mem"].chunks == (1, 1, 256, 64)
            assert handle["test/vv"].compression is None
        virtual, self_contained = _all_datasets(path), _all_datasets(copied)
        assert virtual.keys() == self_contained.keys()
        for key in virtual:
            assert np.array_equal(virtual[key], self_contained[key]), key


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stored_features_equal_the_direct_forward(shared_data: Path, tmp_path: Path, tiny_backbone: Backbone, batch_size: int) -> None:
    data = shared_data / "visa"
    run_extract(_options(data, tmp_path / "run", classes=("tile_b",), batch_size=batch_size, shots=2))
    path = tmp_path / "run" / "features.h5"
    for split in ("train", "test"):
        stored = read_split(path, split)
        direct = _direct(tiny_backbone, data, stored["path"])
        for name in FEATURES:
            if batch_size == 1:
                assert np.array_equal(stored[name], direct[name]), (split, name)
            else:
                # Batched matmuls may round differently in the last fp32 bit; fp16 storage then
                # differs by at most one fp16 step, far below the differences between images.
                np.testing.assert_allclose(stored[name].astype(np.float32), direct[name].astype(np.float32), rtol=2e-3, atol=2e-3)
        shifted = np.roll(direct["vv"], 1, axis=0).astype(np.float32)
        assert np.abs(stored["vv"].astype(np.float32) - shifted).max() > 0.05


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> list[int]:
    """Make the n-th batch forward raise, as a crash or Ctrl-C mid-run would; returns per-call batch sizes."""
    original = Backbone.encode_images
    seen: list[int] = []

    def encode(self: Backbone, images: torch.Tensor, share_trunk: bool | None = None):
        seen.append(images.shape[0])
        if len(seen) == calls:
            raise KeyboardInterrupt
        return original(self, images, share_trunk)

    monkeypatch.setattr(Backbone, "encode_images", encode)
    return seen


def test_interrupted_run_resumes_from_the_store_to_identical_features(
    shared_data: Path, tmp_path: Path, tiny_backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = shared_data / "visa"
    options = _options(data, tmp_path / "resumed", classes=("tile_a",), batch_size=3, shots=2)
    run_extract(replace(options, output=tmp_path / "straight", cache=tmp_path / "other-cache"))
    needed = len(read_split(tmp_path / "straight" / "features.h5", "train", ["path"])["path"]) + len(
        read_split(tmp_path / "straight" / "features.h5", "test", ["path"])["path"]
    )

    _interrupt_after(monkeypatch, calls=3)
    with pytest.raises(KeyboardInterrupt):
        run_extract(options)
    monkeypatch.undo()
    assert not (tmp_path / "resumed" / "features.h5").exists()
    assert not list((tmp_path / "resumed").glob("*.tmp"))

    seen = _interrupt_after(monkeypatch, calls=-1)
    run_extract(options)
    # The two batches finished before the interruption (the 2 shots, then 3 test images; each
    # split is batched on its own) were sealed into the store.
    assert sum(seen) == needed - 5
    entry = json.loads((tmp_path / "resumed" / "manifest.json").read_text())["stages"]["extract"]
    assert (entry["images_encoded"], entry["images_from_store"]) == (needed - 5, 5)
    resumed, straight = tmp_path / "resumed" / "features.h5", tmp_path / "straight" / "features.h5"
    first, second = _all_datasets(resumed), _all_datasets(straight)
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key], second[key]), key
    stored = read_split(resumed, "test")
    direct = _direct(tiny_backbone, data, stored["path"])
    for name in FEATURES:
        np.testing.assert_allclose(stored[name].astype(np.float32), direct[name].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_interrupted_run_never_replaces_a_complete_file(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = _options(shared_data / "visa", tmp_path / "run", classes=("tile_a",), batch_size=2)
    run_extract(options)
    final = tmp_path / "run" / "features.h5"
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    _interrupt_after(monkeypatch, calls=1)  # seed 1 draws another shot: one image to encode
    with pytest.raises(KeyboardInterrupt):
        run_extract(replace(options, seed=1, force=True))
    monkeypatch.undo()
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    with pytest.raises(IipadError, match="features.h5: made with seed 0, not 1"):
        run_extract(replace(options, seed=1))
    run_extract(replace(options, seed=1, force=True))
    assert read_attrs(final)["seed"] == 1 and not list((tmp_path / "run").glob("*.tmp"))


def test_changed_bytes_under_the_same_name_are_encoded_again(shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shared_data / "mvtec" / "bottle", data / "bottle")
    options = _options(data, tmp_path / "run")
    run_extract(options)
    test_image = sorted((data / "bottle" / "test" / "good").iterdir())[0]
    pixels = np.asarray(Image.open(test_image).convert("RGB")).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(test_image)
    with pytest.raises(IipadError, match="features.h5: made with content_sha256 "):
        run_extract(options)
    run_extract(replace(options, force=True))
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["extract"]
    assert entry["images_encoded"] == 1
    stored = read_split(tmp_path / "run" / "features.h5", "test")
    row = stored["path"].index(test_image.relative_to(data).as_posix())
    direct = _direct(_tiny(), data, [stored["path"][row]])
    np.testing.assert_allclose(stored["vv"][row].astype(np.float32), direct["vv"][0].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_each_image_is_hashed_once_per_extract(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun each rank hashes its shard and the digest cache is per process, so an image
    whose hash is asked for again (e.g. for the manifest's recorded options) is read again from
    disk by rank 0: extract asks once per image."""
    import iipad_cli.store as store

    asked: dict[Path, int] = {}
    original = store.content_sha256

    def counting(path: Path) -> str:
        asked[Path(path)] = asked.get(Path(path), 0) + 1
        return original(path)

    monkeypatch.setattr(store, "content_sha256", counting)
    data = tmp_path / "data"
    shutil.copytree(shared_data / "mvtec" / "bottle", data / "bottle")
    run_extract(_options(data, tmp_path / "run", cache=tmp_path / "cache"))
    images = read_split(tmp_path / "run" / "features.h5", "train")["path"] + read_split(tmp_path / "run" / "features.h5", "test")["path"]
    assert sorted(asked) == sorted(data / path for path in images)
    assert set(asked.values()) == {1}


def test_cleared_store_is_a_one_line_error_for_later_stages_and_copy_survives(shared_data: Path, tmp_path: Path) -> None:
    options = _options(shared_data / "visa", tmp_path / "run", classes=("tile_b",))
    run_extract(options)
    run_extract(replace(options, output=tmp_path / "copy", copy=True))
    FeatureStore(resolve_cache_dir()).clear(None)
    with pytest.raises(IipadError) as error:
        read_split(tmp_path / "run" / "features.h5", "test")
    assert "\n" not in str(error.value) and "feature store segment that is gone" in str(error.value)
    assert np.isfinite(read_split(tmp_path / "copy" / "features.h5", "test", ["vv"])["vv"]).all()
    # extract notices the missing segments and writes the file again.
    run_extract(options)
    assert np.isfinite(read_split(tmp_path / "run" / "features.h5", "test", ["vv"])["vv"]).all()


def test_same_options_is_a_no_op_and_other_options_refuse(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = str(shared_data / "visa")
    out = str(tmp_path / "run")
    args = [data, "-k", "1", "--backbone", "tiny", "-o", out, "--workers", "0", "--classes", "tile_b", "-q"]
    assert _invoke(*args).exit_code == 0
    final = tmp_path / "run" / "features.h5"
    digest = hashlib.sha256(final.read_bytes()).hexdigest()

    def no_model(*_args, **_kwargs):
        raise AssertionError("a current features file must not load the backbone")

    monkeypatch.setattr("iipad_cli.stages.extract.load_backbone", no_model)
    again = _invoke(*args)
    assert again.exit_code == 0 and again.stdout.strip() == out
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    for extra, key in [(["--seed", "2"], "seed"), (["--resolution", "112"], "resolution"), (["--shot-policy", "official"], "shot_policy")]:
        refused = _invoke(*args, *extra)
        assert refused.exit_code == 1
        assert refused.stderr.strip() == f"error: {final}: made with {key} {read_attrs(final)[key]!r}, not {_refused_value(extra)!r}; pass --force to replace it"
    monkeypatch.undo()
    forced = _invoke(*args, "--resolution", "112", "--force")
    assert forced.exit_code == 0
    assert read_split(final, "test")["mask"].shape[1:] == (112, 112)


def _refused_value(extra: list[str]) -> object:
    value = extra[1]
    return int(value) if value.isdigit() else value


def test_default_run_dir_and_nan_check(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke(str(shared_data / "mvtec"), "-k", "1", "--backbone", "tiny", "--classes", "bottle", "--workers", "0", "-q")
    assert result.exit_code == 0 and result.stdout.strip() == "runs/mvtec-1shot"
    assert (tmp_path / "runs" / "mvtec-1shot" / "features.h5").is_file()

    original = Backbone.encode_images

    def poisoned(self: Backbone, images: torch.Tensor, share_trunk: bool | None = None):
        out = original(self, images, share_trunk)
        out.vv[-1, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(Backbone, "encode_images", poisoned)
    bad = _invoke(str(shared_data / "mvtec"), "-k", "1", "--backbone", "tiny", "--classes", "tire", "--workers", "0", "-q", "-o", "nan")
    assert bad.exit_code == 1
    assert bad.stderr.strip().startswith("error: ") and "non-finite vv features" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert str(shared_data / "mvtec" / "tire" / "train" / "good") in bad.stderr


def _png(path: Path, size: tuple[int, int] = (20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _small(root: Path, normal: int = 2) -> Path:
    for i in range(normal):
        _png(root / "part" / "train" / "good" / f"{i}.png")
    _png(root / "part" / "test" / "good" / "0.png")
    _png(root / "part" / "test" / "dent" / "0.png")
    _png(root / "part" / "ground_truth" / "dent" / "0_mask.png")
    return root


def _truncate(root: Path) -> Path:
    path = root / "part" / "test" / "dent" / "0.png"
    path.write_bytes(path.read_bytes()[:200])
    return path


def _garbage(root: Path) -> Path:
    path = root / "part" / "test" / "good" / "0.png"
    path.write_bytes(b"\x89PNG not really")
    return path


def _mismatched_mask(root: Path) -> Path:
    return _png(root / "part" / "ground_truth" / "dent" / "0_mask.png", size=(16, 20))


def _no_train_good(root: Path) -> Path:
    (root / "other" / "test" / "good").mkdir(parents=True)
    return root / "other"


@pytest.mark.parametrize(
    ("breakage", "extra", "message"),
    [
        (_truncate, [], "unreadable image"),
        (_garbage, [], "unreadable image"),
        (_mismatched_mask, [], "mask is 16x20 but its image is 20x16"),
        (_no_train_good, [], "class 'other' has no train/good directory"),
        (lambda root: root / "part", ["-k", "3"], "only 2 normal training images"),
    ],
)
@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, breakage, extra: list[str], message: str, workers: str) -> None:
    root = _small(tmp_path / "data")
    named = breakage(root)
    result = _invoke(str(root), "-k", "1", "--backbone", "tiny", "-o", str(tmp_path / "run"), "-q", "--workers", workers, *extra)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(named) in lines[0], result.stderr
    assert not (tmp_path / "run" / "features.h5").exists()


def test_empty_directory_and_other_backbone(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _invoke(str(empty), "-k", "1", "--backbone", "tiny", "-q")
    assert result.exit_code == 1 and result.stderr.strip() == f"error: {empty}: empty directory"

    root = _small(tmp_path / "data")
    out = tmp_path / "run"
    assert _invoke(str(root), "-k", "1", "--backbone", "tiny", "-o", str(out), "-q", "--workers", "0").exit_code == 0
    other = _invoke(str(root), "-k", "1", "--backbone", "vit-l-14", "-o", str(out), "-q")
    assert other.exit_code == 1
    assert other.stderr.strip() == f"error: {out / 'features.h5'}: made with backbone_id 'tiny', not 'vit-l-14'; pass --force to replace it"


def test_check_features_compatible(tmp_path: Path, shared_data: Path) -> None:
    run_extract(_options(shared_data / "visa", tmp_path / "run", classes=("tile_a",)))
    path = tmp_path / "run" / "features.h5"
    attrs = read_attrs(path)
    check_features_compatible(attrs, path=path, backbone_id="tiny", vv_layers=(2, 3, 4, 5), memory_layers=[2, 4], resolution=224, shots=1)
    with pytest.raises(IipadError, match=r"features.h5: made with backbone_id 'tiny', not 'vit-l-14'"):
        check_features_compatible(attrs, path=path, backbone_id="vit-l-14")
    with pytest.raises(IipadError, match=r"made with vv_layers \[2, 3, 4, 5\], not \[6, 12, 18, 24\]"):
        check_features_compatible(attrs, path=path, vv_layers=(6, 12, 18, 24))
    check_features_compatible(attrs, path=path, backbone_id="vit-l-14", force=True)


def test_bf16_features_are_recorded_and_within_the_bound_of_fp32(shared_data: Path, tmp_path: Path, tiny_backbone: Backbone) -> None:
    """The stored bf16 features against the direct fp32 forward: the documented bound on `tiny`
    (test_precision.py) plus fp16 storage, per feature over the whole split."""
    data = shared_data / "visa"
    run_extract(_options(data, tmp_path / "run", classes=("tile_b",), precision="bf16"))
    path = tmp_path / "run" / "features.h5"
    assert read_attrs(path)["precision"] == "bf16"
    extract = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["extract"]
    assert extract["options"]["precision"] == "bf16" and extract["precision"] == "bf16"
    stored = read_split(path, "test")
    direct = _direct(tiny_backbone, data, stored["path"])
    for name in FEATURES:
        got, expected = stored[name].astype(np.float64), direct[name].astype(np.float64)
        relative = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert 0 < relative <= 1e-3 + 1e-3, name  # bf16 bound + two fp16 roundings (2e-4 each)


def test_another_precision_is_refused_unless_forced(shared_data: Path, tmp_path: Path) -> None:
    args = [str(shared_data / "visa"), "-k", "1", "--backbone", "tiny", "-o", str(tmp_path / "run"), "--workers", "0",
            "--classes", "tile_b", "--device", "cpu", "-q"]
    assert _invoke(*args, "--precision", "bf16").exit_code == 0
    final = tmp_path / "run" / "features.h5"
    refused = _invoke(*args, "--precision", "fp32")
    assert refused.exit_code == 1
    assert refused.stderr.strip() == f"error: {final}: made with precision 'bf16', not 'fp32'; pass --force to replace it"
    assert read_attrs(final)["precision"] == "bf16"
    assert _invoke(*args, "--precision", "fp32", "--force").exit_code == 0
    assert read_attrs(final)["precision"] == "fp32"
    bad = _invoke(*args, "--precision", "fp16")
    assert bad.exit_code == 1 and "unknown precision 'fp16'" in bad.stderr


@pytest.mark.parametrize(("flags", "expected"), [(frozenset(), "fp32"), (frozenset({"avx512f", "avx512_bf16"}), "bf16")])
def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], expected: str) -> None:
    monkeypatch.setattr("iipad_cli.devices.cpu_flags", lambda *args: flags)
    options = _options(Path("unused"), Path("unused"), precision="auto")
    assert options.resolved_precision() == expected
