"""Two searches at once on one machine, each driver with its own local Ray (``ray_jobs.cli.init_ray`` without
``RAY_ADDRESS``): both finish, each with its own complete trials table (issue 14: Train's placement-group
cleaner used to fail with "Found multiple active Ray instances"). One of them also has its trial fail once
(``--fail-at-epoch``): Tune retries it and the retried trial continues from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_smoke_searches_at_once_each_with_its_own_local_ray_both_finish(tmp_path):
    from ray_jobs.tune import demo_shards

    demo_shards(smoke_test=True)  # the smoke data, made once before both start (they would race to make it)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each starts a local Ray
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")  # throwaway: no ~/.ray/auth_token
    # The smallest smoke search: one trial, no shared stages (one Train run per search); "a" trains one
    # epoch, "retry" three, and its trial raises once after epoch 2.
    extra = {"a": ["--epochs", "0,0,1"], "retry": ["--epochs", "1,1,1", "--fail-at-epoch", "2"]}
    drivers = {
        name: subprocess.Popen(
            [
                sys.executable,
                "ray_jobs/tune.py",
                "--smoke-test",
                "--num-samples",
                "1",
                "--share-stages",
                "off",
                "--storage",
                str(tmp_path / name),
                "--name",
                "search",
                *extra[name],
            ],  # fmt: skip
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in extra
    }
    outputs = {name: proc.communicate(timeout=600) for name, proc in drivers.items()}
    for name, proc in drivers.items():
        stdout, stderr = outputs[name]
        assert proc.returncode == 0, f"search {name}: " + stdout[-3000:] + stderr[-5000:]
        assert "multiple active Ray instances" not in stderr
        experiment = tmp_path / name / "search"
        table = pd.read_csv(experiment / "trials.csv")
        assert len(table) == 1 and (table["status"] == "OK").all() and table["finished"].all()
        assert (table["epochs"] == (1 if name == "a" else 3)).all()  # the caps 0,0,1 / 1,1,1
        for checkpoint in table["checkpoint"]:  # each search's checkpoints lie in its own experiment
            assert checkpoint.startswith(str(experiment)) and Path(checkpoint).is_file()
        assert not (experiment / "shared").exists()  # off: the trial trained every stage itself
    markers = list((tmp_path / "retry" / "search" / "train_runs").glob(".failed-once-*"))
    assert len(markers) == 1, "the injected trial failure did not happen"
    assert not list((tmp_path / "a" / "search" / "train_runs").glob(".failed-once-*"))
    (result,) = (tmp_path / "retry" / "search").glob("*/result.json")
    lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    # Tune restarts its iteration counter after a retry; our own epoch counter continues from the checkpoint.
    assert [r["global_epoch"] for r in lines][-1] == 3 and sorted({r["global_epoch"] for r in lines}) == [
        1,
        2,
        3,
    ]
