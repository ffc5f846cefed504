"""Metrics against independent, written-out computations and scikit-learn."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from iipad_cli import metrics
from iipad_cli.metrics import pixels


def regions_8(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components by breadth-first flood fill (independent of scipy)."""
    seen = np.zeros(mask.shape, dtype=bool)
    found = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region = np.zeros(mask.shape, dtype=bool)
        queue = deque([start])
        seen[start] = True
        while queue:
            r, c = queue.popleft()
            region[r, c] = True
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        found.append(region)
    return found


def reference_au_pro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float) -> float:
    """MVTec AU-PRO the slow way: one curve point per distinct threshold, descending."""
    scores = np.stack([m.astype(np.float64) for m in maps])
    truth = np.stack(masks).astype(bool)
    regions = [(i, region) for i, mask in enumerate(truth) for region in regions_8(mask)]
    negatives = ~truth
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        fprs.append((predicted & negatives).sum() / negatives.sum())
        pros.append(np.mean([(predicted[i] & region).sum() / region.sum() for i, region in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
            break
    return area / limit


def reference_legacy_pro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """The released `cal_pro_score`, transcribed with its loop over thresholds."""
    amaps = np.stack([m.astype(np.float64) for m in maps])
    truth = np.stack(masks).astype(bool)
    low, high = amaps.min(), amaps.max()
    delta = (high - low) / 200
    pros, fprs = [], []
    for threshold in np.arange(low, high, delta):
        binary = amaps > threshold
        per_region = [
            binary[i][region].sum() / region.sum() for i, mask in enumerate(truth) for region in regions_8(mask)
        ]
        fprs.append(np.logical_and(~truth, binary).sum() / (~truth).sum())
        pros.append(np.mean(per_region))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    kept = fprs[keep]
    kept = (kept - kept.min()) / (kept.max() - kept.min())
    return float(auc(kept, pros[keep]))


def random_masks(rng: np.random.Generator, count: int, size: int, good: int) -> list[np.ndarray]:
    """`count` masks with 1-3 rectangular regions each (some touching diagonally), then `good` empty ones."""
    masks = []
    for _ in range(count):
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 5, 2)
            mask[r : r + h, c : c + w] = True
        masks.append(mask)
    masks += [np.zeros((size, size), dtype=bool) for _ in range(good)]
    return masks


def scored(rng: np.random.Generator, masks: list[np.ndarray], levels: int | None) -> list[np.ndarray]:
    """Scores shifted up inside the masks; `levels` quantises them to create many ties."""
    maps = []
    for mask in masks:
        score = rng.normal(size=mask.shape) + 1.5 * mask
        if levels is not None:
            score = np.round(score * levels / 4)
        maps.append(score.astype(np.float32))
    return maps


def test_regions_are_8_connected() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region
    mask[4, 4] = True
    assert pixels.region_labels(mask)[1] == 2 == len(regions_8(mask))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [None, 6, 40])
def test_au_pro_matches_reference(seed: int, levels: int | None, dtype: type) -> None:
    """float16 takes the lookup-table path, float32 the binary-search path."""
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, count=4, size=14, good=2)
    maps = [m.astype(dtype) for m in scored(rng, masks, levels)]
    for limit in (0.3, 0.05, 1.0):
        assert metrics.au_pro(maps, masks, limit) == pytest.approx(reference_au_pro(maps, masks, limit), abs=1e-6)


def test_au_pro_when_fpr_jumps_past_the_limit_in_one_tie() -> None:
    """Most negatives share one low score, so FPR goes from < 0.3 straight to 1: the cut interpolates."""
    rng = np.random.default_rng(3)
    masks = random_masks(rng, count=3, size=12, good=1)
    maps = []
    for mask in masks:
        score = np.where(rng.random(mask.shape) < 0.85, 0.0, rng.integers(1, 9, mask.shape)).astype(np.float32)
        score[mask] = rng.integers(0, 10, int(mask.sum()))
        maps.append(score)
    fpr, _ = metrics.pro_curve(metrics.pixel_counts(maps, masks))
    assert not np.any((fpr >= 0.3) & (fpr < 0.6))  # no curve point in [0.3, 0.6): a long last segment
    assert metrics.au_pro(maps, masks) == pytest.approx(reference_au_pro(maps, masks, 0.3), abs=1e-6)


def test_good_only_images_add_negatives_only() -> None:
    rng = np.random.default_rng(4)
    masks = random_masks(rng, count=2, size=10, good=0)
    maps = scored(rng, masks, 8)
    good_masks = [np.zeros((10, 10), dtype=bool) for _ in range(3)]
    good_maps = scored(rng, good_masks, 8)
    with_good = metrics.au_pro(maps + good_maps, masks + good_masks)
    assert with_good == pytest.approx(reference_au_pro(maps + good_maps, masks + good_masks, 0.3), abs=1e-6)
    assert math.isnan(metrics.au_pro(good_maps, good_masks))


def test_au_pro_invariant_to_increasing_transform_and_outlier_but_legacy_is_not() -> None:
    """AU-PRO depends on the ranking only. Raising the top pixel to 1000 (scores are ~N(0, 1))
    keeps the ranking, yet it squeezes the 200 equal-width legacy thresholds into a few bins,
    which moves the legacy number from 0.63 to 0.26."""
    rng = np.random.default_rng(5)
    masks = random_masks(rng, count=6, size=24, good=4)
    maps = scored(rng, masks, None)
    base = metrics.au_pro(maps, masks)
    transformed = [np.exp(2.0 * m.astype(np.float64)) + m.astype(np.float64) ** 3 for m in maps]
    assert metrics.au_pro(transformed, masks) == pytest.approx(base, abs=1e-12)
    with_outlier = [m.copy() for m in maps]
    image = int(np.argmax([m.max() for m in maps]))
    with_outlier[image][np.unravel_index(np.argmax(maps[image]), maps[image].shape)] = 1000.0
    assert metrics.au_pro(with_outlier, masks) == pytest.approx(base, abs=1e-12)
    legacy_before, legacy_after = metrics.legacy_pro(maps, masks), metrics.legacy_pro(with_outlier, masks)
    assert abs(legacy_before - legacy_after) > 0.2


@pytest.mark.parametrize("seed", [0, 1])
def test_legacy_pro_matches_released_code_transcription(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, count=3, size=16, good=2)
    maps = scored(rng, masks, None)
    assert metrics.legacy_pro(maps, masks) == pytest.approx(reference_legacy_pro(maps, masks), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_pixel_auroc_matches_sklearn(dtype: type) -> None:
    rng = np.random.default_rng(6)
    masks = random_masks(rng, count=5, size=20, good=3)
    maps = [m.astype(dtype) for m in scored(rng, masks, 10 if dtype == np.float16 else None)]
    truth = np.concatenate([m.ravel() for m in masks])
    flat = np.concatenate([m.ravel().astype(np.float64) for m in maps])
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(truth, flat), abs=1e-9)


@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_sklearn(ties: bool) -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels
    if ties:
        scores = np.round(scores * 2)
    assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert metrics.average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)


def test_one_label_gives_nan() -> None:
    assert math.isnan(metrics.roc_auc(np.ones(5), np.arange(5.0)))
    assert math.isnan(metrics.average_precision(np.zeros(5), np.arange(5.0)))
    empty = [np.zeros((4, 4), dtype=bool)]
    assert math.isnan(metrics.pixel_auroc([np.ones((4, 4))], empty))
    full = [np.ones((4, 4), dtype=bool)]
    assert math.isnan(metrics.au_pro([np.arange(16.0).reshape(4, 4)], full))


def test_nan_mean_counts_classes() -> None:
    assert metrics.nan_mean([0.5, math.nan, 1.0]) == (0.75, 2)
    value, count = metrics.nan_mean([math.nan])
    assert math.isnan(value) and count == 0


def test_mismatched_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="differs from its mask"):
        metrics.au_pro([np.zeros((4, 4))], [np.zeros((5, 5), dtype=bool)])


# --- F1-max, pixel AP and the curves ------------------------------------------------------------


def loop_f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """F1-max written out: every distinct score as a threshold (score >= t anomalous), counted by hand."""
    best, best_threshold = -1.0, math.nan
    for threshold in sorted(set(scores.tolist())):
        tp = fp = fn = 0
        for label, score in zip(labels.tolist(), scores.tolist()):
            if score >= threshold:
                tp, fp = tp + (label == 1), fp + (label == 0)
            else:
                fn += label == 1
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 >= best:  # ascending thresholds: ">=" keeps the highest one reaching the maximum
            best, best_threshold = f1, threshold
    return best, best_threshold


def loop_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Step-wise AP written out: thresholds descending, recall gain times precision at each."""
    positives = int(labels.sum())
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        predicted = [label for label, score in zip(labels.tolist(), scores.tolist()) if score >= threshold]
        recall = sum(predicted) / positives
        total += (recall - previous_recall) * (sum(predicted) / len(predicted))
        previous_recall = recall
    return total


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """How MuSc / APRIL-GAN compute it: F1 at every point of sklearn's precision_recall_curve."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def flattened(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([m.ravel() for m in masks]).astype(int), np.concatenate([m.ravel().astype(np.float64) for m in maps])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_image_f1_max_matches_sklearn_and_a_written_out_loop(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 80)
    scores = rng.normal(size=80) + labels
    if ties:
        scores = np.round(scores * 2) / 2  # about 15 distinct values for 80 images
    result = metrics.f1_max(labels, scores)
    expected, expected_threshold = loop_f1_max(labels, scores)
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert result.threshold == expected_threshold
    assert result.value == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)


def test_image_f1_max_by_hand() -> None:
    """Scores 4,3,3,2,1 with labels 1,1,0,0,1: t=4 -> F1 2/4; t=3 (tie of a positive and a negative)
    -> TP 2, FP 1, FN 1 -> 4/6; t=2 -> 4/7; t=1 -> 6/8. F1-max = 0.75 at threshold 1."""
    result = metrics.f1_max(np.array([1, 1, 0, 0, 1]), np.array([4.0, 3.0, 3.0, 2.0, 1.0]))
    assert result.value == pytest.approx(0.75) and result.threshold == 1.0


@pytest.mark.parametrize("ties", [False, True])
def test_image_average_precision_from_counts_matches_loop(ties: bool) -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(size=60) + labels
    if ties:
        scores = np.round(scores)
    counts = metrics.rank_counts(labels, scores)
    assert metrics.average_precision_from_counts(counts) == pytest.approx(loop_average_precision(labels, scores), abs=1e-12)
    assert metrics.pixel_auroc_from_counts(counts) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("levels", [None, 6])
def test_pixel_ap_and_f1_max_match_sklearn(dtype: type, levels: int | None) -> None:
    """float16 takes the lookup-table path, float32/64 the binary-search path; `levels` makes ties."""
    rng = np.random.default_rng(12)
    masks = random_masks(rng, count=5, size=20, good=3)
    maps = [m.astype(dtype) for m in scored(rng, masks, levels if levels is not None else (10 if dtype == np.float16 else None))]
    truth, flat = flattened(maps, masks)
    assert metrics.pixel_average_precision(maps, masks) == pytest.approx(average_precision_score(truth, flat), abs=1e-12)
    assert metrics.pixel_f1_max(maps, masks).value == pytest.approx(sklearn_f1_max(truth, flat), abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_pixel_ap_and_f1_max_match_written_out_loops_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, count=3, size=9, good=1)
    maps = scored(rng, masks, 3)  # few levels: most pixels tie with others of both kinds
    truth, flat = flattened(maps, masks)
    assert len(set(flat.tolist())) < 15
    assert metrics.pixel_average_precision(maps, masks) == pytest.approx(loop_average_precision(truth, flat), abs=1e-12)
    expected, expected_threshold = loop_f1_max(truth, flat)
    result = metrics.pixel_f1_max(maps, masks)
    assert result.value == pytest.approx(expected, abs=1e-12) and result.threshold == expected_threshold


def test_pixel_metrics_are_the_same_streamed_from_float16_as_from_float32() -> None:
    """The fp16 lookup table and the binary search count the same negatives."""
    rng = np.random.default_rng(13)
    masks = random_masks(rng, count=4, size=16, good=2)
    half = [m.astype(np.float16) for m in scored(rng, masks, 12)]
    single = [m.astype(np.float32) for m in half]
    a, b = metrics.pixel_counts(half, masks), metrics.pixel_counts(single, masks)
    assert metrics.average_precision_from_counts(a) == metrics.average_precision_from_counts(b)
    assert metrics.f1_max_from_counts(a) == metrics.f1_max_from_counts(b)


def test_new_metrics_nan_with_one_label() -> None:
    assert math.isnan(metrics.f1_max(np.zeros(4), np.arange(4.0)).value)
    assert math.isnan(metrics.f1_max(np.ones(4), np.arange(4.0)).threshold)
    empty = [np.zeros((4, 4), dtype=bool)]
    assert math.isnan(metrics.pixel_average_precision([np.ones((4, 4))], empty))
    full = [np.ones((4, 4), dtype=bool)]
    assert math.isnan(metrics.pixel_f1_max([np.arange(16.0).reshape(4, 4)], full).value)


def polyline_area(x: np.ndarray, y: np.ndarray) -> float:
    return float(sum((x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2 for i in range(1, len(x))))


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_area_is_auroc_and_passes_through_sklearn_points(ties: bool) -> None:
    rng = np.random.default_rng(14)
    labels = rng.integers(0, 2, 70)
    scores = rng.normal(size=70) + labels
    if ties:
        scores = np.round(scores)
    fpr, tpr = metrics.roc_curve(metrics.rank_counts(labels, scores))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert polyline_area(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    sk_fpr, sk_tpr, _ = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    vertices = set(zip(np.round(fpr, 12).tolist(), np.round(tpr, 12).tolist()))
    # sklearn's points at thresholds that are a positive's score are vertices of ours; the rest
    # (negative-only thresholds) lie on our horizontal segments.
    positive_scores = set(scores[labels == 1].tolist())
    _, _, thresholds = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    for x, y, t in zip(sk_fpr, sk_tpr, thresholds):
        if t in positive_scores:
            assert (round(float(x), 12), round(float(y), 12)) in vertices


def test_pr_curve_area_is_average_precision() -> None:
    rng = np.random.default_rng(15)
    masks = random_masks(rng, count=4, size=14, good=2)
    maps = scored(rng, masks, 5)
    truth, flat = flattened(maps, masks)
    recall, precision = metrics.pr_curve(metrics.pixel_counts(maps, masks))
    step_area = float(np.sum(np.diff(recall)[::2] * precision[::2]))  # horizontal steps only
    assert step_area == pytest.approx(average_precision_score(truth, flat), abs=1e-12)
    assert recall[0] == 0.0 and recall[-1] == pytest.approx(1.0)
    sk_precision, sk_recall, thresholds = precision_recall_curve(truth, flat)
    ours = set(zip(np.round(recall[1::2], 12).tolist(), np.round(precision[1::2], 12).tolist()))
    positive_scores = set(flat[truth == 1].tolist())
    for p, r, t in zip(sk_precision, sk_recall, thresholds):
        if t in positive_scores:
            assert (round(float(r), 12), round(float(p), 12)) in ours
