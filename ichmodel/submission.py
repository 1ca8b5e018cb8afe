"""Submission files: the ids each kind must hold, one checked writer, and the check itself.

Kinds (:data:`SUBMISSION_KINDS`), each built from a prediction table (:mod:`ichmodel.predict`):

* ``per_slice``: ``dirname,ID,ich,ivh,sah,sdh,edh`` with 0/1 (dirname = series id, ID = slice id), the
  DLCV ``train.csv`` layout;
* ``leaderboard``: ``ID,prediction``, one 0/1 row per slice and class, ID = ``<jpg stem>_<cls>``
  (e.g. ``e00b013d9_14_sdh``), the course leaderboard file;
* ``rsna``: ``ID,Label`` with ``ID_<hex>_<subtype>`` rows (``any`` = max of the five), probabilities,
  the Kaggle RSNA 2019 file.

:func:`write_submission` writes a kind to a temporary file beside the target (:func:`ichmodel.io.atomic_path`),
reads it back and checks it with :func:`validate_submission` against the ids it must hold (every expected
slice exactly once, header and column order, values in range), and only then renames it into place; a failed
check removes the temporary file and raises :class:`SubmissionError`, so no partial or wrong file is ever left
under the target name. :func:`write_probabilities` writes the probabilities themselves as Parquet.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from ichmodel.io import atomic_path, atomic_write
from ichmodel.prediction_table import KEY_COLUMNS, prediction_arrays
from ichmodel.shards import load_manifest, read_shard_table

logger = logging.getLogger(__name__)

#: Columns of the Kaggle RSNA file; its rows follow :data:`ichmodel.constants.RSNA_ROW_ORDER`.
RSNA_HEADER: tuple[str, ...] = ("ID", "Label")
RSNA_ORDER = RSNA_ROW_ORDER
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")


class SubmissionError(ValueError):
    """A submission file does not match what is expected (ids, header, values)."""


def check_thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """``thresholds`` as a float ``[5]`` array.

    Raises:
        ValueError: when it does not hold 5 values.
    """
    th = np.asarray(thresholds, dtype=np.float64)
    if th.shape != (NUM_CLASSES,):
        raise ValueError(f"thresholds must hold {NUM_CLASSES} values. Got shape {th.shape}")
    return th


# ------------------------------------------------------------------------------------------------ ids


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


def expected_slices(shard_dir: str | Path, series_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Every slice of a shard folder (or of its ``series_ids``), read straight from its Parquet files:
    ``series_id, position, slice_id``.

    This is the reference a submission is checked against, independent of any prediction.

    Raises:
        FileNotFoundError: when the folder has no manifest.
    """
    manifest = load_manifest(shard_dir)
    parts = [
        read_shard_table(shard_dir, s["file"], list(KEY_COLUMNS)).to_pandas() for s in manifest["shards"]
    ]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in KEY_COLUMNS})
    slices = pd.concat(parts, ignore_index=True)
    if series_ids is not None:
        slices = slices[slices["series_id"].isin(list(series_ids))]
    return slices.sort_values(["series_id", "position"]).reset_index(drop=True)


# -------------------------------------------------------------------------------------- kinds table


def _decisions(frame: pd.DataFrame, thresholds: np.ndarray | None) -> np.ndarray:
    """0/1 ``[N, 5]`` at ``thresholds``."""
    if thresholds is None:
        raise ValueError("A 0/1 submission needs thresholds. Got None")
    probs, _ = prediction_arrays(frame)
    return M.binarize(probs, check_thresholds(thresholds))


def _slice_id_list(frame: pd.DataFrame) -> list[str]:
    return frame["slice_id"].astype(str).tolist()


def _per_slice_rows(frame: pd.DataFrame, thresholds: np.ndarray | None) -> pd.DataFrame:
    pred = _decisions(frame, thresholds)  # [N, 5]
    rows = pd.DataFrame(
        {"dirname": frame["series_id"].astype(str).to_numpy(), "ID": frame["slice_id"].astype(str).to_numpy()}
    )
    for c, name in enumerate(CLASSES):
        rows[name] = pred[:, c]
    return rows


def _leaderboard_rows(frame: pd.DataFrame, thresholds: np.ndarray | None) -> pd.DataFrame:
    pred = _decisions(frame, thresholds)  # [N, 5] → N × 5 rows, classes inner
    return pd.DataFrame({"ID": leaderboard_ids(_slice_id_list(frame)), "prediction": pred.reshape(-1)})


def _rsna_rows(frame: pd.DataFrame, thresholds: np.ndarray | None) -> pd.DataFrame:
    """Probabilities (``thresholds`` unused); ``any`` = max of the five."""
    probs, _ = prediction_arrays(frame)
    by_subtype = {RSNA_SUBTYPES[c]: probs[:, i] for i, c in enumerate(CLASSES)}
    by_subtype["any"] = probs.max(axis=1)
    values = np.stack([by_subtype[s] for s in RSNA_ORDER], axis=1)  # [N, 6] → N × 6 rows
    return pd.DataFrame({"ID": rsna_ids(_slice_id_list(frame)), "Label": values.reshape(-1)})


@dataclass(frozen=True)
class SubmissionKind:
    """One submission file format.

    ``header``: the exact columns; ``ids``: slice ids → the ids the file holds (``ID`` column), in row order;
    ``rows``: ``(prediction table, thresholds [5] or None) → the file's rows``; ``binary``: values are 0/1
    (else probabilities in [0, 1]); ``float_format``: how probabilities are printed.
    """

    header: tuple[str, ...]
    ids: Callable[[Sequence[str]], list[str]]
    rows: Callable[[pd.DataFrame, np.ndarray | None], pd.DataFrame]
    binary: bool
    float_format: str | None = None
    id_column: str = "ID"


SUBMISSION_KINDS: dict[str, SubmissionKind] = {
    "per_slice": SubmissionKind(DLCV_LABEL_HEADER, list, _per_slice_rows, binary=True),
    "leaderboard": SubmissionKind(LEADERBOARD_HEADER, leaderboard_ids, _leaderboard_rows, binary=True),
    "rsna": SubmissionKind(RSNA_HEADER, rsna_ids, _rsna_rows, binary=False, float_format="%.6f"),
}


def submission_kind(kind: str) -> SubmissionKind:
    """The :data:`SUBMISSION_KINDS` entry of ``kind``.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if kind not in SUBMISSION_KINDS:
        raise ValueError(f"Unknown submission kind {kind!r}; expected one of {sorted(SUBMISSION_KINDS)}")
    return SUBMISSION_KINDS[kind]


def expected_ids(slice_ids: Sequence[str], kind: str) -> list[str]:
    """The ids a ``kind`` submission must hold, once each, for these slices.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    return submission_kind(kind).ids([str(s) for s in slice_ids])


# ------------------------------------------------------------------------------------- validation


def validate_submission(path: str | Path, kind: str, expected: Sequence[str], name: str | None = None) -> int:
    """Check a written submission file against the ids it must hold.

    Args:
        path: the CSV file.
        kind: ``per_slice``, ``leaderboard`` or ``rsna`` (see :data:`SUBMISSION_KINDS`).
        expected: every id the file must hold (``ID`` column), e.g. from :func:`expected_ids`.
        name: what error messages call the file (default: its name; the writer passes the target's name).

    Returns:
        The number of data rows.

    Raises:
        SubmissionError: naming everything that is wrong: the header (exact names and order), missing,
            duplicate or unexpected ids, empty cells, values that are not 0/1 (``per_slice``,
            ``leaderboard``) or not probabilities in [0, 1] (``rsna``).
        ValueError: for an unknown ``kind`` or duplicates in ``expected``.
    """
    spec = submission_kind(kind)
    path = Path(path)
    name = name or path.name
    with open(path, newline="") as f:
        found_header = next(csv.reader(f), [])
    if tuple(found_header) != spec.header:
        raise SubmissionError(f"{name}: header is {found_header}, expected {list(spec.header)}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    problems = _id_problems(table[spec.id_column], expected)
    for column in spec.header:
        if column != spec.id_column:
            problems += _value_problems(column, table[column], spec.binary)
    if problems:
        raise SubmissionError(f"{name}: " + "; ".join(problems))
    return len(table)


def _id_problems(ids: pd.Series, expected: Sequence[str]) -> list[str]:
    present, wanted = set(ids), set(expected)
    if len(wanted) != len(expected):
        raise ValueError(f"The expected ids hold duplicates ({len(expected) - len(wanted)})")
    problems = []
    duplicated = ids[ids.duplicated()].unique().tolist()
    if duplicated:
        problems.append(f"{len(duplicated)} duplicate id(s), e.g. {duplicated[:5]}")
    missing = sorted(wanted - present)
    if missing:
        problems.append(f"{len(missing)} expected id(s) missing, e.g. {missing[:5]}")
    extra = sorted(present - wanted)
    if extra:
        problems.append(f"{len(extra)} unexpected id(s), e.g. {extra[:5]}")
    return problems


def _value_problems(column: str, values: pd.Series, binary: bool) -> list[str]:
    if column == "dirname":
        empty = int((values.str.strip() == "").sum())
        return [f"{empty} empty dirname cell(s)"] if empty else []
    if binary:
        bad, what = values[~values.isin(["0", "1"])], "not 0/1"
    else:
        numbers = pd.to_numeric(values, errors="coerce")
        bad, what = values[numbers.isna() | (numbers < 0) | (numbers > 1)], "not probabilities in [0, 1]"
    if not len(bad):
        return []
    return [f"column {column!r}: {len(bad)} value(s) {what}, e.g. {bad.unique()[:5].tolist()}"]


# ------------------------------------------------------------------------------------------ writers


def submission_rows(
    frame: pd.DataFrame, kind: str, thresholds: Sequence[float] | np.ndarray | None = None
) -> pd.DataFrame:
    """The rows of a ``kind`` submission for a prediction table (``thresholds`` ``[5]`` for 0/1 kinds).

    Raises:
        ValueError: for an unknown ``kind``, or a 0/1 kind without 5 thresholds.
    """
    return submission_kind(kind).rows(frame, thresholds)


def write_submission(
    frame: pd.DataFrame,
    kind: str,
    path: str | Path,
    expected: pd.DataFrame | Sequence[str],
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> Path:
    """Write a ``kind`` submission of a prediction table and check it before it lands at ``path``.

    Args:
        frame: prediction table.
        kind: a key of :data:`SUBMISSION_KINDS`.
        path: target file.
        expected: the slices the file must cover: a table with ``slice_id`` (e.g. :func:`expected_slices`
            of the shards predicted) or the slice ids.
        thresholds: ``[5]`` decision thresholds (0/1 kinds; unused for ``rsna``).

    Raises:
        SubmissionError: when the checked file is wrong; nothing is left at ``path`` or in a temp file.
        ValueError: for an unknown ``kind``, or a 0/1 kind without 5 thresholds.
    """
    spec = submission_kind(kind)
    rows = spec.rows(frame, thresholds)
    slice_ids = expected["slice_id"].tolist() if isinstance(expected, pd.DataFrame) else expected
    ids = expected_ids(slice_ids, kind)
    with atomic_path(path) as tmp:
        rows.to_csv(tmp, index=False, float_format=spec.float_format)
        count = validate_submission(tmp, kind, ids, name=Path(path).name)
    logger.info("wrote %s (%d rows, checked)", path, count)
    return Path(path)


def write_probabilities(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a prediction table as Parquet (atomically: temp file, then rename)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    logger.info("wrote %s (%d slices)", path, len(frame))
    return Path(path)
