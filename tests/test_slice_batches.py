"""The two_stage recipe's data paths: shuffled batches of single slices (ichmodel.slice_batches) and the
frozen backbone's cached features (ichmodel.feature_cache)."""

from __future__ import annotations

import pytest
import torch

from ichmodel.augment import normalize, to_float
from ichmodel.batches import eval_batches
from ichmodel.config import ModelConfig
from ichmodel.dataset import SeriesDataset, collate_series
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


def _ddp_worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    """One rank of a two_stage run under DDP (gloo, CPU): its steps per stage and its history."""
    import json

    import torch.distributed as dist

    from ichmodel.config import Config
    from ichmodel.engine import fit
    from ichmodel.splits import split_series

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train_ids, val_ids = split_series(shards, 0.25, 0)
        cfg = Config().with_overrides(
            {"data.shards": shards, "train.recipe": "two_stage", "train.slice_batch": 8,
             "train.max_epochs": [1, 1, 1], "model.feature_dim": 32, "model.rnn_hidden": 16}
        )  # fmt: skip
        net, state = fit(
            cfg, SeriesDataset(shards, train_ids), SeriesDataset(shards, val_ids), torch.device("cpu")
        )
        weights = {k: float(v.float().sum()) for k, v in net.state_dict().items()}
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"history": state.history, "weights": weights}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_stage_recipe_under_ddp_takes_equal_steps_on_ranks_holding_different_slice_counts(
    demo_shards, tmp_path
):
    """Two gloo ranks: the slice stage's ranks hold different numbers of slices but must take the same number
    of steps (else DDP waits forever); both ranks end with the same weights and the same history."""
    import json
    import multiprocessing as mp
    import socket

    from ichmodel.batches import EpochBatches
    from ichmodel.splits import split_series

    shards = str(demo_shards[0])
    train_ids, _ = split_series(shards, 0.25, 0)
    dataset = SeriesDataset(shards, train_ids)
    counts = []
    for rank in range(2):
        batches = EpochBatches(len(dataset), 4, 0, rank, 2)
        batches.set_epoch(0)
        counts.append(sum(dataset.num_slices(i) for b in batches for i, _ in b))
    assert counts[0] != counts[1]  # the case the test is about

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, shards, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        p.kill() if p.is_alive() else None
    assert not alive, "a rank still runs after 300 s: the ranks took different numbers of steps"
    assert [p.exitcode for p in procs] == [0, 0]
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = [[h["train_steps"] for h in run["history"]] for run in runs]
    assert steps[0] == steps[1] and steps[0][0] == min(counts) // 8
    assert [h["stage"] for h in runs[0]["history"]] == [0, 1, 2]
    assert runs[0]["weights"].keys() == runs[1]["weights"].keys()
    for key, value in runs[0]["weights"].items():
        assert abs(value - runs[1]["weights"][key]) <= 1e-4 * max(1.0, abs(value)), key
