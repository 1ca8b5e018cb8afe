"""Series from preprocessed shards, padded batches, samplers and loaders.

One item is one whole series (or, with ``max_slices``, a random contiguous window of it). A series is one
Parquet row group, read with ``ParquetFile.read_row_group``; one open ``ParquetFile`` is kept per shard
(and re-opened after pickling, so DataLoader workers each hold their own). Images stay ``uint8``: the
float conversion and normalisation happen on the device (:func:`prepare_images`).

A shard folder in object storage (``s3://...``) is read through a node-local cache of whole shard files
(:mod:`ichmodel.shard_cache`): each file is downloaded once per node, and :func:`make_loader` starts
downloading the files its batches need, in background threads, while the first batches are read.

Batches are lists of series indices (:mod:`ichmodel.batches`); :func:`training_batches` gives a run's
training batches of a dataset, shuffled within windows of shard files when they come from object storage.
See ``docs/architecture.md`` ("Batches").
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ichmodel import io
from ichmodel.augment import to_float
from ichmodel.batches import EpochBatches
from ichmodel.constants import NUM_CLASSES
from ichmodel.shard_cache import Prefetch, RemoteFile, ShardCache, list_remote_shards
from ichmodel.shards import MANIFEST_NAME, load_manifest, open_shard, series_index

logger = logging.getLogger(__name__)


class SeriesDataset(Dataset):
    """Whole series from a shard folder.

    ``dataset[i]`` → dict with ``images`` uint8 ``[T, C, H, W]`` (a channels-last view of the shard's
    ``[T, H, W, C]`` bytes, not copied), ``labels`` float32 ``[T, 5]`` (-1 where unlabelled), ``series_id``
    str, ``slice_ids`` list of T str.

    Args:
        shard_dir: folder or storage URI (``s3://...``, see :mod:`ichmodel.io`) holding ``manifest.json``
            and the shards.
        series_ids: the series to serve, in this order (default: all, in manifest order).
        max_slices: if > 0, longer series are cut to a random contiguous window of this many slices, drawn
            from ``(seed, epoch, index)`` so every epoch (see :meth:`set_epoch`) and worker is reproducible.
        seed: seed of those windows.
        cache: where the shard files of a folder in object storage are kept on this node (default:
            ``ShardCache()``, under the node's temporary directory; ``ShardCache.from_config(cfg.data)``
            follows ``data.cache_dir``). Unused for a local folder, which is read in place.

    Raises:
        FileNotFoundError: when there is no manifest, or a shard it lists is not in a storage folder.
        KeyError: naming the series ids that are not in the manifest.
        ValueError: when ``max_slices`` < 0 or the manifest lists a series twice.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        series_ids: Sequence[str] | None = None,
        max_slices: int = 0,
        seed: int = 0,
        cache: ShardCache | None = None,
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
        #: The shard files of a storage folder as one listing saw them (their cache keys); None when local.
        self.remote: dict[str, RemoteFile] | None = None
        self.cache: ShardCache | None = None
        if not io.is_local(self.shard_dir):
            self.cache = cache or ShardCache()
            self.remote = list_remote_shards(self.shard_dir, self.manifest)
        self._files: dict[str, pq.ParquetFile] = {}
        self._prefetch_order: list[str] = []  # set by make_loader for its worker processes
        self._prefetch_threads = 1

    def __len__(self) -> int:
        return len(self.series_ids)

    def set_epoch(self, epoch: int) -> None:
        """Draw new ``max_slices`` windows (call once per epoch)."""
        self.epoch = epoch

    def num_slices(self, i: int) -> int:
        """Length of series ``i`` in the shards (before any ``max_slices`` cut)."""
        return self._index[self.series_ids[i]][2]

    def shard_files(self, indices: Iterable[int] | None = None) -> list[str]:
        """The shard files of series ``indices`` (default: every series), in order of first use."""
        indices = range(len(self)) if indices is None else indices
        return list(dict.fromkeys(self._index[self.series_ids[i]][0] for i in indices))

    def prefetch(self, files: Sequence[str] | None = None, threads: int | None = None) -> Prefetch | None:
        """Start downloading ``files`` (default: all of this dataset's) into the node's cache in ``threads``
        (default: the cache's) background threads; returns the :class:`~ichmodel.shard_cache.Prefetch`
        (``.wait()`` blocks until done), or None for a local folder."""
        if self.remote is None or self.cache is None:
            return None
        files = self.shard_files() if files is None else files
        return self.cache.prefetch([self.remote[f] for f in files], threads)

    def open_file(self, name: str) -> pq.ParquetFile:
        """Shard ``name`` opened for reading row groups (from the node's cache for a storage folder)."""
        if self.remote is None or self.cache is None:
            return open_shard(self.shard_dir, name)
        for _ in range(2):  # the cache may evict the file between fetch and open; fetch it again then
            try:
                return pq.ParquetFile(self.cache.fetch(self.remote[name]))
            except FileNotFoundError:
                continue
        raise FileNotFoundError(
            f"{self.remote[name].location}: evicted from {self.cache.folder} twice while opening"
        )

    def _file(self, name: str) -> pq.ParquetFile:
        if name not in self._files:
            self._files[name] = self.open_file(name)
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
        # use_threads=False: the loader's parallelism is its worker processes; Arrow's pool only adds hand-offs
        table = self._file(file).read_row_group(row_group, columns=ROW_COLUMNS, use_threads=False)
        if table.num_rows != length:
            raise ValueError(f"{file} row group {row_group}: {table.num_rows} rows, manifest says {length}")
        table = table.slice(start, stop - start)
        num = table.num_rows
        height, width, channels = (int(table.column(c)[0].as_py()) for c in ("height", "width", "channels"))
        images = _binary_to_array(_one_chunk(table.column("image")), (num, height, width, channels))
        labels = _one_chunk(table.column("labels")).flatten().to_numpy(zero_copy_only=False)
        return {
            "images": _as_tensor(images).permute(0, 3, 1, 2),  # [T, H, W, C] bytes seen as [T, C, H, W]
            "labels": torch.from_numpy(labels.reshape(num, NUM_CLASSES).astype(np.float32)),
            "series_id": series_id,
            "slice_ids": _one_chunk(table.column("slice_id")).to_pylist(),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # open files do not pickle; each worker opens its own
        for name in ("_main_prefetch", "_worker_prefetch"):  # threads do not pickle either
            state.pop(name, None)
        return state


#: Columns of a shard that an item needs.
ROW_COLUMNS = ["slice_id", "labels", "image", "height", "width", "channels"]


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as is (a row group read gives one), else concatenated."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``'s memory, read-only Arrow memory included (nothing here writes to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


def _binary_to_array(column: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
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

    ``images`` is stored channels-last (``[B, T, H, W, C]`` in memory, the shards' layout, so each series is
    one plain copy); ``images.reshape(B * T, C, H, W)`` is a view in ``torch.channels_last``, the layout the
    model's convolutions use. In a loader worker the batch is built in shared memory, so handing it to the
    main process copies nothing.

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
    images = _empty_uint8((batch, longest, height, width, channels))
    labels = torch.full((batch, longest, NUM_CLASSES), -1.0, dtype=torch.float32)
    for b, item in enumerate(items):
        t = item["images"].shape[0]
        images[b, :t] = item["images"].permute(0, 2, 3, 1)  # [t, H, W, C]
        images[b, t:] = 0
        labels[b, :t] = item["labels"]
    valid = torch.arange(longest)[None, :] < lengths[:, None]  # [B, T]
    return {
        "images": images.permute(0, 1, 4, 2, 3),  # [B, T, H, W, C] memory seen as [B, T, C, H, W]
        "labels": labels,
        "lengths": lengths,
        "valid": valid,
        "series_ids": [item["series_id"] for item in items],
        "slice_ids": [item["slice_ids"] for item in items],
    }


def _empty_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a loader worker, in shared memory (as ``default_collate`` does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def series_labels(dataset: SeriesDataset) -> list[np.ndarray]:
    """Label matrices int8 ``[T, 5]`` of every series of ``dataset`` (whole series) without decoding images.

    A storage folder's shard files are downloaded first, all at once (:meth:`SeriesDataset.prefetch`).
    """
    prefetch = dataset.prefetch()
    if prefetch is not None:
        prefetch.wait()
    files: dict[str, pq.ParquetFile] = {}
    out: list[np.ndarray] = []
    for series_id in dataset.series_ids:
        file, row_group, _ = dataset._index[series_id]
        if file not in files:
            files[file] = dataset.open_file(file)
        table = files[file].read_row_group(row_group, columns=["labels"], use_threads=False)
        labels = _one_chunk(table.column("labels")).flatten().to_numpy(zero_copy_only=False)
        out.append(labels.reshape(-1, NUM_CLASSES).astype(np.int8))
    return out


def training_batches(
    dataset: SeriesDataset,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    *,
    window: int,
) -> EpochBatches:
    """This rank's training batches of ``dataset`` for a whole run (:class:`ichmodel.batches.EpochBatches`):
    for a shard folder in object storage shuffled within windows of ``window`` shard files (0: all series
    at once), so the first epoch trains while the cache downloads the next window; a local folder's files
    need no download, and its series are always shuffled all at once."""
    files = None
    if getattr(dataset, "remote", None) is not None and window > 0:
        numbers: dict[str, int] = {}
        files = [numbers.setdefault(dataset._index[s][0], len(numbers)) for s in dataset.series_ids]
    return EpochBatches(len(dataset), batch_size, seed, rank, world, files, window)


def make_loader(
    dataset: SeriesDataset,
    batches: Iterable[list[int]],
    num_workers: int,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader over ``batches`` (lists of series indices) that pads each with :func:`collate_series`.

    For a shard folder in object storage, the shard files the batches need start downloading into the
    node's cache at once, in background threads (:meth:`SeriesDataset.prefetch`), in the order the batches
    need them, then the rest (the files later epochs of an :class:`EpochBatches` need): in the worker
    processes, which share the list through the files' locks and split the cache's ``threads`` among them,
    or with ``num_workers == 0`` in this process. Workers are not forked while this process downloads for
    the same dataset (an earlier 0-worker loader's downloads finish first).
    ``generator``: draws the workers' base seed (else torch's global generator does), so a run resumed
    from a checkpoint starts workers seeded as the uninterrupted run's were.
    """
    worker_init_fn = None
    if isinstance(dataset, SeriesDataset) and dataset.remote is not None:
        main_prefetch = dataset.__dict__.pop("_main_prefetch", None)
        if main_prefetch is not None:
            main_prefetch.join()
        order = _prefetch_order(dataset, batches)
        if num_workers == 0:
            dataset._main_prefetch = dataset.prefetch(order)
        else:
            dataset._prefetch_order = order
            dataset._prefetch_threads = math.ceil(dataset.cache.threads / num_workers)
            worker_init_fn = _prefetch_in_worker
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_series,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,  # keep a GPU fed across slow shard reads
        persistent_workers=num_workers > 0,  # one set of workers per loader, not one per epoch
        worker_init_fn=worker_init_fn,
        generator=generator,
    )


def _prefetch_order(dataset: SeriesDataset, batches: Iterable[Any]) -> list[str]:
    """The shard files in the order the loader's batches first need them (a DataLoader hands the batches
    out in order, round robin over its workers), then every other file of the dataset.

    One-shot iterables (generators) are not looked into: then all files in index order.
    """
    everything = dataset.shard_files()
    if not isinstance(batches, (Sequence, EpochBatches)):
        return everything
    needed = [i if isinstance(i, int) else i[0] for batch in batches for i in batch]
    first = dataset.shard_files(needed)
    seen = set(first)
    return first + [f for f in everything if f not in seen]


def _prefetch_in_worker(worker_id: int) -> None:
    """``worker_init_fn`` of :func:`make_loader`: start this worker's downloads (its own threads)."""
    dataset = get_worker_info().dataset
    dataset._worker_prefetch = dataset.prefetch(dataset._prefetch_order, dataset._prefetch_threads)


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
