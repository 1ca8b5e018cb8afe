"""Train one configuration of the multitask model with Ray Train (DDP over ``--num-workers`` workers).

Examples (from the repository root):

    python ray_jobs/train.py                                   # embedded demo data, 2 CPU workers
    python ray_jobs/train.py --data shards/dlcv --num-workers 8 --use-gpu --name dlcv-full
    python ray_jobs/train.py --data shards/dlcv --set loss.nu=0.5 --set train.max_epochs=[5,5,10]
    ray job submit --working-dir . -- python ray_jobs/train.py --data s3://bucket/shards --storage s3://bucket/runs

Runs the paper's three stages (pretrain; pretrain + masking/diversity transfer; fine-tune with all five
tasks). Rank 0 checkpoints every epoch to STORAGE/NAME; re-running with the same --name resumes at the same
stage and epoch, and a failed worker is restarted from the last checkpoint (--max-failures). The run records
its arguments and config in STORAGE/NAME/job_args.json: `--name N --storage S --resume` continues it as recorded
(a value given that differs from the record is an error); a rerun without --resume must give the same values.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python ray_jobs/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ichmodel.config import Config
from ichmodel.demo_data import ensure_demo_data
from ray_jobs.arg_types import non_negative_int, positive_int
from ray_jobs.cli import (
    DEMO_ROOT,
    REPO_ROOT,
    ConfigArgs,
    add_config_arguments,
    build_config,
    init_ray_for_job,
    setup_logging,
    workers_fit,
)
from ray_jobs.job_record import (
    options_from,
    parse_job_args,
    read_job_record,
    resume_job_args,
    write_job_record,
)
from ray_jobs.leases import JOB_ERRORS, add_force_argument, failure_line, hold_folder, job_failed
from ray_jobs.storage import absolute, join
from ray_jobs.worker import CHECKPOINT_FILE, build_trainer

logger = logging.getLogger("ray_jobs.train")
#: Epoch caps on the generated demo data, unless --epochs, --set or --config say otherwise.
DEMO_EPOCHS = "2,2,2"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Staged multitask training of one configuration with Ray Train.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_caps = ",".join(str(e) for e in Config().train.max_epochs)
    add_config_arguments(
        parser,
        epochs_help=f"epoch caps of the three stages (default {default_caps} with --data, {DEMO_EPOCHS} on the "
        "demo data; --config or --set train.max_epochs replaces the default). A stage also ends early when "
        "its learning rate falls below train.min_lr",
    )
    parser.add_argument("--name", default="train", help="run name; the same name resumes (default: train)")
    parser.add_argument(
        "--storage", default=str(REPO_ROOT / "runs"), help="local folder or s3:// URI for results"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue run --name with its recorded arguments"
    )
    parser.add_argument("--num-workers", type=positive_int, default=2, help="DDP workers (default 2)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast; defaults to 16 "
                        "series per batch and 3 loader workers (--set data.batch_size=... overrides)")  # fmt: skip
    parser.add_argument(
        "--max-failures",
        type=non_negative_int,
        default=1,
        help="worker failures retried from the last checkpoint",
    )
    parser.add_argument("--fail-at-epoch", type=int, default=None, help=argparse.SUPPRESS)  # test hook
    add_force_argument(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs; a failure with its traceback"
    )
    return parser


@dataclass(frozen=True)
class TrainRun:
    """Where and how one Train run goes: STORAGE/NAME (``storage`` as given), its workers, retries, the test hook."""

    name: str
    storage: str
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 1
    fail_at_epoch: int | None = None


def run_config(config_args: ConfigArgs, use_gpu: bool = False) -> Config:
    """The run's config (:func:`ray_jobs.cli.build_config`); without ``--data``, on generated demo data."""
    if config_args.data is not None:
        return build_config(config_args, gpu=use_gpu)
    train_shards, _ = ensure_demo_data(DEMO_ROOT)
    defaults = {"data.shards": str(train_shards), "train.max_epochs": DEMO_EPOCHS.split(",")}
    return build_config(config_args, defaults, gpu=use_gpu)


def train_run(cfg: Config, run: TrainRun, data: str | None, record: Callable[[], None] | None = None) -> int:
    """Fit (or continue) the Train run ``run`` of ``cfg`` on Ray and print its summary; the exit code.

    ``data``: ``--data`` as given (checked to be shared by every node of a cluster), None for the demo data.
    ``record``: writes a new run's ``job_args.json``, called once the checks passed (a run refused for its
    data or its workers records nothing, so the corrected command may reuse the name).
    """
    ray = init_ray_for_job(run.storage, data and cfg.data.shards)
    if ray is None:
        return 2
    if not workers_fit(ray, {"num_workers": run.num_workers, "use_gpu": run.use_gpu}, "--num-workers"):
        return 2
    if record is not None:
        record()
    storage = absolute(run.storage)
    loop_config = {"config": cfg.to_dict(), "overrides": {}}
    if run.fail_at_epoch is not None:
        loop_config.update(
            fail_at_epoch=run.fail_at_epoch, fail_marker=str(Path(storage) / f".{run.name}.failed-once")
        )
    trainer = build_trainer(
        loop_config,
        name=run.name,
        storage_path=storage,
        num_workers=run.num_workers,
        use_gpu=run.use_gpu,
        max_failures=run.max_failures,
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError, after --max-failures retries
        line = failure_line(exc, join(storage, run.name))
        if line is None:
            raise
        logger.error("training failed: %s", line)
        logger.debug("the failure as Ray reported it", exc_info=exc)
        return 1
    if result.error:
        logger.error(
            "training failed: %s", failure_line(result.error, join(storage, run.name)) or result.error
        )
        return 1
    metrics = result.metrics or {}
    checkpoint = Path(result.checkpoint.path) / CHECKPOINT_FILE if result.checkpoint else None
    summary = {
        "name": run.name,
        "finished": bool(metrics.get("finished")),
        "global_epoch": metrics.get("global_epoch"),
        "stage": metrics.get("stage"),
        "final_f2": metrics.get("final_f2"),
        "val_f2": metrics.get("val_f2"),
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    print(json.dumps(summary, indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    """Train (or continue) the run; ``args`` from :func:`parse_args` (or a plain ``parse_args``, where every
    value other than a default counts as given on resume). A run another job holds, or a storage failure,
    ends it with one line (the traceback with ``-v``)."""
    setup_logging(args.verbose)
    run_dir = join(absolute(args.storage), args.name)
    try:
        with hold_folder(run_dir, "train.py", args.force):  # one writer per run: a second job ends here
            return train_in(run_dir, dict(vars(args)))
    except JOB_ERRORS as exc:
        return job_failed(exc, args.verbose)


def train_in(run_dir: str, values: dict) -> int:
    """Read back and check the run's arguments in ``run_dir`` (or, for a new run, record them once
    :func:`train_run` has checked them), then :func:`train_run`."""
    record = None
    try:
        recorded = read_job_record(run_dir)
        if not values["resume"] and recorded is not None:
            # Train continues a run of the same name: every value must be the recorded one (nothing mixed).
            values = {**values, "given": set(values)}
        if values["resume"] or recorded is not None:
            values, config = resume_job_args(values, get_args_parser(), run_dir, "train")
            cfg = Config.from_dict(config)
        else:
            cfg = run_config(ConfigArgs.of(values), use_gpu=values["use_gpu"])
            record = partial(write_job_record, run_dir, "train", values, cfg.to_dict())
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    return train_run(cfg, options_from(TrainRun, values), values["data"], record)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with which options it gave (:func:`ray_jobs.job_record.parse_job_args`)."""
    return parse_job_args(get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
