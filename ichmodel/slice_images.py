"""One series' slices → windowed, resized ``uint8`` images → one Arrow table in the shard schema.

Per DICOM slice: HU (with the RSNA 12-bit fix, :func:`ichmodel.decode.load_dicom_pixels`) → padded to a
square with the image minimum → resized to ``size`` (block mean for integer factors, else antialiased
bilinear) → one ``uint8`` channel per window (level, width). Resizing before windowing keeps HU precision
and makes the windows 4× cheaper at 512 → 256; with an integer factor, the resize is an integer block sum
and the windows a table lookup (:func:`dicom_slice_image`). A DLCV JPEG (one channel, already windowed) is
resized the same way and repeated into every channel (:func:`jpeg_slice_image`). :func:`process_series` does
this for every slice of a series, skipping the unreadable ones, and returns the series' rows
(``ichmodel.shards.SHARD_SCHEMA``); ``ichmodel.preprocess`` writes them into shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ichmodel.constants import DEFAULT_WINDOWS, NUM_CLASSES
from ichmodel.decode import apply_windows, load_dicom_pixels, load_dlcv_image
from ichmodel.read_records import SeriesRecord, SkipRecord
from ichmodel.shards import SHARD_SCHEMA

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
