"""Ensembles of tuned trials: choosing the trials, averaging their predictions, thresholds and scores.

Steps (``ray_jobs/ensemble.py`` runs them): :func:`select_trials` picks the K best usable trials of a
``trials.csv``; their prediction tables (:mod:`ichmodel.predict`) are averaged by :func:`average_predictions`
(mean of probabilities; the authors' code took a majority vote of binary files instead); per-class
thresholds are tuned on the averaged validation predictions (:func:`choose_thresholds`) and scored
(:func:`score_predictions`); :class:`EnsembleSpec` records the result in ``ensemble.json``. The submission
files themselves are written and checked by :mod:`ichmodel.submission`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ichmodel import metrics as M
from ichmodel.calibration import logit, sigmoid
from ichmodel.constants import CLASSES
from ichmodel.io import atomic_write_text
from ichmodel.prediction_table import KEY_COLUMNS, LABEL_COLUMNS, PROB_COLUMNS, prediction_arrays
from ichmodel.submission import check_thresholds

logger = logging.getLogger(__name__)

ENSEMBLE_SPEC_NAME = "ensemble.json"
#: The ``trials.csv`` column trials are ranked by: validation micro-F2 of the exported checkpoint.
F2_COLUMN = "model_f2"
#: Its name in tables written before it was renamed.
LEGACY_F2_COLUMN = "best_f2"
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# ------------------------------------------------------------------------------------------- trials


def check_file_name(name: object, what: str) -> str:
    """``name`` if it can name one file inside a folder: letters, digits, ``_ . -``, not ``.`` or ``..``.

    Raises:
        ValueError: naming ``what`` (e.g. ``"trial_id in runs/x/trials.csv"``) and the bad name.
    """
    text = "" if pd.isna(name) else str(name)
    if not _FILE_NAME.fullmatch(text) or text in (".", ".."):
        raise ValueError(
            f"Invalid {what}: {text!r} cannot name a file (allowed: letters, digits, '_', '.', '-'; "
            "not '.' or '..')"
        )
    return text


def read_trials(trials_csv: str | Path) -> pd.DataFrame:
    """A tune job's ``trials.csv``, best first by :data:`F2_COLUMN` (missing values last).

    A table with the older :data:`LEGACY_F2_COLUMN` instead is read as if it had the new name (logged).
    Trial ids name files (the ensemble's download cache), so each is checked by :func:`check_file_name`.

    Raises:
        FileNotFoundError: when ``trials_csv`` does not exist.
        ValueError: when the table lacks ``trial_id``/``model_f2``/``checkpoint`` or holds a bad trial id.
    """
    trials_csv = Path(trials_csv)
    if not trials_csv.is_file():
        raise FileNotFoundError(f"No trials table at {trials_csv}; run ray_jobs/tune.py first")
    table = pd.read_csv(trials_csv, dtype={"trial_id": str, "checkpoint": str, "status": str})
    if F2_COLUMN not in table.columns and LEGACY_F2_COLUMN in table.columns:
        logger.info(
            "%s names its F2 column %r (older tune job); reading it as %r",
            trials_csv,
            LEGACY_F2_COLUMN,
            F2_COLUMN,
        )
        table = table.rename(columns={LEGACY_F2_COLUMN: F2_COLUMN})
    missing = [c for c in ("trial_id", F2_COLUMN, "checkpoint") if c not in table.columns]
    if missing:
        raise ValueError(f"{trials_csv} lacks columns {missing}; has {list(table.columns)}")
    for trial_id in table["trial_id"]:
        check_file_name(trial_id, f"trial_id in {trials_csv}")
    table = table.sort_values(F2_COLUMN, ascending=False, na_position="last", kind="stable")
    return table.reset_index(drop=True)


def is_failed(row: pd.Series) -> bool:
    """Whether a ``trials.csv`` row's ``status`` is ``ERROR`` (a table without ``status``: never)."""
    return str(row.get("status", "OK")).strip().upper() == "ERROR"


def select_trials(trials_csv: str | Path, top_k: int) -> pd.DataFrame:
    """The ``top_k`` best usable trials of a tune job's ``trials.csv`` (:func:`read_trials`), best first.

    Rows whose ``status`` is ``ERROR`` or whose ``checkpoint`` file does not exist are skipped (and logged).
    A relative checkpoint path is taken relative to the folder of ``trials_csv``; the returned
    ``checkpoint`` column holds absolute paths.

    Returns:
        The chosen rows (all columns of the table), at most ``top_k``, index reset.

    Raises:
        ValueError: when ``top_k < 1``, the table is not a valid trials table, or no usable trial is left
            (the message says why each was skipped).
        FileNotFoundError: when ``trials_csv`` does not exist.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1. Got {top_k}")
    trials_csv = Path(trials_csv)
    table = read_trials(trials_csv)
    reasons: list[str] = []
    keep: list[int] = []
    for i, row in table.iterrows():
        checkpoint = "" if pd.isna(row["checkpoint"]) else str(row["checkpoint"]).strip()
        path = Path(checkpoint) if checkpoint else None
        if path is not None and not path.is_absolute():
            path = (trials_csv.parent / path).resolve()
        if is_failed(row):
            reasons.append(f"{row['trial_id']}: status ERROR")
        elif path is None:
            reasons.append(f"{row['trial_id']}: no checkpoint")
        elif not path.is_file():
            reasons.append(f"{row['trial_id']}: checkpoint {path} does not exist")
        else:
            table.at[i, "checkpoint"] = str(path)
            keep.append(i)
    for reason in reasons:
        logger.warning("skipping trial %s", reason)
    if not keep:
        raise ValueError(
            f"No usable trial in {trials_csv} ({len(table)} rows): " + "; ".join(reasons or ["empty"])
        )
    chosen = table.loc[keep].head(top_k).reset_index(drop=True)
    if len(chosen) < top_k:
        logger.warning("asked for %d trials, only %d usable in %s", top_k, len(chosen), trials_csv)
    return chosen


# ---------------------------------------------------------------------------------------- averaging


def average_predictions(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean of the class probabilities of several prediction tables of the same slices.

    Args:
        frames: prediction tables (:func:`ichmodel.predict.predict_dataset`) over the same slices.

    Returns:
        A prediction table sorted by ``series_id, position``: the keys, the mean probabilities and, if the
        first table has them, its ``label_<cls>`` columns.

    Raises:
        ValueError: for no tables, or tables that do not cover exactly the same slices (or disagree on labels).
    """
    if not frames:
        raise ValueError("average_predictions needs at least one prediction table. Got 0")
    ordered = [f.sort_values(["series_id", "position"], kind="stable").reset_index(drop=True) for f in frames]
    first = ordered[0]
    keys = first[list(KEY_COLUMNS)]
    total = first[list(PROB_COLUMNS)].to_numpy(
        dtype=np.float64, copy=True
    )  # read-only when read from parquet
    labels = list(LABEL_COLUMNS)
    for i, other in enumerate(ordered[1:], start=1):
        if len(other) != len(first) or not other[list(KEY_COLUMNS)].equals(keys):
            a = set(map(tuple, keys.to_numpy().tolist()))
            b = set(map(tuple, other[list(KEY_COLUMNS)].to_numpy().tolist()))
            raise ValueError(
                f"Prediction table {i} covers other slices than table 0: {len(b - a)} extra, {len(a - b)} missing "
                f"(e.g. {sorted(b ^ a)[:3]})"
            )
        both_labelled = all(c in first.columns and c in other.columns for c in LABEL_COLUMNS)
        if both_labelled and not np.array_equal(first[labels].to_numpy(), other[labels].to_numpy()):
            raise ValueError(f"Prediction table {i} has other labels than table 0 for the same slices")
        total += other[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    out = keys.copy()
    mean = (total / len(ordered)).astype(np.float32)
    for c, name in enumerate(PROB_COLUMNS):
        out[name] = mean[:, c]
    for name in LABEL_COLUMNS:
        if name in first.columns:
            out[name] = first[name].to_numpy()
    return out


def _labelled_arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = prediction_arrays(frame)
    if labels is None:
        raise ValueError(f"Need a labelled prediction table (label_<cls> columns). Got {list(frame.columns)}")
    return probs, labels


def choose_thresholds(frame: pd.DataFrame, prevalence: np.ndarray | None = None) -> np.ndarray:
    """Per-class thresholds ``[5]`` that maximise micro-F2 on a labelled (validation) prediction table.

    Uses :func:`ichmodel.metrics.search_thresholds` (coordinate ascent on the pooled counts, ties to the
    middle), with the training run's rule for a class without a positive here: the quantile of its
    training ``prevalence`` (:func:`ichmodel.metrics.fallback_thresholds`), or 0.5 without one.

    Raises:
        ValueError: when the table has no labels.
    """
    probs, labels = _labelled_arrays(frame)
    fallback = None if prevalence is None else M.fallback_thresholds(prevalence, probs)
    return M.search_thresholds(labels, probs, fallback=fallback, min_positives=0)


def score_predictions(frame: pd.DataFrame, thresholds: Sequence[float] | np.ndarray) -> dict[str, object]:
    """Micro-F2 and per-class F2 of a labelled prediction table at ``thresholds`` ``[5]``.

    Returns:
        ``{"micro_f2": float, "per_class": {cls: float}}``.

    Raises:
        ValueError: when the table has no labels or ``thresholds`` does not hold 5 values.
    """
    thresholds = check_thresholds(thresholds)
    probs, labels = _labelled_arrays(frame)
    pred = M.binarize(probs, thresholds)
    per_class = M.per_class_f2(labels, pred)
    return {
        "micro_f2": M.f2_score(labels, pred),
        "per_class": dict(zip(CLASSES, map(float, per_class), strict=True)),
    }


# ----------------------------------------------------------------------- member choice on OOF scores


def tuned_f2(labels: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """``(micro-F2, thresholds [5])`` of ``probs`` ``[N, 5]`` at thresholds tuned on the same rows.

    Tuning five thresholds on the rows they score is slightly optimistic; :func:`cross_fitted_f2` is not.
    """
    thresholds = M.search_thresholds(labels, probs, min_positives=0)
    return M.f2_score(labels, M.binarize(probs, thresholds)), thresholds


def cross_fitted_f2(labels: np.ndarray, probs: np.ndarray, fold: np.ndarray) -> float:
    """Micro-F2 where each fold's rows are decided by thresholds tuned on the other folds' rows only.

    Raises:
        ValueError: when ``fold`` names fewer than 2 folds.
    """
    fold = np.asarray(fold)
    if len(np.unique(fold)) < 2:
        raise ValueError(f"cross_fitted_f2 needs at least 2 folds. Got {np.unique(fold).tolist()}")
    pred = np.zeros(labels.shape, dtype=np.int8)
    for f in np.unique(fold):
        held = fold == f
        pred[held] = M.binarize(
            probs[held], M.search_thresholds(labels[~held], probs[~held], min_positives=0)
        )
    return M.f2_score(labels, pred)


#: Maps a bag (member indices, with repeats) to its ``[N, 5]`` OOF probabilities.
BagProbs = Callable[[Sequence[int]], np.ndarray]


def top_k_members(
    labels: np.ndarray, member_probs: Sequence[np.ndarray], k: int, combine: BagProbs | None = None
) -> list[int]:
    """Indices of the ``k`` members with the best OOF micro-F2 (each at its own tuned thresholds), best first.

    ``combine`` gives a bag's OOF probabilities (default :func:`bag_probs` of ``member_probs``; the fold job
    passes one that also aligns the folds' scales, :class:`FoldAlignment`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1. Got {k}")
    combine = combine or partial(bag_probs, member_probs)
    scores = [tuned_f2(labels, combine([i]))[0] for i in range(len(member_probs))]
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def greedy_members(
    labels: np.ndarray,
    member_probs: Sequence[np.ndarray],
    max_steps: int = 10,
    combine: BagProbs | None = None,
) -> list[int]:
    """Caruana-style forward selection with replacement on OOF micro-F2 at tuned thresholds.

    Starts from the best single member and adds, one at a time, the member whose addition to the bag (mean
    of the bag's probabilities, or ``combine(bag)``) scores best, while that strictly improves the score, at
    most ``max_steps`` members in all. A member may be added again (its weight grows).

    Returns:
        The bag: member indices, with repeats (weights = counts / length).

    Raises:
        ValueError: for no members.
    """
    if not member_probs:
        raise ValueError("greedy_members needs at least one member. Got 0")
    combine = combine or partial(bag_probs, member_probs)
    bag = [top_k_members(labels, member_probs, 1, combine)[0]]
    best = tuned_f2(labels, combine(bag))[0]
    while len(bag) < max_steps:
        trials = [tuned_f2(labels, combine([*bag, i]))[0] for i in range(len(member_probs))]
        i = int(np.argmax(trials))
        if trials[i] <= best + 1e-12:
            break
        best = trials[i]
        bag.append(i)
    logger.info("greedy selection: bag %s, OOF micro-F2 %.4f", bag, best)
    return bag


def bag_probs(member_probs: Sequence[np.ndarray], bag: Sequence[int]) -> np.ndarray:
    """Mean probabilities of the bag's members (a repeated member counts once per repeat)."""
    return np.mean([np.asarray(member_probs[i], dtype=np.float64) for i in bag], axis=0)


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


def _series_counts(labels: np.ndarray, pred: np.ndarray, series: np.ndarray) -> np.ndarray:
    """``[S, 3]`` pooled tp, fp, fn of each series (rows of ``np.unique(series)``)."""
    _, inverse = np.unique(series, return_inverse=True)
    t, p = labels.astype(bool), pred.astype(bool)
    per_row = np.stack([(t & p).sum(1), (~t & p).sum(1), (t & ~p).sum(1)], axis=1).astype(np.float64)
    out = np.zeros((inverse.max() + 1, 3))
    np.add.at(out, inverse, per_row)
    return out


def _f2_of_counts(counts: np.ndarray) -> np.ndarray:
    """F2 from pooled ``[..., 3]`` tp, fp, fn; 0 where there is no true and no predicted positive."""
    tp, fp, fn = np.moveaxis(np.asarray(counts, dtype=np.float64), -1, 0)
    denom = 5.0 * tp + 4.0 * fn + fp
    return np.divide(5.0 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def bootstrap_f2(
    labels: np.ndarray,
    preds: dict[str, np.ndarray],
    series: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Bootstrap intervals over *series* of the micro-F2 of fixed 0/1 decisions, and of their differences.

    Args:
        labels: ``[N, 5]``; preds: ``{name: [N, 5] 0/1}`` (e.g. single best and ensemble at their thresholds);
        series: ``[N]`` series id of each row (series are resampled with replacement, all their slices kept).

    Returns:
        ``{name: {"f2", "low", "high"}}`` and ``{"<b> - <a>": {...}}`` for the first name ``a`` against each
        other ``b``; ``low``/``high`` are the ``level`` percentile interval.
    """
    series = np.asarray(series)
    counts = {k: _series_counts(labels, v, series) for k, v in preds.items()}  # [S, 3] each
    n_series = len(next(iter(counts.values())))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_series, np.full(n_series, 1.0 / n_series), size=n_boot)  # [n_boot, S]
    boot = {k: _f2_of_counts(weights @ c) for k, c in counts.items()}  # [n_boot] each
    full = {k: float(_f2_of_counts(c.sum(0))) for k, c in counts.items()}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for name, values in boot.items():
        low, high = np.percentile(values, q).tolist()
        out[name] = {"f2": full[name], "low": low, "high": high}
    first, *others = list(preds)
    for name in others:
        diff = boot[name] - boot[first]
        low, high = np.percentile(diff, q).tolist()
        out[f"{name} - {first}"] = {"f2": full[name] - full[first], "low": low, "high": high}
    return out


@dataclass
class FoldEnsemble:
    """The member choice of a cross-validated ensemble, from out-of-fold (OOF) predictions only.

    ``members``: trial ids; ``bag``: the chosen members with repeats (weight = count / length); ``method``:
    ``"top_k"`` (every member once) or ``"greedy"`` (:func:`greedy_members`), whichever has the higher
    cross-fitted OOF micro-F2. F2 figures are ``{"tuned": at thresholds tuned on all OOF rows,
    "cross_fitted": thresholds tuned on the other folds}``. ``bootstrap``: :func:`bootstrap_f2` of the single
    best member against the ensemble, each at its tuned thresholds. ``alignment``: the bag's
    :class:`FoldAlignment` as a dict when the OOF rows were aligned (the thresholds then hold for the mean of
    the fold models; the single best's figures are then those of its rows aligned to its own fold models'
    mean), else ``None``.
    """

    members: list[str]
    single_best: str
    bag: list[str]
    method: str
    thresholds: list[float]
    single_f2: dict[str, float]
    ensemble_f2: dict[str, float]
    top_k_f2: dict[str, float]
    greedy_f2: dict[str, float]
    per_class: dict[str, float]
    bootstrap: dict[str, dict[str, float]]
    alignment: dict | None = None


def choose_fold_ensemble(
    oof: dict[str, pd.DataFrame],
    n_boot: int = 1000,
    seed: int = 0,
    reference: dict[str, dict[int, np.ndarray]] | None = None,
) -> tuple[FoldEnsemble, np.ndarray]:
    """Choose members and thresholds of an ensemble from each member's OOF table (same rows, ``fold`` column).

    With ``reference`` (``{member: {fold: [R, 5] probabilities of that fold's model on the same reference
    slices}}``) every bag's OOF rows are aligned to the scale of its fold models' mean (:class:`FoldAlignment`)
    before members, thresholds and scores are taken from them; without it the raw OOF rows are used.

    Returns:
        ``(choice, the chosen bag's OOF probabilities [N, 5])``, rows sorted by ``series_id, position``.

    Raises:
        ValueError: for no members, unlabelled tables, tables over other rows than the first, or a
            ``reference`` that lacks a member or a fold.
    """
    if not oof:
        raise ValueError("choose_fold_ensemble needs at least one member. Got 0")
    names = list(oof)
    frames = [
        oof[n].sort_values(["series_id", "position"], kind="stable").reset_index(drop=True) for n in names
    ]
    average_predictions(frames)  # checks that every table covers the same slices with the same labels
    probs = [_labelled_arrays(f)[0] for f in frames]
    labels = _labelled_arrays(frames[0])[1]
    fold, series = frames[0]["fold"].to_numpy(), frames[0]["series_id"].to_numpy()
    if reference is not None:
        missing = [n for n in names if set(reference.get(n, {})) != set(np.unique(fold).tolist())]
        if missing:
            raise ValueError(f"reference predictions lack members or folds: {missing}")

    def alignment_of(bag: Sequence[int]) -> FoldAlignment | None:
        if reference is None:
            return None
        folds = reference[names[0]]
        return FoldAlignment.fit({k: np.mean([reference[names[i]][k] for i in bag], axis=0) for k in folds})

    def combine(bag: Sequence[int]) -> np.ndarray:
        alignment = alignment_of(bag)
        raw = bag_probs(probs, bag)
        return raw if alignment is None else alignment.apply(raw, fold)

    def figures(p: np.ndarray) -> dict[str, float]:
        return {"tuned": tuned_f2(labels, p)[0], "cross_fitted": cross_fitted_f2(labels, p, fold)}

    best = top_k_members(labels, probs, 1, combine)[0]
    greedy = greedy_members(labels, probs, combine=combine)
    every = list(range(len(probs)))
    top_k_f2, greedy_f2 = figures(combine(every)), figures(combine(greedy))
    use_greedy = greedy_f2["cross_fitted"] > top_k_f2["cross_fitted"]
    bag = greedy if use_greedy else every
    ensemble, single = combine(bag), combine([best])
    thresholds = tuned_f2(labels, ensemble)[1]
    decisions = {
        "single": M.binarize(single, tuned_f2(labels, single)[1]),
        "ensemble": M.binarize(ensemble, thresholds),
    }
    alignment = alignment_of(bag)
    choice = FoldEnsemble(
        members=names,
        single_best=names[best],
        bag=[names[i] for i in bag],
        method="greedy" if use_greedy else "top_k",
        thresholds=thresholds.tolist(),
        single_f2=figures(single),
        ensemble_f2=greedy_f2 if use_greedy else top_k_f2,
        top_k_f2=top_k_f2,
        greedy_f2=greedy_f2,
        per_class=dict(zip(CLASSES, map(float, M.per_class_f2(labels, decisions["ensemble"])), strict=True)),
        bootstrap=bootstrap_f2(labels, decisions, series, n_boot=n_boot, seed=seed),
        alignment=None if alignment is None else asdict(alignment),
    )
    return choice, ensemble


# ------------------------------------------------------------------------------------ ensemble spec


@dataclass
class EnsembleSpec:
    """What ``ensemble.json`` records so new studies can be predicted with the same ensemble.

    ``models``: checkpoint paths; ``thresholds``: ``[5]`` in ``CLASSES`` order; ``size`` / ``windows`` /
    ``format``: from the training shards' manifest (how new images must be preprocessed); ``tta``: the
    test-time augmentation used (``True`` = flip, or names: :func:`ichmodel.predict.resolve_tta`);
    ``val_f2``: ensemble validation (or cross-fitted OOF) micro-F2; ``single_f2``: that of each model.
    """

    models: list[str]
    thresholds: list[float]
    size: int
    windows: list[list[float]]
    format: str = "dlcv"
    tta: bool | list[str] = False
    val_f2: float | None = None
    single_f2: list[float] = field(default_factory=list)
    trial_ids: list[str] = field(default_factory=list)

    def save(self, out_dir: str | Path) -> Path:
        values = asdict(self)
        values["classes"] = list(CLASSES)
        values["thresholds_by_class"] = dict(zip(CLASSES, self.thresholds, strict=True))
        return atomic_write_text(Path(out_dir) / ENSEMBLE_SPEC_NAME, json.dumps(values, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> EnsembleSpec:
        """Read ``ensemble.json`` (``path`` may be the file or its folder).

        Raises:
            FileNotFoundError: when there is no such file.
            ValueError: when it lacks a field, has no models or not 5 thresholds.
        """
        path = Path(path)
        if path.is_dir():
            path = path / ENSEMBLE_SPEC_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {ENSEMBLE_SPEC_NAME} at {path}; run ray_jobs/ensemble.py first")
        values = json.loads(path.read_text())
        required = ("models", "thresholds", "size", "windows")
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"{path} lacks {missing}")
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        spec = cls(**known)
        if not spec.models:
            raise ValueError(f"{path} lists no models")
        check_thresholds(spec.thresholds)
        return spec
