"""Faults a cluster user meets, through the real jobs on the session's Ray head (32 px generated data):
a double submit (local and on a moto S3 server), a truncated newest checkpoint, storage made read-only
mid-run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ichmodel import io as store
from ichmodel.checkpoint import load_checkpoint
from ichmodel.checkpoint_recovery import run_checkpoints, verify_checkpoint
from ray_jobs.worker import recorded_result
from tests.conftest import REPO_ROOT, auth_env, job_args
from tests.test_s3 import s3  # noqa: F401  (the module's moto server fixture)

pytestmark = pytest.mark.ray
REFUSED_WITHIN_S = 60  # the refused job ends before it starts Ray: seconds (a busy 2-core machine: imports)


def _start(ray_head, args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO_ROOT, env=ray_head.env | (env or {}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _race(
    ray_head, args: list[str], env: dict | None = None
) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    """Start ``args`` twice at once; wait for one to end. ``(winner still running, refused, its stderr)``."""
    procs = [_start(ray_head, args, env), _start(ray_head, args, env)]
    deadline = time.monotonic() + REFUSED_WITHIN_S
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    ended = [p for p in procs if p.poll() is not None]
    assert len(ended) == 1, f"{len(ended)} of the two jobs ended within {REFUSED_WITHIN_S} s"
    refused, winner = ended[0], next(p for p in procs if p is not ended[0])
    _, stderr = refused.communicate()
    return winner, refused, stderr


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[dict, str]:
    """``(the train job's summary, its stderr)`` once it has ended with 0."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return json.loads(stdout[stdout.index("{") :]), stderr


def _refusal_line(stderr: str, winner: subprocess.Popen, job: str, folder: str) -> str:
    lines = [line for line in stderr.splitlines() if "is in use by" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert f"{folder} is in use by {job} on host " in lines[0] and f"pid {winner.pid}," in lines[0]
    assert "--force" in lines[0] and "Traceback" not in stderr  # one line; the traceback only with -v
    return lines[0]


@pytest.fixture(scope="module")
def raced_run(ray_head, demo_shards, tmp_path_factory):
    """Two ``train.py --name twice`` started together (2 epochs of stage 1): the winner's summary, the refused
    job and its stderr, the run folder."""
    storage = tmp_path_factory.mktemp("raced")
    # The paper's recipe: its stage 1 trains the whole model, so the optimizer state is the checkpoint's bulk.
    args = job_args("train", demo_shards[0], storage, "twice", "--epochs", "2,0,0", "--num-workers", "1",
                    "--set", "train.recipe=paper")  # fmt: skip
    winner, refused, stderr = _race(ray_head, args)
    return winner, refused, stderr, _finish(winner)[0], storage / "twice"


def test_two_trains_on_one_name_one_runs_and_the_other_is_refused_naming_it(raced_run):
    winner, refused, stderr, summary, run_dir = raced_run
    assert refused.returncode == 3
    _refusal_line(stderr, winner, "train.py", str(run_dir))
    assert summary["finished"] is True and summary["global_epoch"] == 2
    assert not (run_dir / ".ich-lease.json").exists()  # released when the winner ended
    # Two checkpoints kept: the newest whole, the older one without its optimizer state (the fallback).
    newest, older = run_checkpoints(run_dir)
    assert Path(newest) == Path(summary["checkpoint"])
    assert load_checkpoint(newest)["optimizer"] is not None and load_checkpoint(older)["optimizer"] is None
    assert Path(older).stat().st_size < 0.6 * Path(newest).stat().st_size
    assert set(load_checkpoint(newest)["rng"]) >= {"torch", "numpy", "python"}


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before_and_names_it(raced_run, ray_head):
    _, _, _, summary, run_dir = raced_run
    newest = Path(summary["checkpoint"])
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    rerun = _start(ray_head, [sys.executable, "ray_jobs/train.py", "--name", "twice", "--storage",
                              str(run_dir.parent), "--resume"])  # fmt: skip
    resumed, stderr = _finish(rerun)
    assert f"skipping checkpoint {newest}: truncated ({len(data) // 2} of {len(data)} bytes)" in stderr
    assert "a fresh AdamW" in stderr  # the older file was pruned of its optimizer state
    assert resumed["finished"] is True and resumed["global_epoch"] == 2
    history = load_checkpoint(resumed["checkpoint"])["history"]
    assert [h["global_epoch"] for h in history] == [1.0, 2.0]  # epoch 2 trained again from epoch 1's file
    assert verify_checkpoint(resumed["checkpoint"]) == "size and sha256"


def test_two_searches_on_one_s3_experiment_one_runs_and_the_other_is_refused(
    ray_head,
    s3,  # noqa: F811  (the fixture imported above)
    demo_shards,
    monkeypatch,
):
    env, bucket, _ = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    experiment = f"{bucket}/runs/twice"
    args = job_args(
        "tune", demo_shards[0], f"{bucket}/runs", "twice", "--num-samples", "1", "--epochs", "0,0,1"
    )
    winner, refused, stderr = _race(ray_head, args, env)
    try:
        assert refused.returncode == 3
        _refusal_line(stderr, winner, "tune.py", experiment)
        # The winner goes on: it records the experiment's arguments once it holds the lease.
        deadline = time.monotonic() + 120
        while (
            winner.poll() is None
            and time.monotonic() < deadline
            and not store.is_file(f"{experiment}/job_args.json")
        ):
            time.sleep(0.5)
        assert store.is_file(f"{experiment}/job_args.json"), "the winner did not start the search"
    finally:
        winner.send_signal(signal.SIGKILL)  # the search itself is tests/test_s3.py's; save the time here
        winner.communicate()


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_storage_made_read_only_mid_run_ends_with_one_line_and_keeps_the_checkpoints(
    ray_head, demo_shards, tmp_path
):
    storage = tmp_path / "storage"
    storage.mkdir()
    if not (_mount("--bind", str(storage), str(storage)) and _mount("-o", "remount,bind,ro", str(storage))):
        pytest.skip(
            "cannot mount here (needs root with CAP_SYS_ADMIN): no way to make a folder read-only for root"
        )
    subprocess.run(["umount", str(storage)], check=True)
    # The paper's recipe: 8 epochs of whole-model training, long enough to make the folder read-only mid-run.
    args = job_args("train", demo_shards[0], storage, "ro", "--epochs", "8,0,0", "--num-workers", "1",
                    "--max-failures", "0", "--set", "train.recipe=paper")  # fmt: skip
    proc = _start(ray_head, args)
    try:
        deadline = time.monotonic() + 300
        recorded = None
        while proc.poll() is None and time.monotonic() < deadline and recorded is None:
            result = recorded_result(str(storage / "ro"))
            recorded = result.checkpoint if result is not None else None
            time.sleep(0.3)
        assert recorded is not None, "no checkpoint was recorded before the run ended"
        # A read-only mount stacked over the folder: what is open stays writable below, every new write fails
        # (remounting the folder's own mount read-only is refused while the job has files open for writing).
        assert _mount("--bind", str(storage), str(storage)) and _mount("-o", "remount,bind,ro", str(storage))
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["umount", "-l", str(storage)], capture_output=True)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-4000:]
    failed = [line for line in stderr.splitlines() if "ray_jobs.train: training failed:" in line]
    assert len(failed) == 1, stderr[-4000:]
    assert re.search(r"Read-only storage writing \S*/storage/ro\S* \(Read-only file system", failed[0]), (
        failed[0]
    )
    # The checkpoints written before are whole: the newest verifies and loads.
    kept = run_checkpoints(storage / "ro")
    assert kept and verify_checkpoint(kept[0]) == "size and sha256"
    assert load_checkpoint(kept[0])["global_epoch"] >= 1


def _refused_before_ray(job: str, args: list[str], storage: Path) -> str:
    """Run ``args`` without a cluster address (the job would start its own Ray); assert exit 2, one line on
    stderr, no traceback, no Ray start and nothing recorded under ``storage``; that line."""
    env = {k: v for k, v in auth_env().items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, f"{job}: " + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{job}: " + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not list(storage.rglob("job_args.json"))
    return lines[0]


@pytest.mark.parametrize("job", ["train", "tune"])
@pytest.mark.parametrize("manifest", [None, "{not json", '{"format": "dlcv", "has_labels": false}'])
def test_data_that_cannot_train_ends_the_job_in_one_line_before_ray(job, manifest, tmp_path):
    """``--data`` naming a folder without a (readable) ``manifest.json``, or shards without labels (a test
    folder): exit 2 with one line naming the folder, before any Ray start and before anything is recorded (a
    record would refuse the corrected rerun of the same name). Before, the Train workers found a missing
    manifest after Ray's start and Train's retries (a traceback 30-40 s later), and unlabelled shards
    trained to a "finished" run at F2 0."""
    data = tmp_path / "not-training-shards"
    data.mkdir()
    if manifest is not None:
        (data / "manifest.json").write_text(manifest)
    line = _refused_before_ray(job, job_args(job, data, tmp_path / "runs", "wrong-data"), tmp_path / "runs")
    assert "--data" in line and str(data) in line


@pytest.mark.parametrize("job", ["train", "tune"])
def test_a_config_no_stage_can_predict_with_ends_the_job_in_one_line_before_ray(job, demo_shards, tmp_path):
    """``--epochs 1,0,0`` trains only the slice stage, so the default ``model.prediction`` ("mc+ac") would read
    an untrained MC head: refused in the driver, as the workers refuse it (40 s later, as a traceback)."""
    args = job_args(job, demo_shards[0], tmp_path / "runs", "slice-only", "--epochs", "1,0,0")
    line = _refused_before_ray(job, args, tmp_path / "runs")
    assert 'model.prediction "mc+ac"' in line and "model.prediction=ac" in line


@pytest.mark.parametrize(("job", "option"), [("train", "--num-workers"), ("tune", "--workers-per-trial")])
def test_workers_the_jobs_own_ray_cannot_hold_end_the_job_in_one_line(job, option, demo_shards, tmp_path):
    """More workers than the job's own local Ray has CPUs: Train waited for them silently, up to its 900 s
    start timeout. Refused once that Ray is up, naming the option, with nothing recorded. (On a cluster the
    job only warns: its autoscaler may add nodes.)"""
    env = {k: v for k, v in auth_env().items() if k != "RAY_ADDRESS"}
    args = job_args(job, demo_shards[0], tmp_path / "runs", "too-many", option, "1000")
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "needs 1000 CPU at once" in errors[0] and f"lower {option}" in errors[0]
    assert not list((tmp_path / "runs").rglob("job_args.json"))
