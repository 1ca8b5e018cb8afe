"""Staged multitask training vs MC-only training with the same epoch budget, on generated data.

    python bench/ablation.py                     # 64 px demo data, budget 2+2+4 epochs, seeds 0 and 1
    python bench/ablation.py --epochs 3,3,6 --seeds 0 1 2 --patients 64

Variants (each trained with ichmodel.engine.fit, no Ray, CPU):
- full: the paper's plan: pretrain (MC+AC), pretrain + masking/DT, fine-tune with all five tasks;
- mc_only: the same total number of epochs of MC alone, no strategies (what a plain baseline would do);
- no_strategies: the staged plan without masking and diversity transfer (p1 = p2 = 0).
Prints validation micro-F2 (thresholds tuned on validation, as the leaderboard workflow does) per seed and
the mean, plus a markdown table for the README.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ichmodel.config import Config  # noqa: E402
from ichmodel.dataset import SeriesDataset, split_series  # noqa: E402
from ichmodel.engine import fit  # noqa: E402
from ray_jobs.common import REPO_ROOT, ensure_demo_data  # noqa: E402


def variants(epochs: tuple[int, int, int]) -> dict[str, dict]:
    total = sum(epochs)
    return {
        "full": {"train.max_epochs": list(epochs)},
        "no_strategies": {"train.max_epochs": list(epochs), "strategy.p1": 0.0, "strategy.p2": 0.0},
        "mc_only": {
            "train.max_epochs": [0, 0, total],
            "loss.beta": 0.0,
            "loss.gamma": 0.0,
            "loss.mu": 0.0,
            "loss.nu": 0.0,
            "strategy.p1": 0.0,
            "strategy.p2": 0.0,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", default="2,2,4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--patients", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    epochs = tuple(int(e) for e in args.epochs.split(","))
    shards, _ = ensure_demo_data(
        REPO_ROOT / "runs" / f"ablation_{args.patients}_{args.size}", args.patients, 2, args.size
    )
    base = Config().with_overrides({"data.shards": str(shards), "data.val_fraction": 0.25})
    train_ids, val_ids = split_series(shards, 0.25, 0)
    results: dict[str, list[float]] = {}
    for name, overrides in variants(epochs).items():
        for seed in args.seeds:
            cfg = base.with_overrides({**overrides, "train.seed": seed})
            started = time.perf_counter()
            _, state = fit(
                cfg,
                SeriesDataset(shards, train_ids, seed=seed),
                SeriesDataset(shards, val_ids),
                torch.device("cpu"),
            )
            results.setdefault(name, []).append(state.best_f2)
            print(
                f"{name:14s} seed {seed}: val micro-F2 {state.best_f2:.4f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    print(f"\n| variant | epochs | val micro-F2 (mean over seeds {args.seeds}) | per seed |")
    print("| --- | --- | --- | --- |")
    for name, scores in results.items():
        budget = f"{sum(epochs)}" if name == "mc_only" else "+".join(map(str, epochs))
        print(f"| {name} | {budget} | {np.mean(scores):.4f} | {', '.join(f'{s:.4f}' for s in scores)} |")
    print("RESULT " + json.dumps({k: float(np.mean(v)) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
