"""A small offline data set in MVTec AD layout, made of procedurally generated textures.

`iipad demo` must run on a fresh install with no network, no weights and no data, so it draws its
own images: three texture classes (wood grain, a woven grid, speckled granite) rendered with numpy
from a seed, plus synthetic defects (scratches, holes, colour stains, foreign blobs) whose masks are
exactly the pixels the defect changed. No image is downloaded or shipped; the same seed always
gives the same bytes, so a rebuilt data set leaves `iipad run`'s cached stages valid.

Layout written (the MVTec AD convention the loaders read):
`<root>/<cls>/train/good/NNN.png`, `<root>/<cls>/test/<defect>/NNN.png`,
`<root>/<cls>/ground_truth/<defect>/NNN_mask.png` (0/255).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

DEMO_SIZE = 256
# Defect types per class: each class gets a different mix so the defects are not one pattern.
DEMO_CLASSES: dict[str, tuple[str, ...]] = {
    "wood": ("scratch", "hole", "stain"),
    "weave": ("hole", "stain", "foreign"),
    "granite": ("scratch", "foreign", "stain"),
}

Rng = np.random.Generator
Texture = Callable[[Rng, int], np.ndarray]


@dataclass(frozen=True)
class DemoCounts:
    """How many images of each kind are written per class."""

    train_good: int = 4
    test_good: int = 4
    per_defect: int = 2


def _smooth_noise(rng: Rng, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise: the building block of every texture."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _colourise(value: np.ndarray, dark: tuple[float, float, float], light: tuple[float, float, float]) -> np.ndarray:
    """Map a field in [0, 1] linearly between two RGB colours (0..255 floats)."""
    low, high = np.asarray(dark), np.asarray(light)
    return low + np.clip(value, 0.0, 1.0)[..., None] * (high - low)


def _wood(rng: Rng, size: int) -> np.ndarray:
    """Growth rings: a sine of the warped horizontal coordinate, plus fine grain streaks."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    warp = 14.0 * _smooth_noise(rng, size, 24.0)
    period = rng.uniform(20.0, 26.0)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (x + warp + 0.15 * y) / period + rng.uniform(0, 2 * np.pi))
    streaks = ndimage.gaussian_filter(rng.standard_normal((size, size)), (6.0, 0.7), mode="wrap")
    value = 0.25 + 0.5 * rings**1.5 + 0.8 * streaks
    return _colourise(value, (96.0, 56.0, 28.0), (206.0, 150.0, 92.0))


def _weave(rng: Rng, size: int) -> np.ndarray:
    """Over/under strands: horizontal and vertical bands whose visibility alternates like a checkerboard."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    pitch = rng.uniform(15.0, 17.0)
    ox, oy = rng.uniform(0, pitch, size=2)
    u, v = (x + ox) / pitch, (y + oy) / pitch
    horizontal = np.sin(np.pi * (v % 1.0)) ** 0.6
    vertical = np.sin(np.pi * (u % 1.0)) ** 0.6
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    strands = np.where(over, horizontal, vertical)
    fibre = 0.06 * _smooth_noise(rng, size, 1.0)
    value = 0.15 + 0.75 * strands + fibre
    return _colourise(value, (38.0, 52.0, 84.0), (150.0, 170.0, 205.0))


def _granite(rng: Rng, size: int) -> np.ndarray:
    """Speckles: three grain colours where thresholded noise fields peak, on a grey matrix."""
    base = 0.5 + 0.08 * _smooth_noise(rng, size, 8.0)
    image = _colourise(base, (70.0, 70.0, 74.0), (200.0, 198.0, 196.0))
    grains = ((0.9, (25.0, 22.0, 24.0)), (1.1, (186.0, 128.0, 120.0)), (1.3, (236.0, 234.0, 228.0)))
    for threshold, colour in grains:
        spots = _smooth_noise(rng, size, 1.6) > threshold
        image[spots] = colour
    return image


TEXTURES: dict[str, Texture] = {"wood": _wood, "weave": _weave, "granite": _granite}


def _region(rng: Rng, size: int, radius: float) -> np.ndarray:
    """An irregular blob: a disc whose boundary is perturbed by smooth noise, at a random place."""
    margin = int(radius * 1.6)
    cy, cx = rng.integers(margin, size - margin, size=2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    distance = np.hypot(y - cy, x - cx) / radius
    return distance + 0.35 * _smooth_noise(rng, size, radius / 2.5) < 1.0


def _scratch(rng: Rng, image: np.ndarray) -> np.ndarray:
    """A thin curved line, lighter or darker than the surface."""
    size = image.shape[0]
    canvas = Image.new("L", (size, size), 0)
    start = rng.uniform(0.2 * size, 0.8 * size, size=2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.35 * size, 0.55 * size)
    bend = rng.uniform(-0.6, 0.6)
    points = []
    for t in np.linspace(-0.5, 0.5, 24):
        theta = angle + bend * t
        points.append((float(start[0] + t * length * np.cos(theta)), float(start[1] + t * length * np.sin(theta))))
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(rng.integers(5, 8)))
    mask = np.asarray(canvas) > 0
    shade = 235.0 if rng.random() < 0.5 else 15.0
    image[mask] = 0.25 * image[mask] + 0.75 * shade
    return mask


def _hole(rng: Rng, image: np.ndarray) -> np.ndarray:
    """A dark round hole with a shaded inner wall."""
    size = image.shape[0]
    mask = _region(rng, size, rng.uniform(14.0, 22.0))
    depth = ndimage.distance_transform_edt(mask)
    shade = 10.0 + 40.0 * np.exp(-depth / 3.0)
    image[mask] = shade[mask][:, None]
    return mask


def _stain(rng: Rng, image: np.ndarray) -> np.ndarray:
    """A translucent coloured stain: the texture stays visible under a saturated tint."""
    size = image.shape[0]
    mask = _region(rng, size, rng.uniform(22.0, 32.0))
    tint = np.array([(200.0, 30.0, 40.0), (40.0, 170.0, 60.0), (230.0, 200.0, 20.0)][rng.integers(0, 3)])
    image[mask] = 0.35 * image[mask] + 0.65 * tint
    return mask


def _foreign(rng: Rng, image: np.ndarray) -> np.ndarray:
    """A foreign object lying on the surface: an opaque blob of another colour with its own speckle."""
    size = image.shape[0]
    mask = _region(rng, size, rng.uniform(16.0, 26.0))
    colour = np.array([(245.0, 245.0, 240.0), (20.0, 90.0, 200.0), (250.0, 120.0, 10.0)][rng.integers(0, 3)])
    speckle = 18.0 * _smooth_noise(rng, size, 1.0)
    image[mask] = np.clip(colour[None, :] + speckle[mask][:, None], 0.0, 255.0)
    return mask


DEFECTS: dict[str, Callable[[Rng, np.ndarray], np.ndarray]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "foreign": _foreign,
}


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def build_demo_dataset(
    root: Path, seed: int = 0, size: int = DEMO_SIZE, counts: DemoCounts = DemoCounts()
) -> dict[str, int]:
    """Write the demo data set under `root`; return the number of images written per class.

    Every image has its own generator seeded from (seed, class, split, index), so the output is
    identical across runs and platforms for a given seed and does not depend on file order.
    """
    root = Path(root)
    written: dict[str, int] = {}
    for class_index, (cls, defects) in enumerate(DEMO_CLASSES.items()):
        texture = TEXTURES[cls]

        def rng_for(split: int, index: int) -> Rng:
            return np.random.default_rng([seed, class_index, split, index])

        for index in range(counts.train_good):
            _save_png(root / cls / "train" / "good" / f"{index:03d}.png", _to_uint8(texture(rng_for(0, index), size)))
        for index in range(counts.test_good):
            _save_png(root / cls / "test" / "good" / f"{index:03d}.png", _to_uint8(texture(rng_for(1, index), size)))
        for defect_index, defect in enumerate(defects):
            for index in range(counts.per_defect):
                rng = rng_for(2 + defect_index, index)
                image = texture(rng, size)
                mask = DEFECTS[defect](rng, image)
                _save_png(root / cls / "test" / defect / f"{index:03d}.png", _to_uint8(image))
                _save_png(
                    root / cls / "ground_truth" / defect / f"{index:03d}_mask.png",
                    mask.astype(np.uint8) * 255,
                )
        written[cls] = counts.train_good + counts.test_good + len(defects) * counts.per_defect
    return written
