"""Shared fixtures: one real local Ray head per test session, and small generated shard folders; and the
``slow`` marker, set here (:func:`pytest_collection_modifyitems`) so that ``make check`` runs the fast tests.

The head is started with ``ray start --head`` (dashboard included, so ``ray job submit`` works), on free
ports and its own temp dir, with token authentication set explicitly through ``RAY_AUTH_MODE`` /
``RAY_AUTH_TOKEN`` (nothing is written to ``~/.ray``). At the end only this head's processes are stopped
(``stop_cluster``: those naming its temp dir or carrying its marker in their environment).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)

#: Fixtures that start a Ray cluster, an S3 server or a browser: a test that uses one is slow.
SLOW_FIXTURES = frozenset({"ray_head", "two_nodes", "s3", "s3_server", "browser", "page", "chromium"})
#: What in a test's own source, or a helper of its module it calls, starts a process (a job script,
#: ``python -c``, Chromium): slow as well.
SLOW_SOURCE = ("subprocess.", "sys.executable", "Popen(", "chromium")
#: Slow tests the two rules above miss: they train for many seconds (``fit`` over several stages, or many
#: steps twice). ``file::test_name``; every parametrisation of the test. Measured with ``--durations``.
SLOW_TESTS = frozenset(
    {
        "test_engine.py::test_fit_runs_three_stages_and_resumes_from_a_checkpoint_at_the_same_place",
        "test_engine.py::test_a_stage_that_adds_heads_warms_up_and_every_stage_logs_its_gradient_shares",
        "test_engine.py::test_next_stage_starts_from_the_best_weights_of_the_last",
        "test_engine.py::test_learning_rate_halves_on_plateau_and_the_stage_ends_below_min_lr",
        "test_engine.py::test_select_metric_loss_compares_within_a_stage_only",
        "test_engine.py::test_a_stage_that_does_not_beat_the_earlier_best_keeps_the_earlier_weights",
        "test_engine.py::test_validation_autocasts_only_when_train_amp_bf16_is_set",
        "test_engine.py::test_non_finite_losses_are_skipped_counted_and_end_the_run_when_too_many",
        "test_shared_stages.py::test_fields_the_table_puts_in_later_stages_do_not_change_the_earlier_ones",
        "test_train_step.py::test_sync_free_step_gives_the_loss_history_of_the_plain_step",
        "test_train_step.py::test_a_training_step_reads_nothing_back_from_the_device",
        "test_predict.py::test_reversal_tta_averages_forward_and_reversed_sequences",
    }
)


def _is_slow(item: pytest.Item) -> bool:
    if item.get_closest_marker("slow") or item.get_closest_marker("ray"):
        return True
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    if f"{Path(item.nodeid.split('::')[0]).name}::{item.name.split('[')[0]}" in SLOW_TESTS:
        return True
    return any(word in source for source in map(_source, _own_code(item)) for word in SLOW_SOURCE)


def _own_code(item: pytest.Item) -> list:
    """The test function and the functions of its own module that it calls by name (``_run``, ``run_bench``)."""
    test = getattr(item, "obj", None)
    code = getattr(test, "__code__", None)
    if code is None:
        return []
    module = getattr(item, "module", None)
    helpers = [getattr(module, name, None) for name in code.co_names]
    own = [h for h in helpers if inspect.isfunction(h) and h.__module__ == getattr(module, "__name__", None)]
    return [test, *own]


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts a Ray cluster, an S3 server, a subprocess job or a browser, and
    those in :data:`SLOW_TESTS`: ``pytest -m "not slow"`` (``make check``) is the fast inner loop."""
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


#: Ports for test clusters: above Ray's worker ports (10002-19999) and below Linux's ephemeral range
#: (32768-60999), from which the kernel gives every outgoing connection and every ``bind(0)`` its port. A
#: port picked from that range is free when picked, but one of the many connections Ray opens while it
#: starts can take it before the process meant to listen on it binds it.
PORT_RANGE = (20000, 32767)
_rng = random.Random(os.getpid())


def free_port() -> int:
    """A port in :data:`PORT_RANGE` that nothing listens on now (and that this session has not handed out)."""
    while True:
        port = _rng.randint(*PORT_RANGE)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port


_given: set[int] = set()


@dataclass
class RayHead:
    address: str  # GCS address, for RAY_ADDRESS / ray.init
    dashboard: str  # http address, for ray job submit
    temp_dir: Path
    env: dict[str, str]  # environment for subprocesses that should use this head

    def run(self, args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        """Run a command (from the repository root) against this head and capture its output."""
        return subprocess.run(
            args, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def listed(self, resource: str, *filters: str) -> list[dict]:
        """``ray list RESOURCE --filter F ...`` on this head (alive and dead ones alike), as JSON rows."""
        args = [f"{VENV_BIN}/ray", "list", resource, "--address", self.address, "--format", "json",
                "--limit", "10000"]  # fmt: skip
        proc = self.run([*args, *(part for f in filters for part in ("--filter", f))])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return [] if proc.stdout.strip() == "No resource in the cluster" else json.loads(proc.stdout)


def job_parser(script: str) -> argparse.ArgumentParser:
    """The argument parser of ``ray_jobs/<script>.py``."""
    spec = importlib.util.spec_from_file_location(f"_job_{script}", REPO_ROOT / "ray_jobs" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (a job's typed options) look their module up there
    spec.loader.exec_module(module)
    return module.get_args_parser()


def job_args(job: str, shards: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """Command line of a training job (``train`` or ``tune``) on ``shards``: tiny epochs, 25 % validation;
    ``extra`` comes last, so it overrides (e.g. ``--epochs 2,1,1``)."""
    return [sys.executable, f"ray_jobs/{job}.py", "--data", str(shards), "--storage", str(storage), "--name", name,
            "--epochs", "1,1,1", "--set", "data.val_fraction=0.25", *extra]  # fmt: skip


def auth_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    # Dummy object-storage credentials for every node and job (tests/test_s3.py's local server): no test can
    # reach a real bucket with a real key, and no worker probes for an EC2 instance profile.
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("RAY_ADDRESS", None)
    # Train's preemption watcher is one more actor (a process importing Ray Train) per Train run, ~1.5 s of
    # the 2 cores each time; no test drains a node, so the test clusters go without it.
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


def start_head(
    env: dict[str, str], temp_dir: Path, num_cpus: int = 2, resources: str | None = None, tries: int = 3
) -> RayHead:
    """``ray start --head`` on fresh ports; a start that fails is cleaned up and tried again on other ports
    (up to ``tries`` times), and the last failure is raised with what Ray printed and its error logs."""
    for attempt in range(1, tries + 1):
        try:
            return _start_head_once(env, temp_dir, num_cpus, resources)
        except subprocess.CalledProcessError as err:
            stop_cluster(temp_dir)
            if attempt == tries:
                raise RuntimeError(
                    f"ray start --head failed {tries} times; the last:\n{_start_failure(err, temp_dir)}"
                ) from err
            shutil.rmtree(temp_dir, ignore_errors=True)
    raise AssertionError("unreachable")


def _start_failure(err: subprocess.CalledProcessError, temp_dir: Path) -> str:
    """What ``ray start`` printed and the tails of the session's ``*.err`` logs."""
    parts = [
        f"exit {err.returncode}",
        f"stdout: {(err.stdout or '')[-2000:]}",
        f"stderr: {(err.stderr or '')[-4000:]}",
    ]
    for log in sorted(temp_dir.glob("session_*/logs/*.err")):
        text = log.read_text(errors="replace").strip()
        if text:
            parts.append(f"{log.name}: {text[-1500:]}")
    return "\n".join(parts)


def _start_head_once(env: dict[str, str], temp_dir: Path, num_cpus: int, resources: str | None) -> RayHead:
    port, dash = free_port(), free_port()
    cmd = [
        f"{VENV_BIN}/ray",
        "start",
        "--head",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if resources:
        cmd.append(f"--resources={resources}")
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=180)
    head_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{port}")
    return RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, head_env)


CLUSTER_MARKER = "ICH_TEST_CLUSTER"  # set in the environment of every process of a test cluster


def cluster_pids(temp_dir: Path) -> list[int]:
    """Processes of one test cluster: its temp dir on their command line or among their open files, or its
    marker in their environment.

    Open files matter: Ray's agents rename themselves with setproctitle, which overwrites their command line
    and environment (neither names the cluster then), and they outlive their raylet; their logs stay open.
    """
    in_cmdline, in_environ = (str(temp_dir) + "/").encode(), f"{CLUSTER_MARKER}={temp_dir}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
            ours = in_cmdline in cmdline or in_environ in environ.split(b"\0")
            ours = ours or any(
                os.readlink(fd).startswith(str(temp_dir) + "/") for fd in (proc / "fd").iterdir()
            )
        except OSError:
            continue
        if ours:
            pids.append(int(proc.name))
    return pids


def stop_cluster(temp_dir: Path) -> None:
    """SIGTERM, then SIGKILL, every process of one test cluster; raise if one survives."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
        for pid in cluster_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while cluster_pids(temp_dir) and time.time() < deadline:
            time.sleep(0.2)
    left = cluster_pids(temp_dir)
    if left:
        raise RuntimeError(f"processes of the test cluster in {temp_dir} still running: {left}")


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """The session's one local Ray head (2 CPUs, dashboard on a free port)."""
    temp_dir = Path(f"/tmp/ich_ray_{os.getpid()}")
    env = auth_env()
    env[CLUSTER_MARKER] = str(temp_dir)
    try:
        yield start_head(env, temp_dir)
    finally:
        try:
            stop_cluster(temp_dir)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny generated DLCV-layout data (32 px), preprocessed: ``(train_shards, test_shards)``."""
    from ichmodel.demo_data import ensure_demo_data

    root = tmp_path_factory.mktemp("demo")
    return ensure_demo_data(root, patients=8, test_patients=3, size=32)
