"""Image preprocessing and ground-truth masks against independent computations.

The reference for images is the released code's torchvision pipeline (Resize bicubic, CenterCrop,
ToTensor, Normalize with OpenAI CLIP mean/std); mode conversions and mask resizing are written out
with numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from iipad_cli.config import CLIP_MEAN, CLIP_STD
from iipad_cli.data.images import (
    binarise_mask,
    load_mask,
    load_rgb,
    normalise,
    oriented_size,
    preprocess_image,
    resize_mask,
    to_rgb,
)
from iipad_cli.errors import IipadError

REFERENCE = transforms.Compose(
    [
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ]
)


def _pattern(height: int, width: int) -> np.ndarray:
    """An asymmetric RGB test image (so a wrong rotation or flip cannot go unnoticed)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7) % 256, (y * 11) % 256, (x * y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    "rel",
    [
        "mvtec/bottle/test/good/000.png",  # RGB 900x900
        "mvtec/tire/train/good/000.png",  # RGB 600x800 portrait
        "mvtec/magnetic_tile/test/crack/000.png",  # greyscale (mode L), odd size
        "visa/tile_b/Data/Images/Anomaly/002.JPG",  # JPEG
    ],
)
def test_preprocessing_equals_released_torchvision_pipeline(shared_data: Path, rel: str) -> None:
    path = shared_data / rel
    tensor, size = preprocess_image(path, 224)
    with Image.open(path) as image:
        expected = REFERENCE(image.convert("RGB"))
        assert size == image.size
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 224, 224)
    assert torch.equal(tensor, expected)


def test_normalisation_is_mean_std_of_unit_range() -> None:
    """A constant image: every pixel is (v / 255 - mean_c) / std_c, computed by hand."""
    image = Image.fromarray(np.full((5, 9, 3), (10, 128, 250), dtype=np.uint8))
    tensor = normalise(image, 14)
    for channel, value in enumerate((10, 128, 250)):
        expected = (value / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert torch.allclose(tensor[channel], torch.full((14, 14), expected), atol=1e-6)


def test_greyscale_rgba_and_palette_become_rgb() -> None:
    grey = np.array([[0, 50], [200, 255]], dtype=np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey, mode="L"))), np.repeat(grey[..., None], 3, axis=2))

    rgba = np.concatenate([_pattern(4, 5), np.full((4, 5, 1), 7, dtype=np.uint8)], axis=2)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(rgba, mode="RGBA"))), rgba[..., :3])

    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1], palette[2] = (255, 0, 0), (10, 20, 30)
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.flatten().tolist())
    image.info["transparency"] = 0
    assert np.array_equal(np.asarray(to_rgb(image)), palette[indices])


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path, mode: str) -> None:
    values = np.array([[0, 128, 257], [32896, 60000, 65535]], dtype=np.uint16)
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)  # 0, 0, 1, 128, 233, 255
    if mode == "I;16":
        path = tmp_path / "sixteen.png"
        Image.fromarray(values).save(path)
        with Image.open(path) as check:
            assert check.mode == "I;16"
        rgb = load_rgb(path)
    else:
        rgb = to_rgb(Image.fromarray(values.astype(np.int32), mode="I"))
    assert rgb.mode == "RGB"
    assert np.array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Orientation 6 means "rotate 90° clockwise to display": the model must see the displayed image."""
    pixels = _pattern(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    displayed = np.rot90(pixels, k=-1)
    loaded = load_rgb(path)
    assert loaded.size == (20, 30)
    assert np.array_equal(np.asarray(loaded), displayed)
    tensor, size = preprocess_image(path, 28)
    assert size == (20, 30)
    assert oriented_size(path) == (20, 30)  # from the header, without decoding
    assert torch.equal(tensor, normalise(Image.fromarray(np.ascontiguousarray(displayed)), 28))


@pytest.mark.parametrize("orientation", [1, 3, 5, 8])
def test_oriented_size_matches_the_decoded_image(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.jpg"
    Image.fromarray(_pattern(20, 30)).save(path, exif=exif)
    assert oriented_size(path) == load_rgb(path).size


def test_truncated_and_garbage_images_are_one_line_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_pattern(64, 64)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    for path in (truncated, garbage):
        with pytest.raises(IipadError) as error:
            preprocess_image(path, 224)
        message = str(error.value)
        assert message.startswith(f"{path}: unreadable image") and "\n" not in message


def test_binarise_keeps_small_class_ids_and_253_254() -> None:
    values = np.array([[0, 1, 2], [253, 254, 255]], dtype=np.uint8)
    assert np.array_equal(binarise_mask(Image.fromarray(values, mode="L")), values > 0)
    rgb = np.zeros((1, 3, 3), dtype=np.uint8)
    rgb[0, 1, 2] = 1
    assert binarise_mask(Image.fromarray(rgb)).tolist() == [[False, True, False]]


def test_mask_resize_written_out_cases() -> None:
    """Bilinear (triangle filter scaled by the zoom) then >= 0.5, worked out by hand.

    Downscale x2: output column c averages input columns 2c-1..2c+2 with weights 1/8, 3/8, 3/8, 1/8.
    A 1-pixel line gets at most 3/8 < 0.5 and disappears; a 2-pixel line at columns 2c, 2c+1 gets
    3/4 at column c and 1/8 at its neighbours. Upscale x2 of a left half keeps the left half:
    output column 3 reads 3/4 of input column 1, output column 4 reads 1/4 of it.
    """
    thin = np.zeros((448, 448), dtype=bool)
    thin[:, 100] = True
    assert not resize_mask(thin, 224).any()
    thick = np.zeros((448, 448), dtype=bool)
    thick[:, 100:102] = True
    expected = np.zeros((224, 224), dtype=bool)
    expected[:, 50] = True
    assert np.array_equal(resize_mask(thick, 224), expected)
    half = np.zeros((4, 4), dtype=bool)
    half[:, :2] = True
    up = np.zeros((8, 8), dtype=bool)
    up[:, :4] = True
    assert np.array_equal(resize_mask(half, 8), up)
    assert np.array_equal(resize_mask(up, 4), half)


def test_fixture_masks_survive_resizing(shared_data: Path) -> None:
    """Masks with values 253/254 (tire) and 1/2 (VisA) must not come out empty."""
    for mask_path, image_path in [
        (shared_data / "mvtec/tire/ground_truth/hole/000_mask.png", shared_data / "mvtec/tire/test/hole/000.png"),
        (shared_data / "mvtec/tire/ground_truth/cut/000_mask.png", shared_data / "mvtec/tire/test/cut/000.png"),
        (shared_data / "visa/tile_a/Data/Masks/Anomaly/002.png", shared_data / "visa/tile_a/Data/Images/Anomaly/002.JPG"),
    ]:
        with Image.open(image_path) as image:
            mask = load_mask(mask_path, image.size, 224)
        assert mask.dtype == bool and mask.shape == (224, 224) and mask.any()


def test_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    path = tmp_path / "m_mask.png"
    Image.fromarray(np.full((10, 12), 255, dtype=np.uint8)).save(path)
    with pytest.raises(IipadError, match=r"m_mask.png: mask is 12x10 but its image is 10x12") as error:
        load_mask(path, (10, 12), 224)
    assert str(path) in str(error.value)
