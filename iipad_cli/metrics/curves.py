"""The exact ROC and precision-recall curves of `RankCounts` (image or pixel level), for plots."""

from __future__ import annotations

import numpy as np

from iipad_cli.metrics.ranking import RankCounts


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
