"""Smoke tests of the benchmarks: they run end to end and report positive, finite figures.

Speed goals live in the benches themselves, never here: these tests assert no timing threshold.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "bench"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_bench(args: list[str], env_extra: dict[str, str] | None = None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return load_bench("run_all").parse_result(proc.stdout), proc.stdout


def assert_positive_finite(result: dict) -> None:
    assert result
    for key, value in result.items():
        assert isinstance(value, int | float), key
        assert math.isfinite(value) and value > 0, f"{key} = {value}"


@pytest.mark.slow
def test_gpu_bench_tiny_runs_on_cpu(tmp_path):
    result, _ = run_bench(["bench/gpu.py", "--tiny", "--device", "cpu"], {"OUT": str(tmp_path)})
    assert_positive_finite(result)
    assert {"engine_slices_per_s_32", "engine_wait_fraction_32", "engine_tflops_32", "matmul_tflops"} <= set(
        result
    )
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert "errors" not in report
    figures = report["sizes"]["32"]
    assert "errors" not in figures
    assert set(figures["workers"]) == {"0", "1"}
    assert figures["gflop_per_slice"] > 0
    assert 0 <= figures["engine_wait_fraction"] < 1


@pytest.mark.slow
def test_inference_bench_tiny():
    args = ["--size", "32", "--patients", "3", "--batch", "2", "--rounds", "1"]
    result, out = run_bench(["bench/inference.py", *args])
    assert_positive_finite(result)
    assert {"pipeline_slices_per_s", "bare_slices_per_s", "ratio"} <= set(result)
    assert "ratio pipeline / bare" in out


def test_parse_result_takes_the_last_result_line():
    parse_result = load_bench("run_all").parse_result
    assert parse_result('noise\nRESULT {"a": 1}\nmore\nRESULT {"a": 2.5}\n') == {"a": 2.5}
    with pytest.raises(ValueError, match="no RESULT"):
        parse_result("no figures here\n")


def test_memory_run_tree_follows_ancestry_and_tag():
    run_tree = load_bench("memory").run_tree
    processes = {
        1: (0, "init"),
        10: (1, "python ray_jobs/tune.py"),  # the driver
        11: (10, "gcs_server --session-dir=/tmp/bm-x/r/session_1"),
        12: (11, "ray::IDLE"),  # a worker: only its ancestry ties it to the run
        20: (1, "raylet --session-dir=/tmp/bm-x/r/session_1"),  # re-parented, found by its tag
        21: (20, "ray::worker"),
        30: (1, "raylet --session-dir=/tmp/other/session_9"),  # someone else's Ray
        31: (30, "ray::IDLE"),
    }
    assert run_tree(processes, 10, "/tmp/bm-x/r") == {10, 11, 12, 20, 21}


def test_train_step_bench_reports_every_step_and_its_ratios():
    result, out = run_bench(
        ["bench/train_step.py", "--size", "32", "--slices", "6", "--batch", "2", "--repeats", "1",
         "--warmup", "0", "--pool", "8", "--matmul", "256"]
    )  # fmt: skip
    assert_positive_finite(result)
    for step in ("full", "paper", "no_dt", "full_ng", "mc"):
        assert f"{step}_ms" in result and f"{step}_gflops" in result
    assert {"ratio", "paper_ratio", "full_ng_ratio", "no_dt_ratio", "flop_ratio", "paper_of_matmul"} <= set(
        result
    )
    assert result["flop_ratio"] > 1  # the pair images are extra backbone work
    assert "goal ≤ 1.15×" in out


def test_ablation_smoke_reports_held_out_f2_of_each_variant():
    variants = ["per_slice", "default", "two_stage"]
    result, out = run_bench(["bench/ablation.py", "--smoke", "--only", *variants])
    keys = {"default_test_f2", "two_stage_test_f2", "per_slice_test_f2", "min_class_auc"}
    assert keys | {"variants", "per_class", "auc", "settings"} <= set(result)
    assert result["setting"] == "hard" and set(result["settings"]) == {
        "hard"
    }  # the smoke runs the hard world
    assert set(result["variants"]) == {*variants, "slice_cnn"}  # two_stage also reports its stage 1
    for name in variants:
        assert 0.0 <= result[f"{name}_test_f2"] <= 1.0
        assert result["variants"][name] == result[f"{name}_test_f2"]
        assert all(0.0 <= f2 <= 1.0 for f2 in result["per_class"][name].values())
        aucs = [a for a in result["auc"][name].values() if a is not None]  # None: no test positive
        assert aucs and all(0.0 <= a <= 1.0 for a in aucs)
    assert result["min_class_auc"] == min(a for a in result["auc"]["default"].values() if a is not None)
    assert result["backbone_epochs"] == 2
    for other in ("two_stage", "per_slice"):  # default minus each, seed by seed (one seed: no standard error)
        paired = result["paired"][other]
        assert paired["seeds"] == [0] and paired["se"] is None
        assert paired["mean"] == pytest.approx(
            result["default_test_f2"] - result[f"{other}_test_f2"], abs=1e-9
        )
        assert f"default - {other}: {paired['mean']:+.3f}" in out
    assert sum(result["series"].values()) == 12 and min(result["series"].values()) >= 1
    assert (
        "| per_slice |" in out and "| two_stage |" in out and "held-out micro-F2" in out and "AUC sah" in out
    )
