"""Anomaly-detection metrics with exact definitions (numpy + scipy, no torch).

Why this module exists: published implementations disagree. The released IIPAD/AnomalyCLIP code
computes PRO on 200 equal-width thresholds and min-max rescales the FPR axis (so a single outlier
pixel can move it from 0.70 to 0.16); iipad reports the MVTec AD definition of AU-PRO and keeps
the released variant only as `legacy_pro`, labelled "not comparable" wherever it is shown.

Definitions (docs/metrics.md repeats them with the JSON schema):

* `roc_auc`: area under the ROC curve with tied scores counted one half (the Mann-Whitney
  statistic), which is exactly what scikit-learn's `roc_auc_score` computes.
* `average_precision`: scikit-learn's `average_precision_score`, the step-wise sum
  AP = sum_k (R_k - R_{k-1}) P_k over distinct score thresholds; this is what the paper calls "AUPR".
* `f1_max`: the largest F1 = 2PR/(P+R) over every threshold t on the scores (score >= t counts
  as anomalous; tied scores are one threshold), as MuSc, APRIL-GAN and WinCLIP report it.
* pixel AUROC, pixel AP, pixel F1-max: the same over every pixel of every map of a class.
* AU-PRO: MVTec AD's definition. Ground-truth regions are the 8-connected components of each mask;
  every negative pixel adds 1/num_negatives to the FPR and every pixel of region r adds
  1/(num_regions * area_r) to the per-region overlap once the threshold reaches its score; tied
  scores form one curve point; the curve (0,0) -> ... -> (1,1) is cut at FPR = limit with linear
  interpolation of the segment crossing it, and its trapezoid area is divided by limit.

Memory: pixel metrics never hold a float64 copy of all maps. They stream the maps twice, one image
at a time: pass 1 keeps only the positive (ground-truth) pixels with their region weights; pass 2
locates each negative pixel among the distinct positive scores (`np.searchsorted`) and counts,
per distinct positive score v, the negatives strictly above v and equal to v. Between two distinct
positive scores the true positives and the per-region overlap are constant, so those counts fix
every vertex of the exact ROC, PR and PRO curves, every term of the Mann-Whitney sum and of AP, and
every candidate for F1-max; the results are exact, ties included. Extra memory is O(positive
pixels + one map).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 8-connectivity, as in MVTec AD's evaluation code and skimage.measure.label's default in 2-D.
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)

DEFAULT_PRO_LIMIT = 0.3
LEGACY_PRO_STEPS = 200


def _binary_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    return labels.astype(bool)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC = P(score of a positive > score of a negative) + 0.5 P(equal); NaN with one label.

    Counted with a sort of the negatives and two binary searches per positive, so ties are exact
    (identical to the trapezoidal ROC of scikit-learn, which merges tied scores into one point).
    """
    positive = _binary_labels(labels)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    negatives = np.sort(scores[~positive])
    below = np.searchsorted(negatives, scores[positive], side="left").sum()
    below_or_equal = np.searchsorted(negatives, scores[positive], side="right").sum()
    return float((below + below_or_equal) / (2.0 * n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Step-wise average precision (scikit-learn's `average_precision_score`; the paper's "AUPR").

    AP = sum over distinct thresholds, descending, of (recall gain) x (precision at that threshold);
    no interpolation. NaN when there is no positive or no negative.
    """
    positive = _binary_labels(labels)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        return math.nan
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_positive = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_positive)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


@dataclass(frozen=True)
class RankCounts:
    """How the positives rank among the negatives: enough for exact AUROC, AP, F1-max and curves.

    `values` are the distinct scores of positives (ascending); per value: `positives` (count),
    `negatives_equal` and `negatives_above` (negatives with exactly that score / a higher score).
    A sample counts as predicted anomalous at threshold t when its score is >= t. Only thresholds
    at a positive score matter for AP and F1-max: between two of them the true positives are
    constant, and the higher threshold has no more false positives.
    """

    values: np.ndarray
    positives: np.ndarray
    negatives_equal: np.ndarray
    negatives_above: np.ndarray
    num_negatives: int

    @property
    def num_positives(self) -> int:
        return int(self.positives.sum())

    def true_positives(self) -> np.ndarray:
        """Per value v: positives with score >= v."""
        return np.cumsum(self.positives[::-1])[::-1]

    def false_positives(self) -> np.ndarray:
        """Per value v: negatives with score >= v."""
        return self.negatives_above + self.negatives_equal


@dataclass(frozen=True)
class PixelCounts(RankCounts):
    """`RankCounts` of pixels plus what AU-PRO needs, gathered in two streaming passes over the maps.

    Per value: `overlap` (sum of 1/(num_regions*area) over its positive pixels); `num_regions`:
    the 8-connected ground-truth regions of all masks.
    """

    overlap: np.ndarray
    num_regions: int


@dataclass(frozen=True)
class F1Max:
    """The largest F1 over all thresholds and the highest threshold that reaches it (NaN, NaN: undefined)."""

    value: float
    threshold: float


def _check_pair(index: int, score_map: np.ndarray, mask: np.ndarray) -> None:
    if score_map.shape != mask.shape or score_map.ndim != 2:
        raise ValueError(f"map {index}: shape {score_map.shape} differs from its mask {mask.shape} (both must be 2-D)")
    if not np.isfinite(score_map).all():
        raise ValueError(f"map {index}: contains NaN or Inf")


def _region_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return labelled, int(count)


def _slots(values: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per score: index of the first distinct positive value >= it, and whether it is equal."""
    scores = scores.astype(np.float64)
    slot = np.searchsorted(values, scores, side="left")
    is_equal = np.zeros(slot.shape, dtype=bool)
    inside = slot < values.size
    is_equal[inside] = values[slot[inside]] == scores[inside]
    return slot, is_equal


class _NegativeTally:
    """Counts negatives per slot of the distinct positive values, one batch of scores at a time."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.between = np.zeros(values.size + 1, dtype=np.int64)  # negatives in (values[j-1], values[j])
        self.equal = np.zeros(values.size, dtype=np.int64)
        self.half_table: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, negative_scores: np.ndarray) -> None:
        if negative_scores.dtype == np.float16:
            # float16 (how scores.h5 stores maps) has 65,536 bit patterns: locate each pattern once
            # and look the pixels up (O(1) per pixel instead of a binary search; ~3x faster overall).
            if self.half_table is None:
                self.half_table = _slots(self.values, np.arange(1 << 16, dtype=np.uint16).view(np.float16))
            codes = negative_scores.view(np.uint16)
            slot, is_equal = self.half_table[0][codes], self.half_table[1][codes]
        else:
            # Sorted needles make the binary searches cache-friendly (about 2x); only counts are kept.
            slot, is_equal = _slots(self.values, np.sort(negative_scores))
        self.between += np.bincount(slot[~is_equal], minlength=self.values.size + 1)
        self.equal += np.bincount(slot[is_equal], minlength=self.values.size)

    def above(self) -> np.ndarray:
        """Per value: negatives strictly above it."""
        # A negative in slot j (strictly between values[j-1] and values[j], or equal to values[j])
        # lies above values[k] for every k < j.
        per_slot = self.between[1:].copy()
        per_slot[:-1] += self.equal[1:]
        return np.cumsum(per_slot[::-1])[::-1] if self.values.size else per_slot


def rank_counts(labels: np.ndarray, scores: np.ndarray) -> RankCounts:
    """`RankCounts` of one score per sample (image level)."""
    positive = _binary_labels(labels)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size != positive.size:
        raise ValueError(f"{positive.size} labels but {scores.size} scores")
    values, inverse = np.unique(scores[positive], return_inverse=True)
    tally = _NegativeTally(values)
    tally.add(scores[~positive])
    positives = np.bincount(inverse, minlength=values.size)
    return RankCounts(values, positives, tally.equal, tally.above(), int((~positive).sum()))


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
        _check_pair(index, score_map, mask)
        labelled, count = _region_labels(mask)
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

    tally = _NegativeTally(values)
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


def pixel_auroc_from_counts(counts: RankCounts) -> float:
    """Mann-Whitney AUROC (of pixels, or of images via `rank_counts`); NaN without positives or negatives."""
    num_positives = counts.num_positives
    if num_positives == 0 or counts.num_negatives == 0:
        return math.nan
    below = counts.num_negatives - counts.negatives_above - counts.negatives_equal
    wins = np.sum(counts.positives * (below + 0.5 * counts.negatives_equal))
    return float(wins / (num_positives * counts.num_negatives))


def average_precision_from_counts(counts: RankCounts) -> float:
    """Step-wise AP = sum over distinct positive values v of (positives at v / P) x precision(>= v).

    Thresholds at a negative-only score add no recall, so they add nothing to the sum: this is
    scikit-learn's `average_precision_score`. NaN without positives or negatives.
    """
    num_positives = counts.num_positives
    if num_positives == 0 or counts.num_negatives == 0:
        return math.nan
    true_positives = counts.true_positives()
    precision = true_positives / (true_positives + counts.false_positives())
    return float(np.sum(counts.positives / num_positives * precision))


def f1_max_from_counts(counts: RankCounts) -> F1Max:
    """Max over thresholds t of F1 = 2 TP / (2 TP + FP + FN) = 2 TP(t) / (TP(t) + FP(t) + P).

    The maximum is at a distinct positive value (see `RankCounts`); among equal F1 values the
    highest threshold is reported. NaN without positives or negatives (like AUROC and AP).
    """
    num_positives = counts.num_positives
    if num_positives == 0 or counts.num_negatives == 0:
        return F1Max(math.nan, math.nan)
    true_positives = counts.true_positives()
    f1 = 2.0 * true_positives / (true_positives + counts.false_positives() + num_positives)
    best = int(np.flatnonzero(f1 == f1.max())[-1])
    return F1Max(float(f1[best]), float(counts.values[best]))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> F1Max:
    """Image F1-max: the best F1 over every threshold on the scores (score >= t = anomalous)."""
    return f1_max_from_counts(rank_counts(labels, scores))


def roc_curve(counts: RankCounts) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC curve (FPR, TPR) from (0, 0) to (1, 1), threshold descending.

    Per distinct positive value v two vertices, just above v and at v, so tied positives and
    negatives form one diagonal segment (the area under it is the AUROC, ties counted one half).
    """
    descending = slice(None, None, -1)
    true_positives = counts.true_positives()[descending]
    tpr_at = true_positives / max(counts.num_positives, 1)
    tpr_above = (true_positives - counts.positives[descending]) / max(counts.num_positives, 1)
    fpr_above = counts.negatives_above[descending] / max(counts.num_negatives, 1)
    fpr_at = counts.false_positives()[descending] / max(counts.num_negatives, 1)
    fpr = np.concatenate(([0.0], np.column_stack((fpr_above, fpr_at)).ravel(), [1.0]))
    tpr = np.concatenate(([0.0], np.column_stack((tpr_above, tpr_at)).ravel(), [1.0]))
    return fpr, tpr


def pr_curve(counts: RankCounts) -> tuple[np.ndarray, np.ndarray]:
    """The step-wise precision-recall curve (recall, precision) whose area is exactly the AP.

    For each distinct positive value v (descending) a horizontal step at precision(>= v) over
    (recall(> v), recall(>= v)]; it starts at recall 0 with the first step's precision.
    """
    true_positives = counts.true_positives()[::-1]
    precision = true_positives / np.maximum(true_positives + counts.false_positives()[::-1], 1)
    recall_at = true_positives / max(counts.num_positives, 1)
    recall_before = np.r_[0.0, recall_at[:-1]]
    recall = np.column_stack((recall_before, recall_at)).ravel()
    return recall, np.repeat(precision, 2)

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


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    return pixel_auroc_from_counts(pixel_counts(maps, masks))


def pixel_average_precision(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    return average_precision_from_counts(pixel_counts(maps, masks))


def pixel_f1_max(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> F1Max:
    return f1_max_from_counts(pixel_counts(maps, masks))


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
        _check_pair(index, score_map, mask)
        low, high = min(low, float(score_map.min())), max(high, float(score_map.max()))
        num_regions += _region_labels(mask)[1]
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
        labelled, regions = _region_labels(mask)
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


def nan_mean(values: Sequence[float]) -> tuple[float, int]:
    """Unweighted mean over the non-NaN values and how many there were (NaN, 0 when none)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)
