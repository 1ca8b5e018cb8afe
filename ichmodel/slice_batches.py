"""Shuffled batches of single slices for the slice stage (``train.recipe = "two_stage"``, ichmodel.stages).

The slice stage trains the backbone per slice, as the per-slice CNNs of the RSNA 2019 winners did: every
step sees ``train.slice_batch`` slices drawn from many series, not the 4 whole series of a sequence batch.
:class:`SliceBatches` gets them from the run's ordinary series loader (so its worker processes, its
prefetch of shard files and its split across DDP ranks serve this stage too) through a shuffle buffer:
the valid slices of incoming series batches are pooled until the buffer holds ``buffer`` slices, then
batches are drawn at random from it until half of it is left. Every slice of the epoch is used once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


class SliceBatches:
    """Batches ``{"images": uint8 [n, C, H, W], "labels": [n, 5], "lengths": [1] (= n)}`` of single slices.

    Args:
        series_batches: the epoch's padded series batches (``ichmodel.dataset.collate_series``).
        batch_slices: slices per batch (the last batch of the epoch may hold fewer).
        generator: a CPU generator: the draws from the buffer.
        num_slices: the epoch's slice count, for :meth:`__len__` (progress only).
        buffer: slices pooled before drawing (default 8 batches).
        max_batches: stop after this many batches. Under DDP every rank must take the same number of steps
            while ranks hold different numbers of slices: :func:`ichmodel.engine` passes the fewest full
            batches any rank has (a rank drops at most its last ``batch_slices`` slices of the epoch, and the
            next epoch's draw differs).
    """

    def __init__(
        self,
        series_batches: Iterable[dict[str, Any]],
        batch_slices: int,
        generator: torch.Generator,
        num_slices: int,
        buffer: int | None = None,
        max_batches: int | None = None,
    ) -> None:
        self.series_batches = series_batches
        self.batch_slices = batch_slices
        self.generator = generator
        self.num_slices = num_slices
        self.buffer = buffer or 8 * batch_slices
        self.max_batches = max_batches

    def __len__(self) -> int:
        batches = max(1, -(-self.num_slices // self.batch_slices))
        return batches if self.max_batches is None else min(batches, self.max_batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.max_batches is None:
            yield from self._batches()
            return
        for taken, batch in enumerate(self._batches()):
            if taken == self.max_batches:
                return
            yield batch

    def _batches(self) -> Iterator[dict[str, Any]]:
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        held = 0
        for batch in self.series_batches:
            valid = batch["valid"]
            images.append(batch["images"][valid])  # [n, C, H, W]
            labels.append(batch["labels"][valid])  # [n, 5]
            held += int(valid.sum())
            if held >= self.buffer:
                pooled_images, pooled_labels = torch.cat(images), torch.cat(labels)
                order = torch.randperm(held, generator=self.generator)
                draws = max(1, (held - self.buffer // 2) // self.batch_slices)
                for k in range(draws):
                    yield _batch(
                        pooled_images,
                        pooled_labels,
                        order[k * self.batch_slices : (k + 1) * self.batch_slices],
                    )
                rest = order[draws * self.batch_slices :]
                images, labels, held = [pooled_images[rest]], [pooled_labels[rest]], len(rest)
        if held:  # the epoch's last slices: all of them, the last batch possibly smaller
            pooled_images, pooled_labels = torch.cat(images), torch.cat(labels)
            order = torch.randperm(held, generator=self.generator)
            for start in range(0, held, self.batch_slices):
                yield _batch(pooled_images, pooled_labels, order[start : start + self.batch_slices])


def _batch(images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
    return {"images": images[rows], "labels": labels[rows], "lengths": torch.tensor([len(rows)])}
