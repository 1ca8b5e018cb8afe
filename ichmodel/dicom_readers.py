"""Find the DICOM series: RSNA 2019's flat folder with its label CSV, or any folder of DICOM series.

* RSNA 2019: one flat folder of ``ID_<hex>.dcm`` + ``stage_2_train.csv`` (``ID,Label``, rows
  ``ID_<hex>_<subtype>``). Series are found from the DICOM headers (Study/Series Instance UID) and ordered
  by position along the slice normal (``ImagePositionPatient[2]`` for axial slices).
* A plain folder (searched recursively) of DICOM series, without labels, for inference on new studies.

Only headers are read here, never pixels (:mod:`ichmodel.decode` does that later). Header reading can be
spread over processes: every reader that opens DICOM headers takes a ``map_fn`` (``map_fn(fn, chunks) ->
list of results``, default: the built-in ``map``), which the Ray job fills with a Ray-task map. The library
itself never imports Ray.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichmodel.constants import CLASSES, NUM_CLASSES, RSNA_SUBTYPES
from ichmodel.read_records import (
    ReadResult,
    SeriesRecord,
    SkipRecord,
    SliceRecord,
    parse_01,
    read_csv_rows,
    skip_input,
)

logger = logging.getLogger(__name__)

RSNA_LABEL_HEADER: tuple[str, ...] = ("ID", "Label")
#: Header chunk size used when the headers of many DICOM files are read through ``map_fn``.
HEADER_CHUNK = 1000

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


# --------------------------------------------------------------------------------------------------
# DICOM headers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomHeader:
    """What ordering and grouping need from one DICOM file's header."""

    path: str
    study_uid: str
    series_uid: str
    position: float  # along the slice normal, mm
    instance_number: int
    patient_id: str = ""


def read_dicom_header(path: str | Path) -> DicomHeader | SkipRecord:
    """Read one file's header (pixel data is not loaded) or say why the file is unusable.

    Unusable: not DICOM, not CT, no pixel data, multi-frame, no Series Instance UID.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size=256)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return SkipRecord(str(path), f"not a readable DICOM file ({type(exc).__name__}: {exc})")
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        return SkipRecord(str(path), f"not a CT image (Modality={modality or 'missing'!r})")
    if "PixelData" not in ds:
        return SkipRecord(str(path), "no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return SkipRecord(str(path), f"multi-frame image ({ds.NumberOfFrames} frames) not supported")
    series_uid = str(ds.get("SeriesInstanceUID", "")).strip()
    if not series_uid:
        return SkipRecord(str(path), "no SeriesInstanceUID")
    instance = int(ds.get("InstanceNumber", 0) or 0)
    ipp = ds.get("ImagePositionPatient")
    if ipp is not None and len(ipp) == 3:
        iop = ds.get("ImageOrientationPatient")
        if iop is not None and len(iop) == 6:
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            position = float(np.dot(normal, np.asarray(ipp, float)))
        else:
            position = float(ipp[2])
    else:
        position = float(instance)
    study_uid, patient_id = (str(ds.get(k, "")).strip() for k in ("StudyInstanceUID", "PatientID"))
    return DicomHeader(str(path), study_uid, series_uid, position, instance, patient_id)


def read_dicom_headers(paths: Sequence[str | Path]) -> list[DicomHeader | SkipRecord]:
    """:func:`read_dicom_header` over ``paths`` (one chunk of a parallel map)."""
    return [read_dicom_header(p) for p in paths]


def _map_headers(paths: Sequence[Path], map_fn: MapFn | None) -> list[DicomHeader | SkipRecord]:
    chunks = [paths[i : i + HEADER_CHUNK] for i in range(0, len(paths), HEADER_CHUNK)]
    results: list[DicomHeader | SkipRecord] = []
    for chunk in (map_fn or map)(read_dicom_headers, chunks):
        results.extend(chunk)
    return results


def group_dicom_series(
    headers: Iterable[DicomHeader],
    slice_id_fn: Callable[[DicomHeader], str],
    labels: dict[str, tuple[int, ...]] | None = None,
) -> list[SeriesRecord]:
    """Group headers by (StudyInstanceUID, SeriesInstanceUID) and order each series along the slice normal.

    ``series_id`` is the SeriesInstanceUID (suffixed ``-2``, ``-3`` in the rare case that one UID appears
    in several studies). ``labels`` maps slice ids to label tuples (``None``: unlabelled).
    """
    groups: dict[tuple[str, str], list[DicomHeader]] = defaultdict(list)
    for h in headers:
        groups[(h.study_uid, h.series_uid)].append(h)
    series: list[SeriesRecord] = []
    used: dict[str, int] = {}
    for (_, series_uid), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        members.sort(key=lambda h: (h.position, h.instance_number, h.path))
        used[series_uid] = used.get(series_uid, 0) + 1
        series_id = series_uid if used[series_uid] == 1 else f"{series_uid}-{used[series_uid]}"
        records = []
        for h in members:
            slice_id = slice_id_fn(h)
            records.append(SliceRecord(slice_id, h.path, None if labels is None else labels[slice_id]))
        patient_id = next((h.patient_id for h in members if h.patient_id), None)
        series.append(SeriesRecord(series_id, tuple(records), "dicom", patient_id))
    return series


# --------------------------------------------------------------------------------------------------
# RSNA
# --------------------------------------------------------------------------------------------------


def read_rsna_labels(labels_csv: str | Path) -> tuple[dict[str, tuple[int, ...]], list[SkipRecord]]:
    """Parse ``stage_2_train.csv`` into ``{"ID_<hex>": (ich, ivh, sah, sdh, edh)}``.

    Duplicate rows are tolerated (conflicting ones keep the maximum, with a warning); ``any`` is ignored
    (it is the maximum of the five). Slices missing one of the five subtypes are skipped.

    Raises:
        ValueError: when the header is not ``ID,Label``.
    """
    subtype_index = {sub: CLASSES.index(cls) for cls, sub in RSNA_SUBTYPES.items()}
    partial: dict[str, list[int]] = {}
    skipped: list[SkipRecord] = []
    for line, row in enumerate(read_csv_rows(labels_csv, RSNA_LABEL_HEADER), start=2):
        where = f"{labels_csv}:{line}"
        slice_id, sep, subtype = row[0].strip().rpartition("_")
        if not sep or len(row) != 2:
            skip_input(skipped, where, f"cannot parse row {row!r} as ID_<hex>_<subtype>,<0|1>")
            continue
        if subtype == "any":
            continue
        if subtype not in subtype_index:
            skip_input(skipped, where, f"unknown subtype {subtype!r}")
            continue
        try:
            value = parse_01([row[1]])[0]
        except ValueError as exc:
            skip_input(skipped, where, str(exc))
            continue
        values = partial.setdefault(slice_id, [-1] * NUM_CLASSES)
        i = subtype_index[subtype]
        if values[i] not in (-1, value):
            logger.warning("%s: conflicting duplicate label for %s_%s; keeping 1", where, slice_id, subtype)
        values[i] = max(values[i], value)
    labels = {}
    for slice_id, values in partial.items():
        if -1 in values:
            missing = [RSNA_SUBTYPES[CLASSES[i]] for i, v in enumerate(values) if v == -1]
            skip_input(skipped, slice_id, f"labels incomplete in {labels_csv}: no row for {missing}")
            continue
        labels[slice_id] = tuple(values)
    return labels, skipped


def read_rsna(
    dicom_dir: str | Path, labels_csv: str | Path | None = None, map_fn: MapFn | None = None
) -> ReadResult:
    """List the RSNA layout: DICOM files ``dicom_dir/ID_<hex>.dcm`` labelled by ``stage_2_train.csv``.

    Slice ids are the file stems (``ID_<hex>``). Without ``labels_csv`` the series are unlabelled.
    Skipped (with a reason): label rows for missing files, files without labels, files that are not CT
    DICOM images (see :func:`read_dicom_header`).

    Raises:
        ValueError: when the label CSV header is not ``ID,Label``.
        FileNotFoundError: when ``dicom_dir`` does not exist.
    """
    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise FileNotFoundError(f"RSNA DICOM folder {dicom_dir} does not exist")
    result = ReadResult("rsna", has_labels=labels_csv is not None)
    files = {p.stem: p for p in sorted(dicom_dir.iterdir()) if p.is_file() and p.suffix.lower() == ".dcm"}
    labels: dict[str, tuple[int, ...]] | None = None
    if labels_csv is not None:
        labels, label_skips = read_rsna_labels(labels_csv)
        result.skipped.extend(label_skips)
        for slice_id in sorted(set(labels) - set(files)):
            skip_input(result.skipped, dicom_dir / f"{slice_id}.dcm", "label rows for a missing file")
        incomplete = {s.path for s in label_skips}
        for slice_id in sorted(set(files) - set(labels) - incomplete):
            skip_input(result.skipped, files[slice_id], f"image without labels in {labels_csv}")
        files = {k: v for k, v in files.items() if k in labels}
    headers = []
    for item in _map_headers(list(files.values()), map_fn):
        if isinstance(item, SkipRecord):
            skip_input(result.skipped, item.path, item.reason)
        else:
            headers.append(item)
    result.series = group_dicom_series(headers, lambda h: Path(h.path).stem, labels)
    logger.info(
        "RSNA %s: %d series, %d slices, %d skipped",
        dicom_dir,
        len(result.series),
        result.num_slices,
        len(result.skipped),
    )
    return result


def read_dicom_folder(root: str | Path, map_fn: MapFn | None = None) -> ReadResult:
    """List every DICOM series under ``root`` (searched recursively, any file name), unlabelled.

    Slice ids are file paths relative to ``root``. Files that are not CT DICOM images are skipped with a
    reason; hidden files (``.*``) are ignored.

    Raises:
        FileNotFoundError: when ``root`` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist")
    result = ReadResult("dicom", has_labels=False)
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    headers = []
    for item in _map_headers(paths, map_fn):
        if isinstance(item, SkipRecord):
            skip_input(result.skipped, item.path, item.reason)
        else:
            headers.append(item)
    result.series = group_dicom_series(headers, lambda h: Path(h.path).relative_to(root).as_posix())
    logger.info(
        "DICOM %s: %d series, %d slices, %d skipped",
        root,
        len(result.series),
        result.num_slices,
        len(result.skipped),
    )
    return result
