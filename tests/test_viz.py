"""The embedded viridis colormap and the heatmap figure layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from iipad_cli import viz

# matplotlib's published viridis table (_cm_listed._viridis_data) at indices 0, 64, 128, 192, 255.
VIRIDIS_ANCHORS = {
    0: (0.267004, 0.004874, 0.329415),
    64: (0.231674, 0.318106, 0.544834),
    128: (0.128729, 0.563265, 0.551229),
    192: (0.369214, 0.788888, 0.382914),
    255: (0.993248, 0.906157, 0.143936),
}


def test_viridis_lut_matches_published_anchors() -> None:
    for index, rgb in VIRIDIS_ANCHORS.items():
        expected = np.round(np.array(rgb) * 255)
        assert np.abs(viz.VIRIDIS[index].astype(float) - expected).max() <= 6, index


def test_viridis_lightness_increases() -> None:
    """Perceptual ordering: luminance rises along the map (sampled every 8 entries, above rounding noise)."""
    luminance = viz.VIRIDIS[::8].astype(float) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > 0)


def test_colorize_is_linear_between_vmin_and_vmax_and_clips() -> None:
    values = np.array([[-1.0, 2.0, 2.5, 3.0, 9.0]])
    colours = viz.colorize(values, 2.0, 3.0)
    assert (colours[0, 0] == viz.VIRIDIS[0]).all() and (colours[0, 1] == viz.VIRIDIS[0]).all()
    assert (colours[0, 2] == viz.VIRIDIS[128]).all()
    assert (colours[0, 3] == viz.VIRIDIS[255]).all() and (colours[0, 4] == viz.VIRIDIS[255]).all()


def test_heatmap_figure_panels_and_scale(tmp_path: Path) -> None:
    size = 32
    image = np.full((size, size, 3), 200, dtype=np.uint8)
    amap = np.linspace(0.0, 1.0, size * size).reshape(size, size)
    mask = np.zeros((size, size), dtype=bool)
    mask[:4, :4] = True
    figure = viz.heatmap_figure(image, amap, 0.0, 1.0, mask=mask, title="x (random weights)")
    path = tmp_path / "fig.png"
    viz.save_png(figure, path)
    loaded = np.asarray(Image.open(path))
    top = 2 * 14
    first = loaded[top : top + size, 6 : 6 + size]
    assert (first == 200).all()
    second = loaded[top : top + size, 6 + size + 6 : 6 + 2 * size + 6].astype(int)
    expected_corner = np.round(0.5 * 200 + 0.5 * viz.VIRIDIS[0].astype(float))
    assert np.abs(second[0, 0] - expected_corner).max() <= 1
    gt = loaded[top : top + size, 6 + 2 * (size + 6) : 6 + 3 * size + 12]
    assert (gt[:4, :4] == 255).all() and (gt[10:, 10:] == 0).all()
    without_gt = viz.heatmap_figure(image, amap, 0.0, 1.0, show_mask=False)
    assert without_gt.width == figure.width - (size + 6)
