"""The two_stage recipe's data paths: shuffled batches of single slices (ichmodel.slice_batches) and the
frozen backbone's cached features (ichmodel.feature_cache)."""

from __future__ import annotations

import torch

from ichmodel.augment import normalize, to_float
from ichmodel.config import ModelConfig
from ichmodel.dataset import SeriesDataset, collate_series, eval_batches
from ichmodel.feature_cache import CachedBatches, cache_series
from ichmodel.model import build_model
from ichmodel.slice_batches import SliceBatches


def _series_batches(lengths: list[list[int]]) -> list[dict]:
    """Padded series batches whose slice images hold a unique number: series s, slice t → 10 * s + t."""
    out, s = [], 0
    for batch in lengths:
        items = []
        for t in batch:
            images = torch.stack([torch.full((1, 2, 2), 10 * s + k, dtype=torch.uint8) for k in range(t)])
            items.append(
                {"images": images, "labels": torch.zeros(t, 5), "series_id": str(s), "slice_ids": []}
            )
            s += 1
        out.append(collate_series(items))
    return out


def test_every_slice_comes_once_in_batches_mixing_series():
    series = _series_batches([[5, 3, 7, 4], [6, 2, 8, 5], [3, 3, 4, 6]])
    total = sum(int(b["valid"].sum()) for b in series)
    batches = list(SliceBatches(series, 8, torch.Generator().manual_seed(0), total, buffer=24))
    seen = torch.cat([b["images"][:, 0, 0, 0] for b in batches]).tolist()
    expected = [
        int(b["images"][v][i, 0, 0, 0]) for b in series for v in [b["valid"]] for i in range(int(v.sum()))
    ]
    assert sorted(seen) == sorted(expected)  # each slice once, none of the padding
    assert all(len(b["images"]) == 8 for b in batches[:-1]) and 1 <= len(batches[-1]["images"]) <= 8
    assert all(int(b["lengths"]) == len(b["images"]) == len(b["labels"]) for b in batches)
    assert len(SliceBatches(series, 8, torch.Generator(), total)) == -(-total // 8)
    first_series = {v // 10 for v in batches[0]["images"][:, 0, 0, 0].tolist()}
    assert len(first_series) >= 3  # a batch draws from several series, not one series' run of slices
    again = list(SliceBatches(series, 8, torch.Generator().manual_seed(1), total, buffer=24))
    assert [b["images"].tolist() for b in again] != [
        b["images"].tolist() for b in batches
    ]  # the draw decides


def test_cached_features_are_the_backbones_in_eval_mode_and_batch_like_the_loader(demo_shards):
    shards = demo_shards[0]
    dataset = SeriesDataset(shards, SeriesDataset(shards).series_ids[:3])
    net = build_model(ModelConfig(feature_dim=32, rnn_hidden=16, cpc_steps=2))
    net.train()
    cache = cache_series(net, dataset, eval_batches(3, 2), torch.device("cpu"), amp_bf16=False)
    assert not net.backbone.training  # eval mode: BatchNorm's running statistics, no update
    assert sorted(cache.features) == [0, 1, 2]
    item = dataset[1]
    with torch.no_grad():
        direct = net.backbone(normalize(to_float(item["images"])))
    torch.testing.assert_close(cache.features[1], direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.labels[1], item["labels"])
    (batch,) = list(CachedBatches(cache, [[2, 1]]))
    lengths = [dataset.num_slices(2), dataset.num_slices(1)]
    assert batch["lengths"].tolist() == lengths and batch["series_ids"] == [
        dataset.series_ids[2],
        item["series_id"],
    ]
    assert batch["features"].shape == (2, max(lengths), 32)
    assert bool((batch["labels"][~batch["valid"]] == -1).all()) and bool(
        (batch["features"][~batch["valid"]] == 0).all()
    )
