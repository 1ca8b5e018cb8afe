"""The whole path on the embedded demo: synthetic head CT → preprocess → tune → fold ensemble → submission.

    python ray_jobs/demo.py                 # what `make demo` runs: CPU, local Ray, about three minutes
    python ray_jobs/demo.py --patients 60 --num-samples 8 --epochs 2,2,4 --size 96 --top-k 2 --folds 3 --fold-epochs 2,2,4

Every step runs what one of the real jobs runs (ray_jobs/preprocess.py, tune.py, ensemble.py: the same
functions their main calls), and the log prints that job's command line, so a user can rerun any step alone.
The search trains its shared stages once (one Train run), then --num-samples trials of the last stage; the
ensemble retrains the --top-k best configurations on --folds folds (ray_jobs/folds.py, --fold-epochs caps)
and prints single best vs ensemble out-of-fold (OOF) micro-F2, each labelled with its rows and thresholds.
The defaults are the smallest run that still shows every step (5 Train starts: shared stages, 2 trials, 2
fold runs); their figures show the pipeline works, not how good the model is (a few epochs on 32 generated
series). It ends with a table of each step's wall time. Re-running reuses the generated data and shards; the
search and the fold runs start fresh unless --resume is given.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python ray_jobs/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ichmodel.scores import fold_scores, format_scores
from ray_jobs import ensemble, preprocess, tune
from ray_jobs.arg_types import positive_int, two_or_more
from ray_jobs.cli import REPO_ROOT, init_ray, setup_logging
from ray_jobs.job_record import command_line

logger = logging.getLogger("ray_jobs.demo")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run generate → preprocess → tune → ensemble on synthetic demo data.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "runs" / "demo"), help="where everything goes (default runs/demo)"
    )
    parser.add_argument(
        "--patients", type=positive_int, default=32, help="training series to generate (default 32)"
    )
    parser.add_argument(
        "--test-patients", type=positive_int, default=8, help="unlabelled test series (default 8)"
    )
    parser.add_argument("--size", type=positive_int, default=64, help="image side in pixels (default 64)")
    parser.add_argument(
        "--num-samples", type=positive_int, default=2, help="trials of the search (default 2)"
    )
    parser.add_argument("--epochs", default="1,1,2", help="epoch caps of the three stages (default 1,1,2)")
    parser.add_argument(
        "--top-k", type=positive_int, default=1, help="configurations retrained on folds (default 1)"
    )
    parser.add_argument("--folds", type=two_or_more, default=2, help="folds of the ensemble (default 2)")
    parser.add_argument(
        "--fold-epochs", default="1,0,1", help="epoch caps of each fold run's three stages (default 1,0,1)"
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo search")
    parser.add_argument("--seed", type=int, default=0)
    return parser


#: ``(step, seconds)`` of this run, in order: the closing table.
STEP_TIMES: list[tuple[str, float]] = []


def timed(name: str, run: Callable[[], object]) -> object:
    """Run ``run()``, keeping its wall time under ``name`` for the closing table."""
    started = time.perf_counter()
    result = run()
    STEP_TIMES.append((name, time.perf_counter() - started))
    return result


def run_step(name: str, job: str, options: object, run: Callable[[], int]) -> None:
    """Run one step (``run``: what ``ray_jobs/<job>.py`` with ``options`` runs), logging its command line."""
    logger.info("── %s: python ray_jobs/%s.py %s", name, job, " ".join(command_line(options)))
    code = timed(name, run)
    if code != 0:
        raise SystemExit(f"{name} failed with exit code {code}; see the log above")
    logger.info("── %s done in %.0f s", name, STEP_TIMES[-1][1])


def preprocess_step(name: str, job: preprocess.PreprocessJob) -> None:
    """One preprocessing step, recorded in its output folder as ``ray_jobs/preprocess.py`` records it."""
    run_step(
        name, "preprocess", job, lambda: preprocess.run_preprocess(preprocess.restore_or_record(asdict(job)))
    )


def time_table(total: float) -> list[str]:
    """The closing table: each step's wall time and share of the demo's, then the total."""
    lines = [f"  {'step':<20}{'wall time':>10}{'share':>8}"]
    for name, seconds in STEP_TIMES:
        lines.append(f"  {name:<20}{seconds:>9.0f}s{seconds / total:>8.0%}")
    lines.append(f"  {'total':<20}{total:>9.0f}s")
    return lines


def main(args: argparse.Namespace) -> int:
    setup_logging()
    out = Path(args.out).resolve()
    raw, shards, runs = out / "Blood_data", out / "shards", out / "runs"
    started = time.perf_counter()
    if not (raw / "train.csv").is_file():
        from ichmodel import synth

        logger.info(
            "── generate: %d + %d synthetic series at %d px in %s",
            args.patients,
            args.test_patients,
            args.size,
            raw,
        )
        timed(
            "generate",
            lambda: synth.write_dlcv_dataset(
                raw, args.patients, (12, 24), args.size, args.seed, args.test_patients
            ),
        )
    timed("start Ray", init_ray)
    train = preprocess.PreprocessJob(format="dlcv", input=str(raw / "train"), labels=str(raw / "train.csv"),
                                     out=str(shards / "train"), size=args.size)  # fmt: skip
    preprocess_step("preprocess train", train)
    test = preprocess.PreprocessJob(
        format="dlcv", input=str(raw / "test"), out=str(shards / "test"), size=args.size
    )
    preprocess_step("preprocess test", test)
    if not args.resume and (runs / "search").exists():
        shutil.rmtree(runs / "search")
    given = {"data", "storage", "name", "epochs", "num_samples", "seed", "set"} | (
        {"resume"} if args.resume else set()
    )
    search = tune.SearchOptions(
        data=str(shards / "train"),
        storage=str(runs),
        name="search",
        epochs=args.epochs,
        num_samples=args.num_samples,
        seed=args.seed,
        set=("data.val_fraction=0.2",),
        resume=args.resume,
        given=frozenset(given),  # what a resume compares with the record, as from the command line
    )
    run_step("tune", "tune", search, lambda: tune.run_search(search))
    submission = out / "submission"
    if not args.resume and submission.exists():
        shutil.rmtree(submission)  # its fold runs were trained on the search just replaced
    chosen = ensemble.EnsembleOptions(experiment=str(runs / "search"), top_k=args.top_k, folds=args.folds,
                                      fold_epochs=args.fold_epochs, test=str(shards / "test"),
                                      out=str(submission))  # fmt: skip
    run_step(
        "ensemble",
        "ensemble",
        chosen,
        lambda: ensemble.run_ensemble(*ensemble.record_options(asdict(chosen))),
    )
    total = time.perf_counter() - started
    summary = json.loads((submission / "fold_ensemble.json").read_text())
    print(
        f"\nDemo finished in {total / 60:.1f} min (the search's own figures: {runs / 'search' / 'trials.csv'})."
    )
    print(f"Out-of-fold figures of the {args.folds}-fold ensemble (as in the report and on the RESULT line):")
    print("\n".join(f"  {line}" for line in format_scores(fold_scores(summary))))
    print(f"  submission files: {submission}")
    print(f"  report:           {submission / 'report' / 'index.html'}")
    print(
        f"  viewer:           {submission / 'viewer' / 'index.html'} (OOF rows, per series; open in a browser)"
    )
    print(f"  TensorBoard:      tensorboard --logdir {runs / 'search'}")
    print("Wall time per step:")
    print("\n".join(time_table(total)))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
