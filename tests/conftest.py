"""Shared fixtures: one real local Ray head per test session, and small generated shard folders.

The head is started with ``ray start --head`` (dashboard included, so ``ray job submit`` works), on free
ports and its own temp dir, with token authentication set explicitly through ``RAY_AUTH_MODE`` /
``RAY_AUTH_TOKEN`` (nothing is written to ``~/.ray``). At the end only this head's processes are stopped.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def auth_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("RAY_ADDRESS", None)
    return env


def start_head(env: dict[str, str], temp_dir: Path, num_cpus: int = 2, resources: str | None = None) -> RayHead:
    port, dash = free_port(), free_port()
    cmd = [
        f"{VENV_BIN}/ray", "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    if resources:
        cmd.append(f"--resources={resources}")
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=180)
    head_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{port}")
    return RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, head_env)


def stop_processes_of(temp_dir: Path) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line names ``temp_dir`` (one cluster's)."""
    def matching() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(temp_dir) in cmdline:
                pids.append(int(proc.name))
        return pids

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 1.0)):
        for pid in matching():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while matching() and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """The session's one local Ray head (2 CPUs, dashboard on a free port)."""
    temp_dir = Path(f"/tmp/ich_ray_{os.getpid()}")
    head = start_head(auth_env(), temp_dir)
    yield head
    stop_processes_of(temp_dir)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny generated DLCV-layout data (32 px), preprocessed: ``(train_shards, test_shards)``."""
    from ray_jobs.common import ensure_demo_data

    root = tmp_path_factory.mktemp("demo")
    return ensure_demo_data(root, patients=8, test_patients=3, size=32)
