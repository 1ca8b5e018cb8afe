"""Per-class probability calibration fitted on out-of-fold predictions (for the RSNA log-loss file).

The asymmetric loss the model trains with does not give calibrated probabilities; the RSNA metric
(:func:`ichmodel.metrics.rsna_weighted_log_loss`) punishes that. Three per-class maps, fitted on labelled
OOF probabilities and applied to test probabilities:

- ``"platt"`` (default): ``p' = sigmoid(a · logit(p) + b)``, ``a, b`` by maximum likelihood (Newton steps);
- ``"temperature"``: the same with ``b = 0`` (``a = 1 / T``), which keeps every ranking and threshold order;
- ``"isotonic"``: a monotone step map (pool-adjacent-violators), linear between the fitted points, clipped
  to ``[ISOTONIC_CLIP, 1 - ISOTONIC_CLIP]`` so a probability never becomes exactly 0 or 1.

A map fitted and scored on the same predictions looks better than it is. :func:`cross_fit` therefore
calibrates each fold's OOF rows with a map fitted on the other folds only; :func:`calibration_summary`
reports the weighted log loss before and after *cross-fitted* calibration, and the map fitted on every OOF
row is the one applied to test predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ichmodel.metrics import rsna_weighted_log_loss

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("platt", "temperature", "isotonic")
#: Probabilities are clipped to ``[EPS, 1 - EPS]`` before ``logit``.
EPS = 1e-6
#: Isotonic outputs stay in ``[ISOTONIC_CLIP, 1 - ISOTONIC_CLIP]``.
ISOTONIC_CLIP = 1e-4


def logit(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities clipped to ``[EPS, 1 - EPS]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))``, computed without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_platt(y: np.ndarray, p: np.ndarray, fit_bias: bool = True, steps: int = 50) -> tuple[float, float]:
    """``(a, b)`` maximising the likelihood of ``y`` under ``sigmoid(a · logit(p) + b)``, by Newton steps.

    The targets are Platt's (1999) smoothed ones, ``(N+ + 1) / (N+ + 2)`` for a positive and ``1 / (N- + 2)``
    for a negative: on separable data (a small fold) the plain likelihood has no finite maximum and the map
    would send probabilities to 0 and 1, which a weighted log loss punishes without bound. A tiny ridge
    (1e-6) keeps the step defined when one class of ``y`` is absent. ``fit_bias=False`` fixes ``b = 0``
    (temperature scaling).
    """
    x = logit(p)
    y = np.asarray(y, dtype=np.float64)
    positives, negatives = float(y.sum()), float(len(y) - y.sum())
    y = np.where(y > 0.5, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
    design = np.stack([x, np.ones_like(x)], axis=1) if fit_bias else x[:, None]  # [N, 1 or 2]
    w = np.zeros(design.shape[1])
    w[0] = 1.0  # start at the identity map
    for _ in range(steps):
        q = sigmoid(design @ w)
        grad = design.T @ (q - y) + 1e-6 * w
        hess = (design * (q * (1.0 - q))[:, None]).T @ design + 1e-6 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1]) if fit_bias else 0.0


def fit_isotonic(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing fit of ``y`` on ``p`` (pool-adjacent-violators): ``(x points, y values)``, ``x`` rising."""
    order = np.argsort(p, kind="stable")
    xs, ys = np.asarray(p, np.float64)[order], np.asarray(y, np.float64)[order]
    ux, start = np.unique(xs, return_index=True)  # one point per distinct probability
    sums, counts = np.add.reduceat(ys, start), np.diff(np.append(start, len(xs))).astype(np.float64)
    blocks: list[list[float]] = []  # [sum, count, first point index, last point index]
    for i in range(len(ux)):
        blocks.append([sums[i], counts[i], i, i])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            s, c, _, last = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
            blocks[-1][3] = last
    values = np.empty(len(ux))
    for s, c, first, last in blocks:
        values[int(first) : int(last) + 1] = s / c
    return ux, values


@dataclass
class Calibrator:
    """A fitted per-class map: ``params[c]`` is ``(a, b)`` (platt, temperature) or ``(x, y)`` (isotonic)."""

    method: str
    params: list

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``[N, 5]`` (float64) of ``probs`` ``[N, 5]``.

        Raises:
            ValueError: when ``probs`` is not ``[N, 5]``.
        """
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(self.params):
            raise ValueError(f"probs must be [N, {len(self.params)}]. Got shape {probs.shape}")
        out = np.empty_like(probs)
        for c, param in enumerate(self.params):
            if self.method == "isotonic":
                x, y = (np.asarray(v, dtype=np.float64) for v in param)
                out[:, c] = np.clip(np.interp(probs[:, c], x, y), ISOTONIC_CLIP, 1.0 - ISOTONIC_CLIP)
            else:
                a, b = param
                out[:, c] = sigmoid(a * logit(probs[:, c]) + b)
        return out

    def to_dict(self) -> dict:
        """JSON-ready form (lists of floats)."""
        params = [[np.asarray(v, dtype=float).tolist() for v in p] for p in self.params]
        return {"method": self.method, "params": params}

    @classmethod
    def from_dict(cls, values: dict) -> Calibrator:
        return cls(values["method"], [list(p) for p in values["params"]])


def fit_calibrator(y_true: np.ndarray, probs: np.ndarray, method: str = "platt") -> Calibrator:
    """Fit one map per class column of labelled probabilities ``[N, L]``.

    Raises:
        ValueError: for an unknown ``method`` or arrays of other shapes.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown calibration method {method!r}; choose from {list(METHODS)}")
    y_true, probs = np.asarray(y_true, np.float64), np.asarray(probs, np.float64)
    if probs.ndim != 2 or y_true.shape != probs.shape:
        raise ValueError(f"y_true and probs must both be [N, L]. Got {y_true.shape} and {probs.shape}")
    params: list = []
    for c in range(probs.shape[1]):
        if method == "isotonic":
            params.append(list(fit_isotonic(y_true[:, c], probs[:, c])))
        else:
            params.append(list(fit_platt(y_true[:, c], probs[:, c], fit_bias=method == "platt")))
    return Calibrator(method, params)


def cross_fit(y_true: np.ndarray, probs: np.ndarray, fold: np.ndarray, method: str = "platt") -> np.ndarray:
    """Each fold's rows calibrated by a map fitted on the other folds' rows only (honest OOF calibration).

    Args:
        y_true, probs: ``[N, L]``.
        fold: ``[N]`` fold index of each row (series never straddle folds, so neither do their slices).

    Raises:
        ValueError: when there are fewer than 2 folds.
    """
    fold = np.asarray(fold)
    folds = np.unique(fold)
    if len(folds) < 2:
        raise ValueError(f"cross_fit needs at least 2 folds. Got {folds.tolist()}")
    out = np.empty(np.shape(probs), dtype=np.float64)
    for f in folds:
        held = fold == f
        out[held] = fit_calibrator(y_true[~held], probs[~held], method).apply(probs[held])
    return out


def calibration_summary(
    y_true: np.ndarray, probs: np.ndarray, fold: np.ndarray, methods: Sequence[str] = ("platt",)
) -> dict[str, float]:
    """OOF RSNA weighted log loss before calibration and after cross-fitted calibration by each method.

    Returns:
        ``{"before": float, "<method>": float, ...}``.
    """
    summary = {"before": rsna_weighted_log_loss(y_true, probs)}
    for method in methods:
        summary[method] = rsna_weighted_log_loss(y_true, cross_fit(y_true, probs, fold, method))
    return summary


# ------------------------------------------------------------------- one scale for every fold's rows

#: Below this spread of logits a predictor's scale is not stretched, only shifted.
MIN_LOGIT_SD = 1e-3


@dataclass
class FoldAlignment:
    """Per-class logit mean and spread of each fold's predictor and of the whole ensemble on reference series.

    Each OOF row comes from one fold's models; a test row from the mean of all folds' models, whose
    probabilities spread less, and fold models trained briefly differ in their scale besides. Thresholds
    tuned on raw OOF rows therefore fit neither the other folds (cross-fitting) nor the test average.
    :meth:`apply` aligns each fold's rows by the logit mean and spread its predictor and the ensemble have on
    the same reference series (unlabelled: e.g. the test series; no label is read), which fixes both and
    keeps each fold's ranking.

    ``folds``: ``{fold: [[mean, sd] x 5]}``; ``ensemble``: ``[[mean, sd] x 5]``; ``reference_slices``: how
    many slices the figures come from.
    """

    folds: dict[int, list[list[float]]]
    ensemble: list[list[float]]
    reference_slices: int

    @staticmethod
    def _moments(probs: np.ndarray) -> np.ndarray:
        z = logit(probs)
        return np.stack([z.mean(0), z.std(0)], axis=1)  # [5, 2]

    @classmethod
    def fit(cls, fold_reference: dict[int, np.ndarray]) -> FoldAlignment:
        """From each fold predictor's probabilities ``[R, 5]`` on the same reference slices; the ensemble is
        their mean (the test-time average of the fold models).

        Raises:
            ValueError: for no folds, or folds predicting different numbers of reference slices.
        """
        if not fold_reference:
            raise ValueError("FoldAlignment.fit needs the reference predictions of at least one fold. Got 0")
        shapes = {np.shape(p) for p in fold_reference.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] < 2:
            raise ValueError(f"Every fold must predict the same >= 2 reference slices. Got shapes {shapes}")
        ensemble = np.mean([np.asarray(p, np.float64) for p in fold_reference.values()], axis=0)
        return cls(
            folds={
                int(k): cls._moments(np.asarray(p, np.float64)).tolist() for k, p in fold_reference.items()
            },
            ensemble=cls._moments(ensemble).tolist(),
            reference_slices=int(ensemble.shape[0]),
        )

    def apply(self, probs: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """``probs`` ``[N, 5]`` of rows each predicted by the predictor of its ``fold``, on the ensemble's scale.

        Per class, a row's logit is standardised by its fold predictor's reference mean and spread and given
        the ensemble's: ``z' = (z - m_k) / s_k * s + m``. The map rises, so it keeps every fold's ranking.

        Raises:
            ValueError: for a fold without reference figures.
        """
        fold = np.asarray(fold)
        missing = sorted(set(np.unique(fold).tolist()) - set(self.folds))
        if missing:
            raise ValueError(f"No reference figures for folds {missing}; have {sorted(self.folds)}")
        z = logit(probs)
        target = np.asarray(self.ensemble)
        out = np.empty_like(z)
        for k, moments in self.folds.items():
            rows = fold == k
            m = np.asarray(moments)
            scale = np.where(m[:, 1] > MIN_LOGIT_SD, target[:, 1] / np.maximum(m[:, 1], MIN_LOGIT_SD), 1.0)
            out[rows] = (z[rows] - m[:, 0]) * scale + target[:, 0]
        return sigmoid(out)
