"""``ray_jobs/train.py`` on the session's Ray head, the session's 32 px generated data (``demo_shards``): 2-worker
DDP through all stages, retry, resume."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ichmodel.checkpoint import load_checkpoint, load_model
from ichmodel.predict import series_probs
from ray_jobs.worker import CHECKPOINT_FILE, finished_run_report, recorded_result
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


def test_a_two_worker_ddp_run_that_loses_a_worker_resumes_from_its_checkpoint_and_completes_all_stages(
    ray_head, demo_shards, tmp_path
):
    """One run for both: DDP over two workers through all three stages, and Train's restart of the worker
    group after a worker raised (``--fail-at-epoch``), from the last checkpoint."""
    summary = _summary(
        _train(ray_head, demo_shards[0], tmp_path, "ddp", "--num-workers", "2", "--fail-at-epoch", "2")
    )
    assert (tmp_path / ".ddp.failed-once").exists(), "the injected failure did not happen"
    assert summary["finished"] is True
    assert (summary["stage"], summary["global_epoch"]) == (2, 3)
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)  # plain, safe to load
    assert [h["stage"] for h in ckpt["history"]] == [0.0, 1.0, 2.0]
    # Resumed after epoch 2, not restarted: each global epoch appears once.
    assert [h["global_epoch"] for h in ckpt["history"]] == [1.0, 2.0, 3.0]
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
    probs = series_probs(model, torch.rand(1, 3, 3, 32, 32), torch.tensor([3]))
    assert probs.shape == (1, 3, 5) and bool(((probs >= 0) & (probs <= 1)).all())


def test_killed_run_continues_when_rerun_with_the_same_name(ray_head, demo_shards, tmp_path):
    args = job_args("train", demo_shards[0], tmp_path, "again", "--epochs", "2,1,1", "--num-workers", "1")
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

    # Resumed from its name alone: the recorded data and caps (2,1,1), not the demo's (2,2,2 on demo data).
    rerun = ray_head.run([sys.executable, "ray_jobs/train.py", "--name", "again", "--storage", str(tmp_path),
                          "--resume"])  # fmt: skip
    summary = _summary(rerun)
    assert load_model(summary["checkpoint"])[1].data.shards == str(demo_shards[0])
    assert summary["finished"] is True and summary["global_epoch"] == 4
    history = load_checkpoint(summary["checkpoint"])["history"]
    assert [h["global_epoch"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    # The epochs done before the kill are the killed run's own records (timings included), not a rerun.
    assert history[: killed["global_epoch"]] == killed["history"]
    # What a restored Tune trial reports instead of rerunning: the finished run's last report and checkpoint.
    done = finished_run_report(str(tmp_path / "again"))
    assert done is not None and done["finished"] and done["global_epoch"] == 4
    assert Path(done["checkpoint_path"]) == Path(summary["checkpoint"]).parent
    # Train started its controllers, but not Ray Data's DatasetManager (ray_jobs.worker._trainer_class).
    assert _actors(ray_head, "TrainController") and not _actors(ray_head, "DatasetManager")


def test_a_job_on_a_cluster_releases_the_placement_groups_it_still_holds_at_exit(ray_head):
    """``ray_jobs.cli.init_ray`` on a cluster: at the driver's exit, a placement group of its job still held (here
    a detached one, which Ray keeps after the job; in a search, one a killed controller reserved) is removed."""
    script = ("from ray_jobs.cli import init_ray, setup_logging; from ray.util.placement_group import "
              "placement_group; setup_logging(); ray = init_ray(); "
              "pg = placement_group([{'CPU': 1}], lifetime='detached'); ray.get(pg.ready()); "
              "print('PG', pg.id.hex())")  # fmt: skip
    proc = ray_head.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (pg,) = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PG ")]
    assert "released 1 placement group(s)" in proc.stderr
    assert [g["state"] for g in ray_head.listed("placement-groups", f"placement_group_id={pg}")] == [
        "REMOVED"
    ]


def _actors(ray_head, class_name: str) -> list[dict]:
    """The actors of ``class_name`` the session head has had (alive or dead)."""
    return ray_head.listed("actors", f"class_name={class_name}")


def _run_config(args):
    """``train.run_config`` of a parsed command line (what ``train.main`` passes it)."""
    from ray_jobs import train
    from ray_jobs.cli import ConfigArgs

    return train.run_config(ConfigArgs.of(vars(args)), use_gpu=args.use_gpu)


def test_a_flag_set_on_the_command_line_is_parsed_strictly(tmp_path):
    """``--set train.amp_bf16=fasle`` turned bf16 on (``bool("fasle")``); ``=false`` must turn it off."""
    from ray_jobs import train

    parser = train.get_args_parser()
    data = ["--data", str(tmp_path)]
    assert _run_config(parser.parse_args([*data, "--set", "train.amp_bf16=false"])).train.amp_bf16 is False
    assert _run_config(parser.parse_args([*data, "--set", "train.amp_bf16=No"])).train.amp_bf16 is False
    assert _run_config(parser.parse_args([*data, "--set", "augment.enabled=0"])).augment.enabled is False
    for bad in ("train.amp_bf16=fasle", "train.amp_bf16=2"):
        with pytest.raises(ValueError, match=r"train\.amp_bf16 must be a boolean"):
            _run_config(parser.parse_args([*data, "--set", bad]))
    with pytest.raises(ValueError, match=r"data\.batch_size must be an integer\. Got 2\.5"):
        _run_config(parser.parse_args([*data, "--set", "data.batch_size=2.5"]))
    with pytest.raises(ValueError, match=r"train\.max_epochs must be an integer\. Got 'x'"):
        _run_config(parser.parse_args([*data, "--epochs", "1,x,1"]))


@pytest.mark.parametrize(("with_data", "stated_as"), [(True, "with --data"), (False, "on the demo data")])
def test_the_run_gets_the_epoch_caps_that_the_help_states(monkeypatch, tmp_path, with_data, stated_as):
    from ray_jobs import train

    monkeypatch.setattr(train, "ensure_demo_data", lambda root: (tmp_path / "demo", None))  # not generated
    parser = train.get_args_parser()
    (text,) = [a.help for a in parser._actions if "--epochs" in a.option_strings]
    caps = dict((where, tuple(map(int, c.split(",")))) for c, where in
                re.findall(r"(\d+,\d+,\d+) (with --data|on the demo data)", text))  # fmt: skip
    cfg = _run_config(parser.parse_args(["--data", str(tmp_path)] if with_data else []))
    assert cfg.train.max_epochs == caps[stated_as]
    assert cfg.data.shards == str(tmp_path if with_data else tmp_path / "demo")


def test_train_worker_logs_are_quieted_whatever_ray_names_their_loggers(monkeypatch):
    """Ray 2.60 names ``context``'s logger by its file path, the usual way by module name: both are reached
    (``logging.getLogger(context.__file__)`` only reached the first)."""
    from ray.train.v2._internal.execution import context, storage

    from ray_jobs.worker import quiet_train_worker_logs

    by_file, by_name = logging.getLogger(context.__file__), logging.getLogger(context.__name__)
    levels = {logger: logger.level for logger in (by_file, by_name, storage.logger)}
    try:
        for logger in (by_file, by_name):
            monkeypatch.setattr(context, "logger", logger)
            quiet_train_worker_logs()
            assert logger.getEffectiveLevel() == logging.WARNING
        assert storage.logger.getEffectiveLevel() == logging.WARNING
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


def _processes_of(marker: str, session: str | None = None) -> dict[int, str]:
    """Pid -> command line of the processes with ``marker`` in their environment, or the Ray ``session``
    folder on their command line or among their open files (Ray's agents rename themselves with
    setproctitle, which overwrites their command line and environment)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ours = marker.encode() in (proc / "environ").read_bytes().split(b"\0")
            if session and not ours:
                ours = session in cmdline or any(
                    os.readlink(fd).startswith(session) for fd in (proc / "fd").iterdir()
                )
        except OSError:
            continue
        if ours:
            found[int(proc.name)] = cmdline
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the watchdog and this check read /proc (Linux)")
def test_a_job_with_its_own_ray_talks_only_to_it_and_leaves_nothing_after_kill_9(
    ray_head, demo_shards, tmp_path
):
    """Beside another Ray (the session's head), Train's placement-group cleaner of a job that started its own
    Ray failed with "Found multiple active Ray instances"; after ``kill -9`` of that driver, Ray's agents
    (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) kept running."""
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_ADDRESS"}  # the job starts a local Ray
    log = tmp_path / "driver.log"
    args = job_args("train", demo_shards[0], tmp_path, "alone", "--epochs", "2,1,1", "--num-workers", "1")
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    marker = f"ICH_LOCAL_RAY_DRIVER={proc.pid}"
    recorded, deadline = None, time.time() + 300
    while time.time() < deadline and recorded is None and proc.poll() is None:
        recorded = _recorded_checkpoint(tmp_path / "alone")
        time.sleep(0.5)
    started = _processes_of(marker)
    (session,) = {
        m.group(1) for cmd in started.values() for m in [re.search(r"--session[-_]dir=(\S+)", cmd)] if m
    }
    started = _processes_of(marker, session + "/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert recorded is not None, log.read_text()[-5000:]
    assert any("DashboardAgent" in cmd or "dashboard/agent.py" in cmd for cmd in started.values()), started
    assert any("RuntimeEnvAgent" in cmd or "runtime_env/agent" in cmd for cmd in started.values()), started
    deadline = time.time() + 30
    while _processes_of(marker, session + "/") and time.time() < deadline:
        time.sleep(0.5)
    left = _processes_of(marker, session + "/")
    assert not left, f"left running after kill -9 of the driver: {left}"
    assert "Found multiple active Ray instances" not in log.read_text()


def test_a_rerun_of_a_recorded_run_with_other_values_is_refused_naming_both(tmp_path, caplog):
    from ray_jobs import job_record, train

    first = train.parse_args(
        ["--data", str(tmp_path), "--storage", str(tmp_path), "--name", "r", "--epochs", "2,1,1"]
    )
    job_record.write_job_record(str(tmp_path / "r"), "train", vars(first), {})
    # Without --resume, every value counts (Train would continue the run's checkpoint on a mixed config).
    again = train.parse_args(["--data", str(tmp_path), "--storage", str(tmp_path), "--name", "r"])
    assert train.main(again) == 2
    assert "--epochs None given, but the experiment ran with '2,1,1'" in caplog.text
    resumed = train.parse_args(["--storage", str(tmp_path), "--name", "r", "--resume", "--num-workers", "3"])
    assert train.main(resumed) == 2
    assert "--num-workers 3 given, but the experiment ran with 2" in caplog.text
