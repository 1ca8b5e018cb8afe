"""Why does end-to-end series training leave classes flat? Per-class held-out AUC per epoch (issue 27).

    python bench/flat_classes.py --setting hard --patients 64 --size 64 --epochs 1,1,2
    python bench/flat_classes.py --only default bce two_stage   # a few candidates

Runs the project's default recipe (``ichmodel.engine.fit``) with one change at a time, and the two-stage
baseline (bench/two_stage.py), on one generated data world split by series into train / validation / test.
After every backbone epoch it predicts the held-out part and records each class's AUC; at the end it scores
held-out micro-F2 with thresholds from validation and, to price the threshold source, with thresholds tuned
on the test part itself (an upper bound no real run gets). Candidates (each one change to the default):

- default: the default Config;
- steps: ``data.batch_size=2`` (about 32 slices a step: twice the optimizer steps per epoch);
- bce: ASL off (``gamma_pos = gamma_neg = clip = 0``: plain BCE for MC, AC and DC);
- asl_pos0: ``gamma_pos=0`` only (no down-weighting of the positives the model already finds);
- lr: ``train.lr=3e-4`` (the backbone and every head at a third of the rate);
- no_aug: ``augment.enabled=false``;
- two_stage: per-slice ResNet18 + BCE on shuffled 32-slice batches, then a bi-GRU on frozen features;
- slice_series_batches: two_stage's stage 1 with batches of 64 slices taken from consecutive series (the
  batch composition of a 4-series batch: BatchNorm over slices of few series), against slice_shuffled64 (64
  shuffled slices, same steps): the BatchNorm / batch-composition question alone.

Appends one JSON line per candidate to ``--out`` and prints a table and ``RESULT {json}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import logging
import math
import time

import torch

from bench.ablation import predict, score_held_out, split_three
from bench.two_stage import Series, class_auc, fit_slice_cnn, fit_two_stage, slice_outputs
from ichmodel import metrics as M
from ichmodel.config import Config
from ichmodel.constants import CLASSES
from ichmodel.dataset import SeriesDataset, class_prevalence
from ichmodel.demo_data import ensure_demo_data
from ichmodel.engine import fit
from ichmodel.model import build_model
from ichmodel.synth import PRESETS

REPO_ROOT = Path(__file__).resolve().parent.parent

CANDIDATES: dict[str, dict] = {
    "default": {},
    "steps": {"data.batch_size": 2},
    "bce": {"loss.gamma_pos": 0.0, "loss.gamma_neg": 0.0, "loss.clip": 0.0},
    "asl_pos0": {"loss.gamma_pos": 0.0},
    "lr": {"train.lr": 3e-4},
    "no_aug": {"augment.enabled": False},
}
SLICE_RUNS = ("two_stage", "slice_series_batches", "slice_shuffled64")


def asl_resting_probability(prevalence: float, gamma_pos: float, gamma_neg: float, clip: float) -> float:
    """The probability at which ``ichmodel.losses.asymmetric_loss`` rests for a class the features do not
    separate yet: the one logit minimising ``π·ASL(x, 1) + (1 − π)·ASL(x, 0)``. BCE rests at π itself."""
    from ichmodel.losses import asymmetric_loss

    x = torch.linspace(-9.0, 9.0, 1801)[:, None]  # [G, 1] candidate logits
    per_logit = [
        prevalence * asymmetric_loss(x[i : i + 1], torch.ones(1, 1), gamma_pos, gamma_neg, clip)
        + (1 - prevalence) * asymmetric_loss(x[i : i + 1], torch.zeros(1, 1), gamma_pos, gamma_neg, clip)
        for i in range(len(x))
    ]
    return float(torch.sigmoid(x[int(torch.stack(per_logit).argmin())]))


def _finite(values: dict[str, float]) -> list[float]:
    return [v for v in values.values() if math.isfinite(v)]


def run_fit(cfg: Config, sets: tuple) -> tuple[dict, list[dict]]:
    """The engine's fit with a held-out AUC record after every epoch; the final held-out scores."""
    train_set, val_set, test_set = sets
    curve: list[dict] = []

    def on_epoch_end(metrics: dict, make_checkpoint) -> None:
        net = build_model(cfg.model)
        net.load_state_dict(make_checkpoint()["model"])
        probs, labels = predict(net, test_set, per_slice=False)
        curve.append({"epoch": int(metrics["global_epoch"]), "auc": class_auc(labels, probs)})

    model, _ = fit(cfg, train_set, val_set, torch.device("cpu"), on_epoch_end=on_epoch_end)
    val, test = predict(model, val_set, per_slice=False), predict(model, test_set, per_slice=False)
    return _scores(class_prevalence(train_set), val, test), curve


def _scores(prevalence, val: tuple, test: tuple) -> dict:
    result = score_held_out(prevalence, *val, *test)
    probs, labels = test
    result["oracle_test_f2"] = M.f2_score(
        labels, probs >= M.search_thresholds(labels, probs, min_positives=0)
    )
    # how flat: mean probability of positive and negative test slices per class
    result["mean_prob"] = {
        c: [
            float(probs[labels[:, i] == 1, i].mean()) if labels[:, i].any() else None,
            float(probs[labels[:, i] == 0, i].mean()),
        ]
        for i, c in enumerate(CLASSES)
    }
    return result


def run_slices(name: str, cfg: Config, sets: tuple, backbone_epochs: int) -> list[tuple[str, dict, list]]:
    """two_stage (and its stage 1, slice_cnn), or a stage-1 run with 64-slice batches of either kind."""
    train_set, val_set, test_set = sets
    test = Series.load(test_set)
    curve: list[dict] = []

    def on_epoch(epoch: int, model) -> None:
        curve.append(
            {"epoch": epoch + 1, "auc": class_auc(test.labels.numpy(), slice_outputs(model, test)[0])}
        )

    prevalence = class_prevalence(train_set)
    if name == "two_stage":
        runs = fit_two_stage(cfg, sets, backbone_epochs, 30, 32, on_epoch=on_epoch)
        return [
            (
                key,
                _scores(prevalence, (o["val_probs"], o["val_labels"]), (o["test_probs"], o["test_labels"])),
                curve,
            )
            for key, o in (("two_stage", runs["two_stage"]), ("slice_cnn", runs["slice_cnn"]))
        ]
    train, val = Series.load(train_set), Series.load(val_set)
    model = fit_slice_cnn(
        cfg, train, val, backbone_epochs, 64, shuffle_slices=name == "slice_shuffled64", on_epoch=on_epoch
    )
    val_out = (slice_outputs(model, val)[0], val.labels.numpy())
    test_out = (slice_outputs(model, test)[0], test.labels.numpy())
    return [(name, _scores(prevalence, val_out, test_out), curve)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(PRESETS), default="hard")
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", default="1,1,2", help="stage epoch caps; slice runs get their sum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--only", nargs="+", default=None, help="candidates to run (default: all)")
    parser.add_argument("--out", default=None, help="JSON lines file to append each candidate's record to")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ichmodel.metrics").setLevel(logging.ERROR)
    logging.getLogger("ichmodel.engine").setLevel(logging.ERROR)
    epochs = tuple(int(e) for e in args.epochs.split(","))
    folder = REPO_ROOT / "runs" / f"flat_{args.setting}_{args.patients}_{args.size}"
    shards, _ = ensure_demo_data(folder, args.patients, 2, args.size, 0, PRESETS[args.setting])
    ids = SeriesDataset(shards).series_ids
    train_ids, val_ids, test_ids = split_three(list(ids), args.test_fraction, 0.2, seed=0)
    print(
        f"{args.setting}: {len(train_ids)} train, {len(val_ids)} val, {len(test_ids)} test series", flush=True
    )
    sets = (
        SeriesDataset(shards, train_ids, seed=args.seed),
        SeriesDataset(shards, val_ids),
        SeriesDataset(shards, test_ids),
    )
    base = Config().with_overrides(
        {"data.shards": str(shards), "train.max_epochs": list(epochs), "train.seed": args.seed}
    )
    names = args.only or [*CANDIDATES, *SLICE_RUNS]
    records = []
    for name in names:
        started = time.perf_counter()
        if name in CANDIDATES:
            result, curve = run_fit(base.with_overrides(CANDIDATES[name]), sets)
            outcomes = [(name, result, curve)]
        else:
            outcomes = run_slices(name, base, sets, sum(epochs))
        for key, result, curve in outcomes:
            record = {
                "candidate": key,
                "setting": args.setting,
                "patients": args.patients,
                "size": args.size,
                "epochs": list(epochs),
                "seconds": round(time.perf_counter() - started),
                **result,
                "auc_per_epoch": curve,
            }
            records.append(record)
            print(
                f"{key:22s} held-out micro-F2 {result['test_f2']:.3f} (oracle thresholds "
                f"{result['oracle_test_f2']:.3f}); AUC "
                + " ".join(f"{c} {result['auc'][c]:.2f}" for c in CLASSES)
                + f"; per epoch min AUC {[round(min(_finite(e['auc']), default=float('nan')), 2) for e in curve]}"
                f" ({record['seconds']} s)",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    print(
        "RESULT " + json.dumps({r["candidate"]: {"test_f2": r["test_f2"], "auc": r["auc"]} for r in records})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
