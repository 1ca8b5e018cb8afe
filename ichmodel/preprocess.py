"""Slices → windowed, resized ``uint8`` images → Parquet shards + ``manifest.json`` + ``skipped.csv``.

The shard format is the contract in ``docs/architecture.md``: one Parquet row group per series, rows in
slice order, columns ``series_id, position, slice_id, labels, image, height, width, channels``.

Each series becomes its rows by :func:`ichmodel.slice_images.process_series` (decode, pad, resize, window;
how: :class:`ichmodel.slice_images.PreprocessOptions`). Shards are LZ4-compressed (:data:`SHARD_COMPRESSION`).

Work is split into :class:`ShardTask` s (a list of whole series each) that are independent, so a Ray job can
run :func:`write_shard` in parallel. A shard is written to a temporary name and renamed, so an existing
shard file is complete; on a re-run it is reused when its footer says it was written for the same series
with the same options (and rewritten otherwise). :func:`write_outputs` then writes the manifest and
``skipped.csv`` from the shard results.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io as pyio
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ichmodel import io
from ichmodel.constants import CLASSES, DLCV_WINDOW
from ichmodel.read_records import ReadResult, SeriesRecord, SkipRecord
from ichmodel.shards import MANIFEST_NAME, META_KEY, SHARD_PATTERN, SHARD_SCHEMA, SKIPPED_NAME
from ichmodel.slice_images import PreprocessOptions, process_series

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """One output file and the whole series that go into it."""

    index: int
    file: str
    series: tuple[SeriesRecord, ...]

    def fingerprint(self, options: PreprocessOptions) -> str:
        """Hash of the options and the slices (ids, paths, labels) this shard is made of."""
        h = hashlib.sha256(json.dumps(asdict(options), sort_keys=True).encode())
        for s in self.series:
            h.update(f"\0{s.series_id}\0{s.kind}".encode())
            for sl in s.slices:
                h.update(f"\1{sl.slice_id}\1{sl.path}\1{sl.labels}".encode())
        return h.hexdigest()


@dataclass
class ShardResult:
    """What :func:`write_shard` did. ``series``: manifest entries ``{series_id, row_group, num_slices}``."""

    file: str
    num_rows: int = 0
    series: list[dict] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    reused: bool = False
    seconds: float = 0.0


def plan_shards(series: Sequence[SeriesRecord], series_per_shard: int = 16) -> list[ShardTask]:
    """Split series, in order, into tasks of at most ``series_per_shard`` series.

    Raises:
        ValueError: if ``series_per_shard`` < 1.
    """
    if series_per_shard < 1:
        raise ValueError(f"series_per_shard must be >= 1. Got {series_per_shard}")
    return [
        ShardTask(i, SHARD_PATTERN.format(i), tuple(series[start : start + series_per_shard]))
        for i, start in enumerate(range(0, len(series), series_per_shard))
    ]


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


def _read_finished(location: str, fingerprint: str) -> ShardResult | None:
    """The result recorded in an existing shard's footer, if it was written for ``fingerprint``."""
    try:
        with io.open_input_file(location) as f:
            meta = pq.ParquetFile(f).metadata
        info = json.loads(meta.metadata[META_KEY])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None
    if info.get("fingerprint") != fingerprint:
        return None
    return ShardResult(
        location.rsplit("/", 1)[-1].split("?", 1)[0],
        int(meta.num_rows),
        info["series"],
        [SkipRecord(p, r) for p, r in info["skipped"]],
        reused=True,
    )


@contextmanager
def _local_inputs(task: ShardTask) -> Iterator[tuple[ShardTask, dict[str, str]]]:
    """``task`` with every slice stored at a URI downloaded into a temporary folder of this process.

    Yields the local task and ``{local path: URI}`` to name skipped slices by their URIs. A slice that
    cannot be downloaded keeps its URI, and its decoder reports it as unreadable.
    """
    if not any(io.is_uri(sl.path) for s in task.series for sl in s.slices):
        yield task, {}
        return
    with tempfile.TemporaryDirectory(prefix="ich-inputs-") as folder:
        names: dict[str, str] = {}
        series = []
        for s in task.series:
            slices = []
            for i, sl in enumerate(s.slices):
                local = str(Path(folder, f"{len(series)}-{i}-{Path(sl.path.split('?', 1)[0]).name}"))
                if io.is_uri(sl.path) and io.download(sl.path, local):
                    names[local] = sl.path
                    sl = dataclasses.replace(sl, path=local)
                slices.append(sl)
            series.append(dataclasses.replace(s, slices=tuple(slices)))
        yield dataclasses.replace(task, series=tuple(series)), names


def write_shard(task: ShardTask, out_dir: str | Path, options: PreprocessOptions) -> ShardResult:
    """Decode the series of ``task`` and write them to ``out_dir/task.file``, one row group per series.

    ``out_dir`` and the slice paths may be storage URIs (:mod:`ichmodel.io`); slices at URIs are downloaded
    into a temporary folder first. Skips the work when the shard exists and was written for the same series
    and options. The file is written whole (:func:`ichmodel.io.atomic_write`), so it is either complete or
    absent. A shard whose series were all skipped is still written (with no rows) so a re-run knows it is
    done.
    """
    start = time.perf_counter()
    location = io.join(out_dir, task.file)
    fingerprint = task.fingerprint(options)
    if io.exists(location):
        done = _read_finished(location, fingerprint)
        if done is not None:
            logger.info("%s is complete; skipping", location)
            return done
        logger.info("%s was written for other inputs or options; rewriting", location)
    result = ShardResult(task.file)
    tables = []
    with _local_inputs(task) as (local_task, uris):
        for series in local_task.series:
            table, skipped = process_series(series, options)
            result.skipped.extend(SkipRecord(uris.get(s.path, s.path), s.reason) for s in skipped)
            if table is not None:
                entry = {
                    "series_id": series.series_id,
                    "row_group": len(tables),
                    "num_slices": table.num_rows,
                }
                if series.patient_id:
                    entry["patient_id"] = series.patient_id  # folds keep a patient's series together
                result.series.append(entry)
                tables.append(table)
    result.num_rows = sum(t.num_rows for t in tables)
    info = {
        "fingerprint": fingerprint,
        "series": result.series,
        "skipped": [[s.path, s.reason] for s in result.skipped],
    }
    schema = SHARD_SCHEMA.with_metadata({META_KEY: json.dumps(info).encode()})
    io.atomic_write(location, lambda tmp: _write_parquet(tmp, schema, tables))
    result.seconds = time.perf_counter() - start
    return result


#: Parquet codec of the shards. LZ4 writes a 256 px slice in ~0.28 ms against zstd's ~0.39 ms (the whole
#: budget of a 512 px slice is ~0.75 ms) and reads it ~2.5x faster, for files ~25% larger; "none" writes in
#: ~0.10 ms at 4.5x the size (synthetic data; ``docs/benchmarks.md``). Readers never name the codec.
SHARD_COMPRESSION = "lz4"


def _write_parquet(path: Path, schema: pa.Schema, tables: list[pa.Table]) -> None:
    with pq.ParquetWriter(
        path,
        schema,
        compression=SHARD_COMPRESSION,
        use_dictionary=["series_id"],
        write_statistics=["series_id", "position"],
    ) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=table.num_rows)


def write_outputs(
    out_dir: str | Path,
    read_result: ReadResult,
    options: PreprocessOptions,
    results: Iterable[ShardResult],
) -> dict:
    """Write ``manifest.json`` and ``skipped.csv`` (``path,reason``: reader skips, then slice skips) and
    return the manifest. Shards with no rows are left out of the manifest. ``out_dir`` may be a storage URI;
    the manifest is written last, so a folder with a manifest is complete.
    """
    results = sorted(results, key=lambda r: r.file)
    skipped = list(read_result.skipped) + [s for r in results for s in r.skipped]
    windows = [list(w) for w in options.windows]
    if read_result.format == "dlcv":
        windows = [list(DLCV_WINDOW)] * options.channels
    shards = [{"file": r.file, "num_rows": r.num_rows, "series": r.series} for r in results if r.num_rows > 0]
    manifest = {
        "format": read_result.format,
        "size": options.size,
        "windows": windows,
        "classes": list(CLASSES),
        "has_labels": read_result.has_labels,
        "num_series": sum(len(s["series"]) for s in shards),
        "num_slices": sum(s["num_rows"] for s in shards),
        "num_skipped": len(skipped),
        "shards": shards,
    }
    text = pyio.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "reason"])
    writer.writerows([s.path, s.reason] for s in skipped)
    io.atomic_write_text(io.join(out_dir, SKIPPED_NAME), text.getvalue())
    io.atomic_write_text(io.join(out_dir, MANIFEST_NAME), json.dumps(manifest, indent=1))
    logger.info(
        "Wrote %s: %d series, %d slices in %d shards, %d skipped",
        io.join(out_dir, MANIFEST_NAME),
        manifest["num_series"],
        manifest["num_slices"],
        len(shards),
        len(skipped),
    )
    return manifest


def preprocess(
    read_result: ReadResult,
    out_dir: str | Path,
    options: PreprocessOptions | None = None,
    series_per_shard: int = 16,
) -> dict:
    """Write all shards of ``read_result`` in this process, then the manifest; returns the manifest."""
    options = options or PreprocessOptions()
    tasks = plan_shards(read_result.series, series_per_shard)
    return write_outputs(out_dir, read_result, options, [write_shard(t, out_dir, options) for t in tasks])
