"""The label-free threshold rule and the decisions made with it, against written-out computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from iipad_cli import thresholds as th


def _written_out_pooled_std(scores: list[float], categories: list[str]) -> float:
    """Σ over categories of Σ (s − category mean)², divided by (N − number of categories), square root."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for score, name in zip(scores, categories):
        sums[name] = sums.get(name, 0.0) + score
        counts[name] = counts.get(name, 0) + 1
    means = {name: sums[name] / counts[name] for name in sums}
    squares = 0.0
    for score, name in zip(scores, categories):
        squares += (score - means[name]) ** 2
    return math.sqrt(squares / (len(scores) - len(sums)))


def test_pooled_std_and_category_thresholds_match_a_written_out_computation() -> None:
    scores = [0.10, 0.30, -0.20, -0.26, -0.14, 0.5, 0.5, 0.8]
    maxima = [1.0, 1.4, 0.7, 0.9, 0.8, 2.0, 2.5, 2.2]
    names = ["a", "a", "b", "b", "b", "c", "c", "c"]
    # By hand: a: mean 0.2, squares 0.01 + 0.01; b: mean -0.2, squares 0 + 0.0036 + 0.0036;
    # c: mean 0.6, squares 0.01 + 0.01 + 0.04. Total 0.0872 over 8 − 3 = 5 degrees of freedom.
    expected_std = math.sqrt(0.0872 / 5)
    assert th.pooled_std(scores, names) == pytest.approx(expected_std, rel=1e-12)
    assert th.pooled_std(scores, names) == pytest.approx(_written_out_pooled_std(scores, names), rel=1e-12)
    result = th.category_thresholds(scores, maxima, names)
    assert list(result) == ["a", "b", "c"]
    assert result["a"] == th.CategoryThreshold(
        count=2, image_mean=pytest.approx(0.2), image_threshold=pytest.approx(0.2 + 3 * expected_std), pixel_threshold=1.4
    )
    assert result["b"].image_mean == pytest.approx(-0.2) and result["b"].pixel_threshold == 0.9 and result["b"].count == 3
    assert result["c"].image_threshold == pytest.approx(0.6 + 3 * expected_std) and result["c"].pixel_threshold == 2.5


def test_z_is_the_multiplier_of_the_pooled_std() -> None:
    result = th.category_thresholds([0.0, 2.0], [1.0, 1.0], ["x", "x"], z=2.0)
    # One category: mean 1, sample std sqrt(((−1)² + 1²) / 1) = sqrt(2).
    assert result["x"].image_threshold == pytest.approx(1.0 + 2.0 * math.sqrt(2.0))


def test_no_spread_is_refused() -> None:
    with pytest.raises(ValueError, match="no spread"):
        th.category_thresholds([0.5], [1.0], ["only"])  # one score in one category: N − C = 0
    with pytest.raises(ValueError, match="all equal"):
        th.category_thresholds([0.5, 0.5, 0.1, 0.1], [1.0] * 4, ["a", "a", "b", "b"])


def test_normalised_score_is_zero_at_the_mean_and_one_at_the_threshold() -> None:
    assert th.normalised_score(0.3, 0.3, 0.9) == 0.0
    assert th.normalised_score(0.9, 0.3, 0.9) == pytest.approx(1.0)
    assert th.normalised_score(1.5, 0.3, 0.9) == pytest.approx((1.5 - 0.3) / 0.6)
    assert th.normalised_score(-0.24, -0.5, -0.1) == pytest.approx(0.26 / 0.4)
    with pytest.raises(ValueError, match="not above the normal mean"):
        th.normalised_score(0.0, 0.5, 0.5)


def test_decisions_are_strictly_above_the_threshold() -> None:
    assert th.image_label(0.5, 0.5) == "normal" and th.image_label(0.5000001, 0.5) == "anomalous"
    score_map = np.array([[0.1, 0.5], [0.6, 0.5]], dtype=np.float32)
    assert th.binary_mask(score_map, 0.5).tolist() == [[False, False], [True, False]]


def _written_out_counts(truth: list[int], values: list[float], thresholds: list[float]) -> tuple[int, int, int, int]:
    tp = fp = fn = tn = 0
    for positive, value, threshold in zip(truth, values, thresholds):
        predicted = value > threshold
        if predicted and positive:
            tp += 1
        elif predicted:
            fp += 1
        elif positive:
            fn += 1
        else:
            tn += 1
    return tp, fp, fn, tn


def test_image_precision_recall_f1_against_a_written_out_loop() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 40)
    values = rng.normal(size=40) + truth
    per_row = rng.choice([0.2, 0.5], size=40)
    counts = th.decision_counts(truth, values, per_row)
    tp, fp, fn, tn = _written_out_counts(truth.tolist(), values.tolist(), per_row.tolist())
    assert (counts.true_positive, counts.false_positive, counts.false_negative, counts.true_negative) == (tp, fp, fn, tn)
    precision, recall, f1 = th.precision_recall_f1(counts)
    assert precision == pytest.approx(tp / (tp + fp))
    assert recall == pytest.approx(tp / (tp + fn))
    assert f1 == pytest.approx(2 * precision * recall / (precision + recall))


def test_precision_recall_f1_agree_with_scikit_learn() -> None:
    from sklearn.metrics import f1_score, precision_score, recall_score

    truth = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    values = np.array([0.9, 0.8, 0.4, 0.7, 0.1, 0.65, 0.3, 0.2])
    predicted = (values > 0.6).astype(int)
    precision, recall, f1 = th.precision_recall_f1(th.decision_counts(truth, values, 0.6))
    assert precision == pytest.approx(precision_score(truth, predicted))
    assert recall == pytest.approx(recall_score(truth, predicted))
    assert f1 == pytest.approx(f1_score(truth, predicted))


def test_undefined_ratios_are_nan() -> None:
    precision, recall, f1 = th.precision_recall_f1(th.DecisionCounts(true_negative=5))
    assert math.isnan(precision) and math.isnan(recall) and math.isnan(f1)
    precision, recall, f1 = th.precision_recall_f1(th.DecisionCounts(false_negative=2, true_negative=5))
    assert math.isnan(precision) and recall == 0.0 and f1 == 0.0


def test_pixel_counts_sum_image_by_image_each_at_its_own_threshold() -> None:
    rng = np.random.default_rng(0)
    maps = [rng.random((4, 5)), rng.random((3, 3))]
    masks = [rng.random((4, 5)) > 0.6, np.zeros((3, 3), dtype=bool)]
    levels = [0.5, 0.8]
    counts = th.pixel_decision_counts(maps, masks, levels)
    expected = [0, 0, 0, 0]
    for score_map, mask, level in zip(maps, masks, levels):
        for value, positive in zip(score_map.ravel().tolist(), mask.ravel().tolist()):
            result = _written_out_counts([int(positive)], [value], [level])
            expected = [a + b for a, b in zip(expected, result)]
    assert [counts.true_positive, counts.false_positive, counts.false_negative, counts.true_negative] == expected
    with pytest.raises(ValueError):
        th.pixel_decision_counts(maps, masks[:1], levels)
