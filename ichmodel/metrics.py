"""Evaluation metrics on numpy arrays: the course leaderboard's micro-F2, threshold tuning, RSNA log loss.

Rows are slices, columns the five classes in :data:`ichmodel.constants.CLASSES` order. A decision is
``prob >= threshold`` everywhere (:func:`binarize`).
"""

from __future__ import annotations

import logging

import numpy as np

from ichmodel.constants import CLASSES, NUM_CLASSES

logger = logging.getLogger(__name__)

#: Default threshold grid for :func:`search_thresholds` and :func:`threshold_curve`.
DEFAULT_GRID: np.ndarray = np.round(np.arange(0.02, 0.99, 0.02), 2)


def _check_pair(y_true: np.ndarray, y_other: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_other = np.asarray(y_other)
    if y_true.shape != y_other.shape:
        raise ValueError(
            f"y_true and {name} must have the same shape. Got {y_true.shape} and {y_other.shape}"
        )
    return y_true, y_other


def _fbeta(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float) -> np.ndarray:
    """F-beta from counts; 0 where it is undefined (no true and no predicted positive), as sklearn's default."""
    b2 = beta * beta
    num = (1.0 + b2) * tp
    den = num + b2 * fn + fp
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape, dtype=np.float64), where=den > 0)


def binarize(probs: np.ndarray, thresholds: float | np.ndarray = 0.5) -> np.ndarray:
    """0/1 int8 decisions ``probs >= thresholds`` (thresholds broadcast over the class axis)."""
    return (np.asarray(probs) >= np.asarray(thresholds)).astype(np.int8)


def f2_score(y_true: np.ndarray, y_pred: np.ndarray, beta: float = 2.0) -> float:
    """Micro F-beta (β = 2) over all ``N × L`` binary decisions, the course leaderboard's score.

    Equals ``sklearn.metrics.fbeta_score(y_true.ravel(), y_pred.ravel(), beta=2)``, including its
    zero-division value 0 when there is no true and no predicted positive.
    """
    y_true, y_pred = _check_pair(y_true, y_pred, "y_pred")
    t = y_true.astype(bool)
    p = y_pred.astype(bool)
    tp = np.count_nonzero(t & p)
    fp = np.count_nonzero(~t & p)
    fn = np.count_nonzero(t & ~p)
    return float(_fbeta(np.float64(tp), np.float64(fp), np.float64(fn), beta))


def per_class_f2(y_true: np.ndarray, y_pred: np.ndarray, beta: float = 2.0) -> np.ndarray:
    """F-beta of each class (column) ``[L]``; 0 for a class with no true and no predicted positive."""
    y_true, y_pred = _check_pair(y_true, y_pred, "y_pred")
    t = y_true.astype(bool)
    p = y_pred.astype(bool)
    tp = (t & p).sum(0).astype(np.float64)
    fp = (~t & p).sum(0).astype(np.float64)
    fn = (t & ~p).sum(0).astype(np.float64)
    return _fbeta(tp, fp, fn, beta)


def _class_counts(
    t: np.ndarray, probs: np.ndarray, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tp, fp, fn ``[G]`` of one class for each threshold of ``grid``, from ``[N]`` truths and probabilities."""
    order = np.sort(probs)
    pos_probs = np.sort(probs[t])
    n_pos = pos_probs.size
    n_pred = order.size - np.searchsorted(order, grid, side="left")  # predicted positive: prob >= th
    tp = n_pos - np.searchsorted(pos_probs, grid, side="left")
    return tp.astype(np.float64), (n_pred - tp).astype(np.float64), (n_pos - tp).astype(np.float64)


def search_thresholds(
    y_true: np.ndarray,
    probs: np.ndarray,
    grid: np.ndarray | None = None,
    start: float = 0.5,
    max_rounds: int = 5,
    beta: float = 2.0,
    fallback: float | np.ndarray | None = None,
    min_positives: int = 3,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Per-class thresholds ``[L]`` that maximise micro-F2 on validation data, by coordinate ascent.

    Starting from ``start`` for every class, each round visits the classes in order and moves that class's
    threshold to the best grid value given the others (only a strict improvement moves it), until a round
    changes nothing or ``max_rounds`` is reached. The result therefore scores at least as well as ``start``
    everywhere. Micro-F2 couples the classes through the pooled counts, hence the rounds.
    (The authors' code used per-class quantiles; this tunes the leaderboard's metric directly.)

    Small validation sets make many thresholds tie; a tie goes to the middle of the longest run of best grid
    values (not its lowest value, which sat on the probabilities' edge and failed on new data). A class with
    no positive in ``y_true`` is not searched: it gets ``fallback`` (a float or ``[L]``, e.g. derived from the
    training prevalence), or ``start`` without one. A class with fewer than ``min_positives`` positives
    (positive series when ``groups``, the series id of each row, is given; else slices) is logged as a warning:
    its threshold rests on too little evidence. See :func:`scarce_classes`.
    """
    y_true, probs = _check_pair(y_true, probs, "probs")
    if y_true.ndim != 2:
        raise ValueError(f"y_true must be [N, L]. Got shape {y_true.shape}")
    grid = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    t = y_true.astype(bool)
    L = t.shape[1]
    thresholds = np.full(L, float(start))
    no_positive = ~t.any(0)
    if fallback is not None:
        fallback = np.broadcast_to(np.asarray(fallback, dtype=np.float64), (L,))
        if not np.all((fallback > 0) & (fallback < 1)):
            raise ValueError(f"fallback thresholds must be in (0, 1). Got {fallback.tolist()}")
        thresholds[no_positive] = fallback[no_positive]
    for name, count in scarce_classes(y_true, min_positives, groups).items():
        logger.warning(
            "class %s has %d positive %s in validation (< %d): its threshold %s",
            name,
            count,
            "series" if groups is not None else "slices",
            min_positives,
            "is the fallback" if count == 0 else "rests on little evidence",
        )
    p = probs.astype(np.float64)
    counts = [_class_counts(t[:, c], p[:, c], grid) for c in range(L)]
    cur = np.array([[x[0] for x in _class_counts(t[:, c], p[:, c], thresholds[c : c + 1])] for c in range(L)])
    best = float(_fbeta(*cur.sum(0), beta))  # cur: [L, 3] tp, fp, fn at the current thresholds
    for _ in range(max_rounds):
        changed = False
        for c in np.flatnonzero(~no_positive):
            rest = cur.sum(0) - cur[c]  # [3]
            tp, fp, fn = counts[c]
            scores = _fbeta(rest[0] + tp, rest[1] + fp, rest[2] + fn, beta)  # [G]
            i = _middle_of_best(scores)
            if scores[i] > best + 1e-12:
                best = float(scores[i])
                thresholds[c] = grid[i]
                cur[c] = (tp[i], fp[i], fn[i])
                changed = True
        if not changed:
            break
    return thresholds


def _middle_of_best(scores: np.ndarray, tol: float = 1e-12) -> int:
    """Index of the middle of the longest run of maximal ``scores`` (the first such run on equal lengths)."""
    is_best = np.concatenate([[False], scores >= scores.max() - tol, [False]])
    edges = np.flatnonzero(np.diff(is_best.astype(np.int8)))  # run starts and ends (exclusive), paired
    starts, ends = edges[0::2], edges[1::2]
    longest = int(np.argmax(ends - starts))
    return int((starts[longest] + ends[longest] - 1) // 2)


def scarce_classes(
    y_true: np.ndarray, min_positives: int = 3, groups: np.ndarray | None = None
) -> dict[str, int]:
    """Classes with fewer than ``min_positives`` positives: ``{name: count}``.

    Counts positive series when ``groups`` (the series id of each row) is given, else positive slices.
    """
    t = np.asarray(y_true).astype(bool)
    L = t.shape[1]
    names = CLASSES if L == NUM_CLASSES else tuple(f"class{c}" for c in range(L))
    if groups is None:
        counts = t.sum(0)
    else:
        groups = np.asarray(groups)
        if groups.shape != (t.shape[0],):
            raise ValueError(f"groups must be [N]={t.shape[0]}. Got shape {groups.shape}")
        counts = np.array([np.unique(groups[t[:, c]]).size for c in range(L)])
    return {names[c]: int(counts[c]) for c in range(L) if counts[c] < min_positives}


def threshold_curve(
    y_true: np.ndarray, probs: np.ndarray, grid: np.ndarray | None = None, beta: float = 2.0
) -> dict[str, np.ndarray]:
    """F2 against the threshold, for plotting.

    Returns ``{"threshold": grid [G], "<class>": per-class F2 [G] for each class, "micro": [G]}``, where
    ``micro`` is the micro-F2 with the same threshold for every class.
    """
    y_true, probs = _check_pair(y_true, probs, "probs")
    grid = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    t = y_true.astype(bool)
    L = t.shape[1]
    names = CLASSES if L == NUM_CLASSES else tuple(f"class{c}" for c in range(L))
    out: dict[str, np.ndarray] = {"threshold": grid}
    total = np.zeros((3, grid.size))
    for c in range(L):
        tp, fp, fn = _class_counts(t[:, c], probs[:, c].astype(np.float64), grid)
        out[names[c]] = _fbeta(tp, fp, fn, beta)
        total += np.stack([tp, fp, fn])
    out["micro"] = _fbeta(total[0], total[1], total[2], beta)
    return out


def rsna_weighted_log_loss(
    y_true: np.ndarray, probs: np.ndarray, any_weight: float = 2.0, eps: float = 1e-15
) -> float:
    """RSNA 2019 Kaggle metric: weighted multi-label log loss with a derived ``any`` column of weight 2.

    ``any`` is the maximum over the five classes, both for the truth and for the probabilities (our model has
    no ``any`` output). Probabilities are clipped to ``[eps, 1 − eps]``. The value is
    ``Σ_c w_c · mean_n BCE(y_nc, p_nc) / Σ_c w_c`` with ``w = (1, 1, 1, 1, 1, any_weight)``.
    """
    y_true, probs = _check_pair(y_true, probs, "probs")
    y = np.concatenate([y_true, y_true.max(axis=1, keepdims=True)], axis=1).astype(np.float64)  # [N, L + 1]
    p = np.concatenate([probs, probs.max(axis=1, keepdims=True)], axis=1).astype(np.float64)
    p = np.clip(p, eps, 1.0 - eps)
    bce = -(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean(axis=0)  # [L + 1]
    w = np.ones(y.shape[1])
    w[-1] = any_weight
    return float((w * bce).sum() / w.sum())


def fallback_thresholds(prevalence: np.ndarray, y_prob: np.ndarray | None = None) -> np.ndarray:
    """Thresholds for classes without a validation positive, from their training ``prevalence`` ``[5]``.

    With validation probabilities ``y_prob`` ``[N, 5]``: the class's ``1 − prevalence`` quantile, so the class
    is predicted on about the share of slices it has in training (the authors' per-class quantile
    thresholds). A fixed threshold at the prevalence instead marked every slice positive wherever the
    model's probabilities for an unlearned class sat above it (EDH in the ablation). Without ``y_prob``: the
    prevalence itself. Clipped to [0.02, 0.98]. (0.5, the old fallback, left such a class never predicted.)
    """
    prevalence = np.asarray(prevalence, dtype=np.float64)
    if y_prob is None or len(y_prob) == 0:
        return np.clip(prevalence, 0.02, 0.98)
    q = [np.quantile(y_prob[:, c], 1.0 - prevalence[c]) for c in range(len(prevalence))]
    return np.clip(np.asarray(q, dtype=np.float64), 0.02, 0.98)
