"""The shard format: schema, file names, the manifest and its series index (``docs/architecture.md``).

Readers of shards (the dataset, prediction, the ensemble) import this module only; the writer that
decodes and windows images is :mod:`ichmodel.preprocess`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

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
    """Read ``shard_dir/manifest.json``.

    Raises:
        FileNotFoundError: naming the folder when there is no manifest.
    """
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {MANIFEST_NAME} in {shard_dir}; run ray_jobs/preprocess.py first")
    return json.loads(path.read_text())


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
