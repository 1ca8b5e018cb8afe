"""The library's layout: the modules a job's ``--help`` needs load without torch or Ray (import cycles and
module sizes: tests/test_structure.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARY = REPO_ROOT / "ichmodel"
#: What the jobs read before they parse their arguments: configs, constants, paths, shards, stages, splits,
#: the prediction table and everything that reads it.
LIGHT_MODULES = ("config", "constants", "io", "shards", "stages", "splits", "prediction_table", "folds",
                 "ensemble", "submission", "report", "demo_data", "readers", "preprocess")  # fmt: skip


def test_the_modules_a_jobs_help_needs_import_neither_torch_nor_ray():
    code = (
        "import importlib, json, sys\n"
        f"for name in {LIGHT_MODULES!r}: importlib.import_module('ichmodel.' + name)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'ray') if m in sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
