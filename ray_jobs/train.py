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

if not __package__:  # run as a script: this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import logging
import sys
from pathlib import Path

from ichmodel.config import Config
from ichmodel.demo_data import ensure_demo_data
from ray_jobs.cli import (
    DEMO_ROOT,
    REPO_ROOT,
    add_config_arguments,
    build_config,
    init_ray_for_job,
    setup_logging,
)
from ray_jobs.experiment import parse_job_args, read_job_record, resume_job_args, write_job_record
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
    parser.add_argument("--num-workers", type=int, default=2, help="DDP workers (default 2)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast; defaults to 16 "
                        "series per batch and 3 loader workers (--set data.batch_size=... overrides)")  # fmt: skip
    parser.add_argument(
        "--max-failures", type=int, default=1, help="worker failures retried from the last checkpoint"
    )
    parser.add_argument("--fail-at-epoch", type=int, default=None, help=argparse.SUPPRESS)  # test hook
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def run_config(args: argparse.Namespace) -> Config:
    """The run's config (:func:`ray_jobs.cli.build_config`); without ``--data``, on generated demo data."""
    if args.data is not None:
        return build_config(args, gpu=args.use_gpu)
    train_shards, _ = ensure_demo_data(DEMO_ROOT)
    defaults = {"data.shards": str(train_shards), "train.max_epochs": DEMO_EPOCHS.split(",")}
    return build_config(args, defaults, gpu=args.use_gpu)


def main(args: argparse.Namespace) -> int:
    """Train (or continue) the run; ``args`` from :func:`parse_args` (or a plain ``parse_args``, where every
    value other than a default counts as given on resume)."""
    setup_logging(args.verbose)
    storage = absolute(args.storage)
    run_dir = join(storage, args.name)
    try:
        if not args.resume and read_job_record(run_dir) is not None:
            # Train continues a run of the same name: every value must be the recorded one (nothing mixed).
            args.given = set(vars(args))
        if args.resume or read_job_record(run_dir) is not None:
            args, recorded = resume_job_args(args, get_args_parser(), run_dir, "train")
            cfg = Config.from_dict(recorded)
        else:
            cfg = run_config(args)
            write_job_record(run_dir, "train", args, cfg.to_dict())
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    ray = init_ray_for_job(args.storage, args.data and cfg.data.shards)
    if ray is None:
        return 2
    loop_config = {"config": cfg.to_dict(), "overrides": {}}
    if args.fail_at_epoch is not None:
        loop_config.update(
            fail_at_epoch=args.fail_at_epoch, fail_marker=str(Path(storage) / f".{args.name}.failed-once")
        )
    trainer = build_trainer(
        loop_config,
        name=args.name,
        storage_path=storage,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        max_failures=args.max_failures,
    )
    result = trainer.fit()
    if result.error:
        logger.error("training failed: %s", result.error)
        return 1
    metrics = result.metrics or {}
    checkpoint = Path(result.checkpoint.path) / CHECKPOINT_FILE if result.checkpoint else None
    summary = {
        "name": args.name,
        "finished": bool(metrics.get("finished")),
        "global_epoch": metrics.get("global_epoch"),
        "stage": metrics.get("stage"),
        "final_f2": metrics.get("final_f2"),
        "val_f2": metrics.get("val_f2"),
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    print(json.dumps(summary, indent=2))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with which options it gave (:func:`ray_jobs.experiment.parse_job_args`)."""
    return parse_job_args(get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
