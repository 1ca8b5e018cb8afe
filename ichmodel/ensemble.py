"""Ensembles of tuned models: averaging their predictions, thresholds, scores, member choice, ensemble.json.

Steps (``ray_jobs/ensemble.py`` runs them on the trials :func:`ichmodel.trials.select_trials` picks): the
models' prediction tables (:mod:`ichmodel.predict`) are averaged by :func:`average_predictions` (mean of
probabilities; the authors' code took a majority vote of binary files instead); per-class thresholds are
tuned on the averaged validation predictions (:func:`choose_thresholds`) and scored
(:func:`score_predictions`, :func:`score_model`); members are every model or Caruana's greedy bag
(:func:`greedy_members`, :func:`choose_on_selection` with a held-out part); :func:`write_outputs` writes the
checked submission files (:mod:`ichmodel.submission`) and :class:`EnsembleSpec` records the result in
``ensemble.json``. The cross-validated ensemble is :mod:`ichmodel.fold_ensemble`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ichmodel import metrics as M
from ichmodel import submission as S
from ichmodel.constants import CLASSES
from ichmodel.io import atomic_write_text
from ichmodel.prediction_table import KEY_COLUMNS, LABEL_COLUMNS, PROB_COLUMNS, prediction_arrays
from ichmodel.scores import ModelScore
from ichmodel.shards import load_manifest
from ichmodel.submission import check_thresholds

logger = logging.getLogger(__name__)

ENSEMBLE_SPEC_NAME = "ensemble.json"


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


def labelled_arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
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
    probs, labels = labelled_arrays(frame)
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
    probs, labels = labelled_arrays(frame)
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
    passes one that also aligns the folds' scales, :class:`ichmodel.calibration.FoldAlignment`).
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


def score_model(name: str, val: pd.DataFrame, prevalence: np.ndarray | None) -> ModelScore:
    """Validation F2 of a model's (or the ensemble's) predictions at thresholds tuned on them (the training
    run's rule, so a single model scores what its training reported)."""
    thresholds = choose_thresholds(val, prevalence)
    score = score_predictions(val, thresholds)
    return ModelScore(name, score["micro_f2"], score["per_class"], thresholds.tolist())


def choose_on_selection(
    names: list[str], vals: list[pd.DataFrame], select: list[str], held: list[str], prevalence
) -> tuple[list[int], np.ndarray, list[ModelScore]]:
    """Members and thresholds chosen on the ``select`` series, scored on the ``held`` ones.

    Members: every model, or Caruana's greedy bag (:func:`greedy_members`) when it scores
    higher on the selection series. Returns ``(bag, thresholds, scores)``: ``scores`` holds each model's
    held-out F2 at its own selection thresholds, then the ensemble's.
    """

    def part(frame: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
        return frame[frame["series_id"].isin(ids)]

    probs = [prediction_arrays(part(v, select))[0] for v in vals]
    labels = prediction_arrays(part(vals[0], select))[1]
    greedy, every = greedy_members(labels, probs), list(range(len(vals)))
    scored = [tuned_f2(labels, bag_probs(probs, bag))[0] for bag in (greedy, every)]
    bag = greedy if scored[0] > scored[1] else every
    scores = []
    for name, frames in [(n, [v]) for n, v in zip(names, vals, strict=True)] + [
        (f"ensemble of {len(bag)}", [vals[i] for i in bag])
    ]:
        mean = average_predictions(frames)
        thresholds = choose_thresholds(part(mean, select), prevalence)
        score = score_predictions(part(mean, held), thresholds)
        scores.append(ModelScore(name, score["micro_f2"], score["per_class"], thresholds.tolist()))
    logger.info("members chosen on %d series: %s (%s)", len(select), [names[i] for i in bag],
                "greedy" if bag is greedy else "every model")  # fmt: skip
    return bag, np.asarray(scores[-1].thresholds), scores


# ------------------------------------------------------------------------------------ files

#: Every split gets ``<split>_probs.parquet`` and ``<split>_per_slice.csv``; some shard formats add a
#: competition file: ``(split, format) → (submission kind, file name)``.
COMPETITION_FILES: dict[tuple[str, str], tuple[str, str]] = {
    ("val", "dlcv"): ("leaderboard", "val_leaderboard.csv"),
    ("test", "dlcv"): ("leaderboard", "submission.csv"),
    ("test", "rsna"): ("rsna", "submission_rsna.csv"),
}


def write_outputs(
    out: Path,
    val: pd.DataFrame,
    test: pd.DataFrame,
    thresholds: np.ndarray,
    train_shards: str,
    val_ids: list[str],
    test_shards: str,
) -> list[Path]:
    """Validation and test files (see the module docstring and :data:`COMPETITION_FILES`).

    Each CSV is checked against the slices it must cover, read from the shards: the ``val_ids`` series of
    ``train_shards`` for ``val``, every slice of ``test_shards`` for ``test``.

    Raises:
        SubmissionError: when a file does not cover exactly those slices (or is malformed otherwise).
    """
    written = []
    for split, frame, shards, series in (
        ("val", val, train_shards, val_ids),
        ("test", test, test_shards, None),
    ):
        written.append(S.write_probabilities(frame, out / f"{split}_probs.parquet"))
        expected = S.expected_slices(shards, series)
        shard_format = load_manifest(shards)["format"]
        files = [("per_slice", f"{split}_per_slice.csv")]
        if (split, shard_format) in COMPETITION_FILES:
            files.append(COMPETITION_FILES[split, shard_format])
        for kind, name in files:
            written.append(S.write_submission(frame, kind, out / name, expected, thresholds))
    return written


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
            ValueError: naming the file when it is not a JSON object, lacks a field, has no models or not 5
                thresholds.
        """
        path = Path(path)
        if path.is_dir():
            path = path / ENSEMBLE_SPEC_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {ENSEMBLE_SPEC_NAME} at {path}; run ray_jobs/ensemble.py first")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} is not an ensemble spec (a JSON object)")
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
