"""Training strategies: masking (paper section 2.7) and diversity transfer (section 2.8).

The plan is drawn on the CPU from a ``torch.Generator`` (deterministic for a seed) and applied inside the
model's forward pass (:meth:`ichmodel.model.ICHModel.forward`), so the backbone still runs once per step:

1. once per run, :func:`build_transfer_pool` lists every eligible pair of adjacent training slices and
   :func:`build_pool_images` keeps ``pool_size`` of them whose images stay in memory;
2. per batch, :func:`plan_strategies` picks the masked and the transferred slices and a pool pair for each;
3. :func:`make_transfer_batch` gathers the images of the pairs actually used and :func:`transfer_labels`
   adds each pair's class to the labels of its slice.

Choices where the paper is silent (stated again on the functions):

* one draw with probability ε decides whether a series is *generated*; a generated series gets both
  masking and diversity transfer (the paper: "the generated image sequence (by applying masking or
  diversity transfer techniques)");
* ``n1 = round(m·p1)`` and ``n2 = round(m·p2)`` with halves rounded up; the masked and the transferred
  slices are disjoint (a masked slice's transferred feature would never reach the GRU, yet its MC label
  would carry the added class); if ``n1 + n2 > m`` the transfer gets the slices left;
* pool pairs are drawn uniformly with replacement, independently per slice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ichmodel.dataset import SeriesDataset, series_labels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolPair:
    """A diversity-transfer pair: slices ``position`` (z1) and ``position + 1`` (z2) of series ``series_index``.

    z2's labels are z1's plus exactly ``added_class``.
    """

    series_index: int
    position: int
    added_class: int


@dataclass
class TransferBatch:
    """The diversity-transfer pairs used by one batch, as the model consumes them.

    Attributes:
        pair_images: ``[U, 2, C, H, W]`` images (z1, z2) of the U pairs used, prepared like the batch images.
        slot: int64 ``[B, T]``: −1 = no transfer, else the index in ``[0, U)`` of the pair added to that slice.
        pair_classes: int64 ``[U]``, the class each pair adds.
    """

    pair_images: torch.Tensor
    slot: torch.Tensor
    pair_classes: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.pair_images.size(0))


@dataclass
class StrategyPlan:
    """Which slices of a batch are masked and which receive a pool pair.

    Attributes:
        mask: bool ``[B, T]``, slices whose g is zeroed before the GRU.
        transfer_slot: int64 ``[B, T]``: −1 = none, else an index into the (in-memory) pool.

    Both live on the host: the step reads them there (packing, label transfer) without a device sync.
    """

    mask: torch.Tensor
    transfer_slot: torch.Tensor


def build_transfer_pool(series_labels: Sequence[np.ndarray]) -> list[PoolPair]:
    """Every pair of adjacent slices (z1, z2 = next slice) where z2 has exactly one label more than z1.

    The paper's three conditions: (i) adjacent, z2 behind z1; (ii) z2 has one more label; (iii) otherwise the
    label vectors are identical — together: ``labels[t + 1] − labels[t]`` is a one-hot vector.
    Slices with unknown labels (any ``-1``) never form a pair.

    Args:
        series_labels: one ``[T, L]`` 0/1 array per series, slices in order.

    Returns:
        The pairs in (series, position) order.
    """
    pool: list[PoolPair] = []
    for s, labels in enumerate(series_labels):
        y = np.asarray(labels)
        if y.ndim != 2:
            raise ValueError(f"series_labels[{s}] must be [T, L]. Got shape {y.shape}")
        if y.shape[0] < 2:
            continue
        y = y.astype(np.int64)
        known = (y >= 0).all(axis=1)
        diff = y[1:] - y[:-1]  # [T - 1, L]
        ok = known[1:] & known[:-1] & (diff >= 0).all(axis=1) & (diff.sum(axis=1) == 1)
        for t in np.flatnonzero(ok):
            pool.append(PoolPair(series_index=s, position=int(t), added_class=int(np.argmax(diff[t]))))
    logger.debug("Diversity-transfer pool: %d pairs from %d series", len(pool), len(series_labels))
    return pool


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def plan_strategies(
    lengths: torch.Tensor,
    p1: float,
    p2: float,
    epsilon: float,
    pool_size: int,
    generator: torch.Generator,
    num_slices: int | None = None,
) -> StrategyPlan:
    """Draw masking and diversity transfer for a batch (sections 2.7, 2.8, 3.3).

    Per series of length m, with probability ε: ``n1 = round(m·p1)`` slices are masked and
    ``n2 = round(m·p2)`` other slices each get a pool pair drawn uniformly (with replacement) from
    ``[0, pool_size)``; with an empty pool there is no transfer. Halves round up; masked and transferred slices
    are disjoint (see the module docstring). Padding is never touched. All randomness comes from
    ``generator`` (a CPU generator), so the plan is deterministic for a seed.

    Args:
        lengths: ``[B]`` valid slices per series.
        p1, p2: fractions of masked and transferred slices, in [0, 1].
        epsilon: probability that a series is generated, in [0, 1].
        pool_size: pairs in the in-memory pool.
        generator: the source of randomness.
        num_slices: T of the padded batch; ``None`` = ``max(lengths)``.

    Returns:
        :class:`StrategyPlan` on the CPU, shaped ``[B, T]``.
    """
    for name, value in (("p1", p1), ("p2", p2), ("epsilon", epsilon)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]. Got {value}")
    if pool_size < 0:
        raise ValueError(f"pool_size must be >= 0. Got {pool_size}")
    lengths_list = [int(v) for v in lengths.tolist()]
    B = len(lengths_list)
    T = max(lengths_list, default=0) if num_slices is None else int(num_slices)
    if lengths_list and max(lengths_list) > T:
        raise ValueError(f"num_slices={T} is shorter than the longest series ({max(lengths_list)})")
    mask = torch.zeros(B, T, dtype=torch.bool)
    slot = torch.full((B, T), -1, dtype=torch.long)
    generated = (torch.rand(B, generator=generator) < epsilon).tolist()  # [B]
    for b, m in enumerate(lengths_list):
        if not generated[b] or m == 0:
            continue
        order = torch.randperm(m, generator=generator)  # [m]
        n1 = min(_round_half_up(m * p1), m)
        n2 = min(_round_half_up(m * p2), m - n1) if pool_size > 0 else 0
        mask[b, order[:n1]] = True
        if n2 > 0:
            slot[b, order[n1 : n1 + n2]] = torch.randint(pool_size, (n2,), generator=generator)
    return StrategyPlan(mask=mask, transfer_slot=slot)


def transfer_labels(labels: torch.Tensor, slot: torch.Tensor, pair_classes: torch.Tensor) -> torch.Tensor:
    """Labels after diversity transfer: the pair's class is set to 1 at each transferred slice.

    Works with either indexing: ``(plan.transfer_slot, classes of the pool)`` or
    ``(transfer.slot, transfer.pair_classes)``. Returns a new tensor; other entries are unchanged.
    The transferred slices are found on the host (``slot`` and ``pair_classes`` are host tensors, drawn
    there), so ``labels`` on a GPU gets only index copies to the device and no device → host sync.

    Args:
        labels: ``[B, T, L]``, on any device.
        slot: int64 ``[B, T]`` on the host, −1 = none.
        pair_classes: int64 ``[P]`` on the host, the class added by each pair.
    """
    if slot.shape != labels.shape[:2]:
        raise ValueError(f"slot must be [B, T]={tuple(labels.shape[:2])}. Got {tuple(slot.shape)}")
    if slot.device.type != "cpu" or pair_classes.device.type != "cpu":
        raise ValueError("slot and pair_classes must be host (CPU) tensors: they are drawn on the host")
    out = labels.clone()
    b, t = (slot >= 0).nonzero(as_tuple=True)  # host
    if b.numel():
        index = (b, t, pair_classes[slot[b, t]])
        out[tuple(i.to(labels.device, non_blocking=True) for i in index)] = 1
    return out


def make_transfer_batch(
    plan: StrategyPlan, pool_images: torch.Tensor, pair_classes: torch.Tensor
) -> TransferBatch:
    """Gather the pairs ``plan`` uses from the in-memory pool into a :class:`TransferBatch`.

    Only the distinct pairs used are kept (``U`` ≤ number of transferred slices), and ``slot`` is remapped to
    index them. With no transfer, ``U = 0`` (the model then skips diversity transfer).

    Args:
        plan: from :func:`plan_strategies`.
        pool_images: ``[P, 2, C, H, W]``, (z1, z2) images of each pool pair, or their backbone features
            ``[P, 2, D]`` (``ichmodel.feature_cache``).
        pair_classes: int64 ``[P]`` on the host, the class each pool pair adds.

    Returns:
        a :class:`TransferBatch` whose ``slot`` and ``pair_classes`` stay on the host (the model copies
        ``slot`` to the device) and whose images are on ``pool_images``' device.
    """
    if pool_images.dim() not in (3, 5) or pool_images.size(1) != 2:
        raise ValueError(f"pool_images must be [P, 2, C, H, W] or [P, 2, D]. Got {tuple(pool_images.shape)}")
    if pair_classes.shape != (pool_images.size(0),):
        raise ValueError(f"pair_classes must be [P]={pool_images.size(0)}. Got {tuple(pair_classes.shape)}")
    pool_slot = plan.transfer_slot
    used = pool_slot >= 0
    if bool(used.any()) and int(pool_slot.max()) >= pool_images.size(0):
        raise ValueError(
            f"plan uses pool index {int(pool_slot.max())} but the pool has {pool_images.size(0)} pairs"
        )
    unique, inverse = torch.unique(pool_slot[used], return_inverse=True)  # [U], [n]
    slot = torch.full_like(pool_slot, -1)
    slot[used] = inverse
    return TransferBatch(
        pair_images=pool_images.index_select(0, unique.to(pool_images.device, non_blocking=True)),
        slot=slot,
        pair_classes=pair_classes.index_select(0, unique),
    )


@dataclass
class TransferPoolImages:
    """Diversity-transfer pairs held in memory: ``images`` uint8 ``[P, 2, C, H, W]``, ``classes`` ``[P]``."""

    images: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        return int(self.classes.numel())


def build_pool_images(
    dataset: SeriesDataset, pool_size: int, seed: int, labels: list[np.ndarray] | None = None
) -> TransferPoolImages | None:
    """Sample up to ``pool_size`` diversity-transfer pairs from ``dataset`` and load their images.

    Pairs follow the paper's conditions (adjacent slices, the second has exactly one more label).
    Keeping a bounded sample in memory makes a DT step cost one backbone pass over ``2 × pairs`` extra
    images instead of reading series from disk inside the training step. Returns ``None`` when the
    training labels hold no such pair. ``labels``: the dataset's :func:`series_labels`, if already read.
    """
    pool = build_transfer_pool(series_labels(dataset) if labels is None else labels)
    if not pool or pool_size == 0:
        logger.info("diversity transfer pool is empty: DT will not change any sequence")
        return None
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pool), size=min(pool_size, len(pool)), replace=False)
    by_series: dict[int, list[int]] = {}
    for i in sorted(chosen.tolist()):
        by_series.setdefault(pool[i].series_index, []).append(i)
    images, classes = [], []
    for series, pair_ids in by_series.items():
        series_images = dataset[series]["images"]  # [T, C, H, W] uint8
        for i in pair_ids:
            pos = pool[i].position
            images.append(series_images[pos : pos + 2])
            classes.append(pool[i].added_class)
    logger.info("diversity transfer pool: %d pairs found, %d kept in memory", len(pool), len(images))
    return TransferPoolImages(torch.stack(images), torch.tensor(classes, dtype=torch.long))
