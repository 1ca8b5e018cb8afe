"""The shard format: schema, file names, the manifest and its series index (``docs/architecture.md``).

Readers of shards (the dataset, prediction, the ensemble) import this module only; the writer that
decodes and windows images is :mod:`ichmodel.preprocess`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ichmodel import io
from ichmodel.constants import NUM_CLASSES

MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.csv"
SHARD_PATTERN = "shard-{:05d}.parquet"
#: Footer key holding a shard's fingerprint and its skip records (JSON).
META_KEY = b"ichmodel.shard"

SHARD_SCHEMA = pa.schema(
    [
        ("series_id", pa.string()),
        ("position", pa.int32()),
        ("slice_id", pa.string()),
        ("labels", pa.list_(pa.int8(), NUM_CLASSES)),
        ("image", pa.binary()),
        ("height", pa.int16()),
        ("width", pa.int16()),
        ("channels", pa.int16()),
    ]
)


def load_manifest(shard_dir: str | Path) -> dict:
    """Read ``shard_dir/manifest.json`` (a folder or a storage URI, see :mod:`ichmodel.io`).

    Raises:
        FileNotFoundError: naming the folder when there is no manifest.
        ValueError: naming the file when it is not JSON (e.g. cut short).
    """
    path = io.join(shard_dir, MANIFEST_NAME)
    try:
        text = io.read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"No {MANIFEST_NAME} in {shard_dir}; run ray_jobs/preprocess.py first"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); run ray_jobs/preprocess.py again") from None


def open_shard(shard_dir: str | Path, file: str) -> pq.ParquetFile:
    """One shard of a folder or storage URI, opened for reading row groups."""
    return pq.ParquetFile(io.open_input_file(io.join(shard_dir, file)))


def read_shard_table(shard_dir: str | Path, file: str, columns: list[str]) -> pa.Table:
    """The ``columns`` of one whole shard of a folder or storage URI."""
    with io.open_input_file(io.join(shard_dir, file)) as f:
        return pq.read_table(f, columns=columns)


def series_patients(manifest: dict) -> dict[str, str]:
    """``{series_id: patient_id}`` of the series whose DICOM files named a patient (RSNA, DICOM folders);
    series without one (DLCV folders, shards written before patient ids were kept) are absent."""
    return {
        entry["series_id"]: str(entry["patient_id"])
        for shard in manifest["shards"]
        for entry in shard["series"]
        if entry.get("patient_id")
    }


def series_index(manifest: dict) -> dict[str, tuple[str, int, int]]:
    """``{series_id: (shard file, row group, num_slices)}`` from a manifest.

    Raises:
        ValueError: when a series id appears twice.
    """
    index: dict[str, tuple[str, int, int]] = {}
    for shard in manifest["shards"]:
        for entry in shard["series"]:
            sid = entry["series_id"]
            if sid in index:
                raise ValueError(
                    f"Series {sid!r} appears twice in the manifest ({index[sid][0]}, {shard['file']})"
                )
            index[sid] = (shard["file"], int(entry["row_group"]), int(entry["num_slices"]))
    return index
