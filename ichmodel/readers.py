"""Find the slices of each series in the layouts users bring.

Three layouts (see ``docs/architecture.md``):

* DLCV ``Blood_data``: ``train/<dirname>/<ID>.jpg`` + ``train.csv`` (``dirname,ID,ich,ivh,sah,sdh,edh``),
  or a folder of ``<dirname>/<ID>.jpg`` without labels (the test split). Slice order is the integer after
  the last ``_`` of the file stem, sorted numerically (``_2`` before ``_10``).
* RSNA 2019: one flat folder of ``ID_<hex>.dcm`` + ``stage_2_train.csv`` (``ID,Label``, rows
  ``ID_<hex>_<subtype>``). Series are found from the DICOM headers (Study/Series Instance UID) and ordered
  by position along the slice normal (``ImagePositionPatient[2]`` for axial slices).
* A plain folder (searched recursively) of DICOM series, without labels, for inference on new studies.

Readers only list; they never decode pixels. Each returns a :class:`ReadResult`: the series found, and one
:class:`SkipRecord` per input that could not be used, with a reason that names the file. Pixels are decoded
later, slice by slice, by :mod:`ichmodel.decode` (:func:`~ichmodel.decode.load_dicom_pixels`,
:func:`~ichmodel.decode.load_dlcv_image`).

Header reading can be spread over processes: every reader that opens DICOM headers takes a ``map_fn``
(``map_fn(fn, chunks) -> list of results``, default: the built-in ``map``), which the Ray job fills with a
Ray-task map. The library itself never imports Ray.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichmodel.constants import CLASSES, DLCV_LABEL_HEADER, NUM_CLASSES, RSNA_SUBTYPES

logger = logging.getLogger(__name__)

RSNA_LABEL_HEADER: tuple[str, ...] = ("ID", "Label")
#: Header chunk size used when the headers of many DICOM files are read through ``map_fn``.
HEADER_CHUNK = 1000

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


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


def _skip(skipped: list[SkipRecord], path: str | Path, reason: str) -> None:
    logger.warning("Skipping %s: %s", path, reason)
    skipped.append(SkipRecord(str(path), reason))


# --------------------------------------------------------------------------------------------------
# DLCV
# --------------------------------------------------------------------------------------------------


def slice_number(slice_id: str) -> int:
    """The slice index of a DLCV id: the integer after the last ``_`` of the stem (``e00b013d9_14.jpg`` → 14).

    Raises:
        ValueError: naming the id when there is no such integer.
    """
    stem = slice_id.rsplit(".", 1)[0] if "." in slice_id else slice_id
    _, sep, number = stem.rpartition("_")
    if not sep or not number.isdigit():
        raise ValueError(f"Slice id {slice_id!r} does not end in '_<number>'")
    return int(number)


def _unsafe_name(name: str) -> str | None:
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


def _parse_01(values: Sequence[str]) -> tuple[int, ...]:
    out = tuple(int(float(v)) for v in values)
    if any(v not in (0, 1) for v in out):
        raise ValueError(f"labels must be 0 or 1. Got {list(values)}")
    return out


def _dlcv_label_rows(
    labels_csv: str | Path, image_dir: Path, skipped: list[SkipRecord]
) -> dict[tuple[str, str], tuple[int, ...]]:
    """``{(dirname, ID): labels}`` of a DLCV CSV, in file order; bad rows go to ``skipped`` with a reason.

    Rejected: rows with the wrong column count, names that are absolute or contain ``..``, labels other
    than 0/1, and a duplicate row with other labels (an identical duplicate is dropped silently).
    """
    seen: dict[tuple[str, str], tuple[int, ...]] = {}
    for line, row in enumerate(read_csv_rows(labels_csv, DLCV_LABEL_HEADER), start=2):
        where = f"{labels_csv}:{line}"
        if len(row) != len(DLCV_LABEL_HEADER):
            _skip(skipped, where, f"expected {len(DLCV_LABEL_HEADER)} columns. Got {len(row)}")
            continue
        dirname, name = row[0].strip(), row[1].strip()
        problem = _unsafe_name(dirname) or _unsafe_name(name)
        if problem:
            _skip(skipped, f"{dirname}/{name}", f"rejected CSV row {where}: {problem}")
            continue
        try:
            labels = _parse_01(row[2:])
        except ValueError as exc:
            _skip(skipped, image_dir / dirname / name, f"row {where}: {exc}")
            continue
        key = (dirname, name)
        if key in seen:
            if seen[key] != labels:
                _skip(skipped, image_dir / dirname / name, f"row {where}: conflicting duplicate row")
            continue
        seen[key] = labels
    return seen


def read_dlcv(image_dir: str | Path, labels_csv: str | Path | None = None) -> ReadResult:
    """List the DLCV layout: ``image_dir/<dirname>/<ID>.jpg``, labelled by ``labels_csv`` when given.

    If ``labels_csv`` is ``None`` and ``image_dir`` holds both ``train.csv`` and ``train/`` (the
    ``Blood_data`` root), those are used. Without labels every ``*.jpg`` under a sub-folder is a slice.

    Skipped (with a reason): CSV rows whose ``dirname``/``ID`` are absolute or contain ``..`` (never read
    outside ``image_dir``), rows with bad labels or ids without a slice number, rows for missing files,
    JPEGs without a label row (when labels are given).

    Raises:
        ValueError: when the CSV header is not ``dirname,ID,ich,ivh,sah,sdh,edh``.
        FileNotFoundError: when ``image_dir`` (or the CSV) does not exist.
    """
    image_dir = Path(image_dir)
    if labels_csv is None and (image_dir / "train.csv").is_file() and (image_dir / "train").is_dir():
        labels_csv, image_dir = image_dir / "train.csv", image_dir / "train"
        logger.info("Using %s with labels %s", image_dir, labels_csv)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"DLCV image folder {image_dir} does not exist")
    result = ReadResult("dlcv", has_labels=labels_csv is not None)
    on_disk = {
        (d.name, f.name): f
        for d in sorted(image_dir.iterdir())
        if d.is_dir()
        for f in d.iterdir()
        if f.is_file()
    }
    slices: dict[str, list[tuple[int, SliceRecord]]] = defaultdict(list)

    def add(dirname: str, name: str, labels: tuple[int, ...] | None) -> None:
        path = image_dir / dirname / name
        try:
            number = slice_number(name)
        except ValueError as exc:
            _skip(result.skipped, path, str(exc))
            return
        slices[dirname].append((number, SliceRecord(name, str(path), labels)))

    if labels_csv is None:
        for (dirname, name), path in sorted(on_disk.items()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
                add(dirname, name, None)
    else:
        rows = _dlcv_label_rows(labels_csv, image_dir, result.skipped)
        for key, labels in rows.items():
            if key not in on_disk:
                _skip(result.skipped, image_dir / key[0] / key[1], "label row for a missing file")
                continue
            add(*key, labels)
        for key in sorted(set(on_disk) - set(rows)):
            _skip(result.skipped, on_disk[key], f"image without a label row in {labels_csv}")

    for dirname in sorted(slices):
        ordered = sorted(slices[dirname], key=lambda item: (item[0], item[1].slice_id))
        result.series.append(SeriesRecord(dirname, tuple(s for _, s in ordered), "jpeg"))
    logger.info(
        "DLCV %s: %d series, %d slices, %d skipped",
        image_dir,
        len(result.series),
        result.num_slices,
        len(result.skipped),
    )
    return result


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
            _skip(skipped, where, f"cannot parse row {row!r} as ID_<hex>_<subtype>,<0|1>")
            continue
        if subtype == "any":
            continue
        if subtype not in subtype_index:
            _skip(skipped, where, f"unknown subtype {subtype!r}")
            continue
        try:
            value = _parse_01([row[1]])[0]
        except ValueError as exc:
            _skip(skipped, where, str(exc))
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
            _skip(skipped, slice_id, f"labels incomplete in {labels_csv}: no row for {missing}")
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
            _skip(result.skipped, dicom_dir / f"{slice_id}.dcm", "label rows for a missing file")
        incomplete = {s.path for s in label_skips}
        for slice_id in sorted(set(files) - set(labels) - incomplete):
            _skip(result.skipped, files[slice_id], f"image without labels in {labels_csv}")
        files = {k: v for k, v in files.items() if k in labels}
    headers = []
    for item in _map_headers(list(files.values()), map_fn):
        if isinstance(item, SkipRecord):
            _skip(result.skipped, item.path, item.reason)
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
            _skip(result.skipped, item.path, item.reason)
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


def read_input(
    fmt: str, input_dir: str | Path, labels_csv: str | Path | None = None, map_fn: MapFn | None = None
) -> ReadResult:
    """Dispatch to :func:`read_dlcv`, :func:`read_rsna` or :func:`read_dicom_folder` by ``fmt``.

    For ``rsna`` with no ``labels_csv``: if ``input_dir`` holds ``stage_2_train/`` and ``stage_2_train.csv``
    those are used.

    Raises:
        ValueError: for an unknown ``fmt``, or labels given for ``dicom``.
    """
    if fmt == "dlcv":
        return read_dlcv(input_dir, labels_csv)
    if fmt == "rsna":
        root = Path(input_dir)
        if (
            labels_csv is None
            and (root / "stage_2_train.csv").is_file()
            and (root / "stage_2_train").is_dir()
        ):
            labels_csv, root = root / "stage_2_train.csv", root / "stage_2_train"
            logger.info("Using %s with labels %s", root, labels_csv)
        return read_rsna(root, labels_csv, map_fn)
    if fmt == "dicom":
        if labels_csv is not None:
            raise ValueError(f"format 'dicom' takes no labels. Got labels {labels_csv}")
        return read_dicom_folder(input_dir, map_fn)
    raise ValueError(f"Unknown input format {fmt!r}; expected one of dlcv, rsna, dicom")
