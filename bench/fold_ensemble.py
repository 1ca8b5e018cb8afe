"""Fold ensemble vs best single trial on generated data with a labelled held-out part (issue 13's check).

    python bench/fold_ensemble.py [--series 48 --test-series 32 --size 64 --epochs 1,1,2 --folds 3 --seed 0]

Generates labelled training series and, from other seeds, labelled held-out series and reference series (all
preprocessed), trains two configurations with ray_jobs/train.py (the "trials": 10 % validation, thresholds
tuned on it), retrains both on K folds with ray_jobs/folds.py (its OOF rows aligned to the ensemble's scale on
the reference series, whose labels it never reads; the held-out series serve only the score), and scores on
the held-out series: the best trial at its validation thresholds, the fold ensemble at its OOF thresholds.
Ends with ``RESULT {json}``: ``single_test_f2``, ``ensemble_test_f2``, ``ensemble_oof_f2`` (cross-fitted),
``ensemble_test_f2_unaligned`` (thresholds tuned on the raw OOF rows of the same bag, as before the
alignment), ``single_oof_f2``, log loss before/after calibration, wall seconds.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ichmodel import ensemble as E
from ichmodel import metrics as M
from ichmodel import synth
from ichmodel.checkpoint import load_checkpoint, load_model
from ichmodel.dataset import SeriesDataset
from ichmodel.predict import predict_dataset
from ichmodel.prediction_table import prediction_arrays
from ichmodel.preprocess import PreprocessOptions, preprocess
from ichmodel.readers import read_dlcv
from ichmodel.shards import MANIFEST_NAME
from ichmodel.splits import split_series

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"a": ["--set", "train.seed=0"], "b": ["--set", "train.seed=1", "--set", "train.lr=5e-4"]}


def labelled_shards(root: Path, series: int, size: int, seed: int) -> Path:
    out = root / "shards"
    if not (out / MANIFEST_NAME).is_file():
        synth.write_dlcv_dataset(root / "raw", series, (12, 20), size, seed)
        preprocess(
            read_dlcv(root / "raw" / "train", root / "raw" / "train.csv"), out, PreprocessOptions(size=size)
        )
    return out


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc.stdout


def f2_at(frame: pd.DataFrame, thresholds) -> float:
    probs, labels = prediction_arrays(frame)
    return M.f2_score(labels, M.binarize(probs, np.asarray(thresholds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "bench_folds"))
    parser.add_argument("--series", type=int, default=48)
    parser.add_argument("--test-series", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", default="1,1,2")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--reference-series", type=int, default=32, help="unlabelled-use reference series")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out) / f"seed{args.seed}"
    train = labelled_shards(out / "train", args.series, args.size, args.seed)
    held = labelled_shards(out / "heldout", args.test_series, args.size, args.seed + 1000)
    reference = labelled_shards(out / "reference", args.reference_series, args.size, args.seed + 2000)
    rows = []
    for name, extra in CONFIGS.items():
        run(
            [
                sys.executable,
                "ray_jobs/train.py",
                "--data",
                str(train),
                "--storage",
                str(out / "trials"),
                "--name",
                f"train-{name}",
                "--epochs",
                args.epochs,
                "--num-workers",
                "1",
                *extra,
            ]
        )
        ckpt = next((out / "trials" / f"train-{name}").glob("checkpoint_*/checkpoint.pt"))
        rows.append({"trial_id": name, "model_f2": load_checkpoint(ckpt)["best_f2"], "checkpoint": str(ckpt)})
    pd.DataFrame(rows).to_csv(out / "trials" / "trials.csv", index=False)
    best = max(rows, key=lambda r: r["model_f2"])
    model, cfg, _ = load_model(best["checkpoint"])
    _, val_ids = split_series(train, cfg.data.val_fraction, cfg.data.split_seed)
    single_val = predict_dataset(model, SeriesDataset(train, val_ids))
    single_test = predict_dataset(model, SeriesDataset(held))
    single_thresholds = E.choose_thresholds(single_val)
    folds_out = out / "folds"
    stdout = run(
        [
            sys.executable,
            "ray_jobs/folds.py",
            "--experiment",
            str(out / "trials"),
            "--top-k",
            "2",
            "--folds",
            str(args.folds),
            "--out",
            str(folds_out),
            "--test",
            str(held),
            "--reference",
            str(reference),
            "--num-workers",
            "1",
        ]
    )
    print(stdout)
    summary = json.loads((folds_out / "fold_ensemble.json").read_text())
    ensemble_test = pd.read_parquet(folds_out / "test_ensemble.parquet")
    oof_single_test = pd.read_parquet(folds_out / f"test_{summary['single_best']}.parquet")
    raw_oof = E.average_predictions([pd.read_parquet(folds_out / f"oof_{t}.parquet") for t in summary["bag"]])
    unaligned_thresholds = E.tuned_f2(*reversed(prediction_arrays(raw_oof)))[1]
    result = {
        "seed": args.seed,
        "single_val_f2": float(best["model_f2"]),
        "single_test_f2": f2_at(single_test, single_thresholds),
        "fold_single_test_f2": f2_at(
            oof_single_test,
            E.tuned_f2(
                *reversed(
                    prediction_arrays(pd.read_parquet(folds_out / f"oof_{summary['single_best']}.parquet"))
                )
            )[1],
        ),
        "ensemble_test_f2": f2_at(ensemble_test, summary["thresholds"]),
        "ensemble_test_f2_unaligned": f2_at(ensemble_test, unaligned_thresholds),
        "ensemble_oof_f2": summary["ensemble_f2"]["cross_fitted"],
        "ensemble_oof_f2_tuned": summary["ensemble_f2"]["tuned"],
        "single_oof_f2": summary["single_f2"]["cross_fitted"],
        "bag": summary["bag"],
        "oof_log_loss": summary["calibration"]["oof_log_loss"],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
