"""Which series go in which batch: the training order of each epoch and rank, and the evaluation order.

Batches are lists of series indices. Training shuffles and splits the series among ranks as
``DistributedSampler`` does (:func:`train_batches`, which pads so that every rank gets the same number of
batches, as DDP needs); validation and prediction use :func:`eval_batches`, which never pads: every series is
seen exactly once over all ranks.

A shard folder in object storage is read from a node-local cache that fills in the first epoch. A plain
shuffle would need nearly every shard file within the first few batches, so the first epoch would wait
for most of the download before it trains. Given each series' shard file and a ``window``, the training
order is shuffled within windows of files instead (the shard-aware shuffle of streaming loaders): each
epoch puts the files in a random order, cuts it into windows of ``window`` files and shuffles the series
of each window, so the first batches need only the first window's files, and the next window downloads
while they train. See ``docs/architecture.md`` ("Batches").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def train_batches(
    num_items: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    files: Sequence[int] | None = None,
    window: int = 0,
) -> list[list[int]]:
    """Shuffled batches of series indices for one rank in one epoch.

    The order depends on ``(seed, epoch)`` only, so all ranks draw the same permutation and take disjoint
    slices of it. When ``world`` does not divide ``num_items`` a few series are repeated so that every rank
    gets the same number of batches (DDP needs that); use :func:`eval_batches` where a repeated series would
    be counted twice. Without ``files`` (or with ``window`` 0) the permutation is ``DistributedSampler``'s
    (``randperm`` seeded with ``seed + epoch``) over all series; with ``files`` (the shard file number of each
    series) and ``window`` > 0 it is :func:`windowed_order`. Either way the rank takes its part as
    ``DistributedSampler(shuffle=True, drop_last=False)`` does, so the plain order is that sampler's exactly.

    Raises:
        ValueError: when ``batch_size < 1``, ``rank`` is not in ``[0, world)``, ``window < 0`` or ``files``
            does not have ``num_items`` entries.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Got {batch_size}")
    if window < 0:
        raise ValueError(f"window must be >= 0. Got {window}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}). Got {rank}")
    if files is None or window == 0:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        order = torch.randperm(num_items, generator=generator).tolist()
    elif len(files) != num_items:
        raise ValueError(
            f"files must name the shard file of each of the {num_items} series. Got {len(files)}"
        )
    else:
        order = windowed_order(files, window, seed + epoch)
    mine = _rank_part(order, rank, world)
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def windowed_order(files: Sequence[int], window: int, seed: int) -> list[int]:
    """Every index of ``files`` once: the distinct files in a random order, cut into windows of ``window``
    files, the indices of each window shuffled; a window's indices come before the next window's.

    Raises:
        ValueError: when ``window < 1``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1. Got {window}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    members: dict[int, list[int]] = {}
    for index, file in enumerate(files):
        members.setdefault(file, []).append(index)
    names = list(members)
    shuffled = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
    order: list[int] = []
    for start in range(0, len(shuffled), window):
        pool = [i for file in shuffled[start : start + window] for i in members[file]]
        order += [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
    return order


def _rank_part(order: list[int], rank: int, world: int) -> list[int]:
    """``DistributedSampler``'s part of ``order`` for ``rank`` (``drop_last=False``): padded by repeating
    its start to a multiple of ``world``, then every ``world``-th index from ``rank``."""
    total = -(-len(order) // world) * world
    padded = list(order)
    while len(padded) < total:
        padded += order[: total - len(padded)]
    return padded[rank:total:world]


class EpochBatches:
    """The batch sampler of a training loader that lives for a whole run: each epoch (:meth:`set_epoch`,
    before iterating) gives :func:`train_batches` of that epoch, every index as ``(i, epoch)``.

    The sampler runs in the main process, so with persistent loader workers the epoch still reaches every
    worker's copy of the dataset through the indices. ``files`` and ``window``: see :func:`train_batches`.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        files: Sequence[int] | None = None,
        window: int = 0,
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.files = None if files is None else list(files)
        self.window = window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        return train_batches(
            self.num_items,
            self.batch_size,
            self.seed,
            self.epoch,
            self.rank,
            self.world,
            self.files,
            self.window,
        )

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
