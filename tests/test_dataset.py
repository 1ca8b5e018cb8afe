from __future__ import annotations

import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from ichmodel import preprocess as pp
from ichmodel import readers
from ichmodel.batches import EpochBatches, eval_batches, train_batches, windowed_order
from ichmodel.dataset import SeriesDataset, collate_series, make_loader, prepare_images, series_labels
from ichmodel.splits import split_series
from tests import datagen

SIZE = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Labelled DLCV shards: 8 series of 4-9 slices in 3 shard files."""
    root = tmp_path_factory.mktemp("dataset")
    datagen.dlcv(root / "in", patients=8, slices=(4, 9), seed=3, test_patients=2)
    result = readers.read_input("dlcv", root / "in")
    pp.preprocess(result, root / "train", pp.PreprocessOptions(size=SIZE), series_per_shard=3)
    pp.preprocess(readers.read_dlcv(root / "in" / "test"), root / "test", pp.PreprocessOptions(size=SIZE))
    return root, result


def test_item_shapes_dtypes_and_values(shards):
    root, result = shards
    ds = SeriesDataset(root / "train")
    assert len(ds) == 8
    item = ds[0]
    series = result.series[0]
    t = len(series.slices)
    assert item["images"].shape == (t, 3, SIZE, SIZE) and item["images"].dtype == torch.uint8
    assert item["labels"].shape == (t, 5) and item["labels"].dtype == torch.float32
    assert item["series_id"] == series.series_id
    assert item["slice_ids"] == [s.slice_id for s in series.slices]
    assert item["labels"].tolist() == [list(map(float, s.labels)) for s in series.slices]
    table = pq.read_table(root / "train" / "shard-00000.parquet")
    raw = np.frombuffer(table.column("image")[2].as_py(), np.uint8).reshape(SIZE, SIZE, 3)
    assert torch.equal(item["images"][2], torch.from_numpy(raw.copy()).permute(2, 0, 1))


def test_unlabelled_series_have_minus_one(shards):
    root, _ = shards
    ds = SeriesDataset(root / "test")
    assert len(ds) == 2
    assert (ds[1]["labels"] == -1).all()


def test_series_ids_select_and_order(shards):
    root, result = shards
    wanted = [result.series[5].series_id, result.series[1].series_id]
    ds = SeriesDataset(root / "train", series_ids=wanted)
    assert [ds[i]["series_id"] for i in range(2)] == wanted
    assert ds.num_slices(0) == len(result.series[5].slices)
    with pytest.raises(KeyError, match="nope"):
        SeriesDataset(root / "train", series_ids=["nope"])


def test_max_slices_gives_a_seeded_contiguous_window(shards):
    root, result = shards
    longest = max(range(8), key=lambda i: len(result.series[i].slices))
    full = SeriesDataset(root / "train")[longest]
    ds = SeriesDataset(root / "train", max_slices=3, seed=7)
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[longest]
        assert item["images"].shape[0] == 3 and len(item["slice_ids"]) == 3
        start = full["slice_ids"].index(item["slice_ids"][0])
        assert item["slice_ids"] == full["slice_ids"][start : start + 3]
        assert torch.equal(item["images"], full["images"][start : start + 3])
        assert torch.equal(item["labels"], full["labels"][start : start + 3])
        starts.add(start)
        again = SeriesDataset(root / "train", max_slices=3, seed=7)
        again.set_epoch(epoch)
        assert again[longest]["slice_ids"] == item["slice_ids"]
    assert len(starts) > 1
    shortest = min(range(8), key=lambda i: len(result.series[i].slices))
    assert len(SeriesDataset(root / "train", max_slices=100)[shortest]["slice_ids"]) == len(
        result.series[shortest].slices
    )
    with pytest.raises(ValueError, match="Got -1"):
        SeriesDataset(root / "train", max_slices=-1)


def test_collate_pads_to_the_longest(shards):
    root, _ = shards
    ds = SeriesDataset(root / "train")
    items = [ds[0], ds[1], ds[2]]
    batch = collate_series(items)
    lengths = [it["images"].shape[0] for it in items]
    t = max(lengths)
    assert batch["images"].shape == (3, t, 3, SIZE, SIZE) and batch["images"].dtype == torch.uint8
    assert batch["labels"].shape == (3, t, 5) and batch["labels"].dtype == torch.float32
    assert batch["lengths"].tolist() == lengths and batch["lengths"].dtype == torch.int64
    assert batch["valid"].dtype == torch.bool and batch["valid"].sum(1).tolist() == lengths
    for b, item in enumerate(items):
        n = lengths[b]
        assert torch.equal(batch["images"][b, :n], item["images"])
        assert (batch["images"][b, n:] == 0).all() and (batch["labels"][b, n:] == -1).all()
    assert batch["series_ids"] == [it["series_id"] for it in items]
    assert batch["slice_ids"][1] == items[1]["slice_ids"]
    with pytest.raises(ValueError, match="Got 0"):
        collate_series([])


def test_collate_rejects_mixed_image_shapes(shards):
    root, _ = shards
    item = SeriesDataset(root / "train")[0]
    small = dict(item, images=item["images"][:, :, :8, :8])
    with pytest.raises(ValueError, match="same image shape"):
        collate_series([item, small])


def test_a_persistent_loader_draws_each_epochs_order_and_crops_as_the_main_process_does(shards):
    """One loader for the whole run (``persistent_workers``): its worker's dataset copy never sees
    ``set_epoch``, the ``(i, epoch)`` indices of ``EpochBatches`` carry the epoch to it."""
    root, _ = shards
    batches = EpochBatches(8, 3, seed=5)
    loader = make_loader(SeriesDataset(root / "train", max_slices=3, seed=7), batches, num_workers=1)
    assert loader.persistent_workers
    plain = SeriesDataset(root / "train", max_slices=3, seed=7)
    seen = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        plain.set_epoch(epoch)
        order = [i for batch in train_batches(8, 3, 5, epoch) for i in batch]
        got = [sid for batch in loader for sid in batch["slice_ids"]]
        assert len(batches) == 3 and got == [plain[i]["slice_ids"] for i in order]
        seen.append(got)
    assert seen[0] != seen[1] != seen[2]  # new order and crops each epoch, from the same workers


def test_dataloader_and_pickling(shards):
    root, _ = shards
    ds = SeriesDataset(root / "train")
    ds[0]  # opens a file
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3]["series_id"] == ds[3]["series_id"]
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_series))
    assert [b["images"].shape[0] for b in batches] == [4, 4]


def test_split_series_is_disjoint_seeded_and_stratified(shards):
    root, result = shards
    train, val = split_series(root / "train", val_fraction=0.25, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(s.series_id for s in result.series)
    assert 1 <= len(val) <= 3
    assert split_series(root / "train", 0.25, 0) == (train, val)
    splits = {tuple(split_series(root / "train", 0.25, seed)[1]) for seed in range(6)}
    assert len(splits) > 1
    positive = {s.series_id for s in result.series if any(max(sl.labels) for sl in s.slices)}
    if len(positive) >= 4:
        assert set(val) & positive
    train2, val2 = split_series(root / "test", 0.1, 0)
    assert len(val2) == 1 and len(train2) == 1
    with pytest.raises(ValueError, match="Got 1.5"):
        split_series(root / "train", 1.5, 0)


def test_series_labels_match_the_dataset_without_decoding_images(shards):
    root, _ = shards
    ds = SeriesDataset(root / "train")
    labels = series_labels(ds)
    assert len(labels) == len(ds)
    for i in range(len(ds)):
        assert labels[i].dtype == np.int8
        np.testing.assert_array_equal(labels[i], ds[i]["labels"].numpy().astype(np.int8))


FILES_OF_11 = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]  # the shard file of each of 11 series


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_batches_give_every_rank_the_same_number_of_batches(world, window):
    per_rank = [
        list(train_batches(11, 4, seed=1, epoch=0, rank=r, world=world, files=FILES_OF_11, window=window))
        for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1  # DDP steps in lockstep
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(11))  # every series is used; the padding repeats a few
    assert len(seen) == -(-11 // world) * world


@pytest.mark.parametrize(("num_items", "world"), [(11, 1), (11, 3), (2, 4), (20, 2)])
def test_the_plain_training_order_is_distributed_samplers(num_items, world):
    """Local shards train in ``DistributedSampler``'s order, padding and split, as they did before the
    windowed order shared its code path (the README's figures on local data rest on it)."""
    from torch.utils.data import BatchSampler, DistributedSampler

    for rank in range(world):
        for epoch in (0, 2):
            sampler = DistributedSampler(
                range(num_items), num_replicas=world, rank=rank, shuffle=True, seed=7
            )
            sampler.set_epoch(epoch)
            expected = [list(b) for b in BatchSampler(sampler, 3, drop_last=False)]
            assert train_batches(num_items, 3, 7, epoch, rank, world) == expected


def test_train_batches_reshuffle_per_epoch_and_repeat_per_seed():
    def order(seed, epoch):
        return [i for batch in train_batches(20, 3, seed, epoch) for i in batch]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == list(range(20))
    with pytest.raises(ValueError, match="Got 0"):
        train_batches(20, 0, 0, 0)


def test_a_windowed_order_takes_one_window_of_files_at_a_time():
    files = [i // 3 for i in range(30)]  # 10 files of 3 series
    order = windowed_order(files, 4, seed=3)
    assert sorted(order) == list(range(30))
    windows = [order[:12], order[12:24], order[24:]]  # 4 + 4 + 2 files
    seen = [{files[i] for i in window} for window in windows]
    assert [len(s) for s in seen] == [4, 4, 2] and not (seen[0] & seen[1] or seen[1] & seen[2])
    assert order[:12] != sorted(order[:12])  # shuffled within the window
    assert windowed_order(files, 4, 3) == order and windowed_order(files, 4, 4) != order
    assert {files[i] for i in windowed_order(files, 4, 4)[:12]} != seen[0]  # new windows each draw
    assert len({files[i] for i in windowed_order(files, 1, 0)[:3]}) == 1
    with pytest.raises(ValueError, match="Got 0"):
        windowed_order(files, 0, 0)
    with pytest.raises(ValueError, match="Got -1"):
        train_batches(30, 2, 0, 0, files=files, window=-1)
    with pytest.raises(ValueError, match="Got 29"):
        train_batches(30, 2, 0, 0, files=files[:29], window=4)


def test_ranks_of_a_windowed_epoch_split_each_window_between_them():
    files = [i // 4 for i in range(32)]  # 8 files of 4 series
    per_rank = [[i for b in train_batches(32, 2, 0, 1, r, 2, files, 2) for i in b] for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(32))
    order = windowed_order(files, 2, seed=0 + 1)  # seed + epoch, as DistributedSampler draws
    assert per_rank[0] == order[0::2] and per_rank[1] == order[1::2]
    first_window = {files[i] for i in order[:8]}
    assert {files[i] for i in per_rank[0][:4] + per_rank[1][:4]} == first_window  # both start on it


@pytest.mark.parametrize("num_items", [7, 1, 0])
def test_eval_batches_of_two_ranks_cover_every_series_exactly_once(num_items):
    rank0 = eval_batches(num_items, 2, rank=0, world=2)
    rank1 = eval_batches(num_items, 2, rank=1, world=2)
    seen = [i for batches in (rank0, rank1) for batch in batches for i in batch]
    assert sorted(seen) == list(range(num_items))  # no series padded in, none counted twice
    assert all(0 < len(batch) <= 2 for batch in rank0 + rank1)
    assert eval_batches(5, 2) == [[0, 1], [2, 3], [4]]  # one rank: every series, in order
    with pytest.raises(ValueError, match="Got 2"):
        eval_batches(5, 2, rank=2, world=2)


def test_make_loader_pads_batches_and_prepare_images_scales_to_unit_range(shards):
    root, _ = shards
    ds = SeriesDataset(root / "train")
    batches = list(make_loader(ds, eval_batches(len(ds), 3), num_workers=0))
    assert [len(b["series_ids"]) for b in batches] == [3, 3, 2]
    assert [s for b in batches for s in b["series_ids"]] == ds.series_ids
    images = prepare_images(batches[0], torch.device("cpu"))
    assert images.dtype == torch.float32 and images.shape == batches[0]["images"].shape
    torch.testing.assert_close(images * 255.0, batches[0]["images"].float())
