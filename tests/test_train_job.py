"""``ray_jobs/train.py`` on the session's Ray head, 64 px generated data: 2-worker DDP through all stages,
retry, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ichmodel.engine import load_checkpoint, load_model
from ray_jobs.common import CHECKPOINT_FILE, finished_run_report, recorded_result
from tests.conftest import job_args

pytestmark = pytest.mark.ray
REPO_ROOT = Path(__file__).resolve().parent.parent


def _train(ray_head, shards: Path, storage: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return ray_head.run(job_args("train", shards, storage, name, *extra))


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def _recorded_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint Ray's own record of the run names, loaded; None until there is one.

    A rerun resumes from that record, so a file in a ``checkpoint_*`` folder that Ray has not recorded yet
    (the driver can die between the copy and the record) is not one the rerun may be expected to use.
    """
    result = recorded_result(str(run_dir))
    if result is None or result.checkpoint is None:
        return None
    try:
        return load_checkpoint(Path(result.checkpoint.path) / CHECKPOINT_FILE)
    except (OSError, RuntimeError, EOFError):
        return None  # the folder was just replaced by a newer one


def test_two_worker_ddp_run_completes_all_stages(ray_head, shards_64, tmp_path):
    summary = _summary(_train(ray_head, shards_64, tmp_path, "ddp", "--num-workers", "2"))
    assert summary["finished"] is True
    assert (summary["stage"], summary["global_epoch"]) == (2, 3)
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)  # plain, safe to load
    assert [h["stage"] for h in ckpt["state"]["history"]] == [0.0, 1.0, 2.0]
    assert set(ckpt) >= {
        "model",
        "optimizer",
        "scheduler",
        "stage",
        "epoch",
        "best_model",
        "config",
        "thresholds",
    }
    model, cfg, _ = load_model(summary["checkpoint"])
    assert cfg.train.max_epochs == (1, 1, 1)
    probs = model.predict_proba(torch.rand(1, 3, 3, 64, 64), torch.tensor([3]))
    assert probs.shape == (1, 3, 5) and bool(((probs >= 0) & (probs <= 1)).all())


def test_worker_failure_resumes_from_checkpoint_and_ends_like_an_uninterrupted_run(
    ray_head, shards_64, tmp_path
):
    summary = _summary(
        _train(ray_head, shards_64, tmp_path, "flaky", "--num-workers", "1", "--fail-at-epoch", "2")
    )
    assert (tmp_path / ".flaky.failed-once").exists(), "the injected failure did not happen"
    assert summary["finished"] is True and (summary["stage"], summary["global_epoch"]) == (2, 3)
    history = load_checkpoint(summary["checkpoint"])["state"]["history"]
    # Resumed after epoch 2, not restarted: each global epoch appears once.
    assert [h["global_epoch"] for h in history] == [1.0, 2.0, 3.0]


def test_killed_run_continues_when_rerun_with_the_same_name(ray_head, shards_64, tmp_path):
    args = job_args("train", shards_64, tmp_path, "again", "--epochs", "2,1,1", "--num-workers", "1")
    proc = subprocess.Popen(
        args, cwd=REPO_ROOT, env=ray_head.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Kill once Ray has recorded a checkpoint (a rerun resumes from Ray's record, not from loose files).
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and killed is None:
        killed = _recorded_checkpoint(tmp_path / "again")
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed is not None, "Ray recorded no checkpoint before the kill"
    assert killed["global_epoch"] < 4
    assert finished_run_report(str(tmp_path / "again")) is None  # recorded, but not finished
    assert finished_run_report(str(tmp_path / "no-such-run")) is None

    rerun = _train(ray_head, shards_64, tmp_path, "again", "--epochs", "2,1,1", "--num-workers", "1")
    summary = _summary(rerun)
    assert summary["finished"] is True and summary["global_epoch"] == 4
    history = load_checkpoint(summary["checkpoint"])["state"]["history"]
    assert [h["global_epoch"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    # The epochs done before the kill are the killed run's own records (timings included), not a rerun.
    assert history[: killed["global_epoch"]] == killed["state"]["history"]
    # What a restored Tune trial reports instead of rerunning: the finished run's last report and checkpoint.
    done = finished_run_report(str(tmp_path / "again"))
    assert done is not None and done["finished"] and done["global_epoch"] == 4
    assert Path(done["checkpoint_path"]) == Path(summary["checkpoint"]).parent
