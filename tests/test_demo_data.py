"""The offline demo data set: MVTec layout, deterministic bytes, masks that are exactly the defects."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iipad_cli.data.layouts import load_dataset
from iipad_cli.demo_data import DEMO_CLASSES, DEFECTS, TEXTURES, DemoCounts, build_demo_dataset


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    build_demo_dataset(root, seed=0)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_layout_is_read_as_mvtec(demo_root: Path) -> None:
    dataset = load_dataset(demo_root)
    counts = DemoCounts()
    assert dataset.layout == "mvtec"
    assert sorted(dataset.classes) == sorted(DEMO_CLASSES)
    assert len(dataset.train) == len(DEMO_CLASSES) * counts.train_good
    anomalous = [s for s in dataset.test if s.label == 1]
    assert len(anomalous) == sum(len(d) for d in DEMO_CLASSES.values()) * counts.per_defect
    assert all(s.mask_path is not None for s in anomalous)
    assert {s.defect for s in dataset.test if s.label == 0} == {"good"}


def test_same_seed_same_bytes_other_seed_other_images(demo_root: Path, tmp_path: Path) -> None:
    build_demo_dataset(tmp_path / "again", seed=0)
    build_demo_dataset(tmp_path / "other", seed=1)
    assert _digests(tmp_path / "again") == _digests(demo_root)
    other = _digests(tmp_path / "other")
    assert other.keys() == _digests(demo_root).keys()
    assert all(other[name] != digest for name, digest in _digests(demo_root).items() if "_mask" not in name)


def test_images_differ_within_a_class(demo_root: Path) -> None:
    """Normal images are draws of one texture, not copies (the memory bank must generalise)."""
    first = np.asarray(Image.open(demo_root / "wood/train/good/000.png"), dtype=float)
    second = np.asarray(Image.open(demo_root / "wood/train/good/001.png"), dtype=float)
    assert first.shape == second.shape == (256, 256, 3)
    assert np.abs(first - second).mean() > 10


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_mask_is_exactly_the_changed_pixels(defect: str) -> None:
    """Re-render the clean texture from the same generator state and compare with the defect image."""
    size = 256
    texture = TEXTURES["granite"]
    clean = texture(np.random.default_rng(123), size)
    rng = np.random.default_rng(123)
    damaged = texture(rng, size)
    mask = DEFECTS[defect](rng, damaged)
    changed = np.any(np.rint(np.clip(clean, 0, 255)) != np.rint(np.clip(damaged, 0, 255)), axis=-1)
    assert mask.dtype == bool and mask.shape == (size, size)
    assert 100 < mask.sum() < 0.2 * size * size
    assert not changed[~mask].any()
    assert changed[mask].mean() > 0.95


def test_written_masks_are_binary_and_match_image_size(demo_root: Path) -> None:
    masks = sorted(demo_root.rglob("*_mask.png"))
    assert len(masks) == sum(len(d) for d in DEMO_CLASSES.values()) * DemoCounts().per_defect
    for path in masks:
        mask = np.asarray(Image.open(path))
        assert mask.shape == (256, 256)
        assert set(np.unique(mask)) == {0, 255}
