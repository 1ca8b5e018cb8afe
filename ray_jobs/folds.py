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
test series, whose labels are never read; `--reference none` turns this off; ichmodel.calibration.FoldAlignment).
Members are chosen on OOF micro-F2 (every configuration, or Caruana-style greedy selection when its
cross-fitted OOF F2 is higher), thresholds are tuned on the ensemble's aligned OOF probabilities, and a
per-class calibration (platt or isotonic, whichever lowers the cross-fitted OOF RSNA weighted log loss) is
fitted for the RSNA probability file (ichmodel/fold_ensemble.py). ray_jobs/ensemble.py --folds K runs the
same steps (run_fold_job).

Writes into --out: folds.json, runs.csv (one row per run: trial, fold, retrained or not, checkpoint),
oof_<trial>.parquet (every labelled series once, with its fold), test_<trial>.parquet (mean over the trial's
folds), oof_ensemble.parquet (aligned), test_ensemble.parquet, test_calibrated.parquet, fold_ensemble.json
(members, thresholds, OOF F2 tuned and cross-fitted, bootstrap intervals over series, alignment,
calibration), ray_jobs/ensemble.py's submission files (val_* = the OOF predictions), ensemble.json (every fold model of the chosen members) and
report/index.html (with the search's figures from EXPERIMENT/optuna.db) and viewer/index.html (the OOF
rows at the ensemble's thresholds, per series). Prints single best vs ensemble OOF micro-F2 with intervals,
each labelled with its rows and thresholds, as the report's table shows them, and the RESULT line. Predictions of a run are kept
in --out/predictions and reused while the run is not retrained. A finished run is reused whatever the
options of the rerun: use a new --out (or --storage) after changing --set/--epochs. Run as
ray_jobs/ensemble.py --folds K, the job records its arguments in the output folder and --resume with only
--name/--storage (or --out) continues it as recorded.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python ray_jobs/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import hashlib
import json
import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ichmodel.config import Config
from ichmodel.io import atomic_write, atomic_write_text
from ichmodel.trials import CHECKPOINT_FILE, check_file_name, select_trials
from ray_jobs import storage
from ray_jobs.arg_types import positive_int, two_or_more
from ray_jobs.cli import init_ray, parse_overrides, setup_logging, workers_fit
from ray_jobs.job_record import options_from
from ray_jobs.leases import JOB_ERRORS, add_force_argument, hold_folder, job_failed
from ray_jobs.worker import build_trainer, finished_run_report, predict_fn

if TYPE_CHECKING:
    from ichmodel.fold_ensemble import FoldRuns

logger = logging.getLogger("ray_jobs.folds")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Retrain the best configurations of a search on K folds; out-of-fold and test predictions.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiment", required=True, help="folder of a search (holds trials.csv)")
    parser.add_argument("--top-k", type=positive_int, default=1, help="configurations to retrain (default 1)")
    parser.add_argument("--folds", type=two_or_more, default=5, help="number of folds K (default 5)")
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
    parser.add_argument("--num-workers", type=positive_int, default=1, help="DDP workers per run (default 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker and per prediction task")
    parser.add_argument(
        "--tta",
        action="append",
        default=[],
        choices=["flip", "reverse"],
        help="test-time augmentation (repeatable): flip = also predict left-right flipped slices, reverse = "
        "also predict the series in reversed slice order; every combination is averaged (checked against each "
        "model's training augmentation: reverse needs augment.reverse_prob > 0)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=4, help="series per forward pass (default 4)"
    )
    add_force_argument(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs; a failure with its traceback"
    )
    return parser


@dataclass(frozen=True)
class FoldOptions:
    """One fold job, typed: every option of :func:`get_args_parser` (the same defaults; a test checks)."""

    experiment: str
    out: str
    top_k: int = 1
    folds: int = 5
    fold_seed: int = 0
    storage: str | None = None
    data: str | None = None
    test: str | None = None
    reference: str = "test"
    set: tuple[str, ...] = ()
    epochs: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    tta: tuple[str, ...] = ()
    batch_size: int = 4
    verbose: bool = False


def fold_run_name(trial_id: str, fold: int, k: int) -> str:
    """The stable Train run name of one (configuration, fold): the same name resumes or skips the run."""
    return f"fold-{check_file_name(trial_id, 'trial id')}-{fold}of{k}"


def trial_configs(experiment: str | Path, top_k: int, overrides: dict) -> list[tuple[str, Config]]:
    """``[(trial_id, config)]`` of the ``top_k`` best usable trials: each checkpoint's saved config with
    ``overrides`` applied (the split is replaced by the folds, so ``data.val_fraction`` is not used)."""
    from ichmodel.checkpoint import load_checkpoint

    chosen = select_trials(Path(experiment) / "trials.csv", top_k)
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
    ray, runs: list[dict], test_shards: str, out: Path, options: FoldOptions, reference: str | None = None
) -> list[list]:
    """Each run's ``[held-out table, test table(, reference table)]``, from ``out/predictions`` when the run
    was not retrained and every table is there."""
    import pandas as pd

    cache = out / "predictions"
    task = ray.remote(num_cpus=1, num_gpus=1 if options.use_gpu else 0)(predict_fn)
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
                run["checkpoint"], shard_dirs, ids, list(options.tta), options.batch_size, options.use_gpu
            )
    for run in runs:
        if run["name"] in refs:
            run["tables"] = ray.get(refs[run["name"]])
            cache.mkdir(parents=True, exist_ok=True)
            for table, part in zip(run["tables"], parts, strict=True):
                atomic_write(cache / f"{run['name']}-{part}.parquet", partial(table.to_parquet, index=False))
    return [run["tables"] for run in runs]


def reference_shards(reference: str | None, test_shards: str) -> tuple[str | None, str | None]:
    """``(shards to predict besides the test shards or None, what the reference is)`` for ``--reference``:
    ``"test"`` reuses the test predictions, ``"none"`` turns the alignment off (``(None, None)``)."""
    from ichmodel.shards import load_manifest

    choice = str(reference or "test")
    if choice.lower() == "none":
        return None, None
    if choice.lower() == "test" or storage.absolute(choice) == storage.absolute(test_shards):
        return None, test_shards
    load_manifest(storage.absolute(choice))  # FileNotFoundError naming it when absent
    return storage.absolute(choice), storage.absolute(choice)


def run_folds(ray, configs: list[tuple[str, Config]], options: FoldOptions, out: Path) -> FoldRuns:
    """Folds of the configs' training shards, one Train run per (config, fold), OOF and test tables."""
    from ichmodel import ensemble as E
    from ichmodel import folds as F
    from ichmodel.fold_ensemble import FoldRuns
    from ichmodel.shards import load_manifest
    from ichmodel.splits import shard_fold_runs

    shards = configs[0][1].data.shards
    if any(c.data.shards != shards for _, c in configs):
        raise ValueError(
            f"The configurations use different training shards: {sorted({c.data.shards for _, c in configs})}"
        )
    test_shards = options.test or storage.join(storage.parent(shards), "test")
    load_manifest(test_shards)  # FileNotFoundError naming it when absent
    # Each fold run trains on the other folds less an inner validation part, which picks its epoch and its
    # learning-rate steps: the held-out fold is only predicted (out of fold), never looked at in training.
    folds, inner, patients = shard_fold_runs(
        shards, options.folds, options.fold_seed, configs[0][1].data.val_fraction
    )
    record = {
        "seed": options.fold_seed,
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
                    "name": fold_run_name(trial_id, i, options.folds),
                    "trial_id": trial_id,
                    "fold": i,
                    "shards": shards,
                    "test_shards": test_shards,
                    "val": val_ids,
                    "loop_config": {"config": cfg.to_dict(), "overrides": {}, "split": split},
                }
            )
    extra, reference = reference_shards(options.reference, test_shards)
    storage_path = storage.absolute(options.storage or out / "runs")
    records = train_all(ray, jobs, storage_path, options.num_workers, options.use_gpu)
    runs = [
        {**{k: v for k, v in j.items() if k != "loop_config"}, **r}
        for j, r in zip(jobs, records, strict=True)
    ]
    tables = predict_all(ray, runs, test_shards, out, options, extra)
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


def _sorted_probs(table):
    from ichmodel.prediction_table import prediction_arrays

    return prediction_arrays(table.sort_values(["series_id", "position"], kind="stable"))[0]


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    try:
        local = not storage.is_uri(args.out)  # a URI is refused below: the fold job writes local folders only
        with hold_folder(storage.absolute(args.out), "folds.py", args.force) if local else nullcontext():
            return run_fold_job(
                options_from(FoldOptions, vars(args), set=tuple(args.set), tta=tuple(args.tta))
            )
    except JOB_ERRORS as exc:
        return job_failed(exc, args.verbose)


def run_fold_job(options: FoldOptions) -> int:
    """Train the folds (Ray), then choose, calibrate and write the fold ensemble (:mod:`ichmodel.fold_ensemble`)
    into ``options.out``; the exit code. ``ray_jobs/ensemble.py --folds K`` runs this too."""
    from ichmodel import submission as S
    from ichmodel.fold_ensemble import summarize, write_fold_outputs, write_results
    from ichmodel.prediction_table import prediction_arrays

    if storage.is_uri(options.out) or storage.is_uri(options.experiment):
        logger.error(
            "--out and --experiment must be local folders for the fold job. Got %s, %s",
            options.out,
            options.experiment,
        )
        return 2
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        overrides = parse_overrides(list(options.set))
        if options.epochs:
            overrides["train.max_epochs"] = options.epochs.split(",")
        if options.data:
            overrides["data.shards"] = storage.absolute(options.data)
        configs = trial_configs(storage.absolute(options.experiment), options.top_k, overrides)
        ray = init_ray()
        if not workers_fit(
            ray, {"num_workers": options.num_workers, "use_gpu": options.use_gpu}, "--num-workers"
        ):
            return 2
        result = run_folds(ray, configs, options, out)
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
            study = storage.join(storage.absolute(options.experiment), "optuna.db")  # the search's, if any
            written = write_fold_outputs(result, summary, out, options.tta, options.folds, optuna_db=study)
        except S.SubmissionError as exc:
            logger.error("submission check failed, nothing written under that name: %s", exc)
            return 1
        print_summary(summary)
        print("files:\n" + "\n".join(f"  {p}" for p in written))
    print(f"written: {out}")
    return 0


def print_summary(summary: dict) -> None:
    """The figures a user reads first (:func:`ichmodel.fold_ensemble.summary_lines`)."""
    from ichmodel.fold_ensemble import summary_lines

    print("\n".join(summary_lines(summary)))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
