"""The prediction table: per-slice probabilities (and labels) as one pandas DataFrame, and reading it back.

A prediction table (one row per slice, sorted by ``series_id`` then ``position``) has the columns
``series_id, position, slice_id`` (:data:`KEY_COLUMNS`) and one probability column per class in
:data:`ichmodel.constants.CLASSES` order (:data:`PROB_COLUMNS`); when the shards carry labels, ``label_<cls>``
columns (0/1, :data:`LABEL_COLUMNS`) follow. ``ichmodel.predict`` writes it (:func:`prediction_frame`), the
ensemble, folds and submission read it (:func:`prediction_arrays`), and :func:`summarize_series` sums it up per
series. Needs no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ichmodel.constants import CLASSES, NUM_CLASSES

KEY_COLUMNS: tuple[str, ...] = ("series_id", "position", "slice_id")
PROB_COLUMNS: tuple[str, ...] = CLASSES
LABEL_COLUMNS: tuple[str, ...] = tuple(f"label_{c}" for c in CLASSES)


def prediction_frame(
    columns: dict[str, list], probs_out: list[np.ndarray], labels_out: list[np.ndarray] | None
) -> pd.DataFrame:
    """Key columns, per-class probabilities and (when ``labels_out`` is given) 0/1 label columns."""
    frame = pd.DataFrame(
        {
            "series_id": pd.Series(columns["series_id"], dtype=object),
            "position": np.asarray(columns["position"], dtype=np.int64),
            "slice_id": pd.Series(columns["slice_id"], dtype=object),
        }
    )
    empty = np.zeros((0, NUM_CLASSES), np.float32)
    probs_all = np.concatenate(probs_out).astype(np.float32) if probs_out else empty
    for c, name in enumerate(PROB_COLUMNS):
        frame[name] = probs_all[:, c]
    if labels_out is not None:
        labels_all = np.concatenate(labels_out) if labels_out else empty
        for c, name in enumerate(LABEL_COLUMNS):
            frame[name] = (labels_all[:, c] > 0.5).astype(np.int8)
    return frame


def prediction_arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    """``(probs [N, 5] float, labels [N, 5] int8 or None)`` from a prediction table.

    Raises:
        KeyError: naming the class columns that are missing.
    """
    missing = [c for c in PROB_COLUMNS if c not in frame.columns]
    if missing:
        raise KeyError(f"Prediction table lacks probability columns {missing}; has {list(frame.columns)}")
    probs = frame[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    labels = None
    if all(c in frame.columns for c in LABEL_COLUMNS):
        labels = frame[list(LABEL_COLUMNS)].to_numpy(dtype=np.int8)
    return probs, labels


def summarize_series(frame: pd.DataFrame, thresholds: Sequence[float] | np.ndarray) -> pd.DataFrame:
    """Per-series summary of a prediction table, for new-study inference.

    Args:
        frame: prediction table (see :func:`ichmodel.predict.predict_dataset`).
        thresholds: ``[5]`` per-class decision thresholds (positive = ``prob >= threshold``).

    Returns:
        One row per series (sorted by id): ``series_id``, ``num_slices``, ``max_<cls>`` (highest slice
        probability), ``positive_<cls>`` (slices at or above the class threshold) and ``positive_any``
        (slices positive for at least one class).

    Raises:
        ValueError: when ``thresholds`` does not hold 5 values.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (NUM_CLASSES,):
        raise ValueError(f"thresholds must hold {NUM_CLASSES} values. Got shape {thresholds.shape}")
    probs, _ = prediction_arrays(frame)
    positive = probs >= thresholds  # [N, 5]
    work = pd.DataFrame({"series_id": frame["series_id"].to_numpy()})
    for c, name in enumerate(CLASSES):
        work[f"max_{name}"] = probs[:, c]
        work[f"positive_{name}"] = positive[:, c].astype(np.int64)
    work["positive_any"] = positive.any(axis=1).astype(np.int64)
    grouped = work.groupby("series_id", sort=True)
    summary = grouped.agg(
        num_slices=("positive_any", "size"),
        **{f"max_{c}": (f"max_{c}", "max") for c in CLASSES},
        **{f"positive_{c}": (f"positive_{c}", "sum") for c in CLASSES},
        positive_any=("positive_any", "sum"),
    )
    return summary.reset_index()
