"""What shared stages save: the same search run without and with them (issue 15).

    python bench/search_cost.py            # full size: 48 series at 64 px, epochs 2,2,4, 8 trials (about
                                           # 15-25 min on 2 cores)
    python bench/search_cost.py --smoke    # CI: 12 series at 32 px, epochs 1,1,1, 4 trials (under 10 min)

Both searches are ``ray_jobs/tune.py`` on the same generated data (``ichmodel.demo_data``), with the default
space, the same Optuna seed (TPE samples its first 10 trials at random, so both train the same configs),
ASHA and the same concurrency: once with ``--share-stages off``, once with ``--share-stages auto`` (the two
pretraining stages trained once; γ±, soft F2, p1, p2 and ε then act from fine-tuning on).
Each runs as its own subprocess with its own local Ray.

Trial-epochs: the epochs actually trained, summed over trials, a shared stage counted once (its epochs plus
each trial's epochs after it). Wall time: the whole search, Ray start included. Best F2: the best trial's
``model_f2`` (validation micro-F2 of its exported weights). Last line ``RESULT {json}`` with
``trial_epochs_ratio`` (shared / plain), ``best_f2_plain``, ``best_f2_shared`` and the raw figures.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from ichmodel.demo_data import ensure_demo_data

REPO_ROOT = Path(__file__).resolve().parent.parent
#: (series, px, epoch caps, trials) of the full run and of --smoke.
SIZES = {"full": (48, 64, "2,2,4", 8), "smoke": (12, 32, "1,1,1", 4)}


def trial_epochs(experiment: Path) -> tuple[int, int]:
    """``(trial-epochs, shared epochs)`` of a finished search: every trial's epochs after the shared stages,
    plus the shared stages' epochs once."""
    table = pd.read_csv(experiment / "trials.csv")
    record = json.loads((experiment / "shared_stages.json").read_text())
    shared = int(record.get("epochs", 0))
    return int((table["epochs"] - table["shared_epochs"]).sum()) + shared, shared


def run_search(shards: Path, storage: Path, name: str, share: str, args: argparse.Namespace) -> dict:
    """One ``ray_jobs/tune.py`` search as a subprocess; its figures from ``trials.csv``."""
    _, _, epochs, trials = SIZES["smoke" if args.smoke else "full"]
    command = [sys.executable, "ray_jobs/tune.py", "--data", str(shards), "--storage", str(storage),
               "--name", name, "--num-samples", str(args.trials or trials), "--seed", str(args.seed),
               "--epochs", args.epochs or epochs, "--max-concurrent", str(args.max_concurrent),
               "--share-stages", share, "--set", "data.val_fraction=0.25"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    table = pd.read_csv(storage / name / "trials.csv")
    epochs_trained, shared = trial_epochs(storage / name)
    return {
        "trial_epochs": epochs_trained,
        "shared_epochs": shared,
        "wall_s": round(wall, 1),
        "best_f2": float(table["model_f2"].max()),
        "trials": len(table),
        "epochs_per_trial": table["epochs"].tolist(),
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the CI size")
    parser.add_argument("--trials", type=int, default=None, help="trials per search (default 8; smoke 4)")
    parser.add_argument("--epochs", default=None, help="stage caps (default 2,2,4; smoke 1,1,1)")
    parser.add_argument("--seed", type=int, default=0, help="Optuna seed of both searches")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once in both searches")
    parser.add_argument("--out", default=None, help="keep data and experiments here (default: a temp dir)")
    return parser


def main(args: argparse.Namespace) -> int:
    series, size, _, _ = SIZES["smoke" if args.smoke else "full"]
    with tempfile.TemporaryDirectory(prefix="search-cost-") as tmp:
        root = Path(args.out or tmp)
        shards, _ = ensure_demo_data(root / "data", patients=series, test_patients=1, size=size)
        results = {}
        for name, share in (("plain", "off"), ("shared", "auto")):
            print(f"search {name} (--share-stages {share}) ...", flush=True)
            results[name] = run_search(shards, root / "runs", name, share, args)
            print(f"  {results[name]}", flush=True)
    plain, shared = results["plain"], results["shared"]
    ratio = shared["trial_epochs"] / max(plain["trial_epochs"], 1)
    print(f"\n{series} series at {size} px, {plain['trials']} trials each, {os.cpu_count()} cores")
    print("| search | trial-epochs | wall time (s) | best validation F2 |")
    print("| --- | --- | --- | --- |")
    for name in ("plain", "shared"):
        r = results[name]
        print(f"| {name} | {r['trial_epochs']} | {r['wall_s']:.0f} | {r['best_f2']:.4f} |")
    result = {
        "trial_epochs_ratio": round(ratio, 4),
        "best_f2_plain": plain["best_f2"],
        "best_f2_shared": shared["best_f2"],
        "wall_ratio": round(shared["wall_s"] / plain["wall_s"], 4),
        "plain": plain,
        "shared": shared,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
