"""Backbone features computed once for the stages that train on a frozen backbone (``train.recipe =
"two_stage"``, ``ichmodel.stages``).

While the backbone does not change, every epoch would compute the same features g_i again: the stages on a
frozen backbone read them from a :class:`FeatureCache` instead (one forward pass over the training series,
this rank's validation series and the diversity-transfer pool's images, in eval mode and without
augmentation, as the sequence models of the RSNA 2019 winners were trained on cached features). An epoch
of those stages then costs the bi-GRU and the heads only. The cache lives in host memory (4 bytes per
feature: 2 KiB per slice at ResNet18's 512) and is rebuilt when a run resumes in such a stage.

Batches of cached series look like the loader's (:func:`ichmodel.dataset.collate_series`) with ``features``
``[B, T, D]`` in place of ``images``; the model takes them where it takes images (``ICHModel.forward``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ichmodel.augment import normalize, to_float
from ichmodel.constants import NUM_CLASSES
from ichmodel.dataset import SeriesDataset, make_loader, prepare_images
from ichmodel.predict import autocast, unwrap
from ichmodel.strategies import TransferPoolImages


@dataclass
class CachedSeries:
    """Features ``[T, D]`` (float32, host) and labels ``[T, 5]`` of some series, by position in a dataset."""

    features: dict[int, torch.Tensor]
    labels: dict[int, torch.Tensor]
    series_ids: dict[int, str]

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """A padded batch of the cached series ``indices``: ``features`` ``[B, T, D]`` (zeros in padding),
        ``labels`` ``[B, T, 5]`` (−1 in padding), ``lengths`` ``[B]``, ``valid`` ``[B, T]``, ``series_ids``."""
        feats = [self.features[i] for i in indices]
        lengths = torch.tensor([len(f) for f in feats], dtype=torch.int64)
        B, T, D = len(feats), int(lengths.max()), feats[0].size(1)
        features = torch.zeros(B, T, D)
        labels = torch.full((B, T, NUM_CLASSES), -1.0)
        for b, i in enumerate(indices):
            features[b, : lengths[b]] = feats[b]
            labels[b, : lengths[b]] = self.labels[i]
        return {
            "features": features,
            "labels": labels,
            "lengths": lengths,
            "valid": torch.arange(T)[None, :] < lengths[:, None],
            "series_ids": [self.series_ids[i] for i in indices],
        }


class CachedBatches:
    """An epoch's batches of cached series: an iterable with a length, as a loader is."""

    def __init__(self, cache: CachedSeries, batches: Sequence[Sequence[int]]) -> None:
        self.cache, self.batches = cache, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.cache.batch(b) for b in self.batches)


@dataclass
class FeatureCache:
    train: CachedSeries
    val: CachedSeries
    pool: torch.Tensor | None  # [P, 2, D] features of the transfer pool's (z1, z2) images


@torch.no_grad()
def cache_series(
    net: nn.Module,
    dataset: SeriesDataset,
    batches: Sequence[Sequence[int]],
    device: torch.device,
    amp_bf16: bool,
    num_workers: int = 0,
) -> CachedSeries:
    """The backbone features of the series in ``batches`` (lists of indices into ``dataset``), eval mode."""
    backbone = unwrap(net).backbone.eval()
    out = CachedSeries({}, {}, {})
    loader = make_loader(dataset, [list(b) for b in batches], num_workers)
    for indices, batch in zip(batches, loader, strict=True):
        valid = batch["valid"]
        images = normalize(prepare_images(batch, device))[valid.to(device)]  # [N, C, H, W]
        with autocast(device, amp_bf16):
            g = backbone(images).float().cpu()  # [N, D]
        for pos, (i, part) in enumerate(zip(indices, g.split(batch["lengths"].tolist()), strict=True)):
            out.features[i], out.labels[i] = part, batch["labels"][pos, : len(part)]
            out.series_ids[i] = batch["series_ids"][pos]
    return out


@torch.no_grad()
def cache_pool(net: nn.Module, pool: TransferPoolImages | None, device: torch.device) -> torch.Tensor | None:
    """Features ``[P, 2, D]`` of the pool's pair images (eval mode), on ``device``."""
    if pool is None:
        return None
    backbone = unwrap(net).backbone.eval()
    P = pool.images.size(0)
    images = normalize(to_float(pool.images.to(device))).flatten(0, 1)  # [2P, C, H, W]
    return torch.cat([backbone(chunk) for chunk in images.split(256)]).float().view(P, 2, -1)
