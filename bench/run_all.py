"""Run the CPU benchmarks at small sizes and print one table of figures against their goals (``make bench``).

    python bench/run_all.py [--only loader inference] [--json runs/bench/results.json]

Each bench runs as its own subprocess (so one's threads, memory and Ray processes never touch the next) and
ends with a ``RESULT {json}`` line, from which the key figures are read. Sizes are chosen so that the whole
set takes a few minutes on a 2-core machine; every figure is a ratio or a rate measured within one run,
with the variants interleaved, so background load moves it less than it moves absolute times.

Goals on this machine (2 cores, no GPU): preprocessing ≥ 0.7 × bare DICOM decode (256→128 and 512→256);
at most one device → host sync per training step (counted, not timed: ``bench/host_syncs.py``); full multitask step
≤ 1.15 × the main-task-only step; CPU train step ≥ 45 % of the measured fp32 matmul rate (channels-last).
The GPU goal (≥ 6,000 slices/s at 256 px, < 5 % loader wait) is ``bench/gpu.py``'s, run on a lent H100.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

#: name → arguments of each bench at its small default size.
BENCHES: dict[str, list[str]] = {
    "preprocess": [
        "--patients",
        "4",
        "--slices",
        "16",
        "--input-size",
        "256",
        "--size",
        "128",
        "--repeats",
        "3",
    ],
    "train_step": ["--size", "64", "--slices", "16", "--batch", "4", "--repeats", "5", "--warmup", "1"],
    "loader": ["--size", "64", "--patients", "12", "--batch", "2", "--steps", "4", "--rounds", "2"],
    "inference": ["--size", "64", "--patients", "8", "--rounds", "3"],
    "memory": [],
    "host_syncs": ["--steps", "20"],
    "search_cost": ["--smoke"],
}
#: Seconds a bench may take when more than ``--timeout``: the search-cost smoke runs two searches.
TIMEOUTS = {"search_cost": 900}


@dataclass(frozen=True)
class Figure:
    bench: str
    name: str
    value: Callable[[dict], float]
    fmt: str
    goal: str = "—"
    met: Callable[[float], bool] | None = None


FIGURES = [
    Figure(
        "preprocess",
        "preprocess / bare decode (256→128 px)",
        lambda r: r["ratio"],
        "{:.2f}",
        "≥ 0.70",
        lambda v: v >= 0.7,
    ),
    Figure(
        "preprocess",
        "preprocess / bare decode (512→256 px)",
        lambda r: r["ratio_512_256"],
        "{:.2f}",
        "≥ 0.70",
        lambda v: v >= 0.7,
    ),
    Figure("preprocess", "preprocess / bare decode (512→512 px)", lambda r: r["ratio_512_512"], "{:.2f}"),
    Figure(
        "host_syncs",
        "device → host syncs per training step (fine-tuning stage)",
        lambda r: r["syncs_per_step"],
        "{:.2f}",
        "≤ 1",
        lambda v: v <= 1,
    ),
    Figure(
        "train_step",
        "full / MC-only step, paper ε=0.5 (64 px)",
        lambda r: r["paper_ratio"],
        "{:.3f}×",
        "≤ 1.15×",
        lambda v: v <= 1.15,
    ),
    Figure(
        "train_step",
        "full / MC-only step, ε=1 worst case",
        lambda r: r["ratio"],
        "{:.3f}×",
        "≤ 1.15×",
        lambda v: v <= 1.15,
    ),
    Figure(
        "train_step",
        "ε=1 with model.transfer_grad=false",
        lambda r: r["full_ng_ratio"],
        "{:.3f}×",
        "≤ 1.15×",
        lambda v: v <= 1.15,
    ),
    Figure("train_step", "full / MC-only step without DT, ε=1", lambda r: r["no_dt_ratio"], "{:.3f}×"),
    Figure(
        "train_step",
        "train step (ε=0.5) / fp32 matmul, channels-last",
        lambda r: r["paper_of_matmul"],
        "{:.0%}",
        "≥ 45%",
        lambda v: v >= 0.45,
    ),
    Figure("train_step", "MC-only step / fp32 matmul, channels-last", lambda r: r["mc_of_matmul"], "{:.0%}"),
    Figure("train_step", "fp32 matmul 2048² (GFLOP/s)", lambda r: r["matmul_gflops"], "{:.0f}"),
    Figure(
        "loader", "loader wait / step time, default workers", lambda r: r["wait_fraction_default"], "{:.1%}"
    ),
    Figure("loader", "loader wait / step time, 2 workers", lambda r: r["wait_fraction_w2"], "{:.1%}"),
    Figure("loader", "fastest worker count here", lambda r: r["fastest_num_workers"], "{:.0f}"),
    Figure("inference", "predict_batches / bare forward (slices/s)", lambda r: r["ratio"], "{:.2f}"),
    Figure("inference", "predict_batches slices/s (64 px)", lambda r: r["pipeline_slices_per_s"], "{:.0f}"),
    Figure("memory", "tune --smoke-test peak RSS sum (GiB)", lambda r: r["peak_rss_gib"], "{:.2f}"),
    Figure("memory", "tune --smoke-test peak PSS sum (GiB)", lambda r: r["peak_pss_gib"], "{:.2f}"),
    Figure("memory", "tune --smoke-test wall time (s)", lambda r: r["wall_s"], "{:.0f}"),
    Figure(
        "search_cost",
        "search trial-epochs, shared / plain stages (smoke)",
        lambda r: r["trial_epochs_ratio"],
        "{:.2f}",
        "≤ 0.60",
        lambda v: v <= 0.6,
    ),
    Figure(
        "search_cost",
        "best F2 shared − plain (smoke)",
        lambda r: r["best_f2_shared"] - r["best_f2_plain"],
        "{:+.3f}",  # no goal at this size: 3 validation series; the goal (≥ −0.01) is the full size's
    ),
]


def parse_result(output: str) -> dict:
    """The JSON of the last ``RESULT {...}`` line of ``output``.

    Raises:
        ValueError: when there is none.
    """
    for line in reversed(output.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise ValueError("no RESULT line in the bench's output")


def run_bench(name: str, args: list[str], timeout: float) -> tuple[dict | None, float, str]:
    """Run ``bench/<name>.py``; return ``(result or None, seconds, last lines of output)``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(BENCH_DIR / f"{name}.py"), *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = proc.stdout + proc.stderr
        result = parse_result(proc.stdout) if proc.returncode == 0 else None
    except subprocess.TimeoutExpired as e:
        output = f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
        result = None
    except ValueError as e:
        result, output = None, f"{e}\n{output}"
    return result, time.perf_counter() - start, "\n".join(output.splitlines()[-8:])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHES), default=list(BENCHES), help="benches to run"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed to each bench")
    parser.add_argument("--json", default=None, help="also write every bench's full RESULT here")
    return parser


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    results: dict[str, dict | None] = {}
    for name in args.only:
        print(f"running bench/{name}.py {' '.join(BENCHES[name])}", flush=True)
        result, seconds, tail = run_bench(name, BENCHES[name], max(args.timeout, TIMEOUTS.get(name, 0)))
        results[name] = result
        print(f"  {'done' if result is not None else 'FAILED'} in {seconds:.0f} s", flush=True)
        if result is None:
            print("  " + tail.replace("\n", "\n  "), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{os.cpu_count()} cores, load average {load:.1f} at the end; total {time.perf_counter() - started:.0f} s"
    )
    rows = [("figure", "value", "goal", "met?")]
    failed = 0
    for fig in FIGURES:
        if fig.bench not in results:
            continue
        result = results[fig.bench]
        try:
            value = fig.value(result) if result is not None else math.nan
        except KeyError:
            value = math.nan
        text = fig.fmt.format(value) if math.isfinite(value) else "error"
        met = "—" if fig.met is None else ("yes" if math.isfinite(value) and fig.met(value) else "NO")
        failed += text == "error"
        rows.append((fig.name, text, fig.goal, met))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print(
            "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
