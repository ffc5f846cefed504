"""Anomaly-detection metrics with exact definitions (numpy + scipy, no torch).

Why this package exists: published implementations disagree. The released IIPAD/AnomalyCLIP code
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

Modules, by concern: `ranking` (how positives rank among negatives, and AUROC / AP / F1-max from
those counts), `pixels` (the same counts streamed over pixel maps, with AU-PRO's region weights),
`pro` (the PRO curve, AU-PRO and the legacy variant), `curves` (ROC and PR curves for plots).
This module is their public interface: callers use `metrics.roc_auc`, `metrics.pixel_counts`, ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from iipad_cli.metrics.curves import pr_curve, roc_curve
from iipad_cli.metrics.pixels import pixel_auroc, pixel_average_precision, pixel_counts, pixel_f1_max
from iipad_cli.metrics.pro import DEFAULT_PRO_LIMIT, au_pro, au_pro_from_counts, legacy_pro, pro_curve
from iipad_cli.metrics.ranking import (
    average_precision,
    average_precision_from_counts,
    f1_max,
    f1_max_from_counts,
    pixel_auroc_from_counts,
    rank_counts,
    roc_auc,
)

__all__ = [
    "DEFAULT_PRO_LIMIT",
    "au_pro",
    "au_pro_from_counts",
    "average_precision",
    "average_precision_from_counts",
    "f1_max",
    "f1_max_from_counts",
    "legacy_pro",
    "nan_mean",
    "pixel_auroc",
    "pixel_auroc_from_counts",
    "pixel_average_precision",
    "pixel_counts",
    "pixel_f1_max",
    "pr_curve",
    "pro_curve",
    "rank_counts",
    "roc_auc",
    "roc_curve",
]


def nan_mean(values: Sequence[float]) -> tuple[float, int]:
    """Unweighted mean over the non-NaN values and how many there were (NaN, 0 when none).

    How every per-class metric is summarised: a class whose metric is undefined (NaN: one label
    only) is left out, and the count says over how many classes the mean is.
    """
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)
