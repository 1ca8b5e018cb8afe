from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import fbeta_score, log_loss

from ichmodel.constants import CLASSES
from ichmodel.metrics import (
    binarize,
    f2_score,
    per_class_f2,
    rsna_weighted_log_loss,
    scarce_classes,
    search_thresholds,
    threshold_curve,
)


def _sk_f2(y: np.ndarray, p: np.ndarray) -> float:
    return float(fbeta_score(y.ravel(), p.ravel(), beta=2, zero_division=0.0))


@pytest.mark.parametrize("seed", range(6))
def test_f2_matches_sklearn_on_random_cases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    y = (rng.random((n, 5)) < rng.random()).astype(int)
    p = (rng.random((n, 5)) < rng.random()).astype(int)
    assert f2_score(y, p) == pytest.approx(_sk_f2(y, p), abs=1e-12)
    assert np.allclose(per_class_f2(y, p), fbeta_score(y, p, beta=2, average=None, zero_division=0.0))


@pytest.mark.parametrize(
    "y_pos, p_pos",
    [((), ()), ((), ((0, 1),)), (((0, 1),), ()), (((3, 4),), ((3, 4),))],
    ids=["all-zero", "no-truth", "no-prediction", "perfect"],
)
def test_f2_edge_cases_match_sklearn(y_pos: tuple, p_pos: tuple) -> None:
    y = np.zeros((6, 5), dtype=int)
    p = np.zeros((6, 5), dtype=int)
    for r, c in y_pos:
        y[r, c] = 1
    for r, c in p_pos:
        p[r, c] = 1
    expected = _sk_f2(y, p)
    assert f2_score(y, p) == pytest.approx(expected)
    assert f2_score(y, p) == (1.0 if y_pos and y_pos == p_pos else 0.0)


def test_f2_golden_value() -> None:
    # tp = 1, fp = 1, fn = 1: F2 = 5·1 / (5·1 + 4·1 + 1) = 0.5
    y = np.array([[1, 1, 0, 0, 0]])
    p = np.array([[1, 0, 1, 0, 0]])
    assert f2_score(y, p) == pytest.approx(0.5)


def test_f2_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        f2_score(np.zeros((3, 5)), np.zeros((4, 5)))


def test_binarize_uses_greater_or_equal() -> None:
    assert binarize(np.array([[0.4, 0.5, 0.6]]), 0.5).tolist() == [[0, 1, 1]]
    assert binarize(np.array([[0.4, 0.5]]), np.array([0.3, 0.7])).tolist() == [[1, 0]]


def _noisy_probs(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 5)) < np.array([0.1, 0.07, 0.09, 0.16, 0.04])).astype(int)
    # Calibrated low for rare classes: 0.5 is a poor threshold for F2 here.
    probs = np.clip(0.25 * y + rng.normal(0.15, 0.1, size=y.shape), 0, 1)
    return y, probs


@pytest.mark.parametrize("seed", range(4))
def test_search_thresholds_beats_or_equals_half(seed: int) -> None:
    y, probs = _noisy_probs(seed)
    th = search_thresholds(y, probs)
    assert th.shape == (5,)
    tuned = f2_score(y, binarize(probs, th))
    base = f2_score(y, binarize(probs, 0.5))
    assert tuned >= base
    assert tuned > base + 0.1  # the construction makes 0.5 clearly sub-optimal


def test_search_thresholds_keeps_start_when_nothing_helps() -> None:
    y = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    probs = np.array([[0.9, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1]])
    th = search_thresholds(y, probs)
    assert f2_score(y, binarize(probs, th)) == 1.0
    assert np.allclose(th, 0.5)


def test_search_thresholds_breaks_ties_at_the_middle_of_the_best_range() -> None:
    """Defect: ties went to the lowest grid value, on the edge of the validation probabilities."""
    y = np.zeros((6, 5), dtype=int)
    y[0, 3] = 1
    probs = np.full((6, 5), 0.1)
    probs[0, 3] = 0.45  # every threshold in (0.1, 0.45] is perfect: grid 0.12 .. 0.44
    th = search_thresholds(y, probs)
    assert th[3] == pytest.approx(0.28)
    assert f2_score(y, binarize(probs, th)) == 1.0


def test_search_thresholds_falls_back_for_a_class_without_positives() -> None:
    """Defect: a class with no validation positive was tuned on its negatives alone (pushed to an edge)."""
    y = np.zeros((6, 5), dtype=int)
    y[:3, 0] = 1
    probs = np.full((6, 5), 0.2)
    probs[:3, 0] = 0.8
    probs[:, 1] = 0.65  # no positive for class 1: searching would move it above 0.65
    th = search_thresholds(y, probs)
    assert th[1] == 0.5 and np.all(th[1:] == 0.5)
    th = search_thresholds(y, probs, fallback=np.array([0.5, 0.3, 0.2, 0.1, 0.25]))
    assert th[1:].tolist() == [0.3, 0.2, 0.1, 0.25]
    assert search_thresholds(y, probs, fallback=0.4)[4] == 0.4
    with pytest.raises(ValueError, match="fallback"):
        search_thresholds(y, probs, fallback=0.0)


def test_search_thresholds_warns_on_scarce_classes(caplog: pytest.LogCaptureFixture) -> None:
    y = np.zeros((8, 5), dtype=int)
    y[:4, 0] = 1  # 4 positive slices, in 2 series
    y[5, 2] = 1
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    assert scarce_classes(y, 3) == {"ivh": 0, "sah": 1, "sdh": 0, "edh": 0}
    assert scarce_classes(y, 3, groups) == {"ich": 2, "ivh": 0, "sah": 1, "sdh": 0, "edh": 0}
    with caplog.at_level("WARNING", logger="ichmodel.metrics"):
        search_thresholds(y, np.full((8, 5), 0.3), min_positives=3, groups=groups)
    assert "class ich has 2 positive series" in caplog.text and "class sah has 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ichmodel.metrics"):
        search_thresholds(y, np.full((8, 5), 0.3), min_positives=0)
    assert not caplog.text


def test_threshold_curve_matches_direct_scores() -> None:
    y, probs = _noisy_probs(7, n=120)
    grid = np.array([0.1, 0.2, 0.35, 0.5])
    curve = threshold_curve(y, probs, grid)
    assert set(curve) == {"threshold", "micro", *CLASSES}
    for i, th in enumerate(grid):
        pred = binarize(probs, th)
        assert curve["micro"][i] == pytest.approx(f2_score(y, pred))
        assert np.allclose([curve[c][i] for c in CLASSES], per_class_f2(y, pred))


def test_rsna_weighted_log_loss_matches_sklearn_columns() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random((50, 5)) < 0.3).astype(int)
    probs = rng.uniform(0.01, 0.99, size=(50, 5))
    y_any, p_any = y.max(1), probs.max(1)
    per_col = [log_loss(y[:, c], probs[:, c], labels=[0, 1]) for c in range(5)]
    expected = (sum(per_col) + 2 * log_loss(y_any, p_any, labels=[0, 1])) / 7
    assert rsna_weighted_log_loss(y, probs) == pytest.approx(expected, rel=1e-10)


def test_rsna_weighted_log_loss_golden() -> None:
    # One slice, every probability 0.5: each column costs log 2, so the weighted mean is log 2.
    assert rsna_weighted_log_loss(np.array([[1, 0, 0, 0, 0]]), np.full((1, 5), 0.5)) == pytest.approx(
        np.log(2)
    )
    # Perfect confident predictions cost (almost) nothing; clipping keeps 0/1 finite.
    y = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert rsna_weighted_log_loss(y, y.astype(float)) < 1e-12
    assert np.isfinite(rsna_weighted_log_loss(y, 1.0 - y))
