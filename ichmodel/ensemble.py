"""Ensembles of tuned trials, decision thresholds, and the submission files, checked before they land.

Steps (``ray_jobs/ensemble.py`` runs them): :func:`select_trials` picks the K best usable trials of a
``trials.csv``; their prediction tables (:mod:`ichmodel.predict`) are averaged by :func:`average_predictions`
(mean of probabilities; the authors' code took a majority vote of binary files instead); per-class
thresholds are tuned on the averaged validation predictions (:func:`choose_thresholds`); the writers then
produce

* ``per-slice`` CSV: ``dirname,ID,ich,ivh,sah,sdh,edh`` with 0/1 (dirname = series id, ID = slice id), the
  DLCV ``train.csv`` layout;
* ``leaderboard`` CSV: ``ID,prediction``, one 0/1 row per slice and class, ID = ``<jpg stem>_<cls>``
  (e.g. ``e00b013d9_14_sdh``), the course leaderboard file;
* ``rsna`` CSV: ``ID,Label`` with ``ID_<hex>_<subtype>`` rows (``any`` = max of the five), probabilities,
  the Kaggle RSNA 2019 file;
* the probabilities as Parquet.

Every CSV is written to a temporary file in the target folder, read back and checked by
:func:`validate_submission` (every expected slice exactly once, header and column order, values in range),
and only then renamed into place; a failed check removes the temporary file and raises
:class:`SubmissionError`, so no partial or wrong file is ever left under the target name.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ichmodel import metrics as M
from ichmodel.constants import (
    CLASSES,
    DLCV_LABEL_HEADER,
    LEADERBOARD_HEADER,
    NUM_CLASSES,
    RSNA_ROW_ORDER,
    RSNA_SUBTYPES,
)
from ichmodel.predict import KEY_COLUMNS, LABEL_COLUMNS, PROB_COLUMNS, prediction_arrays
from ichmodel.shards import load_manifest

logger = logging.getLogger(__name__)

#: Columns of the Kaggle RSNA file; its rows follow :data:`ichmodel.constants.RSNA_ROW_ORDER`.
RSNA_HEADER: tuple[str, ...] = ("ID", "Label")
RSNA_ORDER = RSNA_ROW_ORDER
#: Submission kinds: header, id column, whether values are 0/1 (else probabilities in [0, 1]).
SUBMISSION_KINDS: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "per_slice": (DLCV_LABEL_HEADER, "ID", True),
    "leaderboard": (LEADERBOARD_HEADER, "ID", True),
    "rsna": (RSNA_HEADER, "ID", False),
}
ENSEMBLE_SPEC_NAME = "ensemble.json"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")


class SubmissionError(ValueError):
    """A submission file does not match what is expected (ids, header, values)."""


# ------------------------------------------------------------------------------------------- trials


def select_trials(trials_csv: str | Path, top_k: int) -> pd.DataFrame:
    """The ``top_k`` best usable trials of a tune job's ``trials.csv``, best first.

    Rows whose ``status`` is ``ERROR`` or whose ``checkpoint`` file does not exist are skipped (and logged);
    the rest are ranked by ``best_f2`` (missing values last). A relative checkpoint path is taken relative
    to the folder of ``trials_csv``; the returned ``checkpoint`` column holds absolute paths.

    Returns:
        The chosen rows (all columns of the table), at most ``top_k``, index reset.

    Raises:
        ValueError: when ``top_k < 1``, the table lacks ``trial_id``/``best_f2``/``checkpoint``, or no usable
            trial is left (the message says why each was skipped).
        FileNotFoundError: when ``trials_csv`` does not exist.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1. Got {top_k}")
    trials_csv = Path(trials_csv)
    if not trials_csv.is_file():
        raise FileNotFoundError(f"No trials table at {trials_csv}; run ray_jobs/tune.py first")
    table = pd.read_csv(trials_csv, dtype={"trial_id": str, "checkpoint": str, "status": str})
    missing = [c for c in ("trial_id", "best_f2", "checkpoint") if c not in table.columns]
    if missing:
        raise ValueError(f"{trials_csv} lacks columns {missing}; has {list(table.columns)}")
    reasons: list[str] = []
    keep: list[int] = []
    for i, row in table.iterrows():
        status = str(row.get("status", "OK")).strip().upper()
        checkpoint = "" if pd.isna(row["checkpoint"]) else str(row["checkpoint"]).strip()
        path = Path(checkpoint) if checkpoint else None
        if path is not None and not path.is_absolute():
            path = (trials_csv.parent / path).resolve()
        if status == "ERROR":
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
    chosen = table.loc[keep].sort_values("best_f2", ascending=False, na_position="last", kind="stable")
    chosen = chosen.head(top_k).reset_index(drop=True)
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
    thresholds = _check_thresholds(thresholds)
    probs, labels = _labelled_arrays(frame)
    pred = M.binarize(probs, thresholds)
    per_class = M.per_class_f2(labels, pred)
    return {
        "micro_f2": M.f2_score(labels, pred),
        "per_class": dict(zip(CLASSES, map(float, per_class), strict=True)),
    }


def _check_thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    th = np.asarray(thresholds, dtype=np.float64)
    if th.shape != (NUM_CLASSES,):
        raise ValueError(f"thresholds must hold {NUM_CLASSES} values. Got shape {th.shape}")
    return th


# ------------------------------------------------------------------------------------ expected ids


def expected_slices(shard_dir: str | Path) -> pd.DataFrame:
    """Every slice of a shard folder, read straight from its Parquet files: ``series_id, position, slice_id``.

    This is the reference a submission is checked against, independent of any prediction.

    Raises:
        FileNotFoundError: when the folder has no manifest.
    """
    manifest = load_manifest(shard_dir)
    parts = [
        pq.read_table(Path(shard_dir) / s["file"], columns=list(KEY_COLUMNS)).to_pandas()
        for s in manifest["shards"]
    ]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in KEY_COLUMNS})
    return pd.concat(parts, ignore_index=True).sort_values(["series_id", "position"]).reset_index(drop=True)


def slice_stem(slice_id: str) -> str:
    """``e00b013d9_14.jpg`` → ``e00b013d9_14`` (an image suffix is dropped; ``ID_<hex>`` stays as it is)."""
    name = PurePosixPath(slice_id).name
    return name[: -len(PurePosixPath(name).suffix)] if name.lower().endswith(_IMAGE_SUFFIXES) else name


def leaderboard_ids(slice_ids: Sequence[str]) -> list[str]:
    """``<stem>_<cls>`` for every slice (outer) and class (inner, ``CLASSES`` order)."""
    return [f"{slice_stem(s)}_{c}" for s in slice_ids for c in CLASSES]


def rsna_ids(slice_ids: Sequence[str]) -> list[str]:
    """``ID_<hex>_<subtype>`` for every slice (outer) and subtype (inner, :data:`RSNA_ORDER`)."""
    return [f"{s}_{sub}" for s in slice_ids for sub in RSNA_ORDER]


def expected_ids(slice_ids: Sequence[str], kind: str) -> list[str]:
    """The ids a ``kind`` submission must hold, once each, for these slices.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if kind == "per_slice":
        return list(slice_ids)
    if kind == "leaderboard":
        return leaderboard_ids(slice_ids)
    if kind == "rsna":
        return rsna_ids(slice_ids)
    raise ValueError(f"Unknown submission kind {kind!r}; expected one of {sorted(SUBMISSION_KINDS)}")


# ------------------------------------------------------------------------------------- validation


def validate_submission(path: str | Path, kind: str, expected: Sequence[str]) -> int:
    """Check a written submission file against the ids it must hold.

    Args:
        path: the CSV file.
        kind: ``per_slice``, ``leaderboard`` or ``rsna`` (see :data:`SUBMISSION_KINDS`).
        expected: every id the file must hold (``ID`` column), e.g. from :func:`expected_ids`.

    Returns:
        The number of data rows.

    Raises:
        SubmissionError: naming everything that is wrong: the header (exact names and order), missing,
            duplicate or unexpected ids, empty cells, values that are not 0/1 (``per_slice``,
            ``leaderboard``) or not probabilities in [0, 1] (``rsna``).
        ValueError: for an unknown ``kind``.
    """
    if kind not in SUBMISSION_KINDS:
        raise ValueError(f"Unknown submission kind {kind!r}; expected one of {sorted(SUBMISSION_KINDS)}")
    header, id_column, binary = SUBMISSION_KINDS[kind]
    path = Path(path)
    with open(path, newline="") as f:
        found_header = next(csv.reader(f), [])
    if tuple(found_header) != header:
        raise SubmissionError(f"{path.name}: header is {found_header}, expected {list(header)}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    problems: list[str] = []
    ids = table[id_column]
    duplicated = ids[ids.duplicated()].unique().tolist()
    if duplicated:
        problems.append(f"{len(duplicated)} duplicate id(s), e.g. {duplicated[:5]}")
    present, wanted = set(ids), set(expected)
    if len(wanted) != len(expected):
        raise ValueError(f"The expected ids hold duplicates ({len(expected) - len(wanted)})")
    missing = sorted(wanted - present)
    if missing:
        problems.append(f"{len(missing)} expected id(s) missing, e.g. {missing[:5]}")
    extra = sorted(present - wanted)
    if extra:
        problems.append(f"{len(extra)} unexpected id(s), e.g. {extra[:5]}")
    for column in header:
        if column == id_column:
            continue
        values = table[column]
        if kind == "per_slice" and column == "dirname":
            empty = int((values.str.strip() == "").sum())
            if empty:
                problems.append(f"{empty} empty dirname cell(s)")
            continue
        if binary:
            bad = values[~values.isin(["0", "1"])]
            if len(bad):
                problems.append(
                    f"column {column!r}: {len(bad)} value(s) not 0/1, e.g. {bad.unique()[:5].tolist()}"
                )
        else:
            numbers = pd.to_numeric(values, errors="coerce")
            bad = values[numbers.isna() | (numbers < 0) | (numbers > 1)]
            if len(bad):
                problems.append(
                    f"column {column!r}: {len(bad)} value(s) not probabilities in [0, 1], e.g. {bad.unique()[:5].tolist()}"
                )
    if problems:
        raise SubmissionError(f"{path.name}: " + "; ".join(problems))
    return len(table)


def _write_checked(
    write_fn: Callable[[Path], None], path: str | Path, kind: str, expected: Sequence[str]
) -> Path:
    """``write_fn(tmp)`` → :func:`validate_submission` → rename to ``path``; the temp file never survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_fn(tmp)
        rows = validate_submission(tmp, kind, expected)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%d rows, checked)", path, rows)
    return path


def _slice_ids(frame: pd.DataFrame, expected: pd.DataFrame | Sequence[str] | None) -> list[str]:
    if expected is None:
        return frame["slice_id"].astype(str).tolist()
    if isinstance(expected, pd.DataFrame):
        return expected["slice_id"].astype(str).tolist()
    return [str(s) for s in expected]


# ------------------------------------------------------------------------------------------ writers


def per_slice_frame(frame: pd.DataFrame, thresholds: Sequence[float] | np.ndarray) -> pd.DataFrame:
    """``dirname, ID, ich, ivh, sah, sdh, edh`` (0/1) from a prediction table."""
    probs, _ = prediction_arrays(frame)
    pred = M.binarize(probs, _check_thresholds(thresholds))
    out = pd.DataFrame(
        {"dirname": frame["series_id"].astype(str).to_numpy(), "ID": frame["slice_id"].astype(str).to_numpy()}
    )
    for c, name in enumerate(CLASSES):
        out[name] = pred[:, c]
    return out


def leaderboard_frame(frame: pd.DataFrame, thresholds: Sequence[float] | np.ndarray) -> pd.DataFrame:
    """``ID, prediction`` (0/1), ``N × 5`` rows: every slice, then its classes in ``CLASSES`` order."""
    probs, _ = prediction_arrays(frame)
    pred = M.binarize(probs, _check_thresholds(thresholds))  # [N, 5]
    return pd.DataFrame(
        {"ID": leaderboard_ids(frame["slice_id"].astype(str).tolist()), "prediction": pred.reshape(-1)}
    )


def rsna_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``ID, Label`` probabilities, ``N × 6`` rows in :data:`RSNA_ORDER`; ``any`` = max of the five."""
    probs, _ = prediction_arrays(frame)
    by_subtype = {RSNA_SUBTYPES[c]: probs[:, i] for i, c in enumerate(CLASSES)}
    by_subtype["any"] = probs.max(axis=1)
    values = np.stack([by_subtype[s] for s in RSNA_ORDER], axis=1)  # [N, 6]
    return pd.DataFrame({"ID": rsna_ids(frame["slice_id"].astype(str).tolist()), "Label": values.reshape(-1)})


def write_per_slice_csv(
    frame: pd.DataFrame,
    thresholds: Sequence[float] | np.ndarray,
    path: str | Path,
    expected: pd.DataFrame | Sequence[str] | None = None,
) -> Path:
    """Write ``dirname,ID,ich,ivh,sah,sdh,edh`` (0/1) and check it.

    Args:
        frame: prediction table.
        thresholds: ``[5]`` decision thresholds.
        path: target file.
        expected: the slices the file must cover (a table with ``slice_id``, e.g. :func:`expected_slices`, or
            the ids); default: the slices of ``frame`` (still checks duplicates, header and values).

    Raises:
        SubmissionError: when the checked file is wrong; nothing is left at ``path`` or in a temp file.
    """
    data = per_slice_frame(frame, thresholds)
    return _write_checked(
        lambda p: data.to_csv(p, index=False), path, "per_slice", _slice_ids(frame, expected)
    )


def write_leaderboard_csv(
    frame: pd.DataFrame,
    thresholds: Sequence[float] | np.ndarray,
    path: str | Path,
    expected: pd.DataFrame | Sequence[str] | None = None,
) -> Path:
    """Write the course leaderboard file ``ID,prediction`` (0/1) and check it (see :func:`write_per_slice_csv`).

    Raises:
        SubmissionError: when the checked file is wrong; nothing is left behind.
    """
    data = leaderboard_frame(frame, thresholds)
    ids = expected_ids(_slice_ids(frame, expected), "leaderboard")
    return _write_checked(lambda p: data.to_csv(p, index=False), path, "leaderboard", ids)


def write_rsna_csv(
    frame: pd.DataFrame, path: str | Path, expected: pd.DataFrame | Sequence[str] | None = None
) -> Path:
    """Write the Kaggle RSNA 2019 file ``ID,Label`` (probabilities) and check it.

    Raises:
        SubmissionError: when the checked file is wrong; nothing is left behind.
    """
    data = rsna_frame(frame)
    ids = expected_ids(_slice_ids(frame, expected), "rsna")
    return _write_checked(lambda p: data.to_csv(p, index=False, float_format="%.6f"), path, "rsna", ids)


def write_probabilities(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a prediction table as Parquet (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%d slices)", path, len(frame))
    return path


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
        path = Path(out_dir) / ENSEMBLE_SPEC_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        values = asdict(self)
        values["classes"] = list(CLASSES)
        values["thresholds_by_class"] = dict(zip(CLASSES, self.thresholds, strict=True))
        path.write_text(json.dumps(values, indent=2))
        return path

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
        _check_thresholds(spec.thresholds)
        return spec
