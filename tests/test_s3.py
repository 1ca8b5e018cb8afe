"""Every job path on object storage: preprocess → tune --smoke-test (submitted with ``ray job submit``) →
ensemble, against a local S3 server.

The server is moto's (``ThreadedMotoServer`` on 127.0.0.1, a free port), never AWS: the jobs get a dummy key
and ``AWS_ENDPOINT_URL`` in their environment, which ``ray_jobs.cli.init_ray`` forwards to the workers.
Nothing is written to local disk by the jobs but temporary files: inputs, shards, the experiment and the
submission all live in the bucket.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest

from ichmodel import io as store
from ichmodel.checkpoint_recovery import load_verified_checkpoint
from ichmodel.dataset import SeriesDataset, series_labels
from tests import datagen
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.ray
BUCKET = "ich-test"


@pytest.fixture(scope="module")
def s3():
    """``(environment for the jobs, s3://bucket)`` of a moto S3 server running for this module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)  # fmt: skip
    fs.create_dir(BUCKET)
    try:
        yield env, f"s3://{BUCKET}", fs
    finally:
        server.stop()


def test_uris_keep_their_query_and_name_the_same_server(s3, monkeypatch):
    env, bucket, fs = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    port = env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    uri = f"{bucket}/q?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    assert store.join(uri, "a", "b.txt") == f"{bucket}/q/a/b.txt?" + uri.split("?", 1)[1]
    assert store.parent(store.join(uri, "a", "b.txt")) == store.join(uri, "a")
    store.atomic_write_text(store.join(uri, "a", "b.txt"), "hello")
    assert fs.open_input_stream(f"{BUCKET}/q/a/b.txt").read() == b"hello"
    assert store.read_text(f"{bucket}/q/a/b.txt") == "hello"  # the same object through AWS_ENDPOINT_URL
    assert store.list_files(store.join(uri, "a")) == ["b.txt"] and store.list_files(f"{bucket}/none") == []
    with pytest.raises(FileNotFoundError, match=f"No file at {bucket}/q/missing"):
        store.read_bytes(f"{bucket}/q/missing")


def test_large_files_copy_whole_within_the_bucket_and_to_local_disk(s3, monkeypatch, tmp_path):
    env, bucket, fs = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    data = bytes(range(256)) * (3 * 2**20 // 256 + 7)  # over two of the 1 MiB parts a stream would read
    store.atomic_write_bytes(f"{bucket}/big/a.bin", data)
    source_fs, source = store.resolve(f"{bucket}/big/a.bin")
    store.copy_from(source_fs, source, f"{bucket}/big/b.bin")  # a server-side copy
    store.copy_from(source_fs, source, tmp_path / "c.bin")
    assert store.read_bytes(f"{bucket}/big/b.bin") == data and (tmp_path / "c.bin").read_bytes() == data
    assert (
        store.download(f"{bucket}/big/b.bin", tmp_path / "d.bin")
        and (tmp_path / "d.bin").read_bytes() == data
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def _held_placement_groups(ray_head) -> set[str]:
    """Ids of the placement groups the head holds (state CREATED)."""
    return {group["placement_group_id"] for group in ray_head.listed("placement-groups", "state=CREATED")}


def _run(ray_head, env, script: str, *args: str, timeout: float = 300):
    proc = subprocess.run([sys.executable, f"ray_jobs/{script}.py", *args], cwd=REPO_ROOT, env=ray_head.env | env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{script}: " + proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_preprocess_a_submitted_search_and_ensemble_with_every_path_on_s3(
    ray_head, s3, tmp_path, monkeypatch
):
    env, bucket, fs = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    raw = tmp_path / "raw"
    datagen.dlcv(raw, patients=8, slices=(4, 6), seed=5, test_patients=2)
    store.copy_folder(raw, f"{bucket}/raw")
    for split, extra in (("train", ["--labels", f"{bucket}/raw/train.csv"]), ("test", [])):
        _run(ray_head, env, "preprocess", "--format", "dlcv", "--input", f"{bucket}/raw/{split}", *extra,
             "--out", f"{bucket}/shards/{split}", "--size", "32", "--shard-series", "4")  # fmt: skip
    manifest = json.loads(store.read_text(f"{bucket}/shards/train/manifest.json"))
    assert manifest["num_series"] == 8 and manifest["has_labels"]
    assert sorted(store.list_files(f"{bucket}/shards/train")) == [  # job_args.json: resume by name
        "job_args.json", "manifest.json", "shard-00000.parquet", "shard-00001.parquet", "skipped.csv"
    ]  # fmt: skip
    train = SeriesDataset(f"{bucket}/shards/train")  # the library reads the bucket itself
    assert len(train) == 8 and train[0]["images"].shape[1:] == (3, 32, 32)
    assert sum(int((labels >= 0).all()) for labels in series_labels(train)) == 8

    # The search is submitted as users submit it (``ray job submit --working-dir .``), the bucket's endpoint in
    # the job's runtime env: the smoke search's two trials, stages 1-2 shared.
    cache = tmp_path / "shard-cache"  # the node-local copies of the bucket's shard files (data.cache_dir)
    held_before = _held_placement_groups(ray_head)
    submitted = ray_head.run([f"{Path(sys.executable).parent}/ray", "job", "submit", "--address", ray_head.dashboard,
                              "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": env}), "--",
                              "python", "ray_jobs/tune.py", "--smoke-test", "--data", f"{bucket}/shards/train",
                              "--set", "data.val_fraction=0.25", "--set", f"data.cache_dir={cache}",
                              "--storage", f"{bucket}/runs", "--name", "s3"], timeout=400)  # fmt: skip
    said = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0 and "succeeded" in said.lower(), said[-6000:]
    assert "take the base config's values in the shared stages" in said
    assert _held_placement_groups(ray_head) <= held_before  # the search left nothing reserved on the cluster
    cached = sorted(p.name.split("-", 1)[1] for p in cache.glob("*.parquet"))
    assert cached == ["shard-00000.parquet", "shard-00001.parquet"]  # each file once, whole, under one key
    assert not list(cache.glob("*.tmp"))
    experiment = f"{bucket}/runs/s3"
    trials = pd.read_csv(io.StringIO(store.read_text(f"{experiment}/trials.csv")), dtype={"trial_id": str})
    assert len(trials) == 2 and (trials["status"] == "OK").all() and (trials["epochs"] == 3).all()
    assert trials["model_f2"].is_monotonic_decreasing  # sorted, best first
    assert {"loss.alpha", "strategy.p1", "loss.gamma_neg"} <= set(trials.columns)
    for checkpoint in trials["checkpoint"]:
        assert checkpoint.startswith(f"{experiment}/") and store.is_file(checkpoint)
    # Stages 1-2 trained once on the bucket, as one Train run; both trials continued from its checkpoint.
    (shared,) = set(trials["shared_from"])
    assert shared.startswith(f"{experiment}/shared/stages2-") and store.is_file(shared)
    assert load_verified_checkpoint(shared)["global_epoch"] == 2 and (trials["shared_epochs"] == 2).all()
    objects = [i.path.removeprefix(f"{BUCKET}/runs/s3/") for i in fs.get_file_info(
        pafs.FileSelector(f"{BUCKET}/runs/s3", recursive=True)) if i.type == pafs.FileType.File]  # fmt: skip
    assert any("/events.out.tfevents." in o for o in objects), "no TensorBoard event files"
    # On a storage URI the Optuna study is pickled with the searcher's state, not a sqlite file (tune.py).
    assert "optuna.db" not in objects and any(o.startswith("searcher-state-") for o in objects)
    assert len({o.split("/")[1] for o in objects if o.startswith("train_runs/train-")}) == 2  # one per trial
    results = [o for o in objects if o.endswith("/result.json") and o.count("/") == 1]
    assert len(results) == 2
    for result in results:  # no trial trained stages 1-2 again
        lines = [json.loads(x) for x in store.read_text(f"{experiment}/{result}").splitlines() if x.strip()]
        assert [r["global_epoch"] for r in lines] == [3]
    record = json.loads(store.read_text(f"{experiment}/shared_stages.json"))
    assert record["plan"]["stages"] == 2 and "loss.gamma_neg" in record["plan"]["deferred"]

    out = tmp_path / "local_out"
    proc = _run(ray_head, env, "ensemble", "--experiment", f"{bucket}/runs/s3", "--top-k", "1", "--test",
                f"{bucket}/shards/test", "--out", f"{bucket}/sub")  # fmt: skip
    assert not out.exists() and f"copied to {bucket}/sub" in proc.stdout
    spec = json.loads(store.read_text(f"{bucket}/sub/ensemble.json"))
    assert spec["models"] == [
        trials["checkpoint"][0]
    ]  # the best trial's URI: the spec works from any machine
    submission = pd.read_csv(io.StringIO(store.read_text(f"{bucket}/sub/submission.csv")))
    test_slices = sum(
        s["num_rows"] for s in json.loads(store.read_text(f"{bucket}/shards/test/manifest.json"))["shards"]
    )
    assert len(submission) == 5 * test_slices and set(submission["prediction"]) <= {0, 1}
    assert store.is_file(f"{bucket}/sub/report/index.html")
    viewer = store.read_text(f"{bucket}/sub/viewer/index.html")  # written locally (thumbnails read from the
    assert (
        viewer.count('<section class="series"') == 2
    )  # bucket's shards), then uploaded: 2 validation series


def test_a_path_in_a_submitted_jobs_working_dir_is_refused(tmp_path, monkeypatch):
    """Ray runs a ``--working-dir`` job in a temporary copy: a relative --storage would vanish with it."""
    from ray_jobs import storage

    job_dir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    storage.check_not_in_job_dir("--storage", "runs")  # not a submitted job: fine
    monkeypatch.setenv(
        storage.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})
    )
    with pytest.raises(
        ValueError, match=r"--storage runs resolves to .*_ray_pkg_x/runs, inside this job's temporary"
    ):
        storage.check_not_in_job_dir("--storage", "runs")
    storage.check_not_in_job_dir("--storage", str(tmp_path / "shared"))  # absolute, outside: fine
    storage.check_not_in_job_dir("--storage", "s3://bucket/runs")
