"""How the positives rank among the negatives, and the metrics that follow from it.

AUROC, AP and F1-max depend only on the order of the scores. For each distinct score v of a
positive it is enough to know how many positives have score v and how many negatives lie strictly
above v and exactly at v (`RankCounts`): between two distinct positive scores the true positives
are constant, so those counts fix every vertex of the exact ROC and PR curves, every term of the
Mann-Whitney sum and of AP, and every candidate for F1-max; the results are exact, ties included.
`rank_counts` gathers them for one score per image; `pixels.pixel_counts` streams them over maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
class F1Max:
    """The largest F1 over all thresholds and the highest threshold that reaches it (NaN, NaN: undefined)."""

    value: float
    threshold: float


def _slots(values: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per score: index of the first distinct positive value >= it, and whether it is equal."""
    scores = scores.astype(np.float64)
    slot = np.searchsorted(values, scores, side="left")
    is_equal = np.zeros(slot.shape, dtype=bool)
    inside = slot < values.size
    is_equal[inside] = values[slot[inside]] == scores[inside]
    return slot, is_equal


class NegativeTally:
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
    tally = NegativeTally(values)
    tally.add(scores[~positive])
    positives = np.bincount(inverse, minlength=values.size)
    return RankCounts(values, positives, tally.equal, tally.above(), int((~positive).sum()))


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
