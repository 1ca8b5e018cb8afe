"""What a reader returns: the series it found (slices in order, with labels where known) and the inputs it
skipped, each with a reason naming the file; and the checks on the label CSV files both layouts share.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceRecord:
    """One slice of a series. ``labels``: five 0/1 ints in ``CLASSES`` order, or ``None`` when unlabelled."""

    slice_id: str
    path: str
    labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SeriesRecord:
    """A series with its slices in order. ``kind`` says how to decode a slice: ``"dicom"`` or ``"jpeg"``.
    ``patient_id``: the DICOM PatientID where the files carry one (folds keep a patient's series together)."""

    series_id: str
    slices: tuple[SliceRecord, ...]
    kind: str
    patient_id: str | None = None


@dataclass(frozen=True)
class SkipRecord:
    """An input that is not used, and why (``path`` names the file, or the CSV row's path)."""

    path: str
    reason: str


@dataclass
class ReadResult:
    """The series of one input (``format`` is ``dlcv``, ``rsna`` or ``dicom``) and what was skipped."""

    format: str
    series: list[SeriesRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    has_labels: bool = False

    @property
    def num_slices(self) -> int:
        return sum(len(s.slices) for s in self.series)


def skip_input(skipped: list[SkipRecord], path: str | Path, reason: str) -> None:
    logger.warning("Skipping %s: %s", path, reason)
    skipped.append(SkipRecord(str(path), reason))


def unsafe_name(name: str) -> str | None:
    """Why a single path component from a CSV is unsafe to join to the input folder, or ``None``."""
    if not name or name in (".", ".."):
        return f"invalid name {name!r}"
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"absolute path {name!r} not allowed"
    if "/" in name or "\\" in name or ".." in name:
        return f"path separators or '..' not allowed in {name!r}"
    return None


def read_csv_rows(path: str | Path, expected_header: Sequence[str]) -> list[list[str]]:
    """Rows of a CSV file after checking its header is exactly ``expected_header``.

    Raises:
        ValueError: naming the file and the header found when it differs.
        FileNotFoundError: when the file does not exist.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        found = [h.strip() for h in header] if header else []
        if found != list(expected_header):
            raise ValueError(
                f"{path}: header must be exactly {','.join(expected_header)!r}. Got {','.join(found)!r}"
            )
        return [row for row in reader if row]


def parse_01(values: Sequence[str]) -> tuple[int, ...]:
    out = tuple(int(float(v)) for v in values)
    if any(v not in (0, 1) for v in out):
        raise ValueError(f"labels must be 0 or 1. Got {list(values)}")
    return out
