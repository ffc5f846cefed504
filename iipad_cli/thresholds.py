"""Label-free decision thresholds and the decisions made with them (numpy only, no torch, no I/O).

In few-shot use the only images known to be normal are the K shots per class (and whatever extra
normal images the user has). `iipad score` scores those normal images the way a test image is
scored (leave-one-out for K >= 2, augmented views of the shot for K = 1; `stages/calibrate.py`),
and this module turns their scores into thresholds. Nothing here ever sees a test label.

Why per category. iipad is one model for all classes, but its image scores are not on one scale:
the memory-bank distances and prompt probabilities of a texture differ from an object's by more
than the gap between normal and anomalous images within one class. A single global threshold
would be set by the noisiest class and miss every anomaly of the quiet ones. The banks are
category-aware (retrieval picks the bank images of the image's own kind), so an image's category
is the class of its top-1 retrieved bank image, known at prediction time without any label, and
each category gets its own threshold. The spread, however, is pooled over the categories: with
K = 2 shots a class has two normal scores, too few for a standard deviation of its own.

The rule (docs/scoring.md repeats it):

* image threshold of category c: t_c = mean_c + Z · s_pooled, Z = 3 (the Shewhart control-chart
  limit), mean_c the mean normal score of c, s_pooled the pooled within-category standard deviation
  sqrt(Σ_c Σ_i (s_ci − mean_c)² / (N − C)) over the N normal scores in C categories;
* pixel threshold of category c: the largest value of any normal calibration map of c (the
  lowest threshold at which no normal calibration pixel is flagged);
* a value is anomalous when it is strictly above its threshold;
* normalised score = (s − mean_c) / (t_c − mean_c): 0 at the normal mean, 1 at the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Z = 3.0
NORMAL = "normal"
ANOMALOUS = "anomalous"


@dataclass(frozen=True)
class CategoryThreshold:
    """One category's label-free thresholds and the normal statistics they come from."""

    count: int
    image_mean: float
    image_threshold: float
    pixel_threshold: float


def pooled_std(scores: Sequence[float], categories: Sequence[str]) -> float:
    """Pooled within-category sample standard deviation: sqrt(Σ (s − mean of its category)² / (N − C))."""
    values = np.asarray(scores, dtype=np.float64)
    names = np.asarray(categories)
    if values.size != names.size:
        raise ValueError(f"{values.size} scores but {names.size} categories")
    groups = [values[names == name] for name in dict.fromkeys(names.tolist())]
    freedom = values.size - len(groups)
    if freedom < 1:
        raise ValueError(f"{values.size} normal scores in {len(groups)} categories: no spread can be estimated")
    squares = sum(float(((group - group.mean()) ** 2).sum()) for group in groups)
    return math.sqrt(squares / freedom)


def category_thresholds(
    image_scores: Sequence[float], map_maxima: Sequence[float], categories: Sequence[str], z: float = Z
) -> dict[str, CategoryThreshold]:
    """Per category: t_c = mean_c + z · pooled std (image) and the largest normal map value (pixel).

    image_scores and map_maxima are those of the normal calibration images (one each per image),
    categories their category names. Raises ValueError when the normal scores have no spread (every
    normalised score would divide by zero).
    """
    scores = np.asarray(image_scores, dtype=np.float64)
    maxima = np.asarray(map_maxima, dtype=np.float64)
    names = np.asarray(categories)
    if not scores.size == maxima.size == names.size:
        raise ValueError("one image score, one map maximum and one category per calibration image")
    spread = pooled_std(scores, names)
    if spread <= 0.0:
        raise ValueError("the normal images' scores are all equal within their categories: no spread to set a threshold")
    result = {}
    for name in dict.fromkeys(names.tolist()):
        rows = names == name
        mean = float(scores[rows].mean())
        result[str(name)] = CategoryThreshold(
            count=int(rows.sum()),
            image_mean=mean,
            image_threshold=mean + z * spread,
            pixel_threshold=float(maxima[rows].max()),
        )
    return result


def normalised_score(score: float, normal_mean: float, threshold: float) -> float:
    """(s − mean) / (t − mean): 0 at the normal mean, 1 at the threshold. Needs t > mean."""
    if not threshold > normal_mean:
        raise ValueError(f"threshold {threshold:.6g} is not above the normal mean {normal_mean:.6g}")
    return (score - normal_mean) / (threshold - normal_mean)


def is_anomalous(value: float, threshold: float) -> bool:
    return value > threshold


def image_label(score: float, threshold: float) -> str:
    return ANOMALOUS if is_anomalous(score, threshold) else NORMAL


def binary_mask(score_map: np.ndarray, threshold: float) -> np.ndarray:
    """True where the map is strictly above the pixel threshold."""
    return np.asarray(score_map) > threshold


@dataclass(frozen=True)
class DecisionCounts:
    """Confusion counts of binary decisions against the ground truth."""

    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0

    def __add__(self, other: "DecisionCounts") -> "DecisionCounts":
        return DecisionCounts(
            self.true_positive + other.true_positive,
            self.false_positive + other.false_positive,
            self.false_negative + other.false_negative,
            self.true_negative + other.true_negative,
        )


def decision_counts(truth: np.ndarray, values: np.ndarray, thresholds: np.ndarray | float) -> DecisionCounts:
    """Counts of (value > threshold) against the boolean/0-1 truth; thresholds broadcast to values."""
    positive = np.asarray(truth).astype(bool)
    predicted = np.asarray(values) > thresholds
    if positive.shape != predicted.shape:
        raise ValueError(f"truth shape {positive.shape} differs from the values' {predicted.shape}")
    return DecisionCounts(
        true_positive=int(np.count_nonzero(predicted & positive)),
        false_positive=int(np.count_nonzero(predicted & ~positive)),
        false_negative=int(np.count_nonzero(~predicted & positive)),
        true_negative=int(np.count_nonzero(~predicted & ~positive)),
    )


def pixel_decision_counts(
    maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], thresholds: Iterable[float]
) -> DecisionCounts:
    """Pixel counts summed image by image (one map in memory at a time), each at its own threshold."""
    total = DecisionCounts()
    for score_map, mask, threshold in zip(maps, masks, thresholds, strict=True):
        total = total + decision_counts(mask, score_map, threshold)
    return total


def precision_recall_f1(counts: DecisionCounts) -> tuple[float, float, float]:
    """precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN); NaN where a denominator is 0
    (no predicted positives: precision; no actual positives: recall; neither: F1)."""
    tp, fp, fn = counts.true_positive, counts.false_positive, counts.false_negative
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan
    return precision, recall, f1
