"""Two Ray nodes on this machine, joined as on a cluster: preprocessing spreads its shards over both, Tune trials
train on both while every trial driver stays on the node with the ``driver`` resource (the head in cluster.yaml).

The head (1 CPU + ``driver``) comes from conftest's ``start_head``; the second node (1 CPU + ``worker_node``) joins
it with ``ray start --address`` on free ports and its own temp dir, and reads the shared token from a file
(``RAY_AUTH_TOKEN_PATH``), as cluster.yaml's nodes do. Jobs are sent the way docs/scaling_out.md sends them.
This cluster never touches the session's ``ray_head``: its own ports, temp dir and token, and at the end only its
own processes are stopped: those naming its temp dir and those carrying its marker in their environment (Ray's
agents rename themselves and outlive their raylet otherwise).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests import datagen
from tests.conftest import CLUSTER_MARKER, VENV_BIN, RayHead, auth_env, free_port, start_head, stop_cluster

pytestmark = pytest.mark.ray
REPO_ROOT = Path(__file__).resolve().parent.parent

STATE_SCRIPT = """
import json, ray
from ray.util.state import list_actors
ray.init(log_to_driver=False)
nodes = [{"node_id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
actors = [{"class_name": a.class_name, "node_id": a.node_id}
          for a in list_actors(limit=10000, raise_on_missing_output=False)]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


@dataclass
class TwoNodes:
    head: RayHead
    client_env: dict[str, str]  # like a user's shell: the token from a file, no token in the environment
    head_node: str = ""  # node ids
    worker_node: str = ""
    private: Path | None = None  # a folder the worker node sees as its own empty tmpfs: local, not shared

    def state(self) -> dict:
        """Nodes and actors (dead ones too) as the head's state API reports them."""
        proc = self.head.run([sys.executable, "-c", STATE_SCRIPT], timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])


def join_node(head: RayHead, env: dict[str, str], temp_dir: Path, private: Path) -> None:
    """A second Ray node on this machine: every port it opens chosen free, so nothing collides with the head.

    The node runs in its own mount namespace where ``private`` is a fresh tmpfs: a folder there is local to
    each node, as on a cluster without a shared filesystem.
    """
    private.mkdir(parents=True, exist_ok=True)
    namespace = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f'mount -t tmpfs tmpfs "{private}" && exec "$@"', "sh"]  # fmt: skip
    cmd = [
        *namespace,
        f"{VENV_BIN}/ray", "start", f"--address={head.address}", "--num-cpus=1", '--resources={"worker_node": 1}',
        f"--temp-dir={temp_dir}", f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_nodes():
    temp_dir = Path(f"/tmp/ich_mn_{os.getpid()}")
    env = auth_env()
    env[CLUSTER_MARKER] = str(temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    token_file = temp_dir / "auth_token"
    token_file.write_text(env["RAY_AUTH_TOKEN"])
    token_file.chmod(0o600)
    file_env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {
        "RAY_AUTH_TOKEN_PATH": str(token_file)
    }
    try:
        head = start_head(env, temp_dir / "head", num_cpus=1, resources='{"driver": 4}')
        join_node(head, file_env, temp_dir / "worker", temp_dir / "private")
        cluster = TwoNodes(head, dict(file_env, RAY_ADDRESS=head.address), private=temp_dir / "private")
        deadline = time.time() + 90
        while time.time() < deadline:
            alive = [n for n in cluster.state()["nodes"] if n["alive"]]
            if len(alive) == 2:
                break
            time.sleep(1)
        assert len(alive) == 2, f"the second node did not join: {alive}"
        cluster.head_node = next(n["node_id"] for n in alive if "driver" in n["resources"])
        cluster.worker_node = next(n["node_id"] for n in alive if "worker_node" in n["resources"])
        yield cluster
    finally:
        try:
            stop_cluster(temp_dir)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def preprocessed(two_nodes, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """8 generated DLCV series preprocessed on the cluster, one shard (one Ray task) per series."""
    root = tmp_path_factory.mktemp("mn_data")
    datagen.dlcv(root / "in", patients=8, slices=(4, 6), seed=3)
    out = root / "shards"
    proc = two_nodes.head.run(
        [sys.executable, "ray_jobs/preprocess.py", "--format", "dlcv", "--input", str(root / "in" / "train"),
         "--labels", str(root / "in" / "train.csv"), "--out", str(out), "--size", "32", "--shard-series", "1"],
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, out


def test_the_cluster_needs_the_token(two_nodes):
    without = {k: v for k, v in two_nodes.client_env.items() if not k.startswith("RAY_AUTH")}
    job_list = [f"{VENV_BIN}/ray", "job", "list", "--address", two_nodes.head.dashboard]
    denied = subprocess.run(job_list, env=without, capture_output=True, text=True, timeout=120)
    allowed = subprocess.run(job_list, env=two_nodes.client_env, capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and "AuthenticationError" in denied.stdout + denied.stderr
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_preprocessing_spreads_shards_over_both_nodes(two_nodes, preprocessed):
    proc, out = preprocessed
    (logged,) = re.findall(r"shards per node: (\{.*\})", proc.stderr)
    per_node = ast.literal_eval(logged)  # {node id prefix: shards}
    assert sum(per_node.values()) == 8 and len(list(out.glob("shard-*.parquet"))) == 8
    assert len(per_node) == 2, per_node
    assert {n[:12] for n in (two_nodes.head_node, two_nodes.worker_node)} == set(per_node)


def test_trials_train_on_both_nodes_and_their_drivers_stay_on_the_head(two_nodes, preprocessed, tmp_path):
    # Where trials and their workers run is the point, not what they learn: one epoch each, no shared stages
    # (a shared Train run would put workers on some node before the trials do).
    _, shards = preprocessed
    proc = subprocess.run(
        [f"{VENV_BIN}/ray", "job", "submit", "--address", two_nodes.head.dashboard, "--working-dir", ".", "--",
         "python", "ray_jobs/tune.py", "--smoke-test", "--data", str(shards), "--set", "data.val_fraction=0.25",
         "--num-samples", "2", "--max-concurrent", "2", "--workers-per-trial", "1", "--driver-resource", "driver",
         "--epochs", "0,0,1", "--share-stages", "off", "--storage", str(tmp_path), "--name", "mn"],
        cwd=REPO_ROOT, env=two_nodes.client_env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), (
        proc.stdout[-4000:] + proc.stderr[-3000:]
    )
    table = pd.read_csv(tmp_path / "mn" / "trials.csv")
    assert len(table) == 2 and (table["status"] == "OK").all(), table
    assert set(table["node_id"]) == {two_nodes.head_node, two_nodes.worker_node}  # rank 0 of each trial

    actors = two_nodes.state()["actors"]
    drivers = {
        a["node_id"] for a in actors if a["class_name"] == "ImplicitFunc"
    }  # Tune's function-trial actor
    trainers = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    assert drivers == {two_nodes.head_node}
    assert trainers == {two_nodes.head_node, two_nodes.worker_node}


def test_a_local_out_that_a_node_does_not_share_stops_the_job_early(two_nodes, tmp_path):
    datagen.dlcv(tmp_path / "in", patients=2, slices=(4, 5), seed=1)
    out = two_nodes.private / "shards"  # the head sees a folder here; the worker node its own empty tmpfs
    proc = two_nodes.head.run(
        [sys.executable, "ray_jobs/preprocess.py", "--format", "dlcv", "--input", str(tmp_path / "in" / "train"),
         "--labels", str(tmp_path / "in" / "train.csv"), "--out", str(out), "--size", "32"],
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"--out {out}" in proc.stderr and "do not share" in proc.stderr, proc.stderr[-3000:]
    assert not list(out.glob("shard-*.parquet"))  # stopped before any work
