"""Find the slices of each series in the layouts users bring.

Three layouts (see ``docs/architecture.md``):

* DLCV ``Blood_data``: ``train/<dirname>/<ID>.jpg`` + ``train.csv`` (``dirname,ID,ich,ivh,sah,sdh,edh``),
  or a folder of ``<dirname>/<ID>.jpg`` without labels (the test split). Slice order is the integer after
  the last ``_`` of the file stem, sorted numerically (``_2`` before ``_10``).
* RSNA 2019: one flat folder of ``ID_<hex>.dcm`` + ``stage_2_train.csv`` (``ID,Label``, rows
  ``ID_<hex>_<subtype>``). Series are found from the DICOM headers (Study/Series Instance UID) and ordered
  by position along the slice normal (``ImagePositionPatient[2]`` for axial slices).
* A plain folder (searched recursively) of DICOM series, without labels, for inference on new studies.

Readers only list; they never decode pixels. Each returns a :class:`~ichmodel.read_records.ReadResult`: the
series found, and one :class:`~ichmodel.read_records.SkipRecord` per input that could not be used, with a
reason that names the file. This module reads the DLCV layout and dispatches (:func:`read_input`); the DICOM
layouts are read by :mod:`ichmodel.dicom_readers`. Pixels are decoded
later, slice by slice, by :mod:`ichmodel.decode` (:func:`~ichmodel.decode.load_dicom_pixels`,
:func:`~ichmodel.decode.load_dlcv_image`).

DICOM header reading can be spread over processes through a ``map_fn`` (see :mod:`ichmodel.dicom_readers`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from ichmodel.constants import DLCV_LABEL_HEADER
from ichmodel.dicom_readers import MapFn, read_dicom_folder, read_rsna
from ichmodel.read_records import (
    ReadResult,
    SeriesRecord,
    SkipRecord,
    SliceRecord,
    parse_01,
    read_csv_rows,
    skip_input,
    unsafe_name,
)

logger = logging.getLogger(__name__)


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
            skip_input(skipped, where, f"expected {len(DLCV_LABEL_HEADER)} columns. Got {len(row)}")
            continue
        dirname, name = row[0].strip(), row[1].strip()
        problem = unsafe_name(dirname) or unsafe_name(name)
        if problem:
            skip_input(skipped, f"{dirname}/{name}", f"rejected CSV row {where}: {problem}")
            continue
        try:
            labels = parse_01(row[2:])
        except ValueError as exc:
            skip_input(skipped, image_dir / dirname / name, f"row {where}: {exc}")
            continue
        key = (dirname, name)
        if key in seen:
            if seen[key] != labels:
                skip_input(skipped, image_dir / dirname / name, f"row {where}: conflicting duplicate row")
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
            skip_input(result.skipped, path, str(exc))
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
                skip_input(result.skipped, image_dir / key[0] / key[1], "label row for a missing file")
                continue
            add(*key, labels)
        for key in sorted(set(on_disk) - set(rows)):
            skip_input(result.skipped, on_disk[key], f"image without a label row in {labels_csv}")

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
