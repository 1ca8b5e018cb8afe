"""The embedded demo data (:func:`ichmodel.demo_data.ensure_demo_data`): made once, also when two processes
ask for the same folder at once (a search and a train run on the demo, or two test processes)."""

from __future__ import annotations

import subprocess
import sys

from ichmodel.shards import load_manifest
from tests.conftest import REPO_ROOT

MAKE = (
    "import logging, sys; logging.basicConfig(level=logging.INFO); "
    "from ichmodel.demo_data import ensure_demo_data; "
    "print(*ensure_demo_data(sys.argv[1], patients=4, test_patients=2, size=32))"
)


def test_two_processes_asking_at_once_get_one_complete_copy_made_once(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MAKE, str(tmp_path)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.split() == [str(tmp_path / "shards" / "train"), str(tmp_path / "shards" / "test")]
    generated = [stderr.count("generating demo data") for _, stderr in outputs]
    assert sorted(generated) == [0, 1], generated  # the other one waited and found the shards made
    assert load_manifest(tmp_path / "shards" / "train")["num_series"] == 4
    assert load_manifest(tmp_path / "shards" / "test")["num_series"] == 2
