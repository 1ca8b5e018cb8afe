"""Ensemble the best trials of a search and write the submission files, a report and ensemble.json.

Examples (from the repository root):

    python ray_jobs/ensemble.py --experiment runs/search --top-k 3 --test shards/test --out runs/submission
    python ray_jobs/ensemble.py --experiment runs/search --top-k 5 --test shards/test --out sub --tta --gpus-per-model 1
    ray job submit --working-dir . -- python ray_jobs/ensemble.py --experiment /shared/runs/search ...
    python ray_jobs/ensemble.py --experiment s3://bucket/runs/search --test s3://bucket/shards/test --out s3://bucket/sub
    python ray_jobs/ensemble.py --experiment runs/search --folds 5 --top-k 2 --name cv5    # into runs/cv5
    python ray_jobs/ensemble.py --name cv5 --resume       # continue it, as recorded in runs/cv5/job_args.json
    python ray_jobs/ensemble.py --smoke-test              # a tiny search plus a 2-fold ensemble (CI)

Reads EXPERIMENT/trials.csv (written by ray_jobs/tune.py), keeps the K best trials (by model_f2) that
finished and have a checkpoint, and predicts the validation series (the same split as training, from the checkpoint's config)
and the --test shards with one Ray task per model (--gpus-per-model GPUs each; bf16 on GPU). Probabilities
are averaged over models; per-class thresholds are tuned on the averaged validation predictions (each
single model's printed F2 uses its own thresholds tuned on the same validation series). That score is
optimistic (the trials were ranked and the thresholds tuned on the series it scores), and the job says so;
--holdout FRACTION sets that share of the validation series aside (by series, stratified by positive series):
members (all top-k, or greedy selection if it scores higher) and thresholds are chosen on the rest, and the
reported score is that of the held-out series. --folds K retrains the configurations on K folds instead
(ray_jobs/folds.py: out-of-fold members, thresholds and score; --fold-epochs E1,E2,E3 caps each fold run).

The output folder is --out, or STORAGE/NAME with --name (--storage, default runs/). The job records its
arguments there (job_args.json) first; --resume with only --out (or --name/--storage) continues it as
recorded (a value given again must equal the recorded one): fold runs that finished are not retrained, and
predictions kept in OUT/predictions are reused (keyed by checkpoint, shards and options).

Writes into --out: submission.csv (course leaderboard ID,prediction; DLCV input), test_per_slice.csv
(dirname,ID,ich,...,edh 0/1), submission_rsna.csv (Kaggle ID,Label; RSNA input), test_probs.parquet,
the same files for validation (val_*), ensemble.json (models, thresholds, image size and windows; read by
ray_jobs/predict.py), report/index.html and viewer/index.html (the ensemble's validation rows at its
thresholds, per series). Every figure printed names its rows and thresholds as the report's table does;
the RESULT line (single_val_f2, ensemble_val_f2; with --holdout *_holdout_f2) carries the same values. Every CSV is checked against the slices of the shards it
predicts (for validation: the validation series) before it is renamed into place. --test may be left out when the training shards have a sibling test/ folder (the demo's layout).
Every path may be a storage URI (s3://, gs://, file://): an --out URI gets the finished folder, written locally
first; prediction tasks download checkpoints kept on storage themselves. On a cluster, local --experiment and
--test folders and the training shards must be shared by every node (checked).
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python ray_jobs/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ichmodel.config import Config
from ichmodel.constants import CLASSES
from ichmodel.io import atomic_write
from ichmodel.trials import check_file_name, is_failed, read_trials, select_trials
from ray_jobs import folds as fold_job
from ray_jobs import storage
from ray_jobs import tune as tune_job
from ray_jobs.arg_types import fold_count, non_negative_float, positive_int
from ray_jobs.cli import (
    REPO_ROOT,
    add_output_arguments,
    init_ray,
    output_folder,
    record_or_resume,
    setup_logging,
)
from ray_jobs.job_record import JOB_ARGS_FILE, options_from, parse_job_args
from ray_jobs.leases import JOB_ERRORS, add_force_argument, hold_folder, job_failed
from ray_jobs.storage import fetch, is_uri
from ray_jobs.worker import predict_fn

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("ray_jobs.ensemble")
#: --smoke-test without --out/--name writes into STORAGE/SMOKE_NAME (its search in SMOKE_NAME/search).
SMOKE_NAME = "smoke-ensemble"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Average the K best trials of a search, tune thresholds on validation, write submissions.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="folder or storage URI (s3://...) of a search (holds trials.csv, optuna.db); a URI's trials "
        "table and chosen checkpoints are downloaded into OUT/experiment (required, but for --smoke-test "
        "and --resume)",
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=3, help="number of best trials to average (default 3)"
    )
    parser.add_argument(
        "--test", default=None, help="test shards (default: the sibling test/ of the training shards)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder or URI for the submission files, ensemble.json and report/ (or give --name)",
    )
    add_output_arguments(parser, "ensemble")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: also predict left-right "
                        "flipped slices and average (flip; ray_jobs/folds.py --tta also offers reverse)")  # fmt: skip
    parser.add_argument("--folds", type=fold_count, default=0, help="retrain the top-k configurations on K folds and "
                        "choose members, thresholds and calibration out of fold (ray_jobs/folds.py; default 0: off)")  # fmt: skip
    parser.add_argument("--fold-epochs", default=None, metavar="E1,E2,E3",
                        help="with --folds: epoch caps of every fold run (default: each configuration's own)")  # fmt: skip
    parser.add_argument("--reference", default=None, metavar="SHARDS|test|none",
                        help="with --folds: unlabelled series that put the OOF rows on the fold models' "
                        "average scale before thresholds are tuned (default: the test shards; none: off)")  # fmt: skip
    parser.add_argument(
        "--gpus-per-model",
        type=non_negative_float,
        default=0.0,
        help="GPUs per prediction task (default 0: CPU)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=4, help="series per forward pass (default 4)"
    )
    parser.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                        help="without --folds: validation series set aside for the reported score; members and "
                        "thresholds are chosen on the rest (default 0: none, the score is optimistic)")  # fmt: skip
    parser.add_argument("--smoke-test", action="store_true",
                        help="a tiny search (ray_jobs/tune.py --smoke-test) plus a 2-fold ensemble of it")  # fmt: skip
    add_force_argument(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs; a failure with its traceback"
    )
    return parser


@dataclass(frozen=True)
class EnsembleOptions:
    """One ensemble job, typed: every option of :func:`get_args_parser` (the same defaults; a test checks)."""

    experiment: str | None = None
    top_k: int = 3
    test: str | None = None
    out: str | None = None
    name: str | None = None
    storage: str = str(REPO_ROOT / "runs")
    resume: bool = False
    tta: bool = False
    folds: int = 0
    fold_epochs: str | None = None
    reference: str | None = None
    gpus_per_model: float = 0.0
    batch_size: int = 4
    holdout: float = 0.0
    smoke_test: bool = False
    verbose: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with which options it gave (:func:`ray_jobs.job_record.parse_job_args`)."""
    return parse_job_args(get_args_parser(), argv)


def fetch_experiment(uri: str, cache: Path, top_k: int) -> Path:
    """Download a search kept on storage (``s3://...``) into ``cache``: trials.csv, optuna.db if present,
    and the checkpoints of the ``top_k`` best usable trials (the next best where one is missing).

    Returns the local experiment folder, whose trials.csv points at the local checkpoints; its ``source``
    column keeps each checkpoint's URI (prediction tasks on other nodes download from there).

    Raises:
        FileNotFoundError: when the URI holds no trials.csv.
        ValueError: when trials.csv is not a valid trials table, e.g. a trial id or checkpoint file name that
            could name a file outside ``cache`` (the storage's content is not trusted).
    """
    uri = uri.rstrip("/")
    if not fetch(f"{uri}/trials.csv", cache / "trials.csv"):
        raise FileNotFoundError(f"No trials table at {uri}/trials.csv; run ray_jobs/tune.py first")
    fetch(f"{uri}/optuna.db", cache / "optuna.db")
    try:
        table = read_trials(cache / "trials.csv")  # best first; checks every trial id
    except ValueError as exc:
        raise ValueError(f"{exc} (downloaded from {uri}/trials.csv)") from None
    keep, fetched = [], 0  # rows of the local table: the fetched trials, and the ones tried that could not be
    for i, row in table.iterrows():
        source = row["checkpoint"]
        if fetched == top_k:
            break
        if is_failed(row) or not isinstance(source, str) or not is_uri(source):
            continue  # select_trials would skip it too
        name = check_file_name(source.rsplit("/", 1)[-1], f"checkpoint file name in {uri}/trials.csv")
        local = cache / "checkpoints" / row["trial_id"] / name
        logger.info("downloading %s", source)
        if local.is_file() or fetch(source, local):
            table.at[i, "checkpoint"], fetched = str(local.resolve()), fetched + 1
            table.at[i, "source"] = source
        keep.append(i)  # a missing one keeps its URI, which select_trials reports as missing
    table.loc[keep].to_csv(cache / "trials.csv", index=False)
    return cache


def resolve_data(checkpoints: list[str], test: str | None) -> tuple[Config, str, list[str]]:
    """``(config of the best model, test shard dir, validation series ids)``.

    Raises:
        ValueError: when the models were trained on different shards or splits, or no test folder is found.
    """
    from ichmodel.checkpoint import load_checkpoint
    from ichmodel.splits import split_series

    configs = [Config.from_dict(load_checkpoint(p)["config"]) for p in checkpoints]
    data = {(c.data.shards, c.data.val_fraction, c.data.split_seed) for c in configs}
    if len(data) != 1:
        raise ValueError(f"The chosen models were trained on different shards or splits: {sorted(data)}")
    cfg = configs[0]
    if test is None:
        sibling = storage.join(storage.parent(cfg.data.shards), "test")
        if not storage.is_file(storage.join(sibling, "manifest.json")):
            raise ValueError(
                f"--test is required: the training shards {cfg.data.shards} have no sibling test/ folder"
            )
        test = str(sibling)
        logger.info("test shards: %s (beside the training shards)", test)
    _, val_ids = split_series(cfg.data.shards, cfg.data.val_fraction, cfg.data.split_seed)
    return cfg, test, val_ids


def training_prevalence(cfg: Config):
    """Each class's share of the training series' labelled slices (the models' own training split)."""
    from ichmodel.dataset import SeriesDataset, class_prevalence
    from ichmodel.shard_cache import ShardCache
    from ichmodel.splits import split_series

    train_ids, _ = split_series(cfg.data.shards, cfg.data.val_fraction, cfg.data.split_seed)
    return class_prevalence(SeriesDataset(cfg.data.shards, train_ids, cache=ShardCache.from_config(cfg.data)))


def check_options(options: EnsembleOptions, folder: str) -> None:
    """Refuse options that cannot work together, before anything is recorded or started.

    Raises:
        ValueError: naming the option and its value.
    """
    if options.experiment is None and not options.smoke_test:
        raise ValueError("--experiment (the search to ensemble) is required, unless --smoke-test or --resume")
    if not 0 <= options.holdout < 1:
        raise ValueError(f"--holdout is a fraction of the validation series in [0, 1). Got {options.holdout}")
    if options.fold_epochs and not (options.folds or options.smoke_test):
        raise ValueError(f"--fold-epochs {options.fold_epochs} is for the fold ensemble (--folds K)")
    if options.holdout and options.folds:
        raise ValueError(
            f"--holdout {options.holdout} is for the ensemble without --folds (--folds {options.folds} scores out of fold)"
        )
    if options.smoke_test and is_uri(folder):
        raise ValueError(f"--smoke-test writes into a local folder. Got {folder}")
    for option, location in (
        ("--experiment", options.experiment),
        ("--test", options.test),
        ("--out", folder),
    ):
        storage.check_not_in_job_dir(option, location)


def run_smoke_search(folder: str) -> int:
    """``--smoke-test``: ray_jobs/tune.py's smoke search into FOLDER/search (continued when it was started
    before; caps 1,0,1); returns the search's exit code."""
    search = storage.join(folder, "search")
    # No shared stages: their Train run, fitted in this driver, was seen to keep its controller and CPU
    # reservation alive afterwards (while Train's placement-group cleaner failed: ray_jobs.cli.init_ray),
    # and the fold runs that follow in this driver waited for CPUs.
    options = tune_job.SearchOptions(
        smoke_test=True, share_stages="off", epochs="1,0,1", storage=folder, name="search"
    )
    given = {"smoke_test", "share_stages", "epochs", "storage", "name"}
    if storage.is_file(storage.join(search, JOB_ARGS_FILE)):  # a finished search ends at once; an
        options, given = replace(options, resume=True), given | {"resume"}  # interrupted one continues
    return tune_job.run_search(replace(options, given=frozenset(given)))


def fold_options(options: EnsembleOptions, out: str) -> fold_job.FoldOptions:
    """The fold job's options for ``--folds K`` writing into ``out``; its other options keep their defaults."""
    return fold_job.FoldOptions(
        experiment=options.experiment,
        out=out,
        top_k=options.top_k,
        folds=options.folds,
        test=options.test or None,
        reference=options.reference or "test",
        epochs=options.fold_epochs,
        tta=("flip",) if options.tta else (),
        use_gpu=options.gpus_per_model > 0,
        batch_size=options.batch_size,
        verbose=options.verbose,
    )


def main(args: argparse.Namespace) -> int:
    """Run (or with ``--resume`` continue) the job; ``args`` from :func:`parse_args` (or a plain
    ``parse_args``, where every value other than a default counts as given on resume)."""
    setup_logging(args.verbose)
    values = dict(vars(args))
    if values["smoke_test"] and values["out"] is None and values["name"] is None:
        values["name"] = SMOKE_NAME
    try:
        with hold_folder(
            output_folder(values["out"], values["name"], values["storage"]), "ensemble.py", args.force
        ):
            try:
                options, folder = record_options(values)
            except (ValueError, FileNotFoundError) as exc:
                logger.error("%s", exc)
                return 2
            return run_ensemble(options, folder)
    except JOB_ERRORS as exc:
        return job_failed(exc, args.verbose)
    except ValueError as exc:  # neither --out nor --name
        logger.error("%s", exc)
        return 2


def record_options(values: dict) -> tuple[EnsembleOptions, str]:
    """The job's options from its values (``vars(args)``), checked and recorded in the output folder, or with
    ``--resume`` the recorded ones; ``(options, output folder)``.

    Raises:
        ValueError: naming a refused option (before anything is recorded) or a conflict with the record.
        FileNotFoundError: on --resume when the folder holds no record.
    """
    if values["experiment"] is not None:  # one spelling, recorded and compared on resume
        values = {**values, "experiment": storage.absolute(values["experiment"])}
    if values["smoke_test"] and values["out"] is None and values["name"] is None:
        values = {**values, "name": SMOKE_NAME}
    if not values["resume"]:
        folder = output_folder(values["out"], values["name"], values["storage"])
        check_options(options_from(EnsembleOptions, values), folder)
    options = options_from(EnsembleOptions, record_or_resume(values, get_args_parser(), "ensemble"))
    folder = output_folder(options.out, options.name, options.storage)
    check_options(options, folder)
    return options, folder


def run_ensemble(options: EnsembleOptions, folder: str) -> int:
    """The ensemble (``--folds``: the fold ensemble, :func:`ray_jobs.folds.run_fold_job`) of ``options`` into
    ``folder``, after the smoke search with ``--smoke-test``; the exit code."""
    if options.smoke_test:
        code = run_smoke_search(folder)
        if code != 0:
            return code
        search = storage.join(folder, "search")  # the 2-fold ensemble of its 2 trials (their epoch caps)
        options = replace(options, experiment=search, folds=options.folds or 2, top_k=min(options.top_k, 2))
    if options.folds:  # the cross-validated ensemble
        return fold_job.run_fold_job(fold_options(options, folder))
    with tempfile.TemporaryDirectory(prefix="ich-ensemble-") as staging:
        out = Path(staging, "out") if is_uri(folder) else Path(folder)
        cache = Path(staging, "experiment") if is_uri(folder) else out / "experiment"
        code = run(options, out, cache, folder)
        if code == 0 and is_uri(folder):
            storage.copy_folder(out, folder)
            print(f"copied to {folder}")
    return code


def predict_members(ray, options: EnsembleOptions, checkpoints: list[str], trial_ids: list[str], shards: list[str], val_ids: list[str],
                    cache: Path) -> list[list[pd.DataFrame]]:  # fmt: skip
    """Each model's ``[validation table, test table]``: from ``cache`` when a file for the same checkpoint,
    shards, series and TTA is there (a resumed job), else one Ray task per model (then kept in ``cache``)."""
    import pandas as pd

    task = ray.remote(num_cpus=1, num_gpus=options.gpus_per_model)(predict_fn)
    files, refs = [], {}
    for trial, checkpoint in zip(trial_ids, checkpoints, strict=True):
        key = json.dumps([checkpoint, shards, val_ids, options.tta]).encode()
        stem = f"{check_file_name(trial, 'trial id')}-{hashlib.sha256(key).hexdigest()[:12]}"
        files.append([cache / f"{stem}-{part}.parquet" for part in ("val", "test")])
        if not all(f.is_file() for f in files[-1]):
            refs[trial] = task.remote(
                checkpoint,
                shards,
                [val_ids, None],
                options.tta,
                options.batch_size,
                options.gpus_per_model > 0,
            )
    logger.info("predicting %d validation series and %s with %d models (%d from %s)", len(val_ids), shards[1],
                len(checkpoints), len(checkpoints) - len(refs), cache)  # fmt: skip
    tables = []
    for trial, pair in zip(trial_ids, files, strict=True):
        if trial in refs:
            tables.append(ray.get(refs[trial]))
            for table, path in zip(tables[-1], pair, strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, partial(table.to_parquet, index=False))
        else:
            tables.append([pd.read_parquet(path) for path in pair])
    print(f"predictions: {len(refs)} models predicted now, {len(trial_ids) - len(refs)} read from {cache}")
    return tables


def run(options: EnsembleOptions, out: Path, cache: Path, folder: str) -> int:
    """The ensemble job writing into the local folder ``out`` (copied to ``folder`` when that is a URI; a
    search on storage is downloaded into ``cache``); returns the exit code."""
    from ichmodel import ensemble as E
    from ichmodel import submission as S
    from ichmodel.metrics import rsna_weighted_log_loss
    from ichmodel.prediction_table import prediction_arrays
    from ichmodel.report import make_report
    from ichmodel.shards import load_manifest
    from ichmodel.splits import split_holdout
    from ichmodel.viewer import write_viewer

    try:
        if is_uri(options.experiment):
            experiment = fetch_experiment(options.experiment, cache, options.top_k)
        else:
            experiment = Path(storage.absolute(options.experiment))
        chosen = select_trials(experiment / "trials.csv", options.top_k)
        checkpoints = chosen["checkpoint"].tolist()
        cfg, test_shards, val_ids = resolve_data(checkpoints, options.test and storage.absolute(options.test))
        train_manifest = load_manifest(cfg.data.shards)
        load_manifest(test_shards)
        ray = init_ray()
        shared = {"--experiment": None if is_uri(options.experiment) else str(experiment), "--test": test_shards,
                  "data.shards (training shards of the models)": cfg.data.shards}  # fmt: skip
        storage.check_shared(shared, ray)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    sources = chosen["source"].tolist() if "source" in chosen else [None] * len(chosen)
    task_checkpoints = [
        s if isinstance(s, str) and s else p for s, p in zip(sources, checkpoints, strict=True)
    ]
    names = [f"trial {t}" for t in chosen["trial_id"]]
    try:
        results = predict_members(ray, options, task_checkpoints, chosen["trial_id"].astype(str).tolist(),
                                  [cfg.data.shards, test_shards], val_ids, out / "predictions")  # fmt: skip
    except ray.exceptions.RayTaskError as exc:
        logger.error("a prediction task failed: %s", exc)
        return 1
    prevalence = training_prevalence(cfg)
    vals = [r[0] for r in results]
    if options.holdout:
        try:
            select, held = split_holdout(vals[0], options.holdout)
        except ValueError as exc:
            logger.error("%s", exc)
            return 2
        bag, thresholds, scores = E.choose_on_selection(names, vals, select, held, prevalence)
    else:
        bag = list(range(len(results)))
        scores = [E.score_model(n, v, prevalence) for n, v in zip(names, vals, strict=True)]
        scores.append(
            E.score_model(f"ensemble of {len(checkpoints)}", E.average_predictions(vals), prevalence)
        )
        thresholds = np.asarray(scores[-1].thresholds)
    scores = labelled_scores(scores, options.holdout)
    ens = scores[-1]
    val = E.average_predictions([vals[i] for i in bag])
    test = E.average_predictions([results[i][1] for i in bag])
    try:
        written = E.write_outputs(out, val, test, thresholds, cfg.data.shards, val_ids, test_shards)
    except S.SubmissionError as exc:
        logger.error("submission check failed, nothing written under that name: %s", exc)
        return 1
    spec = E.EnsembleSpec(
        models=[task_checkpoints[i] for i in bag],  # URIs for a search on storage: usable elsewhere
        thresholds=thresholds.tolist(),
        size=int(train_manifest["size"]),
        windows=train_manifest["windows"],
        format=train_manifest["format"],
        tta=options.tta,
        val_f2=ens.micro_f2,
        single_f2=[s.micro_f2 for s in scores[:-1]],
        trial_ids=[str(chosen["trial_id"][i]) for i in bag],
    )
    written.append(spec.save(out))
    probs, y_true = prediction_arrays(val)
    log_loss = rsna_weighted_log_loss(y_true, probs)
    heading = (
        f"Held-out F2 ({options.holdout:g} of the validation series)" if options.holdout else "Validation F2"
    )
    report = make_report(
        out / "report",
        scores,
        probs=probs,
        y_true=y_true,
        thresholds=thresholds,
        optuna_db=experiment / "optuna.db",
        title=f"Ensemble of {options.experiment.rstrip('/').rsplit('/', 1)[-1]}",
        score_heading=heading,
    )
    viewer = write_viewer(out, val, thresholds, cfg.data.shards,
                          title=f"Ensemble's validation rows at its thresholds ({ens.estimate.label})")  # fmt: skip
    print_scores(scores, options.holdout, len(val_ids))
    print(f"ensemble validation RSNA weighted log loss: {log_loss:.4f}")
    print("thresholds: " + ", ".join(f"{c}={t:.2f}" for c, t in zip(CLASSES, thresholds, strict=True)))
    print("files:")
    for path in written:
        print(f"  {storage.join(folder, Path(path).relative_to(out).as_posix()) if is_uri(folder) else path}")
    print(f"report: {report}")
    print(f"viewer: {viewer}")
    return 0


def labelled_scores(scores: list, holdout: float) -> list:
    """``scores`` (each model's, then the ensemble's) labelled with their estimate (validation rows, or with
    ``holdout`` the held-out rows) and roles: the single best model is ``single``, the ensemble ``ensemble``
    (their keys on the RESULT line and in the report's table)."""
    from dataclasses import replace as with_fields

    from ichmodel.scores import VALIDATION, holdout_estimate

    estimate = holdout_estimate(holdout) if holdout else VALIDATION
    best = max(range(len(scores) - 1), key=lambda i: scores[i].micro_f2)
    roles = ["single" if i == best else "" for i in range(len(scores) - 1)] + ["ensemble"]
    return [with_fields(s, estimate=estimate, role=r) for s, r in zip(scores, roles, strict=True)]


def print_scores(scores: list, holdout: float, num_val: int) -> None:
    """Each model's and the ensemble's score, labelled as the report's table labels them, what that score is
    worth, and the RESULT line (:func:`ichmodel.scores.format_scores`, :func:`ichmodel.scores.result_line`)."""
    from ichmodel.scores import format_scores, result_line

    print("\n" + "\n".join(format_scores(scores)))
    if holdout:
        print(f"ensemble: {scores[-1].name}; members and thresholds chosen on the other {1 - holdout:g} of the "
              f"{num_val} validation series")  # fmt: skip
        print("note: the top-k trials were still ranked on every validation series (their training runs' "
              "model_f2); --folds K gives an out-of-fold estimate")  # fmt: skip
    else:
        print(f"note: this validation score is optimistic: the trials were ranked and the thresholds tuned on "
              f"the same {num_val} series it scores; --holdout FRACTION or --folds K give an honest estimate")  # fmt: skip
    print(result_line(scores))


if __name__ == "__main__":
    sys.exit(main(parse_args()))
