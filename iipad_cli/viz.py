"""Heatmap figures: the image, the anomaly-map overlay and the ground truth, with the map's scale.

No plotting library is needed: the colormap is viridis (perceptually uniform, readable in grey
and by colour-blind viewers), evaluated from Matt Zucker's published degree-6 polynomial fit to
matplotlib's viridis table (max error below 0.01 per channel), and text is drawn with PIL's
default font.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from iipad_cli.artifacts import atomic_path

# Polynomial coefficients c0..c6 (per RGB channel) of the viridis fit, lowest order first.
_VIRIDIS_COEFFS = np.array(
    [
        [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
        [0.1050930431085774, 1.404613529898575, 1.384590162594685],
        [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
        [-4.634230498983486, -5.799100973351585, -19.33244095627987],
        [6.228269936347081, 14.17993336680509, 56.69055260068105],
        [4.776384997670288, -13.74514537774601, -65.35303263337234],
        [-5.435455855934631, 4.645852612178535, 26.3124352495832],
    ]
)


def _viridis_lut() -> np.ndarray:
    t = np.linspace(0.0, 1.0, 256)[:, None]
    rgb = np.zeros((256, 3))
    for coeff in _VIRIDIS_COEFFS[::-1]:
        rgb = rgb * t + coeff
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


VIRIDIS = _viridis_lut()

OVERLAY_ALPHA = 0.5
_BAR_WIDTH = 14
_MARGIN = 6
_LABEL_HEIGHT = 14


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 viridis colours, linear between vmin and vmax (clipped)."""
    span = vmax - vmin if vmax > vmin else 1.0
    scaled = np.clip((np.asarray(values, dtype=np.float64) - vmin) / span, 0.0, 1.0)
    return VIRIDIS[np.round(scaled * 255).astype(np.int64)]


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Blend the colourised map over an (H, W, 3) uint8 image of the same size."""
    blend = (1 - OVERLAY_ALPHA) * image.astype(np.float64) + OVERLAY_ALPHA * colorize(amap, vmin, vmax)
    return np.round(blend).astype(np.uint8)


def _format(value: float) -> str:
    return f"{value:.3g}"


def _colour_bar(height: int, vmin: float, vmax: float) -> Image.Image:
    """A vertical bar, vmax at the top and vmin at the bottom, with both numbers written beside it."""
    font = ImageFont.load_default()
    labels = [_format(vmax), _format(vmin)]
    text_width = max(int(font.getbbox(label)[2]) for label in labels)
    bar = Image.new("RGB", (_BAR_WIDTH + 4 + text_width, height), "white")
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(_BAR_WIDTH, axis=1)
    bar.paste(Image.fromarray(colorize(ramp, 0.0, 1.0)), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((_BAR_WIDTH + 3, 0), labels[0], fill="black", font=font)
    draw.text((_BAR_WIDTH + 3, height - _LABEL_HEIGHT + 2), labels[1], fill="black", font=font)
    return bar


def _mask_panel(mask: np.ndarray | None, size: tuple[int, int]) -> Image.Image:
    if mask is None:
        panel = Image.new("RGB", size, (128, 128, 128))
        ImageDraw.Draw(panel).text((4, 4), "no mask", fill="white", font=ImageFont.load_default())
        return panel
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool)[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2))


def heatmap_figure(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    *,
    mask: np.ndarray | None = None,
    show_mask: bool = True,
    title: str = "",
) -> Image.Image:
    """image | overlay (| ground truth) | colour bar, with column labels and a title line.

    `mask=None` with `show_mask` draws a grey "no mask" panel (an anomalous image without a
    ground-truth file); `show_mask=False` omits the column (predict on unlabelled images).
    """
    height, width = amap.shape
    panels = [("image", Image.fromarray(image)), ("anomaly map", Image.fromarray(overlay(image, amap, vmin, vmax)))]
    if show_mask:
        panels.append(("ground truth", _mask_panel(mask, (width, height))))
    bar = _colour_bar(height, vmin, vmax)
    top = 2 * _LABEL_HEIGHT if title else _LABEL_HEIGHT
    total_width = len(panels) * (width + _MARGIN) + bar.width + _MARGIN
    figure = Image.new("RGB", (total_width, top + height + _MARGIN), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    if title:
        draw.text((_MARGIN, 1), title, fill="black", font=font)
    x = _MARGIN
    for label, panel in panels:
        draw.text((x, top - _LABEL_HEIGHT + 1), label, fill="black", font=font)
        figure.paste(panel, (x, top))
        x += width + _MARGIN
    figure.paste(bar, (x, top))
    return figure


def save_png(figure: Image.Image, path: Path) -> None:
    """Write a PNG atomically (a crash never leaves a truncated figure)."""
    with atomic_path(Path(path)) as tmp:
        figure.save(tmp, format="PNG")
