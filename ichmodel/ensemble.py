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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ichmodel import metrics as M
from ichmodel.constants import CLASSES
from ichmodel.io import atomic_write_text
from ichmodel.predict import KEY_COLUMNS, LABEL_COLUMNS, PROB_COLUMNS, prediction_arrays
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
    total = first[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
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


def choose_thresholds(frame: pd.DataFrame) -> np.ndarray:
    """Per-class thresholds ``[5]`` that maximise micro-F2 on a labelled (validation) prediction table.

    Uses :func:`ichmodel.metrics.search_thresholds` (coordinate ascent on the pooled counts).

    Raises:
        ValueError: when the table has no labels.
    """
    probs, labels = _labelled_arrays(frame)
    return M.search_thresholds(labels, probs)


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


# ------------------------------------------------------------------------------------ ensemble spec


@dataclass
class EnsembleSpec:
    """What ``ensemble.json`` records so new studies can be predicted with the same ensemble.

    ``models``: checkpoint paths; ``thresholds``: ``[5]`` in ``CLASSES`` order; ``size`` / ``windows`` /
    ``format``: from the training shards' manifest (how new images must be preprocessed); ``tta``: whether
    reversed-sequence TTA was used; ``val_f2``: ensemble validation micro-F2; ``single_f2``: that of each model.
    """

    models: list[str]
    thresholds: list[float]
    size: int
    windows: list[list[float]]
    format: str = "dlcv"
    tta: bool = False
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
