"""Data layouts and K-shot selection on the real fixtures and on small synthetic trees."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iipad_cli.data.layouts import Dataset, detect_layout, load_dataset
from iipad_cli.data.shots import select_shots, shot_files
from iipad_cli.errors import IipadError


def _png(path: Path, size: tuple[int, int] = (8, 6), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def _tree(root: Path, classes: dict[str, int], with_masks: bool = True) -> Path:
    """`<cls>/train/good/*` with n images, `test/good` 1, `test/scratch` 2 (+ masks when asked)."""
    for cls, n in classes.items():
        for i in range(n):
            _png(root / cls / "train" / "good" / f"{i:03d}.png", value=i)
        _png(root / cls / "test" / "good" / "000.png")
        for i in range(2):
            _png(root / cls / "test" / "scratch" / f"{i:03d}.png")
            if with_masks:
                _png(root / cls / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return root


# --- real fixtures -------------------------------------------------------------------------------


def test_mvtec_fixture(shared_data: Path) -> None:
    data = load_dataset(shared_data / "mvtec")
    assert data.layout == "mvtec"
    assert data.classes == ("bottle", "magnetic_tile", "tire")
    train = {c: sum(s.cls == c for s in data.train) for c in data.classes}
    test = {c: sum(s.cls == c for s in data.test) for c in data.classes}
    assert train == {"bottle": 5, "magnetic_tile": 6, "tire": 6}
    assert test == {"bottle": 10, "magnetic_tile": 13, "tire": 11}
    for sample in data.test:
        assert sample.path.is_absolute() and sample.path.is_file()
        assert sample.path == data.root / sample.rel_path
        assert sample.rel_path.split("/")[:3] == [sample.cls, "test", sample.defect]
        assert sample.label == int(sample.defect != "good")
        assert sample.has_mask
        if sample.label:
            assert sample.mask_path == data.root / sample.cls / "ground_truth" / sample.defect / (
                Path(sample.rel_path).stem + "_mask.png"
            )
        else:
            assert sample.mask_path is None
    assert all(s.split == "train" and s.label == 0 and s.defect == "good" for s in data.train)


def test_visa_fixture(shared_data: Path) -> None:
    data = load_dataset(shared_data / "visa")
    assert data.layout == "visa"
    assert data.classes == ("tile_a", "tile_b")
    assert [sum(s.cls == c for s in data.train) for c in data.classes] == [6, 6]
    assert [sum(s.cls == c for s in data.test) for c in data.classes] == [6, 6]
    defects = sorted(s.defect for s in data.test if s.label)
    assert defects == ["blowhole", "blowhole", "break", "crack", "crack", "uneven"]
    for sample in (*data.train, *data.test):
        assert "\r" not in sample.rel_path and sample.path.is_file()
        assert sample.rel_path.startswith(f"{sample.cls}/Data/Images/")
    for sample in data.test:
        if sample.label:
            assert sample.mask_path is not None and sample.mask_path.name == Path(sample.rel_path).stem + ".png"
        else:
            assert sample.mask_path is None and sample.has_mask
    # The CSV's train rows are exactly the train candidates.
    rows = (shared_data / "visa" / "split_csv" / "1cls.csv").read_bytes().decode().split("\r\n")[1:]
    expected = sorted(r.split(",")[3] for r in rows if r and r.split(",")[1] == "train")
    assert sorted(s.rel_path for s in data.train) == expected


def test_classes_filter_and_unknown_class(shared_data: Path) -> None:
    data = load_dataset(shared_data / "mvtec", classes=["tire", "bottle"])
    assert data.classes == ("bottle", "tire")
    assert {s.cls for s in (*data.train, *data.test)} == {"bottle", "tire"}
    with pytest.raises(IipadError, match="no class nut"):
        load_dataset(shared_data / "mvtec", classes=["nut"])
    assert load_dataset(shared_data / "visa", classes=["tile_b"]).classes == ("tile_b",)


# --- synthetic trees -----------------------------------------------------------------------------


def test_folder_layout_allows_anomalies_without_masks(tmp_path: Path) -> None:
    root = _tree(tmp_path / "products", {"widget": 3}, with_masks=False)
    assert detect_layout(root) == "folder"
    _png(root / "widget" / "ground_truth" / "scratch" / "001_mask.PNG")
    (root / "widget" / "test" / "scratch" / "notes.txt").write_text("not an image")
    _png(root / "widget" / "test" / "dent" / "a.JPG")
    _png(root / "widget" / "test" / "dent" / "b.Tiff")
    data = load_dataset(root, layout="folder")
    by_name = {s.rel_path: s for s in data.test}
    assert sorted(by_name) == [
        "widget/test/dent/a.JPG",
        "widget/test/dent/b.Tiff",
        "widget/test/good/000.png",
        "widget/test/scratch/000.png",
        "widget/test/scratch/001.png",
    ]
    assert by_name["widget/test/scratch/000.png"].has_mask is False
    assert by_name["widget/test/scratch/001.png"].mask_path == root / "widget/ground_truth/scratch/001_mask.PNG"
    assert by_name["widget/test/good/000.png"].has_mask is True
    assert by_name["widget/test/dent/a.JPG"].label == 1


def test_mvtec_layout_requires_masks_and_folder_override(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"a": 2})
    (root / "a" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    assert detect_layout(root) == "mvtec"
    with pytest.raises(IipadError, match="001_mask.png: missing mask"):
        load_dataset(root)
    data = load_dataset(root, layout="folder")
    assert [s.has_mask for s in data.test] == [True, True, False]


def test_listing_is_sorted_independent_of_creation_order(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("c.png", "a.png", "b.png"):
        _png(root / "x" / "train" / "good" / name)
    assert [s.rel_path for s in load_dataset(root).train] == [f"x/train/good/{n}" for n in ("a.png", "b.png", "c.png")]


@pytest.mark.parametrize(
    ("build", "layout", "message"),
    [
        (lambda root: _tree(root, {"a": 2}), "mvtecc", "unknown layout 'mvtecc'"),
        (lambda root: root.mkdir(), "auto", "empty directory"),
        (lambda root: (_tree(root, {"a": 2}), (root / "b" / "test").mkdir(parents=True)), "folder", "b: class 'b' has no train/good"),
        (lambda root: None, "auto", "no such directory"),
        (lambda root: _tree(root, {"a": 2}), "visa", "1cls.csv: missing"),
    ],
)
def test_layout_errors(tmp_path: Path, build, layout: str, message: str) -> None:
    root = tmp_path / "data"
    build(root)
    with pytest.raises(IipadError, match=message) as error:
        load_dataset(root, layout=layout)
    assert str(root) in str(error.value) and "\n" not in str(error.value)


# --- K-shot selection ------------------------------------------------------------------------------


def _names(shots) -> list[str]:
    return [s.rel_path for s in shots]


def test_official_policy_takes_every_third_sorted_image(tmp_path: Path) -> None:
    data = load_dataset(_tree(tmp_path / "d", {"a": 13, "b": 12}), classes=["a"])
    picked = select_shots(data, 5, "official", seed=123)
    assert _names(picked) == [f"a/train/good/{i:03d}.png" for i in (0, 3, 6, 9, 12)]
    assert _names(select_shots(data, 2, "official", seed=0)) == ["a/train/good/000.png", "a/train/good/003.png"]
    with pytest.raises(IipadError, match="class 'b'.*needs index 12"):
        select_shots(load_dataset(tmp_path / "d", classes=["b"]), 5, "official", seed=0)


def test_random_policy_is_seeded_and_order_independent(shared_data: Path) -> None:
    data = load_dataset(shared_data / "mvtec")
    first = _names(select_shots(data, 2, "random", seed=0))
    assert first == _names(select_shots(data, 2, "random", seed=0))
    assert first != _names(select_shots(data, 2, "random", seed=1))
    draws = {tuple(_names(select_shots(data, 2, "random", seed=s))) for s in range(10)}
    assert len(draws) > 5
    shuffled = Dataset(data.root, data.layout, data.classes, tuple(reversed(data.train)), data.test)
    assert _names(select_shots(shuffled, 2, "random", seed=0)) == first
    # K shots extend the K-1 shots of the same seed, class by class.
    one = _names(select_shots(data, 1, "random", seed=4))
    two = _names(select_shots(data, 2, "random", seed=4))
    assert one == two[0::2]
    assert [s.split("/")[0] for s in two] == ["bottle", "bottle", "magnetic_tile", "magnetic_tile", "tire", "tire"]


def test_too_few_normal_images_names_the_class(shared_data: Path) -> None:
    data = load_dataset(shared_data / "mvtec")
    with pytest.raises(IipadError, match=r"class 'bottle': only 5 normal training images .*bottle/train/good.*--shots 6"):
        select_shots(data, 6, "random", seed=0)


def test_shot_files_record_sha256(shared_data: Path) -> None:
    data = load_dataset(shared_data / "visa")
    shots = select_shots(data, 2, "official", seed=0)
    files = shot_files(shots)
    assert list(files) == ["tile_a", "tile_b"]
    for cls, entries in files.items():
        for entry in entries:
            assert entry.sha256 == hashlib.sha256((data.root / entry.rel_path).read_bytes()).hexdigest()
    assert [e.rel_path for e in files["tile_a"]] == ["tile_a/Data/Images/Normal/000.JPG", "tile_a/Data/Images/Normal/006.JPG"]
