"""Held-out ablation: does each part of the paper's recipe beat plain training? (issue 12)

    python bench/ablation.py                      # full size: 128 series at 128 px, budget 4+4+8, seeds 0 1 2
    python bench/ablation.py --smoke              # tiny: 12 series at 32 px, 1+0+1 epochs, one seed (about
                                                  # 10 s a variant on 2 idle cores; longer while others run)

Generated labelled series (ichmodel.synth, DLCV layout) are split by series into train / validation / test.
The test part is never used for training, model selection or thresholds: thresholds are tuned on validation
only, then applied to test. Every variant gets the same epoch budget. Variants:

- per_slice: a ResNet18 (ichmodel.model.Backbone) + a linear head on single slices, BCE: no GRU, no tasks;
- mc_only: the sequence model trained on MC alone, no strategies, one stage of the whole budget;
- mc_ac: the three stages with MC + AC only, no masking or diversity transfer;
- strategies: + masking and diversity transfer (stages 2-3);
- lp: + LP in the fine-tuning stage;  dc: + DC;  default: + CPC (the default Config);
- default_mc: the default recipe predicting with the MC head alone (the paper's output) instead of the
  default ``model.prediction = "mc+ac"``.

Prints per-seed held-out micro-F2, a markdown table (mean ± sd and per class), and last a line
``RESULT {json}`` with ``default_test_f2``, ``mc_only_test_f2``, ``per_slice_test_f2`` and ``variants``.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ichmodel import metrics as M
from ichmodel.augment import augment_series, normalize, to_float
from ichmodel.config import Config
from ichmodel.constants import CLASSES
from ichmodel.dataset import (
    SeriesDataset,
    class_prevalence,
    collate_series,
)
from ichmodel.demo_data import ensure_demo_data
from ichmodel.engine import fit
from ichmodel.metrics import fallback_thresholds
from ichmodel.model import Backbone, slice_probs

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_STRATEGIES = {"strategy.p1": 0.0, "strategy.p2": 0.0}


def variants(epochs: tuple[int, int, int]) -> dict[str, dict | None]:
    """Config overrides per variant (``None``: the per-slice baseline, built here)."""
    staged = {"train.max_epochs": list(epochs)}
    return {
        "per_slice": None,
        "mc_only": {
            "train.max_epochs": [0, 0, sum(epochs)],
            **dict.fromkeys(("loss.beta", "loss.gamma", "loss.mu", "loss.nu"), 0.0),
            **NO_STRATEGIES,
            "model.prediction": "mc",  # AC is never trained here
        },
        "mc_ac": {**staged, "loss.gamma": 0.0, "loss.mu": 0.0, "loss.nu": 0.0, **NO_STRATEGIES},
        "strategies": {**staged, "loss.gamma": 0.0, "loss.mu": 0.0, "loss.nu": 0.0},
        "lp": {**staged, "loss.mu": 0.0, "loss.nu": 0.0},
        "dc": {**staged, "loss.nu": 0.0},
        "default": staged,
        "default_mc": {**staged, "model.prediction": "mc"},  # the paper's output: the MC head alone
    }


def split_three(series_ids: list[str], test_fraction: float, val_fraction: float, seed: int) -> tuple:
    """Disjoint (train, val, test) lists of series ids; the test part depends on ``seed`` only."""
    order = np.random.default_rng(seed).permutation(sorted(series_ids)).tolist()
    n_test = max(1, round(test_fraction * len(order)))
    n_val = max(1, round(val_fraction * (len(order) - n_test)))
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def loader(dataset: SeriesDataset, batch_size: int, shuffle: bool, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_series)


@torch.no_grad()
def predict(model: nn.Module, dataset: SeriesDataset, per_slice: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels ``[N, 5]`` over the valid slices of ``dataset`` (eval mode)."""
    model.eval()
    probs, labels = [], []
    for batch in loader(dataset, 4, shuffle=False):
        images = normalize(to_float(batch["images"]))  # [B, T, C, H, W]
        valid = batch["valid"]
        if per_slice:
            probs.append(torch.sigmoid(model(images[valid]).float()).numpy())
        else:
            probs.append(slice_probs(model(images, batch["lengths"]), model.cfg.prediction)[valid].numpy())
        labels.append(batch["labels"][valid].numpy())
    return np.concatenate(probs), (np.concatenate(labels) > 0.5).astype(np.int8)


def fit_per_slice(cfg: Config, train_set: SeriesDataset, val_set: SeriesDataset) -> nn.Module:
    """ResNet18 + linear head trained with BCE on slices; keeps the epoch with the best validation F2."""
    torch.manual_seed(cfg.train.seed)
    model = nn.Sequential(Backbone(cfg.model), nn.Linear(cfg.model.feature_dim, cfg.model.num_classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    best, best_state = -1.0, None
    for epoch in range(sum(cfg.train.max_epochs)):
        model.train()
        for batch in loader(train_set, cfg.data.batch_size, shuffle=True, seed=cfg.train.seed * 1000 + epoch):
            images = normalize(augment_series(to_float(batch["images"]), cfg.augment, generator))
            valid = batch["valid"]
            loss = F.binary_cross_entropy_with_logits(model(images[valid]), batch["labels"][valid])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        probs, labels = predict(model, val_set, per_slice=True)
        f2 = M.f2_score(labels, probs >= M.search_thresholds(labels, probs, min_positives=0))
        if f2 > best:
            best, best_state = f2, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model


def held_out(model: nn.Module, sets: tuple, per_slice: bool) -> dict:
    """Thresholds from validation (training prevalence where validation has no positive), scores on test."""
    train_set, val_set, test_set = sets
    val_probs, val_labels = predict(model, val_set, per_slice)
    fallback = fallback_thresholds(class_prevalence(train_set), val_probs)
    thresholds = M.search_thresholds(val_labels, val_probs, fallback=fallback, min_positives=0)
    probs, labels = predict(model, test_set, per_slice)
    decisions = probs >= thresholds
    return {
        "val_f2": M.f2_score(val_labels, val_probs >= thresholds),
        "test_f2": M.f2_score(labels, decisions),
        "per_class": dict(zip(CLASSES, M.per_class_f2(labels, decisions).tolist(), strict=True)),
    }


def run_variant(name: str, overrides: dict | None, base: Config, seed: int, sets: tuple) -> dict:
    train_set, val_set, _ = sets
    cfg = base.with_overrides({**(overrides or {}), "train.seed": seed})
    if overrides is None:
        return held_out(fit_per_slice(cfg, train_set, val_set), sets, per_slice=True)
    model, _ = fit(cfg, train_set, val_set, torch.device("cpu"))
    return held_out(model, sets, per_slice=False)


def table(results: dict[str, list[dict]], budget: str) -> str:
    lines = [
        f"| variant | epochs | held-out micro-F2 (mean ± sd) | {' | '.join(CLASSES)} | val F2 |",
        "| --- | --- | --- |" + " --- |" * (len(CLASSES) + 1),
    ]
    for name, runs in results.items():
        f2 = [r["test_f2"] for r in runs]
        per_class = " | ".join(f"{np.mean([r['per_class'][c] for r in runs]):.3f}" for c in CLASSES)
        val = np.mean([r["val_f2"] for r in runs])
        lines.append(
            f"| {name} | {budget} | {np.mean(f2):.3f} ± {np.std(f2):.3f} | {per_class} | {val:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", default="4,4,8", help="stage epoch caps; every variant gets their sum")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patients", type=int, default=128, help="labelled series generated")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every sequence variant, e.g. train.select_metric=f2 train.warmup_epochs=0",
    )
    parser.add_argument("--smoke", action="store_true", help="12 series at 32 px, 1+0+1 epochs, seed 0")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.seeds, args.patients, args.size = "1,0,1", [0], 12, 32
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ichmodel.metrics").setLevel(logging.ERROR)  # scarce-class warnings at every epoch
    epochs = tuple(int(e) for e in args.epochs.split(","))
    shards, _ = ensure_demo_data(
        REPO_ROOT / "runs" / f"ablation_{args.patients}_{args.size}", args.patients, 2, args.size
    )
    all_ids = SeriesDataset(shards).series_ids
    train_ids, val_ids, test_ids = split_three(list(all_ids), args.test_fraction, 0.2, seed=0)
    print(
        f"series: {len(train_ids)} train, {len(val_ids)} validation, {len(test_ids)} held-out test",
        flush=True,
    )
    extra = dict(item.split("=", 1) for item in args.set)
    base = Config().with_overrides({"data.shards": str(shards), "train.max_epochs": list(epochs), **extra})
    results: dict[str, list[dict]] = {}
    for name, overrides in variants(epochs).items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            sets = (
                SeriesDataset(shards, train_ids, seed=seed),
                SeriesDataset(shards, val_ids),
                SeriesDataset(shards, test_ids),
            )
            started = time.perf_counter()
            result = run_variant(name, overrides, base, seed, sets)
            results.setdefault(name, []).append(result)
            print(
                f"{name:11s} seed {seed}: held-out micro-F2 {result['test_f2']:.4f} "
                f"(val {result['val_f2']:.4f}, {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    print("\n" + table(results, "+".join(map(str, epochs))) + "\n")
    means = {name: float(np.mean([r["test_f2"] for r in runs])) for name, runs in results.items()}
    summary = {
        "default_test_f2": means.get("default"),
        "mc_only_test_f2": means.get("mc_only"),
        "per_slice_test_f2": means.get("per_slice"),
        "variants": means,
        "sd": {name: float(np.std([r["test_f2"] for r in runs])) for name, runs in results.items()},
        "per_class": {
            name: {c: float(np.mean([r["per_class"][c] for r in runs])) for c in CLASSES}
            for name, runs in results.items()
        },
        "epochs": list(epochs),
        "seeds": args.seeds,
        "series": {"train": len(train_ids), "val": len(val_ids), "test": len(test_ids)},
    }
    print("RESULT " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
