"""Retrain a search's best configurations on K folds (one Ray Train run each) and collect OOF predictions.

Examples (from the repository root):

    python ray_jobs/folds.py --experiment runs/search --top-k 2 --folds 5 --out runs/folds
    python ray_jobs/folds.py --experiment runs/search --folds 3 --out runs/folds --num-workers 1 --epochs 2,2,4
    python ray_jobs/folds.py --experiment runs/search --folds 5 --out runs/folds --use-gpu --tta flip

Reads EXPERIMENT/trials.csv (ray_jobs/tune.py), takes the --top-k best usable trials and each one's saved
config (inside its checkpoint), splits the training shards' series into --folds folds (stratified by positive
series; a patient's series in one fold where the DICOM files name patients, e.g. RSNA: ichmodel/folds.py) and trains every (config, fold) pair
as its own Ray Train run on the other folds. The run's validation split (its epoch choice and learning-rate
steps) is an inner part of those folds (data.val_fraction of them, folds.json's inner_val), so the held-out
fold is used only for the out-of-fold prediction. Runs go
as many at once as the cluster's CPUs (GPUs with --use-gpu) hold for --num-workers workers each. Each run
has a stable name, fold-<trial>-<i>of<K>, under --storage: a rerun (after a kill) resumes an unfinished run
from its last checkpoint and skips a finished one (its Train record says so), as ray_jobs/train.py does.

Then each fold model predicts its held-out series (out-of-fold, OOF) and the test shards (--test, default the
training shards' sibling test/). An OOF row comes from one fold's models, a test row from the mean of all
folds' models, which spreads less, and briefly trained fold models differ in scale besides: thresholds tuned
on raw OOF rows fit neither. So each fold's OOF rows are first put on the ensemble's scale (per class, the
logit mean and spread that fold's models and the whole ensemble have on --reference series: by default the
test series, whose labels are never read; `--reference none` turns this off; ichmodel.ensemble.FoldAlignment).
Members are chosen on OOF micro-F2 (every configuration, or Caruana-style greedy selection when its
cross-fitted OOF F2 is higher), thresholds are tuned on the ensemble's aligned OOF probabilities, and a
per-class calibration (platt or isotonic, whichever lowers the cross-fitted OOF RSNA weighted log loss) is
fitted for the RSNA probability file. ray_jobs/ensemble.py --folds K runs this job.

Writes into --out: folds.json, runs.csv (one row per run: trial, fold, retrained or not, checkpoint),
oof_<trial>.parquet (every labelled series once, with its fold), test_<trial>.parquet (mean over the trial's
folds), oof_ensemble.parquet (aligned), test_ensemble.parquet, test_calibrated.parquet, fold_ensemble.json
(members, thresholds, OOF F2 tuned and cross-fitted, bootstrap intervals over series, alignment,
calibration), ray_jobs/ensemble.py's submission files (val_* = the OOF predictions), ensemble.json (every fold model of the chosen members) and
report/index.html. Prints single best vs ensemble OOF micro-F2 with intervals. Predictions of a run are kept
in --out/predictions and reused while the run is not retrained. A finished run is reused whatever the
options of the rerun: use a new --out (or --storage) after changing --set/--epochs. Run as
ray_jobs/ensemble.py --folds K, the job records its arguments in the output folder and --resume with only
--name/--storage (or --out) continues it as recorded.
"""

from __future__ import annotations

if not __package__:  # run as a script: this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ichmodel import calibration as C
from ichmodel import ensemble as E
from ichmodel import folds as F
from ichmodel import submission as S
from ichmodel.checkpoint import load_checkpoint
from ichmodel.config import Config
from ichmodel.io import atomic_write, atomic_write_text
from ichmodel.predict import PROB_COLUMNS, prediction_arrays
from ichmodel.report import ModelScore, make_report
from ichmodel.shards import load_manifest
from ray_jobs import storage
from ray_jobs.cli import init_ray, parse_overrides, setup_logging
from ray_jobs.worker import CHECKPOINT_FILE, build_trainer, finished_run_report, predict_fn

logger = logging.getLogger("ray_jobs.folds")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Retrain the best configurations of a search on K folds; out-of-fold and test predictions.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiment", required=True, help="folder of a search (holds trials.csv)")
    parser.add_argument("--top-k", type=int, default=1, help="configurations to retrain (default 1)")
    parser.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    parser.add_argument("--fold-seed", type=int, default=0, help="seed of the fold split (default 0)")
    parser.add_argument("--out", required=True, help="folder for the predictions and tables")
    parser.add_argument("--storage", default=None, help="where the Train runs live (default OUT/runs)")
    parser.add_argument("--data", default=None, help="training shards (default: those of the configs)")
    parser.add_argument(
        "--test", default=None, help="test shards (default: sibling test/ of the training shards)"
    )
    parser.add_argument(
        "--reference",
        default="test",
        metavar="SHARDS|test|none",
        help="unlabelled series on which each fold's models and the whole ensemble are compared, to put the "
        "OOF rows on the ensemble's scale before thresholds are tuned (default: the test shards; their labels "
        "are never read); none: tune on the raw OOF rows",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field of every configuration (repeatable)",
    )
    parser.add_argument(
        "--epochs", default=None, metavar="E1,E2,E3", help="epoch caps of every configuration"
    )
    parser.add_argument("--num-workers", type=int, default=1, help="DDP workers per run (default 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker and per prediction task")
    parser.add_argument(
        "--tta",
        action="append",
        default=[],
        choices=["flip", "reverse"],
        help="test-time augmentation of the predictions (repeatable; checked against "
        "each model's training augmentation)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="series per forward pass (default 4)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def args_from_ensemble(args: argparse.Namespace, out: str | None = None) -> argparse.Namespace:
    """This job's arguments for ``ray_jobs/ensemble.py --folds K`` writing into ``out`` (default its --out);
    its other options keep their defaults."""
    argv = ["--experiment", args.experiment, "--top-k", str(args.top_k), "--folds", str(args.folds)]
    argv += ["--out", out or args.out, "--batch-size", str(args.batch_size)]
    argv += ["--test", args.test] if args.test else []
    argv += ["--reference", args.reference] if getattr(args, "reference", None) else []
    argv += ["--tta", "flip"] if args.tta else []
    argv += ["--use-gpu"] if args.gpus_per_model > 0 else []
    return get_args_parser().parse_args(argv + (["-v"] if args.verbose else []))


def fold_run_name(trial_id: str, fold: int, k: int) -> str:
    """The stable Train run name of one (configuration, fold): the same name resumes or skips the run."""
    return f"fold-{E.check_file_name(trial_id, 'trial id')}-{fold}of{k}"


def trial_configs(experiment: str | Path, top_k: int, overrides: dict) -> list[tuple[str, Config]]:
    """``[(trial_id, config)]`` of the ``top_k`` best usable trials: each checkpoint's saved config with
    ``overrides`` applied (the split is replaced by the folds, so ``data.val_fraction`` is not used)."""
    chosen = E.select_trials(Path(experiment) / "trials.csv", top_k)
    return [
        (str(t), Config.from_dict(load_checkpoint(c)["config"]).with_overrides(overrides))
        for t, c in zip(chosen["trial_id"], chosen["checkpoint"], strict=True)
    ]


def train_fold_fn(loop_config: dict, name: str, storage_path: str, num_workers: int, use_gpu: bool) -> dict:
    """Ray task body: run (or resume, or skip when finished) one fold's Train run; its checkpoint path."""
    setup_logging()
    report = finished_run_report(f"{storage_path}/{name}")
    if report is not None:
        return {
            "name": name,
            "retrained": False,
            "checkpoint": f"{report['checkpoint_path']}/{CHECKPOINT_FILE}",
        }
    trainer = build_trainer(
        loop_config, name=name, storage_path=storage_path, num_workers=num_workers, use_gpu=use_gpu
    )
    result = trainer.fit()
    if result.error or result.checkpoint is None:
        raise RuntimeError(f"Train run {name} failed: {result.error or 'no checkpoint'}")
    return {"name": name, "retrained": True, "checkpoint": f"{result.checkpoint.path}/{CHECKPOINT_FILE}"}


@dataclass
class FoldRuns:
    """What :func:`run_folds` returns: per trial its OOF table and mean test table; one record per run;
    per trial and fold the fold model's probabilities ``[R, 5]`` on the reference series (empty: none)."""

    oof: dict[str, pd.DataFrame] = field(default_factory=dict)
    test: dict[str, pd.DataFrame] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    reference: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    reference_name: str | None = None


def _at_once(ray, num_workers: int, use_gpu: bool) -> int:
    """How many runs of ``num_workers`` workers the cluster holds at once (at least 1)."""
    total = ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1.0)
    return max(1, int(total // max(num_workers, 1)))


def train_all(ray, jobs: list[dict], storage_path: str, num_workers: int, use_gpu: bool) -> list[dict]:
    """Run the Train runs of ``jobs`` (``name``, ``loop_config``), as many at once as the cluster holds."""
    task = ray.remote(num_cpus=0)(train_fold_fn)  # the run's driver; its workers hold the CPUs/GPUs
    limit, pending, results = _at_once(ray, num_workers, use_gpu), list(jobs), {}
    running: dict = {}
    logger.info("%d fold runs, up to %d at once", len(jobs), limit)
    while pending or running:
        while pending and len(running) < limit:
            job = pending.pop(0)
            ref = task.remote(job["loop_config"], job["name"], storage_path, num_workers, use_gpu)
            running[ref] = job["name"]
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            record = ray.get(ref)
            results[running.pop(ref)] = record
            logger.info("%s: %s", record["name"], "trained" if record["retrained"] else "finished before")
    return [results[j["name"]] for j in jobs]


def predict_all(
    ray, runs: list[dict], test_shards: str, out: Path, args: argparse.Namespace, reference: str | None = None
) -> list[list]:
    """Each run's ``[held-out table, test table(, reference table)]``, from ``out/predictions`` when the run
    was not retrained and every table is there."""
    cache = out / "predictions"
    task = ray.remote(num_cpus=1, num_gpus=1 if args.use_gpu else 0)(predict_fn)
    # the reference's file names carry its path: a rerun with another --reference predicts it anew
    parts = (
        ("oof", "test", f"reference-{hashlib.sha1(reference.encode()).hexdigest()[:8]}")
        if reference
        else ("oof", "test")
    )
    refs = {}
    for run in runs:
        files = [cache / f"{run['name']}-{part}.parquet" for part in parts]
        if not run["retrained"] and all(f.is_file() for f in files):
            run["tables"] = [pd.read_parquet(f) for f in files]
        else:
            shard_dirs = [run["shards"], test_shards, *([reference] if reference else [])]
            ids = [run["val"], None, *([None] if reference else [])]
            refs[run["name"]] = task.remote(
                run["checkpoint"], shard_dirs, ids, args.tta, args.batch_size, args.use_gpu
            )
    for run in runs:
        if run["name"] in refs:
            run["tables"] = ray.get(refs[run["name"]])
            cache.mkdir(parents=True, exist_ok=True)
            for table, part in zip(run["tables"], parts, strict=True):
                atomic_write(cache / f"{run['name']}-{part}.parquet", partial(table.to_parquet, index=False))
    return [run["tables"] for run in runs]


def reference_shards(args: argparse.Namespace, test_shards: str) -> tuple[str | None, str | None]:
    """``(shards to predict besides the test shards or None, what the reference is)`` for ``--reference``:
    ``"test"`` reuses the test predictions, ``"none"`` turns the alignment off (``(None, None)``)."""
    choice = str(args.reference or "test")
    if choice.lower() == "none":
        return None, None
    if choice.lower() == "test" or storage.absolute(choice) == storage.absolute(test_shards):
        return None, test_shards
    load_manifest(storage.absolute(choice))  # FileNotFoundError naming it when absent
    return storage.absolute(choice), storage.absolute(choice)


def run_folds(ray, configs: list[tuple[str, Config]], args: argparse.Namespace, out: Path) -> FoldRuns:
    """Folds of the configs' training shards, one Train run per (config, fold), OOF and test tables."""
    shards = configs[0][1].data.shards
    if any(c.data.shards != shards for _, c in configs):
        raise ValueError(
            f"The configurations use different training shards: {sorted({c.data.shards for _, c in configs})}"
        )
    test_shards = args.test or storage.join(storage.parent(shards), "test")
    load_manifest(test_shards)  # FileNotFoundError naming it when absent
    # Each fold run trains on the other folds less an inner validation part, which picks its epoch and its
    # learning-rate steps: the held-out fold is only predicted (out of fold), never looked at in training.
    folds, inner, patients = F.shard_fold_runs(
        shards, args.folds, args.fold_seed, configs[0][1].data.val_fraction
    )
    record = {
        "seed": args.fold_seed,
        "split_by": "series" if patients is None else "patient",
        "patients": patients,
        "folds": folds,
        "inner_val": [select for _, select in inner],
    }
    atomic_write_text(out / "folds.json", json.dumps(record, indent=1))
    jobs = []
    for trial_id, cfg in configs:
        for i, (fit_ids, select_ids) in enumerate(inner):
            val_ids = folds[i]  # the held-out fold (sorted, as fold_split gives it)
            split = {"train": fit_ids, "val": select_ids}
            jobs.append(
                {
                    "name": fold_run_name(trial_id, i, args.folds),
                    "trial_id": trial_id,
                    "fold": i,
                    "shards": shards,
                    "test_shards": test_shards,
                    "val": val_ids,
                    "loop_config": {"config": cfg.to_dict(), "overrides": {}, "split": split},
                }
            )
    extra, reference = reference_shards(args, test_shards)
    storage_path = storage.absolute(args.storage or out / "runs")
    records = train_all(ray, jobs, storage_path, args.num_workers, args.use_gpu)
    runs = [
        {**{k: v for k, v in j.items() if k != "loop_config"}, **r}
        for j, r in zip(jobs, records, strict=True)
    ]
    tables = predict_all(ray, runs, test_shards, out, args, extra)
    result = FoldRuns(runs=runs, reference_name=reference)
    for trial_id, _ in configs:
        mine = [(run, t) for run, t in zip(runs, tables, strict=True) if run["trial_id"] == trial_id]
        result.oof[trial_id] = F.assemble_oof([t[0] for _, t in mine], folds)
        result.test[trial_id] = E.average_predictions([t[1] for _, t in mine])
        if reference:
            result.reference[trial_id] = {
                run["fold"]: _sorted_probs(t[-1]) for run, t in mine
            }  # the test table (t[1]) when the reference is the test set
    return result


def _sorted_probs(table: pd.DataFrame) -> np.ndarray:
    return prediction_arrays(table.sort_values(["series_id", "position"], kind="stable"))[0]


def write_results(result: FoldRuns, out: Path) -> None:
    """``runs.csv``, ``oof_<trial>.parquet`` and ``test_<trial>.parquet`` into ``out``."""
    table = pd.DataFrame(
        [{k: r[k] for k in ("name", "trial_id", "fold", "retrained", "checkpoint")} for r in result.runs]
    )
    table.to_csv(out / "runs.csv", index=False)
    for trial_id in result.oof:
        result.oof[trial_id].to_parquet(out / f"oof_{trial_id}.parquet", index=False)
        result.test[trial_id].to_parquet(out / f"test_{trial_id}.parquet", index=False)


def calibrate(oof: pd.DataFrame, test: pd.DataFrame, out: Path) -> tuple[dict, pd.DataFrame | None]:
    """Fit per-class calibration on the ensemble's OOF probabilities; ``(summary, calibrated test or None)``.

    The method (platt or isotonic) with the lower *cross-fitted* OOF weighted log loss is fitted on every OOF
    row and applied to the test probabilities; none when neither lowers the loss.
    """
    probs, labels = prediction_arrays(oof)
    losses = C.calibration_summary(labels, probs, oof["fold"].to_numpy(), ("platt", "isotonic"))
    method = min(("platt", "isotonic"), key=losses.__getitem__)
    summary = {"oof_log_loss": losses, "method": None, "after": "cross-fitted over the folds"}
    if losses[method] >= losses["before"]:
        return summary, None
    calibrator = C.fit_calibrator(labels, probs, method)
    summary.update(method=method, calibrator=calibrator.to_dict())
    calibrated = test.copy()
    calibrated[list(PROB_COLUMNS)] = calibrator.apply(prediction_arrays(test)[0]).astype("float32")
    calibrated.to_parquet(out / "test_calibrated.parquet", index=False)
    return summary, calibrated


def summarize(result: FoldRuns, out: Path, n_boot: int = 1000) -> dict:
    """Member choice, OOF thresholds, bootstrap and calibration of the fold ensemble; writes
    ``oof_ensemble.parquet`` (the bag's OOF probabilities, aligned to the ensemble's scale when there is a
    reference), ``test_ensemble.parquet`` and ``fold_ensemble.json``; returns the summary."""
    choice, probs = E.choose_fold_ensemble(result.oof, n_boot=n_boot, reference=result.reference or None)
    oof = E.average_predictions([result.oof[t] for t in choice.bag])
    oof[list(PROB_COLUMNS)] = probs.astype(np.float32)  # same row order: both sorted by series, position
    oof["fold"] = (
        result.oof[choice.bag[0]].sort_values(["series_id", "position"], kind="stable")["fold"].to_numpy()
    )
    if choice.alignment is not None:
        choice.alignment["reference"] = result.reference_name
    test = E.average_predictions([result.test[t] for t in choice.bag])
    oof.to_parquet(out / "oof_ensemble.parquet", index=False)
    test.to_parquet(out / "test_ensemble.parquet", index=False)
    calibration, _ = calibrate(oof, test, out)
    summary = {**asdict(choice), "calibration": calibration}
    atomic_write_text(out / "fold_ensemble.json", json.dumps(summary, indent=1))
    return summary


def print_summary(summary: dict) -> None:
    """The figures a user reads first: single best vs ensemble OOF micro-F2, interval, calibration."""
    boot = summary["bootstrap"]
    print(f"{'OOF micro-F2':<34}{'tuned':>9}{'cross-fitted':>14}{'95% interval (series)':>26}")
    for key, name in (("single", f"single best ({summary['single_best']})"), ("ensemble", "ensemble")):
        f2 = summary[f"{key}_f2"]
        print(
            f"{name:<34}{f2['tuned']:>9.4f}{f2['cross_fitted']:>14.4f}"
            f"{boot[key]['low']:>15.4f} - {boot[key]['high']:.4f}"
        )
    diff = boot["ensemble - single"]
    print(f"ensemble - single: {diff['f2']:+.4f} (95% interval {diff['low']:+.4f} .. {diff['high']:+.4f})")
    print(
        f"members: {summary['method']} bag {summary['bag']} (top-k {summary['top_k_f2']['cross_fitted']:.4f}, "
        f"greedy {summary['greedy_f2']['cross_fitted']:.4f} cross-fitted)"
    )
    alignment = summary.get("alignment")
    if alignment:
        print(
            f"OOF rows aligned to the ensemble's scale on {alignment['reference_slices']} reference slices "
            f"({alignment['reference']}; unlabelled use) before thresholds were tuned"
        )
    else:
        print("OOF rows not aligned (--reference none): thresholds tuned on the raw OOF probabilities")
    losses = summary["calibration"]["oof_log_loss"]
    print(
        "OOF RSNA weighted log loss: "
        + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
        + f" (after: cross-fitted; applied: {summary['calibration']['method']})"
    )
    e, one = summary["ensemble_f2"], summary["single_f2"]
    print(
        f"RESULT ensemble_oof_f2={e['tuned']:.6f} ensemble_oof_f2_cross_fitted={e['cross_fitted']:.6f} "
        f"single_oof_f2={one['tuned']:.6f} single_oof_f2_cross_fitted={one['cross_fitted']:.6f}"
    )


def write_fold_outputs(result: FoldRuns, summary: dict, out: Path, args: argparse.Namespace) -> list[Path]:
    """Submission files (``ray_jobs/ensemble.py``'s, with ``val_*`` = the OOF predictions of every
    labelled series), the RSNA file from calibrated probabilities when a calibration was kept,
    ``ensemble.json`` (every fold model of the bag) and ``report/``."""
    from ray_jobs import ensemble as job  # imported here: that job imports this module for --folds

    oof, test = pd.read_parquet(out / "oof_ensemble.parquet"), pd.read_parquet(out / "test_ensemble.parquet")
    thresholds = np.asarray(summary["thresholds"])
    shards, test_shards = result.runs[0]["shards"], result.runs[0]["test_shards"]
    series = sorted(oof["series_id"].unique())
    written = job.write_outputs(
        out, oof.drop(columns=["fold"]), test, thresholds, shards, series, test_shards
    )
    manifest = load_manifest(shards)
    if summary["calibration"]["method"] and manifest["format"] == "rsna":
        calibrated = pd.read_parquet(out / "test_calibrated.parquet")
        expected = S.expected_slices(test_shards)
        written.append(
            S.write_submission(calibrated, "rsna", out / "submission_rsna.csv", expected, thresholds)
        )
    checkpoints = [r["checkpoint"] for t in summary["bag"] for r in result.runs if r["trial_id"] == t]
    spec = E.EnsembleSpec(
        models=checkpoints,
        thresholds=thresholds.tolist(),
        size=int(manifest["size"]),
        windows=manifest["windows"],
        format=manifest["format"],
        tta=list(args.tta) or False,
        val_f2=summary["ensemble_f2"]["cross_fitted"],
        single_f2=[summary["single_f2"]["cross_fitted"]],
        trial_ids=summary["bag"],
    )
    written.append(spec.save(out))
    single = E.score_predictions(
        result.oof[summary["single_best"]], E.choose_thresholds(result.oof[summary["single_best"]])
    )
    probs, labels = prediction_arrays(oof)
    scores = [
        ModelScore(f"single best ({summary['single_best']})", single["micro_f2"], single["per_class"]),
        ModelScore(f"ensemble ({summary['method']})", summary["ensemble_f2"]["tuned"], summary["per_class"]),
    ]
    boot = [[k, v["f2"], v["low"], v["high"]] for k, v in summary["bootstrap"].items()]
    losses = [[k, v] for k, v in summary["calibration"]["oof_log_loss"].items()]
    tables = [
        ("OOF micro-F2, 95% bootstrap interval over series", ["", "F2", "low", "high"], boot),
        ("OOF RSNA weighted log loss (after: cross-fitted calibration)", ["calibration", "loss"], losses),
    ]
    report = make_report(
        out / "report",
        scores,
        labels,
        probs,
        thresholds,
        score_heading="Out-of-fold F2",
        tables=tables,
        title=f"Fold ensemble ({args.folds} folds)",
    )
    return [*written, report]


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    if storage.is_uri(args.out) or storage.is_uri(args.experiment):
        logger.error(
            "--out and --experiment must be local folders for the fold job. Got %s, %s",
            args.out,
            args.experiment,
        )
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        overrides = parse_overrides(args.set)
        if args.epochs:
            overrides["train.max_epochs"] = args.epochs.split(",")
        if args.data:
            overrides["data.shards"] = storage.absolute(args.data)
        configs = trial_configs(storage.absolute(args.experiment), args.top_k, overrides)
        ray = init_ray()
        result = run_folds(ray, configs, args, out)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    write_results(result, out)
    retrained = sum(bool(r["retrained"]) for r in result.runs)
    print(
        f"fold runs: {len(result.runs)} ({retrained} trained now, {len(result.runs) - retrained} finished before)"
    )
    if all(prediction_arrays(t)[1] is not None for t in result.oof.values()):
        summary = summarize(result, out)
        try:
            written = write_fold_outputs(result, summary, out, args)
        except S.SubmissionError as exc:
            logger.error("submission check failed, nothing written under that name: %s", exc)
            return 1
        print_summary(summary)
        print("files:\n" + "\n".join(f"  {p}" for p in written))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
