"""Image and mask decoding: the exact preprocessing of the released code, and honest ground truth.

Images: PIL decode, EXIF orientation applied, any mode (greyscale, RGBA, palette, 16-bit) turned
into 8-bit RGB, squashed to S x S with PIL bicubic (no aspect preservation, as BLIP's processor and
the released torchvision pipeline do), scaled to [0, 1] and normalised with OpenAI CLIP mean/std.
The float operations mirror torchvision's ToTensor + Normalize so the tensors are bit-identical.

Masks: binarised with `> 0` (VisA stores class ids 1..9, MVTec 3D-AD 253/254), then resized to
the evaluation resolution R the way the released code does: bilinear (PIL, on the 0/255 image),
then re-binarised at 0.5 (a resized value v in 0..255 counts when v / 255 >= 0.5, i.e. v >= 128).
Nearest-neighbour would keep thin defects more often but would not match published numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from iipad_cli.config import CLIP_MEAN, CLIP_STD
from iipad_cli.errors import IipadError

if TYPE_CHECKING:
    import torch

# Modes holding more than 8 bits per sample; PIL's own convert("L") clips them instead of scaling.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# A resized 0/255 mask value v is foreground when v / 255 >= 0.5.
MASK_THRESHOLD = 128

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, UnidentifiedImageError)


def _open(path: Path, what: str) -> Image.Image:
    """Fully decoded, EXIF-transposed image; any decoding failure is a one-line IipadError."""
    try:
        with Image.open(path) as handle:
            handle.load()
            image = ImageOps.exif_transpose(handle)
            image.load()
            return image
    except _DECODE_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise IipadError(f"{path}: unreadable {what} ({reason})") from None


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit: round(v * 255 / 65535) = round(v / 257), so 65535 maps to 255."""
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; alpha is dropped as PIL's convert does (the released code's path)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_to_eight(image).convert("RGB")
    if image.mode == "P":
        # Via RGBA so palette transparency is read as alpha (and dropped) without PIL warnings.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    return to_rgb(_open(path, "image"))


def resized_image(path: Path, resolution: int) -> np.ndarray:
    """The image as the model saw it (squashed to a square, bicubic) at the map's resolution, as
    the heatmaps and overlays show it."""
    return np.asarray(load_rgb(path).resize((resolution, resolution), Image.Resampling.BICUBIC))


def normalise(image: Image.Image, image_size: int) -> torch.Tensor:
    """(3, S, S) float32: bicubic squash, /255, (x - mean) / std, as torchvision's ToTensor + Normalize."""
    # Imported here: reading images and masks (metrics --resolution native, report) needs no torch.
    import torch

    resized = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub(mean).div(std)


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, as `preprocess_image` returns it, from the header alone."""
    try:
        with Image.open(path) as handle:
            width, height = handle.size
            orientation = handle.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise IipadError(f"{path}: unreadable image ({reason})") from None
    # Orientations 5-8 rotate by 90 degrees (transposed width and height).
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def preprocess_image(path: Path, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The model input for one image file and its (width, height) after EXIF orientation."""
    image = load_rgb(path)
    return normalise(image, image_size), image.size


def binarise_mask(image: Image.Image) -> np.ndarray:
    """(H, W) bool, True where any colour channel is non-zero (alpha ignored)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("1", "L", "F"):
        values = np.asarray(image)
    else:
        values = np.asarray(image.convert("RGB")).max(axis=2)
    return values > 0


def resize_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """(R, R) bool: bilinear on the 0/255 image, then >= 0.5 (the released code's ground truth)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    resized = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= MASK_THRESHOLD


def load_mask(path: Path, image_size: tuple[int, int], resolution: int) -> np.ndarray:
    """The ground truth of one anomalous image at resolution R; its size must equal the image's."""
    image = _open(path, "mask")
    if image.size != image_size:
        raise IipadError(
            f"{path}: mask is {image.size[0]}x{image.size[1]} but its image is {image_size[0]}x{image_size[1]}"
        )
    return resize_mask(binarise_mask(image), resolution)
