"""Series from preprocessed shards, padded batches, samplers and loaders.

One item is one whole series (or, with ``max_slices``, a random contiguous window of it). A series is one
Parquet row group, read with ``ParquetFile.read_row_group``; one open ``ParquetFile`` is kept per shard
(and re-opened after pickling, so DataLoader workers each hold their own). Images stay ``uint8``: the
float conversion and normalisation happen on the device (:func:`prepare_images`).

Batches are lists of series indices. Training shuffles with ``DistributedSampler`` (:func:`train_batches`,
which pads so that every rank gets the same number of batches, as DDP needs); validation and prediction
use :func:`eval_batches`, which never pads: every series is seen exactly once over all ranks.
See ``docs/architecture.md`` ("Batches").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from ichmodel.augment import to_float
from ichmodel.constants import NUM_CLASSES
from ichmodel.shards import MANIFEST_NAME, load_manifest, open_shard, series_index

logger = logging.getLogger(__name__)


class SeriesDataset(Dataset):
    """Whole series from a shard folder.

    ``dataset[i]`` → dict with ``images`` uint8 ``[T, C, H, W]``, ``labels`` float32 ``[T, 5]`` (-1 where
    unlabelled), ``series_id`` str, ``slice_ids`` list of T str.

    Args:
        shard_dir: folder or storage URI (``s3://...``, see :mod:`ichmodel.io`) holding ``manifest.json``
            and the shards.
        series_ids: the series to serve, in this order (default: all, in manifest order).
        max_slices: if > 0, longer series are cut to a random contiguous window of this many slices, drawn
            from ``(seed, epoch, index)`` so every epoch (see :meth:`set_epoch`) and worker is reproducible.
        seed: seed of those windows.

    Raises:
        FileNotFoundError: when there is no manifest.
        KeyError: naming the series ids that are not in the manifest.
        ValueError: when ``max_slices`` < 0 or the manifest lists a series twice.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        series_ids: Sequence[str] | None = None,
        max_slices: int = 0,
        seed: int = 0,
    ) -> None:
        if max_slices < 0:
            raise ValueError(f"max_slices must be >= 0. Got {max_slices}")
        self.shard_dir = str(shard_dir)
        self.manifest = load_manifest(shard_dir)
        self.max_slices = max_slices
        self.seed = seed
        self.epoch = 0
        self._index = series_index(self.manifest)
        if series_ids is None:
            series_ids = list(self._index)
        missing = [s for s in series_ids if s not in self._index]
        if missing:
            raise KeyError(
                f"Series not in {self.shard_dir}/{MANIFEST_NAME}: {missing[:5]} ({len(missing)} in all)"
            )
        self.series_ids: list[str] = list(series_ids)
        self._files: dict[str, pq.ParquetFile] = {}

    def __len__(self) -> int:
        return len(self.series_ids)

    def set_epoch(self, epoch: int) -> None:
        """Draw new ``max_slices`` windows (call once per epoch)."""
        self.epoch = epoch

    def num_slices(self, i: int) -> int:
        """Length of series ``i`` in the shards (before any ``max_slices`` cut)."""
        return self._index[self.series_ids[i]][2]

    def _file(self, name: str) -> pq.ParquetFile:
        if name not in self._files:
            self._files[name] = open_shard(self.shard_dir, name)
        return self._files[name]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Series ``key``; ``(i, epoch)`` draws the crop window of that epoch (what :class:`EpochBatches`
        yields: a persistent loader worker's copy of the dataset never sees :meth:`set_epoch`)."""
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        series_id = self.series_ids[i]
        file, row_group, length = self._index[series_id]
        start, stop = 0, length
        if 0 < self.max_slices < length:
            rng = np.random.default_rng([self.seed, epoch, i])
            start = int(rng.integers(0, length - self.max_slices + 1))
            stop = start + self.max_slices
        table = self._file(file).read_row_group(
            row_group, columns=["slice_id", "labels", "image", "height", "width", "channels"]
        )
        if table.num_rows != length:
            raise ValueError(f"{file} row group {row_group}: {table.num_rows} rows, manifest says {length}")
        table = table.slice(start, stop - start)
        num = table.num_rows
        height, width, channels = (int(table.column(c)[0].as_py()) for c in ("height", "width", "channels"))
        images = _binary_to_array(table.column("image").combine_chunks(), (num, height, width, channels))
        labels = table.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return {
            "images": torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),  # [T, H, W, C] → [T, C, H, W]
            "labels": torch.from_numpy(labels.reshape(num, NUM_CLASSES).astype(np.float32)),
            "series_id": series_id,
            "slice_ids": table.column("slice_id").to_pylist(),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # open files do not pickle; each worker opens its own
        return state


def _binary_to_array(column, shape: tuple[int, ...]) -> np.ndarray:
    """Equal-length binary values → one ``uint8`` array of ``shape`` without a per-row copy."""
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=len(column) + 1, offset=column.offset * 4)
    expected = int(np.prod(shape[1:]))
    if not np.all(np.diff(offsets) == expected):
        raise ValueError(f"Image bytes do not match shape {shape[1:]} ({expected} bytes per slice)")
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(shape)


def collate_series(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of :class:`SeriesDataset` items to the longest series.

    Returns ``images`` uint8 ``[B, T, C, H, W]`` (zeros in padding), ``labels`` float32 ``[B, T, 5]``
    (-1 in padding), ``lengths`` int64 ``[B]``, ``valid`` bool ``[B, T]``, ``series_ids`` (B str),
    ``slice_ids`` (B lists).

    Raises:
        ValueError: for an empty list, or items whose image shapes ``[C, H, W]`` differ.
    """
    if not items:
        raise ValueError("collate_series needs at least one item. Got 0")
    shapes = {tuple(item["images"].shape[1:]) for item in items}
    if len(shapes) != 1:
        raise ValueError(f"All series need the same image shape [C, H, W]. Got {sorted(shapes)}")
    (channels, height, width) = shapes.pop()
    lengths = torch.tensor([item["images"].shape[0] for item in items], dtype=torch.int64)
    batch, longest = len(items), int(lengths.max())
    images = torch.zeros((batch, longest, channels, height, width), dtype=torch.uint8)
    labels = torch.full((batch, longest, NUM_CLASSES), -1.0, dtype=torch.float32)
    for b, item in enumerate(items):
        t = item["images"].shape[0]
        images[b, :t] = item["images"]
        labels[b, :t] = item["labels"]
    valid = torch.arange(longest)[None, :] < lengths[:, None]  # [B, T]
    return {
        "images": images,
        "labels": labels,
        "lengths": lengths,
        "valid": valid,
        "series_ids": [item["series_id"] for item in items],
        "slice_ids": [item["slice_ids"] for item in items],
    }


def series_labels(dataset: SeriesDataset) -> list[np.ndarray]:
    """Label matrices int8 ``[T, 5]`` of every series of ``dataset`` (whole series) without decoding images."""
    files: dict[str, pq.ParquetFile] = {}
    out: list[np.ndarray] = []
    for series_id in dataset.series_ids:
        file, row_group, _ = dataset._index[series_id]
        if file not in files:
            files[file] = open_shard(dataset.shard_dir, file)
        table = files[file].read_row_group(row_group, columns=["labels"])
        labels = table.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        out.append(labels.reshape(-1, NUM_CLASSES).astype(np.int8))
    return out


def train_batches(
    num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> BatchSampler:
    """Shuffled batches of series indices for one rank in one epoch (``DistributedSampler`` + ``set_epoch``).

    The order depends on ``(seed, epoch)`` only, so all ranks draw the same permutation and take disjoint
    slices of it. When ``world`` does not divide ``num_items`` the sampler repeats a few series so that
    every rank gets the same number of batches (DDP needs that); use :func:`eval_batches` where a repeated
    series would be counted twice.

    Raises:
        ValueError: when ``batch_size < 1`` or ``rank`` is not in ``[0, world)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Got {batch_size}")
    # DistributedSampler only takes len() of its dataset; passing rank/world needs no process group.
    sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return BatchSampler(sampler, batch_size, drop_last=False)


class EpochBatches:
    """The batch sampler of a training loader that lives for a whole run: each epoch (:meth:`set_epoch`,
    before iterating) gives :func:`train_batches` of that epoch, every index as ``(i, epoch)``.

    The sampler runs in the main process, so with persistent loader workers the epoch still reaches every
    worker's copy of the dataset through the indices.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> BatchSampler:
        return train_batches(self.num_items, self.batch_size, self.seed, self.epoch, self.rank, self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self._batches():
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        return len(self._batches())


def eval_batches(num_items: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Batches of series indices ``rank, rank + world, …`` in order: no padding, each series once overall.

    Ranks may get different numbers of series (and batches); evaluation gathers per-rank results.

    Raises:
        ValueError: when ``batch_size < 1`` or ``rank`` is not in ``[0, world)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Got {batch_size}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}). Got {rank}")
    mine = list(range(rank, num_items, world))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def make_loader(dataset: SeriesDataset, batches: Iterable[list[int]], num_workers: int) -> DataLoader:
    """A DataLoader over ``batches`` (lists of series indices) that pads each with :func:`collate_series`."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_series,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,  # keep a GPU fed across slow shard reads
        persistent_workers=num_workers > 0,  # one set of workers per loader, not one per epoch
    )


def prepare_images(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """A batch's uint8 ``images`` ``[B, T, C, H, W]`` on the host → float in [0, 1] on ``device``."""
    return to_float(batch["images"].to(device, non_blocking=True))


def class_prevalence(dataset: SeriesDataset, labels: list[np.ndarray] | None = None) -> np.ndarray | None:
    """Fraction of labelled slices positive for each class ``[5]``; ``None`` when no slice has labels.

    ``labels``: the dataset's :func:`series_labels` when the caller has read them already.
    """
    labels = series_labels(dataset) if labels is None else labels
    stacked = np.concatenate(labels) if labels else np.zeros((0, NUM_CLASSES), np.int8)
    known = stacked[(stacked >= 0).all(1)]
    return (known > 0).mean(0) if len(known) else None
