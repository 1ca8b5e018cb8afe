"""The node-local shard cache (``ichmodel.shard_cache``) and ``SeriesDataset`` over ``s3://`` shards.

S3 is moto's server (``ThreadedMotoServer`` on 127.0.0.1), reached through ``bench/remote_loader.py``'s
``DelayProxy``, which counts the GETs of shard files the way a bucket's access log would. Loaders are the
engine's own (``make_loader`` over ``EpochBatches``) with two real worker processes.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from ichmodel import io, readers, shard_cache
from ichmodel import preprocess as pp
from ichmodel.batches import EpochBatches, train_batches
from ichmodel.config import Config
from ichmodel.dataset import SeriesDataset, _prefetch_order, make_loader, series_labels, training_batches
from ichmodel.shard_cache import RemoteFile, ShardCache, list_remote_shards
from ichmodel.shards import load_manifest
from tests import datagen
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
SIZE = 16
BUCKET = "cache-test"


def load_remote_loader_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_remote_loader", REPO_ROOT / "bench" / "remote_loader.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_remote_loader_bench()


@pytest.fixture(scope="module")
def s3():
    """``(direct endpoint, proxy)`` of a moto S3 server with bucket ``cache-test``; dummy keys in the env."""
    saved = {k: os.environ.get(k) for k in bench.CREDENTIALS}
    os.environ.update(bench.CREDENTIALS)
    server, (host, port) = bench.start_moto()
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           allow_bucket_creation=True)  # fmt: skip
    fs.create_dir(BUCKET)
    proxy = bench.DelayProxy((host, port), delay=0.0, lifetime=600)
    try:
        yield f"{host}:{port}", proxy
    finally:
        proxy.stop()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_shards(root: Path, seed: int, patients: int = 8) -> Path:
    """Labelled DLCV shards: ``patients`` series of 4-9 slices, 3 series per shard file."""
    datagen.dlcv(root / "in", patients=patients, slices=(4, 9), seed=seed)
    result = readers.read_input("dlcv", root / "in")
    pp.preprocess(result, root / "shards", pp.PreprocessOptions(size=SIZE), series_per_shard=3)
    return root / "shards"


def upload(local: Path, s3, name: str) -> str:
    """Copy ``local`` to ``s3://cache-test/<name>``; returns that folder's URI through the counting proxy."""
    direct, proxy = s3
    io.copy_folder(local, bench.s3_uri(f"{BUCKET}/{name}", direct))
    return bench.s3_uri(f"{BUCKET}/{name}", proxy.endpoint)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), seed=5)


def assert_same_items(remote: SeriesDataset, local: SeriesDataset) -> None:
    assert remote.series_ids == local.series_ids
    for i in range(len(local)):
        a, b = remote[i], local[i]
        assert a["series_id"] == b["series_id"] and a["slice_ids"] == b["slice_ids"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def read_two_epochs(dataset: SeriesDataset, num_workers: int = 2) -> list[list[str]]:
    batches = EpochBatches(len(dataset), batch_size=3, seed=0)
    loader = make_loader(dataset, batches, num_workers)
    seen = []
    for epoch in range(2):
        batches.set_epoch(epoch)
        seen.append(sorted(s for batch in loader for s in batch["series_ids"]))
    return seen


def test_two_epochs_from_s3_download_each_shard_file_once(s3, local_shards, tmp_path):
    _, proxy = s3
    uri = upload(local_shards, s3, "once")
    files = len(load_manifest(local_shards)["shards"])
    proxy.reset()
    dataset = SeriesDataset(uri, cache=ShardCache(tmp_path / "cache"))
    assert proxy.count("GET", "shard") == 0  # building the dataset lists the folder, reads no shard
    seen = read_two_epochs(dataset)
    assert seen == [sorted(dataset.series_ids)] * 2  # every series in both epochs
    assert proxy.count("GET", "shard") == files
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == files
    before = proxy.count("GET", "shard")
    local = SeriesDataset(local_shards)
    assert_same_items(SeriesDataset(uri, cache=ShardCache(tmp_path / "cache")), local)
    labels = series_labels(SeriesDataset(uri, cache=ShardCache(tmp_path / "cache")))
    assert all(np.array_equal(a, b) for a, b in zip(labels, series_labels(local), strict=True))
    assert proxy.count("GET", "shard") == before  # a new dataset on the node reads the cache


def fetch_all(cache: ShardCache, remotes: list[RemoteFile], barrier, out) -> None:
    barrier.wait()
    out.put([str(cache.fetch(r)) for r in remotes])


def test_two_processes_asking_at_once_download_each_file_once(s3, local_shards, tmp_path):
    """Two processes (forked, like loader workers) fetch every file at the same moment; each file is
    downloaded once, while the other waits on its lock; both get the same finished files."""
    _, proxy = s3
    uri = upload(local_shards, s3, "race")
    remotes = list(list_remote_shards(uri, load_manifest(uri)).values())
    cache = ShardCache(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    old_delay, proxy.delay = proxy.delay, 0.2  # each GET takes long enough for the two to overlap
    proxy.reset()
    try:
        procs = [ctx.Process(target=fetch_all, args=(cache, remotes, barrier, out)) for _ in range(2)]
        for p in procs:
            p.start()
        paths = [out.get(timeout=60), out.get(timeout=60)]
        for p in procs:
            p.join(timeout=60)
    finally:
        proxy.delay = old_delay
    assert [p.exitcode for p in procs] == [0, 0]
    assert paths[0] == paths[1]
    assert proxy.count("GET", "shard") == len(remotes)
    for remote, path in zip(remotes, paths[0], strict=True):
        assert Path(path).read_bytes() == (local_shards / remote.name).read_bytes()


def test_a_loader_with_two_workers_downloads_each_file_once(s3, local_shards, tmp_path):
    """Both workers of one loader prefetch every file (their own batches' first) at the same time."""
    _, proxy = s3
    uri = upload(local_shards, s3, "workers")
    files = len(load_manifest(local_shards)["shards"])
    old_delay, proxy.delay = proxy.delay, 0.2
    proxy.reset()
    try:
        read_two_epochs(SeriesDataset(uri, cache=ShardCache(tmp_path / "cache")), num_workers=2)
    finally:
        proxy.delay = old_delay
    assert proxy.count("GET", "shard") == files


def test_a_file_larger_than_a_part_downloads_as_parallel_ranged_gets(s3, local_shards, tmp_path):
    _, proxy = s3
    uri = upload(local_shards, s3, "parts")
    remotes = list(list_remote_shards(uri, load_manifest(uri)).values())
    part = min(r.size for r in remotes) // 3  # every file in 3 parts or more
    proxy.reset()
    cache = ShardCache(tmp_path / "cache", part_bytes=part)
    for remote in remotes:
        assert cache.fetch(remote).read_bytes() == (local_shards / remote.name).read_bytes()
    assert proxy.count("GET", "shard") == sum(math.ceil(r.size / part) for r in remotes)
    assert proxy.count("HEAD", "shard") == len(remotes)  # one open per file
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_prefetch_skips_a_file_downloading_elsewhere_and_waits_for_it_last(s3, local_shards, tmp_path):
    """A file whose lock another process holds is put aside: the files after it are downloaded meanwhile,
    and ``wait`` returns only once the put-aside file is in the cache too."""
    uri = upload(local_shards, s3, "busy")
    remotes = list(list_remote_shards(uri, load_manifest(uri)).values())
    cache = ShardCache(tmp_path / "cache", threads=1)
    busy = cache.path(remotes[0])
    busy.parent.mkdir(parents=True)
    fd = os.open(busy.with_name(busy.name + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another process downloading it would
    try:
        assert cache.try_fetch(remotes[0]) is None
        prefetch = cache.prefetch(remotes)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(cache.path(r).exists() for r in remotes[1:]):
            time.sleep(0.02)
        assert all(cache.path(r).exists() for r in remotes[1:]) and not busy.exists()
        assert prefetch._threads[0].is_alive()  # waiting for the busy file
    finally:
        os.close(fd)  # the "other process" stops (without the file): the prefetch downloads it itself
    prefetch.wait()
    assert busy.read_bytes() == (local_shards / remotes[0].name).read_bytes()


def test_the_prefetch_order_follows_the_batches_and_the_workers_split_the_threads(s3, local_shards, tmp_path):
    uri = upload(local_shards, s3, "order")
    dataset = SeriesDataset(uri, cache=ShardCache(tmp_path / "cache", threads=5))
    batches = EpochBatches(len(dataset), batch_size=3, seed=0)
    first_use = []
    for batch in batches:
        for i, _ in batch:
            file = dataset._index[dataset.series_ids[i]][0]
            if file not in first_use:
                first_use.append(file)
    assert _prefetch_order(dataset, batches) == first_use  # every file is in epoch 0's batches here
    assert _prefetch_order(dataset, [[len(dataset) - 1]])[0] == dataset.shard_files([len(dataset) - 1])[0]
    assert sorted(_prefetch_order(dataset, iter([[0]]))) == sorted(dataset.shard_files())
    make_loader(dataset, batches, num_workers=2)
    assert dataset._prefetch_threads == 3  # ceil(5 / 2) per worker


def test_training_from_storage_takes_one_window_of_shard_files_at_a_time(s3, tmp_path):
    """A plain shuffle needs nearly every shard file within the first batches; from object storage the
    training order takes the files a window at a time, so the prefetch downloads the window first and the
    next while it trains. A local folder keeps the plain shuffle."""
    local = write_shards(tmp_path / "many", seed=9, patients=18)  # 6 files of 3 series
    dataset = SeriesDataset(upload(local, s3, "windows"), cache=ShardCache(tmp_path / "cache"))
    file_of = {i: dataset._index[s][0] for i, s in enumerate(dataset.series_ids)}
    batches = training_batches(dataset, 2, seed=0, window=2)
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        order = [i for batch in batches for i, _ in batch]
        assert sorted(order) == list(range(18))
        windows = [{file_of[i] for i in order[k : k + 6]} for k in (0, 6, 12)]
        assert [len(w) for w in windows] == [2, 2, 2] and len(set.union(*windows)) == 6
        assert _prefetch_order(dataset, batches)[:2] == list(dict.fromkeys(file_of[i] for i in order[:6]))
    plain = training_batches(SeriesDataset(local), 2, seed=0, window=2)
    assert [list(b) for b in plain._batches()] == [list(b) for b in train_batches(18, 2, 0, 0)]
    whole = training_batches(dataset, 2, seed=0, window=0)  # 0: one shuffle of every series
    assert [list(b) for b in whole._batches()] == [list(b) for b in train_batches(18, 2, 0, 0)]


def filesystems_in_child(out) -> None:
    out.put(len(shard_cache._filesystems))


def test_one_filesystem_per_process_and_bucket(s3, local_shards):
    uri = upload(local_shards, s3, "clients")
    remotes = list(list_remote_shards(uri, load_manifest(uri)).values())
    opened = [shard_cache._open_source(r.location) for r in remotes]
    assert all(fs is opened[0][0] for fs, _ in opened)  # the S3 client is built once
    assert [path for _, path in opened] == [io.resolve(r.location)[1] for r in remotes]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=filesystems_in_child, args=(out,))
    child.start()
    assert out.get(timeout=60) == 0  # a forked loader worker builds its own client
    child.join(timeout=60)


def test_a_shard_changed_in_the_bucket_is_not_served_from_the_stale_cache(s3, local_shards, tmp_path):
    _, proxy = s3
    uri = upload(local_shards, s3, "changing")
    cache = ShardCache(tmp_path / "cache")
    assert_same_items(SeriesDataset(uri, cache=cache), SeriesDataset(local_shards))
    # The same folder rewritten by another preprocessing run: other series in files of the same names
    other = write_shards(tmp_path / "v2", seed=9)
    assert {s["file"] for s in load_manifest(other)["shards"]} == {
        s["file"] for s in load_manifest(local_shards)["shards"]
    }
    upload(other, s3, "changing")
    proxy.reset()
    assert_same_items(SeriesDataset(uri, cache=cache), SeriesDataset(other))
    assert proxy.count("GET", "shard") == len(load_manifest(other)["shards"])


KILLED_DOWNLOAD = """
import sys
from ichmodel import shard_cache
from ichmodel.shards import load_manifest
shard_cache.READ_CHUNK = 512  # many small reads, so the temporary file grows while the answers trickle in
uri, folder, name = sys.argv[1:]
remote = shard_cache.list_remote_shards(uri, load_manifest(uri))[name]
print(remote.key, flush=True)
shard_cache.ShardCache(folder).fetch(remote)
"""


def test_a_download_killed_midway_leaves_no_file_that_is_read_as_a_shard(s3, local_shards, tmp_path):
    direct, proxy = s3
    uri = upload(local_shards, s3, "killed")
    name = load_manifest(local_shards)["shards"][0]["file"]
    size = (local_shards / name).stat().st_size
    folder = tmp_path / "cache"
    host, port = direct.split(":")
    with bench.DelayProxy((host, int(port)), rate=size / 10) as slow:  # a whole shard would take ~10 s
        slow_uri = bench.s3_uri(f"{BUCKET}/killed", slow.endpoint)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", KILLED_DOWNLOAD, slow_uri, str(folder), name], env=env,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            key = proc.stdout.readline().strip()
            deadline = time.monotonic() + 60
            partial = []
            while time.monotonic() < deadline and proc.poll() is None and not partial:
                time.sleep(0.02)
                partial = [p for p in folder.glob("*.tmp") if 0 < p.stat().st_size < size]
            assert partial, "the download never got under way"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not list(
        folder.glob("*.parquet")
    )  # only the temporary file is there, under a name no reader opens
    # The same file (same cache key) fetched again: the lock died with the process, the partial file goes
    killed = RemoteFile(name, io.join(uri, name), size, key)
    assert ShardCache(folder).fetch(killed).read_bytes() == (local_shards / name).read_bytes()
    assert not list(folder.glob("*.tmp"))
    assert_same_items(SeriesDataset(uri, cache=ShardCache(folder)), SeriesDataset(local_shards))


def file_remote(path: Path, key: str) -> RemoteFile:
    return RemoteFile(path.name, path.as_uri(), path.stat().st_size, key)


def test_eviction_keeps_the_newest_files_under_the_bound(local_shards, tmp_path):
    paths = sorted(local_shards.glob("*.parquet"))
    sizes = [p.stat().st_size for p in paths]
    cache = ShardCache(tmp_path / "cache", max_bytes=sizes[1] + sizes[2])
    cached = []
    for i, path in enumerate(paths):
        cached.append(cache.fetch(file_remote(path, f"k{i}")))
        time.sleep(0.01)  # distinct use times
    assert not cached[0].exists() and cached[1].exists() and cached[2].exists()
    assert cache.usage() == sizes[1] + sizes[2]
    assert cache.fetch(file_remote(paths[0], "k0")).read_bytes() == paths[0].read_bytes()  # fetched again
    assert not cached[1].exists()  # now the least recently used


def test_a_listing_that_disagrees_with_the_file_fails_and_keeps_nothing(local_shards, tmp_path):
    path = sorted(local_shards.glob("*.parquet"))[0]
    cache = ShardCache(tmp_path / "cache")
    wrong = RemoteFile(path.name, path.as_uri(), path.stat().st_size + 1, "bad")
    with pytest.raises(ValueError, match=f"{path.name}: downloaded .* bytes, the listing says"):
        cache.fetch(wrong)
    assert not list((tmp_path / "cache").glob("*.parquet")) and not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_keys_change_with_the_manifest_entry_and_the_file(local_shards, tmp_path):
    folder = tmp_path / "shards"
    io.copy_folder(local_shards, folder)
    uri = folder.as_uri()
    manifest = load_manifest(folder)
    keys = {n: r.key for n, r in list_remote_shards(uri, manifest).items()}
    assert keys == {n: r.key for n, r in list_remote_shards(uri, manifest).items()}  # stable
    edited = {**manifest, "shards": [{**manifest["shards"][0], "num_rows": 1}, *manifest["shards"][1:]]}
    first = manifest["shards"][0]["file"]
    changed = {n: r.key for n, r in list_remote_shards(uri, edited).items()}
    assert changed[first] != keys[first] and all(changed[n] == keys[n] for n in keys if n != first)
    os.utime(folder / first, ns=(0, 10**18))
    assert list_remote_shards(uri, manifest)[first].key != keys[first]
    (folder / first).unlink()
    with pytest.raises(FileNotFoundError, match=f"the manifest lists {first}"):
        list_remote_shards(uri, manifest)


def test_config_names_the_cache():
    cfg = Config().with_overrides({"data.cache_dir": "/nvme/cache", "data.cache_max_gib": "2.5"})
    cache = ShardCache.from_config(cfg.data)
    assert cache.folder == Path("/nvme/cache") and cache.max_bytes == int(2.5 * 2**30)
    assert ShardCache.from_config(Config().data).folder.name == "ichmodel-shard-cache"
    with pytest.raises(ValueError, match="data.cache_max_gib"):
        Config().with_overrides({"data.cache_max_gib": 0})


def test_the_remote_loader_bench_smoke_run_reads_epoch_2_without_a_get():
    """``bench/remote_loader.py --smoke`` end to end (its speed goals live in the bench, not here)."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, "bench/remote_loader.py", "--smoke"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result["gets_epoch2"] == 0 and result["gets_epoch1"] == result["shard_files"] == 3
    for key in ("remote_epoch1_over_local", "remote_epoch2_over_local", "local_slices_per_s_per_core"):
        assert 0 < result[key] < float("inf"), key
