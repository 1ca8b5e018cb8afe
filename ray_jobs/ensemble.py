"""Ensemble the best trials of a search and write the submission files, a report and ensemble.json.

Examples (from the repository root):

    python ray_jobs/ensemble.py --experiment runs/search --top-k 3 --test shards/test --out runs/submission
    python ray_jobs/ensemble.py --experiment runs/search --top-k 5 --test shards/test --out sub --tta --gpus-per-model 1
    ray job submit --working-dir . -- python ray_jobs/ensemble.py --experiment /shared/runs/search ...
    python ray_jobs/ensemble.py --experiment s3://bucket/runs/search --test s3://bucket/shards/test --out s3://bucket/sub

Reads EXPERIMENT/trials.csv (written by ray_jobs/tune.py), keeps the K best trials (by model_f2) that
finished and have a checkpoint, and predicts the validation series (the same split as training, from the checkpoint's config)
and the --test shards with one Ray task per model (--gpus-per-model GPUs each; bf16 on GPU). Probabilities
are averaged over models; per-class thresholds are tuned on the averaged validation predictions (each
single model's printed F2 uses its own thresholds tuned on the same validation series).

Writes into --out: submission.csv (course leaderboard ID,prediction; DLCV input), test_per_slice.csv
(dirname,ID,ich,...,edh 0/1), submission_rsna.csv (Kaggle ID,Label; RSNA input), test_probs.parquet,
the same files for validation (val_*), ensemble.json (models, thresholds, image size and windows; read by
ray_jobs/predict.py) and report/index.html. Every CSV is checked against the slices of the shards it
predicts (for validation: the validation series) before it is renamed into place. --test may be left out when the training shards have a sibling test/ folder (the demo's layout).
Every path may be a storage URI (s3://, gs://, file://): an --out URI gets the finished folder, written locally
first; prediction tasks download checkpoints kept on storage themselves. On a cluster, local --experiment and
--test folders and the training shards must be shared by every node (checked).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ichmodel import ensemble as E  # noqa: E402
from ichmodel import submission as S  # noqa: E402
from ichmodel.checkpoint import load_checkpoint  # noqa: E402
from ichmodel.config import Config  # noqa: E402
from ichmodel.constants import CLASSES  # noqa: E402
from ichmodel.dataset import SeriesDataset, class_prevalence, split_series  # noqa: E402
from ichmodel.metrics import rsna_weighted_log_loss  # noqa: E402
from ichmodel.predict import prediction_arrays  # noqa: E402
from ichmodel.report import ModelScore, make_report  # noqa: E402
from ichmodel.shards import load_manifest  # noqa: E402
from ray_jobs import storage  # noqa: E402
from ray_jobs.cli import init_ray, setup_logging  # noqa: E402
from ray_jobs.storage import fetch, is_uri  # noqa: E402
from ray_jobs.worker import predict_fn  # noqa: E402

logger = logging.getLogger("ray_jobs.ensemble")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Average the K best trials of a search, tune thresholds on validation, write submissions.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--experiment",
        required=True,
        help="folder or storage URI (s3://...) of a search (holds trials.csv, optuna.db); a URI's trials "
        "table and chosen checkpoints are downloaded into OUT/experiment",
    )
    parser.add_argument("--top-k", type=int, default=3, help="number of best trials to average (default 3)")
    parser.add_argument(
        "--test", default=None, help="test shards (default: the sibling test/ of the training shards)"
    )
    parser.add_argument(
        "--out", required=True, help="folder or URI for the submission files, ensemble.json and report/"
    )
    parser.add_argument("--tta", action="store_true", help="also predict left-right flipped slices, average")
    parser.add_argument("--folds", type=int, default=0, help="retrain the top-k configurations on K folds and "
                        "choose members, thresholds and calibration out of fold (ray_jobs/folds.py; default 0: off)")  # fmt: skip
    parser.add_argument(
        "--gpus-per-model", type=float, default=0.0, help="GPUs per prediction task (default 0: CPU)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="series per forward pass (default 4)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


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
        table = E.read_trials(cache / "trials.csv")  # best first; checks every trial id
    except ValueError as exc:
        raise ValueError(f"{exc} (downloaded from {uri}/trials.csv)") from None
    keep, fetched = [], 0  # rows of the local table: the fetched trials, and the ones tried that could not be
    for i, row in table.iterrows():
        source = row["checkpoint"]
        if fetched == top_k:
            break
        if E.is_failed(row) or not isinstance(source, str) or not is_uri(source):
            continue  # select_trials would skip it too
        name = E.check_file_name(source.rsplit("/", 1)[-1], f"checkpoint file name in {uri}/trials.csv")
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


#: Every split gets ``<split>_probs.parquet`` and ``<split>_per_slice.csv``; some shard formats add a
#: competition file: ``(split, format) → (submission kind, file name)``.
COMPETITION_FILES: dict[tuple[str, str], tuple[str, str]] = {
    ("val", "dlcv"): ("leaderboard", "val_leaderboard.csv"),
    ("test", "dlcv"): ("leaderboard", "submission.csv"),
    ("test", "rsna"): ("rsna", "submission_rsna.csv"),
}


def write_outputs(
    out: Path,
    val: pd.DataFrame,
    test: pd.DataFrame,
    thresholds: np.ndarray,
    train_shards: str,
    val_ids: list[str],
    test_shards: str,
) -> list[Path]:
    """Validation and test files (see the module docstring and :data:`COMPETITION_FILES`).

    Each CSV is checked against the slices it must cover, read from the shards: the ``val_ids`` series of
    ``train_shards`` for ``val``, every slice of ``test_shards`` for ``test``.

    Raises:
        SubmissionError: when a file does not cover exactly those slices (or is malformed otherwise).
    """
    written = []
    for split, frame, shards, series in (
        ("val", val, train_shards, val_ids),
        ("test", test, test_shards, None),
    ):
        written.append(S.write_probabilities(frame, out / f"{split}_probs.parquet"))
        expected = S.expected_slices(shards, series)
        shard_format = load_manifest(shards)["format"]
        files = [("per_slice", f"{split}_per_slice.csv")]
        if (split, shard_format) in COMPETITION_FILES:
            files.append(COMPETITION_FILES[split, shard_format])
        for kind, name in files:
            written.append(S.write_submission(frame, kind, out / name, expected, thresholds))
    return written


def training_prevalence(cfg: Config) -> np.ndarray | None:
    """Each class's share of the training series' labelled slices (the models' own training split)."""
    train_ids, _ = split_series(cfg.data.shards, cfg.data.val_fraction, cfg.data.split_seed)
    return class_prevalence(SeriesDataset(cfg.data.shards, train_ids))


def score_model(name: str, val: pd.DataFrame, prevalence: np.ndarray | None) -> ModelScore:
    """Validation F2 of a model's (or the ensemble's) predictions at thresholds tuned on them (the training
    run's rule, so a single model scores what its training reported)."""
    thresholds = E.choose_thresholds(val, prevalence)
    score = E.score_predictions(val, thresholds)
    return ModelScore(name, score["micro_f2"], score["per_class"], thresholds.tolist())


def main(args: argparse.Namespace) -> int:
    if args.folds:  # the cross-validated ensemble is its own job
        from ray_jobs import folds

        return folds.main(folds.args_from_ensemble(args))
    setup_logging(args.verbose)
    with tempfile.TemporaryDirectory(prefix="ich-ensemble-") as staging:
        out = Path(staging, "out") if is_uri(args.out) else Path(args.out)
        cache = Path(staging, "experiment") if is_uri(args.out) else out / "experiment"
        code = run(args, out, cache)
        if code == 0 and is_uri(args.out):
            storage.copy_folder(out, args.out)
            print(f"copied to {args.out}")
    return code


def run(args: argparse.Namespace, out: Path, cache: Path) -> int:
    """The ensemble job writing into the local folder ``out`` (a search on storage is downloaded into
    ``cache``); returns the exit code."""
    try:
        for option in ("experiment", "test", "out"):
            storage.check_not_in_job_dir(f"--{option}", getattr(args, option))
        if is_uri(args.experiment):
            experiment = fetch_experiment(args.experiment, cache, args.top_k)
        else:
            experiment = Path(storage.absolute(args.experiment))
        chosen = E.select_trials(experiment / "trials.csv", args.top_k)
        checkpoints = chosen["checkpoint"].tolist()
        cfg, test_shards, val_ids = resolve_data(checkpoints, args.test and storage.absolute(args.test))
        train_manifest = load_manifest(cfg.data.shards)
        load_manifest(test_shards)
        ray = init_ray()
        shared = {"--experiment": None if is_uri(args.experiment) else str(experiment), "--test": test_shards,
                  "data.shards (training shards of the models)": cfg.data.shards}  # fmt: skip
        storage.check_shared(shared, ray)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    sources = chosen["source"].tolist() if "source" in chosen else [None] * len(chosen)
    task_checkpoints = [
        s if isinstance(s, str) and s else p for s, p in zip(sources, checkpoints, strict=True)
    ]
    task = ray.remote(num_cpus=1, num_gpus=args.gpus_per_model)(predict_fn)
    refs = [
        task.remote(
            p,
            [cfg.data.shards, test_shards],
            [val_ids, None],
            args.tta,
            args.batch_size,
            args.gpus_per_model > 0,
        )
        for p in task_checkpoints
    ]
    logger.info("predicting %d validation series and %s with %d models", len(val_ids), test_shards, len(refs))
    try:
        results = ray.get(refs)  # [(val table, test table)] per model
    except ray.exceptions.RayTaskError as exc:
        logger.error("a prediction task failed: %s", exc)
        return 1
    val = E.average_predictions([r[0] for r in results])
    test = E.average_predictions([r[1] for r in results])
    prevalence = training_prevalence(cfg)
    scores = [
        score_model(f"trial {t}", r[0], prevalence) for t, r in zip(chosen["trial_id"], results, strict=True)
    ]
    ens = score_model(f"ensemble of {len(checkpoints)}", val, prevalence)
    scores.append(ens)
    thresholds = np.asarray(ens.thresholds)
    try:
        written = write_outputs(out, val, test, thresholds, cfg.data.shards, val_ids, test_shards)
    except S.SubmissionError as exc:
        logger.error("submission check failed, nothing written under that name: %s", exc)
        return 1
    spec = E.EnsembleSpec(
        models=task_checkpoints,  # URIs for a search on storage: ensemble.json stays usable elsewhere
        thresholds=thresholds.tolist(),
        size=int(train_manifest["size"]),
        windows=train_manifest["windows"],
        format=train_manifest["format"],
        tta=args.tta,
        val_f2=ens.micro_f2,
        single_f2=[s.micro_f2 for s in scores[:-1]],
        trial_ids=chosen["trial_id"].tolist(),
    )
    written.append(spec.save(out))
    probs, y_true = prediction_arrays(val)
    log_loss = rsna_weighted_log_loss(y_true, probs)
    report = make_report(
        out / "report",
        scores,
        probs=probs,
        y_true=y_true,
        thresholds=thresholds,
        optuna_db=experiment / "optuna.db",
        title=f"Ensemble of {args.experiment.rstrip('/').rsplit('/', 1)[-1]}",
    )

    print(f"\n{'model':<28}{'val micro-F2':>14}")
    for s in scores[:-1]:
        print(f"{s.name:<28}{s.micro_f2:>14.6f}")
    print(f"{'single best':<28}{max(s.micro_f2 for s in scores[:-1]):>14.6f}")
    print(f"ensemble validation micro-F2: {ens.micro_f2:.6f}")
    print(f"ensemble validation RSNA weighted log loss: {log_loss:.4f}")
    print("thresholds: " + ", ".join(f"{c}={t:.2f}" for c, t in zip(CLASSES, thresholds, strict=True)))
    print("files:")
    for path in written:
        print(
            f"  {storage.join(args.out, Path(path).relative_to(out).as_posix()) if is_uri(args.out) else path}"
        )
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
