"""`RankCounts` of pixels, streamed over the maps of a class, plus the region weights of AU-PRO.

Memory: pixel metrics never hold a float64 copy of all maps. They stream the maps twice, one image
at a time: pass 1 keeps only the positive (ground-truth) pixels with their region weights; pass 2
locates each negative pixel among the distinct positive scores (`np.searchsorted`) and counts,
per distinct positive score v, the negatives strictly above v and equal to v. Like the true
positives, the per-region overlap changes only at a positive score, so these counts make AU-PRO
exact too (`ranking` says why). Extra memory is O(positive pixels + one map).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from iipad_cli.metrics.ranking import (
    F1Max,
    NegativeTally,
    RankCounts,
    average_precision_from_counts,
    f1_max_from_counts,
    pixel_auroc_from_counts,
)

# 8-connectivity, as in MVTec AD's evaluation code and skimage.measure.label's default in 2-D.
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


@dataclass(frozen=True)
class PixelCounts(RankCounts):
    """`RankCounts` of pixels plus what AU-PRO needs, gathered in two streaming passes over the maps.

    Per value: `overlap` (sum of 1/(num_regions*area) over its positive pixels); `num_regions`:
    the 8-connected ground-truth regions of all masks.
    """

    overlap: np.ndarray
    num_regions: int


def check_pair(index: int, score_map: np.ndarray, mask: np.ndarray) -> None:
    """Refuse map `index` unless it is 2-D, finite and of its mask's shape (every pixel metric checks)."""
    if score_map.shape != mask.shape or score_map.ndim != 2:
        raise ValueError(f"map {index}: shape {score_map.shape} differs from its mask {mask.shape} (both must be 2-D)")
    if not np.isfinite(score_map).all():
        raise ValueError(f"map {index}: contains NaN or Inf")


def region_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The ground-truth regions of a mask: its 8-connected components (labelled array, count)."""
    labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return labelled, int(count)


def pixel_counts(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> PixelCounts:
    """Stream `maps`/`masks` (any indexable sequences, e.g. lazily decoded) into `PixelCounts`."""
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    positive_scores: list[np.ndarray] = []
    positive_weights: list[np.ndarray] = []
    num_negatives = 0
    num_regions = 0
    for index in range(len(maps)):
        score_map, mask = np.asarray(maps[index]), np.asarray(masks[index]).astype(bool)
        check_pair(index, score_map, mask)
        labelled, count = region_labels(mask)
        num_negatives += int(mask.size - np.count_nonzero(mask))
        if count == 0:
            continue
        region_of_pixel = labelled[mask]
        area = np.bincount(region_of_pixel)
        positive_scores.append(score_map[mask].astype(np.float64))
        positive_weights.append(1.0 / area[region_of_pixel])
        num_regions += count
    scores = np.concatenate(positive_scores) if positive_scores else np.zeros(0)
    weights = np.concatenate(positive_weights) if positive_weights else np.zeros(0)
    values, inverse = np.unique(scores, return_inverse=True)
    positives = np.bincount(inverse, minlength=values.size)
    overlap = np.bincount(inverse, weights=weights, minlength=values.size) / max(num_regions, 1)

    tally = NegativeTally(values)
    for index in range(len(maps)):
        mask = np.asarray(masks[index]).astype(bool)
        tally.add(np.asarray(maps[index])[~mask])
    return PixelCounts(
        values=values,
        positives=positives,
        negatives_equal=tally.equal,
        negatives_above=tally.above(),
        num_negatives=num_negatives,
        overlap=overlap,
        num_regions=num_regions,
    )


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    return pixel_auroc_from_counts(pixel_counts(maps, masks))


def pixel_average_precision(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    return average_precision_from_counts(pixel_counts(maps, masks))


def pixel_f1_max(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> F1Max:
    return f1_max_from_counts(pixel_counts(maps, masks))
