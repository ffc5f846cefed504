"""Per-region overlap (PRO): the exact curve, AU-PRO (MVTec AD's definition) and the released
code's variant, kept for comparison only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from iipad_cli.metrics.pixels import PixelCounts, check_pair, pixel_counts, region_labels

DEFAULT_PRO_LIMIT = 0.3
LEGACY_PRO_STEPS = 200


def pro_curve(counts: PixelCounts) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve (FPR, per-region overlap), from (0, 0) to (1, 1), threshold descending.

    For each distinct positive score v (descending) two vertices: just above v (FPR from the
    negatives > v) and at v (negatives >= v, overlap including v's pixels). Thresholds that only
    move negatives lie on horizontal segments between those vertices and add no area.
    """
    descending = slice(None, None, -1)
    overlap_at = np.cumsum(counts.overlap[descending])
    overlap_above = overlap_at - counts.overlap[descending]
    fpr_above = counts.negatives_above[descending] / counts.num_negatives
    fpr_at = (counts.negatives_above + counts.negatives_equal)[descending] / counts.num_negatives
    fpr = np.concatenate(([0.0], np.column_stack((fpr_above, fpr_at)).ravel(), [1.0]))
    pro = np.concatenate(([0.0], np.column_stack((overlap_above, overlap_at)).ravel(), [1.0]))
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of the polyline (x nondecreasing) over [0, limit], divided by `limit`.

    The one segment that crosses `limit` is cut there with linear interpolation.
    """
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    inside = x1 <= limit
    area = float(np.sum(0.5 * (x1[inside] - x0[inside]) * (y0[inside] + y1[inside])))
    crossing = np.flatnonzero((x0 < limit) & (x1 > limit))
    if crossing.size:
        i = crossing[0]
        y_at_limit = y0[i] + (y1[i] - y0[i]) * (limit - x0[i]) / (x1[i] - x0[i])
        area += 0.5 * (limit - x0[i]) * (y0[i] + y_at_limit)
    return area / limit


def au_pro_from_counts(counts: PixelCounts, limit: float = DEFAULT_PRO_LIMIT) -> float:
    """MVTec AU-PRO up to FPR `limit`, divided by `limit`; NaN without regions or negatives."""
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"pro limit must be in (0, 1], got {limit}")
    if counts.num_regions == 0 or counts.num_negatives == 0:
        return math.nan
    fpr, pro = pro_curve(counts)
    return area_up_to(fpr, pro, limit)


def au_pro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], limit: float = DEFAULT_PRO_LIMIT) -> float:
    return au_pro_from_counts(pixel_counts(maps, masks), limit)


def legacy_pro(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    limit: float = DEFAULT_PRO_LIMIT,
    steps: int = LEGACY_PRO_STEPS,
) -> float:
    """The released code's PRO (`cal_pro_score`, from cflow-ad): for comparison only, NOT AU-PRO.

    Thresholds `np.arange(min, max, (max-min)/steps)` over the class's maps; a pixel is predicted
    anomalous when its score > threshold; per threshold PRO = mean over all regions of TP/area and
    FPR = FP / negatives; keep FPR < limit, min-max rescale the kept FPRs to [0, 1], trapezoid.
    Computed without a loop over thresholds: each pixel is binned once by `np.searchsorted`.
    NaN when the maps are constant, there are no regions, or fewer than two distinct kept FPRs.
    """
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    low, high = math.inf, -math.inf
    num_regions = 0
    num_negatives = 0
    for index in range(len(maps)):
        score_map, mask = np.asarray(maps[index]), np.asarray(masks[index]).astype(bool)
        check_pair(index, score_map, mask)
        low, high = min(low, float(score_map.min())), max(high, float(score_map.max()))
        num_regions += region_labels(mask)[1]
        num_negatives += int(mask.size - np.count_nonzero(mask))
    if num_regions == 0 or num_negatives == 0 or not high > low:
        return math.nan
    thresholds = np.arange(low, high, (high - low) / steps)
    count = thresholds.size
    false_positives = np.zeros(count + 1, dtype=np.int64)
    overlap = np.zeros(count + 1, dtype=np.float64)
    for index in range(len(maps)):
        score_map, mask = np.asarray(maps[index]).astype(np.float64), np.asarray(masks[index]).astype(bool)
        # Number of thresholds strictly below the score = thresholds at which the pixel is positive.
        exceeded = np.searchsorted(thresholds, score_map, side="left")
        false_positives += np.bincount(exceeded[~mask], minlength=count + 1)
        labelled, regions = region_labels(mask)
        if regions:
            region_of_pixel = labelled[mask]
            area = np.bincount(region_of_pixel)
            overlap += np.bincount(exceeded[mask], weights=1.0 / area[region_of_pixel], minlength=count + 1)
    # At threshold i the positives are the pixels with more than i thresholds below them.
    fpr = np.cumsum(false_positives[::-1])[::-1][1:] / num_negatives
    pro = np.cumsum(overlap[::-1])[::-1][1:] / num_regions
    keep = fpr < limit
    kept_fpr, kept_pro = fpr[keep], pro[keep]
    if kept_fpr.size < 2 or kept_fpr.max() == kept_fpr.min():
        return math.nan
    scaled = (kept_fpr - kept_fpr.min()) / (kept_fpr.max() - kept_fpr.min())
    # FPR falls as the threshold rises; reversing (not re-sorting) keeps the released code's order
    # of points with equal FPR, which decides the area (sklearn.metrics.auc does the same).
    return float(np.trapezoid(kept_pro[::-1], scaled[::-1]))
