"""Slices → windowed, resized ``uint8`` images → Parquet shards + ``manifest.json`` + ``skipped.csv``.

The shard format is the contract in ``docs/architecture.md``: one Parquet row group per series, rows in
slice order, columns ``series_id, position, slice_id, labels, image, height, width, channels``.

Per DICOM slice: HU (with the RSNA 12-bit fix, :func:`ichmodel.decode.load_dicom_pixels`) → padded to a
square with the image minimum → resized to ``size`` (block mean for integer factors, else antialiased
bilinear) → one ``uint8`` channel per window (level, width). Resizing before windowing keeps HU precision
and makes the windows 4× cheaper at 512 → 256; with an integer factor, the resize is an integer block sum
and the windows a table lookup (:func:`dicom_slice_image`). A DLCV JPEG (one channel, already windowed) is
resized the same way and repeated into every channel. Shards are LZ4-compressed (:data:`SHARD_COMPRESSION`).

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ichmodel import io
from ichmodel.constants import CLASSES, DEFAULT_WINDOWS, DLCV_WINDOW, NUM_CLASSES
from ichmodel.decode import apply_windows, load_dicom_pixels, load_dlcv_image
from ichmodel.readers import ReadResult, SeriesRecord, SkipRecord
from ichmodel.shards import MANIFEST_NAME, META_KEY, SHARD_PATTERN, SHARD_SCHEMA, SKIPPED_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessOptions:
    """How slices become shard images.

    ``size``: side of the square output image. ``windows``: (level, width) in HU, one output channel each.
    ``min_slices``: series with fewer usable slices are skipped (a sequence model needs neighbours).
    """

    size: int = 256
    windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS
    min_slices: int = 2

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 4096:
            raise ValueError(f"size must be in [8, 4096] pixels. Got {self.size}")
        windows = tuple((float(level), float(width)) for level, width in self.windows)
        if not windows or any(width <= 0 for _, width in windows):
            raise ValueError(
                f"windows must be non-empty (level, width) pairs with width > 0. Got {self.windows}"
            )
        object.__setattr__(self, "windows", windows)
        if self.min_slices < 1:
            raise ValueError(f"min_slices must be >= 1. Got {self.min_slices}")

    @property
    def channels(self) -> int:
        return len(self.windows)


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
# Images
# --------------------------------------------------------------------------------------------------


def pad_square(image: np.ndarray, fill: float) -> np.ndarray:
    """Centre a ``[H, W]`` image on a square ``[S, S]`` canvas (S = max(H, W)) filled with ``fill``."""
    height, width = image.shape
    if height == width:
        return image
    side = max(height, width)
    out = np.full((side, side), fill, dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


def block_sum(image: np.ndarray, factor: int) -> np.ndarray:
    """Sum of every ``factor × factor`` block of an integer image ``[S, S]`` (S a multiple of ``factor``)
    → ``[S / factor, S / factor]``.

    The sums stay in the image's own integer type (at least 16 bits) when they cannot overflow it, else in
    int32 or int64: adding 16-bit planes moves half the bytes of a float32 box filter.

    Raises:
        ValueError: when ``image`` is not an integer image or its side is not a multiple of ``factor``.
    """
    if image.dtype.kind not in "iu" or image.shape[0] % factor:
        raise ValueError(
            f"block_sum needs an integer image whose side is a multiple of {factor}. "
            f"Got {image.dtype} {image.shape}"
        )
    count = factor * factor
    low = int(image.min()) * count if image.dtype.kind == "i" else 0  # unsigned: no pass for the minimum
    high = int(image.max()) * count
    candidates = (image.dtype, np.dtype(np.uint16 if image.dtype.kind == "u" else np.int16), np.int32)
    dtype = next(
        (
            d
            for d in map(np.dtype, candidates)
            if d.itemsize >= 2 and np.iinfo(d).min <= low and high <= np.iinfo(d).max
        ),
        np.dtype(np.int64),
    )
    if factor == 1:
        return image.astype(dtype)
    # sum f rows, then f columns, each add reading strided views (a reshape-sum is 10-20x slower)
    rows = np.add(image[0::factor], image[1::factor], dtype=dtype)
    for i in range(2, factor):
        rows += image[i::factor]
    out = np.add(rows[:, 0::factor], rows[:, 1::factor])
    for j in range(2, factor):
        out += rows[:, j::factor]
    return out


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a square image ``[S, S]`` to float32 ``[size, size]`` (returned as is when S == size).

    Integer down-scaling factors use a block mean (exact box filter); other sizes use antialiased bilinear
    interpolation (``torch.nn.functional.interpolate``).
    """
    side = image.shape[0]
    if side == size:
        return image
    if side % size == 0:
        factor = side // size
        if image.dtype.kind in "iu":
            return block_sum(image, factor) * np.float32(1.0 / (factor * factor))
        rows = image[0::factor].astype(np.float32)
        for i in range(1, factor):
            rows += image[i::factor]
        out = rows[:, 0::factor].copy()
        for j in range(1, factor):
            out += rows[:, j::factor]
        out *= np.float32(1.0 / (factor * factor))
        return out
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[
        0, 0
    ].numpy()


def dicom_slice_image(path: str | Path, options: PreprocessOptions) -> np.ndarray:
    """One DICOM file → ``uint8 [size, size, C]``.

    Resizing works on the stored pixels (the rescale to HU is linear, so it commutes with resizing and is
    folded into the windows); the 12-bit fix has already been applied by the decoder. For integer factors
    the block mean is a block sum on the integers, its ``1 / factor²`` folded into the slope, and the window
    map of those integer sums is a lookup in a cached table (:func:`ichmodel.decode.apply_windows`): no
    float arithmetic per pixel at all. Other sizes resize in float (antialiased bilinear) and window in float.

    Raises:
        ValueError: naming the file when it cannot be read (see :func:`ichmodel.decode.load_dicom_pixels`).
    """
    pixels, slope, intercept = load_dicom_pixels(path)
    if pixels.shape[0] != pixels.shape[1]:
        pixels = pad_square(pixels, pixels.min())
    side = pixels.shape[0]
    if side % options.size == 0 and pixels.dtype.kind in "iu":
        factor = side // options.size
        if factor > 1:
            pixels, slope = block_sum(pixels, factor), slope / (factor * factor)
        return apply_windows(pixels, options.windows, slope, intercept)
    return apply_windows(resize_square(pixels, options.size), options.windows, slope, intercept)


def jpeg_slice_image(path: str | Path, options: PreprocessOptions) -> np.ndarray:
    """One DLCV JPEG → ``uint8 [size, size, C]`` (its one channel repeated); the resized grey level is
    rounded half up.

    Raises:
        ValueError: naming the file when it cannot be decoded.
    """
    gray = pad_square(load_dlcv_image(path), 0)
    side = gray.shape[0]
    if side % options.size == 0:  # integer block mean, rounded half up: floor((2 × sum + f²) / (2 f²))
        count = (side // options.size) ** 2
        gray = ((2 * block_sum(gray, side // options.size).astype(np.int32) + count) // (2 * count)).astype(
            np.uint8
        )
    else:
        gray = np.clip(resize_square(gray.astype(np.float32), options.size) + np.float32(0.5), 0, 255)
        gray = gray.astype(np.uint8)
    return np.repeat(gray[:, :, None], options.channels, axis=2)


_DECODERS: dict[str, Callable[[str | Path, PreprocessOptions], np.ndarray]] = {
    "dicom": dicom_slice_image,
    "jpeg": jpeg_slice_image,
}


def process_series(
    series: SeriesRecord, options: PreprocessOptions
) -> tuple[pa.Table | None, list[SkipRecord]]:
    """Decode every slice of ``series`` into one Arrow table in the shard schema (rows in slice order).

    Unreadable slices are skipped (the others keep their order and are renumbered 0..T-1). A series left
    with fewer than ``options.min_slices`` slices is skipped whole: returns ``(None, skips)``.
    """
    decode = _DECODERS.get(series.kind)
    if decode is None:
        raise ValueError(f"Unknown slice kind {series.kind!r} for series {series.series_id}")
    skipped: list[SkipRecord] = []
    kept = []
    # [T, size, size, C] in Arrow's memory pool, which keeps freed pages for the next series: a fresh numpy
    # array of this size costs ~50 page faults per slice, up to 0.25 ms under load (np.stack did that)
    shape = (options.size, options.size, options.channels)
    pool = pa.allocate_buffer(len(series.slices) * int(np.prod(shape)))
    images = np.frombuffer(pool, np.uint8).reshape(len(series.slices), *shape)
    for record in series.slices:
        try:
            image = decode(record.path, options)
        except ValueError as exc:
            reason = str(exc).removeprefix(f"{record.path}: ")
            logger.warning("Skipping %s: %s", record.path, reason)
            skipped.append(SkipRecord(record.path, reason))
            continue
        images[len(kept)] = image
        kept.append(record)
    if len(kept) < options.min_slices:
        for record in kept:
            reason = f"series {series.series_id} has {len(kept)} usable slice(s); at least {options.min_slices} needed"
            logger.warning("Skipping %s: %s", record.path, reason)
            skipped.append(SkipRecord(record.path, reason))
        return None, skipped
    return _series_table(series.series_id, kept, images[: len(kept)]), skipped


def _series_table(series_id: str, records: list, images: np.ndarray) -> pa.Table:
    num, height, width, channels = images.shape  # slices, rows, columns, windows
    per_image = height * width * channels
    offsets = np.arange(0, (num + 1) * per_image, per_image, dtype=np.int32)
    image_col = pa.Array.from_buffers(
        pa.binary(), num, [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(images))]
    )
    labels = np.array(
        [r.labels if r.labels is not None else (-1,) * NUM_CLASSES for r in records], dtype=np.int8
    ).reshape(-1)
    return pa.Table.from_arrays(
        [
            pa.array([series_id] * num, pa.string()),
            pa.array(np.arange(num, dtype=np.int32)),
            pa.array([r.slice_id for r in records], pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(labels, pa.int8()), NUM_CLASSES),
            image_col,
            pa.array(np.full(num, height, np.int16)),
            pa.array(np.full(num, width, np.int16)),
            pa.array(np.full(num, channels, np.int16)),
        ],
        schema=SHARD_SCHEMA,
    )


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
