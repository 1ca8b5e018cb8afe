"""Smoke runs of ``ray_jobs/preprocess.py`` as a user would start it (a subprocess from the repo root)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import datagen

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "ray_jobs" / "preprocess.py"


#: What ray.init prints when it starts a local instance.
RAY_STARTED = "Started a local Ray instance"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join someone else's cluster
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster: do not write ~/.ray/auth_token
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_explains_the_formats():
    proc = _run("--help", timeout=60)
    assert proc.returncode == 0
    assert "--format {dlcv,rsna,dicom}" in proc.stdout and "--shard-series" in proc.stdout
    assert "ray_jobs/preprocess.py --format dlcv" in proc.stdout  # the examples


@pytest.mark.slow
def test_job_end_to_end_on_generated_dlcv_data(tmp_path):
    datagen.dlcv(tmp_path / "in", patients=3, slices=(4, 5), seed=1)
    bad = sorted((tmp_path / "in" / "train").rglob("*_2.jpg"))[0]
    bad.write_bytes(b"not a jpeg")
    with open(tmp_path / "in" / "train.csv", "a", newline="") as f:
        csv.writer(f).writerow(["ID_gone", "gone_1.jpg", 0, 0, 0, 0, 0])
    out = tmp_path / "shards"
    proc = _run(
        "--format", "dlcv", "--input", str(tmp_path / "in" / "train"), "--labels", str(tmp_path / "in" / "train.csv"),
        "--out", str(out), "--size", "16", "--shard-series", "2", "--num-cpus", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard 1/2 done" in proc.stderr and "shard 2/2 done" in proc.stderr and "slices/s" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_series"] == 3 and manifest["num_skipped"] == 2 and manifest["size"] == 16
    assert manifest["num_slices"] == sum(s["num_rows"] for s in manifest["shards"])
    assert f"series: 3, slices: {manifest['num_slices']}, skipped: 2" in proc.stdout
    with open(out / "skipped.csv", newline="") as f:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert skipped[str(bad)].startswith("unreadable image")
    assert any(p.endswith("gone_1.jpg") for p in skipped)
    assert str(bad) in proc.stderr  # the log names the bad file
    assert len(list(out.glob("shard-*.parquet"))) == 2

    # Resumed from the output folder alone: the recorded arguments, every written shard reused as it is.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    conflict = _run("--out", str(out), "--resume", "--size", "32", timeout=120)
    assert conflict.returncode == 2 and "--size 32 given, but the experiment ran with 16" in conflict.stderr
    resumed = _run("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "shard 1/2 done (reused)" in resumed.stderr and "shard 2/2 done (reused)" in resumed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")} == stamps
    assert json.loads((out / "manifest.json").read_text())["num_slices"] == manifest["num_slices"]


def test_job_exits_non_zero_when_nothing_is_usable(tmp_path):
    datagen.dlcv(tmp_path / "in", patients=1, slices=(2, 2))
    for f in (tmp_path / "in" / "train").rglob("*.jpg"):
        f.unlink()  # every label row now points at a missing file: no series, so no Ray start either
    proc = _run(
        "--format", "dlcv", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "16"
    )
    assert proc.returncode == 1
    assert "Nothing usable" in proc.stderr and "series: 0, slices: 0, skipped: 2" in proc.stdout
    assert RAY_STARTED not in proc.stderr + proc.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_skipped"] == 2


def test_job_reports_a_wrong_csv_header(tmp_path):
    datagen.dlcv(tmp_path / "in", patients=1, slices=(2, 2))
    (tmp_path / "bad.csv").write_text("name,ID,ich,ivh,sah,sdh,edh\n")
    proc = _run(
        "--format", "dlcv", "--input", str(tmp_path / "in" / "train"), "--labels", str(tmp_path / "bad.csv"),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "'name,ID,ich,ivh,sah,sdh,edh'" in proc.stderr
    assert RAY_STARTED not in proc.stderr + proc.stdout  # reported before the job's own Ray would start
