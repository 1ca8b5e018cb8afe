"""Preprocess CT slices into Parquet shards with Ray tasks (one task per shard).

Examples (from the repository root):

    python ray_jobs/preprocess.py --format dlcv --input Blood_data/train --labels Blood_data/train.csv --out shards/dlcv --size 256
    python ray_jobs/preprocess.py --format rsna --input rsna/stage_2_train --labels rsna/stage_2_train.csv --out shards/rsna
    python ray_jobs/preprocess.py --format dicom --input new_studies/ --out shards/new --size 256
    python ray_jobs/preprocess.py --format dlcv --input s3://bucket/Blood_data/train \
        --labels s3://bucket/Blood_data/train.csv --out s3://bucket/shards/dlcv --size 256

Every path may be a storage URI (s3://, gs://, file://). Input on a URI is listed through the storage; for
rsna/dicom the driver downloads it to read the headers (in one process), and each shard task downloads the
slices it needs. On a cluster, a local --input/--labels/--out must be a folder every node shares (checked).

Joins the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``), else starts a local Ray. Re-running with
the same arguments reuses finished shards. Exits non-zero only when nothing usable is left.

The output folder is --out, or STORAGE/NAME with --name (--storage, default runs/). The job records its
arguments there (job_args.json) before it reads anything; --resume with only --out (or --name/--storage)
continues an interrupted run as recorded (a value given again must equal the recorded one): every shard
already written for the same series and options is reused, not rewritten.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python ray_jobs/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ichmodel.constants import DEFAULT_WINDOWS
from ray_jobs import storage
from ray_jobs.arg_types import positive_int
from ray_jobs.cli import (
    REPO_ROOT,
    add_output_arguments,
    init_ray,
    output_folder,
    parse_window,
    record_or_resume,
    setup_logging,
)
from ray_jobs.job_record import options_from, parse_job_args
from ray_jobs.leases import JOB_ERRORS, add_force_argument, hold_folder, job_failed

if TYPE_CHECKING:
    from ichmodel.preprocess import PreprocessOptions, ShardResult, ShardTask
    from ichmodel.readers import ReadResult

logger = logging.getLogger("ray_jobs.preprocess")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Turn CT slices into windowed, resized uint8 images in Parquet shards (one row group per "
        "series) plus manifest.json and skipped.csv, running one Ray task per shard.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--format",
        default=None,
        choices=["dlcv", "rsna", "dicom"],
        help="dlcv: <input>/<dirname>/<ID>.jpg (+ train.csv); rsna: flat folder of ID_<hex>.dcm "
        "(+ stage_2_train.csv); dicom: any folder of DICOM series, searched recursively, no labels "
        "(required, but for --resume)",
    )
    parser.add_argument(
        "--input",
        default=None,
        help="image folder; a Blood_data root (train/ + train.csv) or an RSNA root "
        "(stage_2_train/ + stage_2_train.csv) also works without --labels (required, but for --resume)",
    )
    parser.add_argument("--labels", default=None, help="label CSV (dlcv: train.csv, rsna: stage_2_train.csv)")
    parser.add_argument(
        "--out", default=None, help="output folder or URI (s3://...) for the shards (or give --name)"
    )
    add_output_arguments(parser, "shards")
    parser.add_argument(
        "--size", type=positive_int, default=256, help="side of the square output images (default 256)"
    )
    parser.add_argument(
        "--shard-series", type=positive_int, default=16, help="series per shard / Ray task (default 16)"
    )
    parser.add_argument(
        "--windows",
        type=parse_window,
        nargs="+",
        default=list(DEFAULT_WINDOWS),
        metavar="LEVEL,WIDTH",
        help="CT windows in HU, one output channel each (default: 40,80 80,200 600,2800)",
    )
    parser.add_argument(
        "--min-slices", type=positive_int, default=2, help="skip series with fewer usable slices"
    )
    parser.add_argument(
        "--num-cpus", type=positive_int, default=None, help="CPUs of a local Ray (default: all)"
    )
    add_force_argument(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs; a failure with its traceback"
    )
    return parser


@dataclass(frozen=True)
class PreprocessJob:
    """One preprocessing job, typed: every option of :func:`get_args_parser` (the same defaults; a test checks)."""

    format: str | None = None
    input: str | None = None
    labels: str | None = None
    out: str | None = None
    name: str | None = None
    storage: str = str(REPO_ROOT / "runs")
    resume: bool = False
    size: int = 256
    shard_series: int = 16
    windows: tuple[tuple[float, float], ...] = tuple(DEFAULT_WINDOWS)
    min_slices: int = 2
    num_cpus: int | None = None
    verbose: bool = False


def ray_map_fn(num_cpus: int | None):
    """A ``map_fn`` for the readers: one Ray task per chunk (in-process when there is only one chunk)."""

    def map_fn(fn, chunks):
        if len(chunks) <= 1:
            return [fn(c) for c in chunks]
        ray = init_ray(num_cpus)
        remote = ray.remote(fn)
        return ray.get([remote.remote(c) for c in chunks])

    return map_fn


def mirror_input(uri: str, folder: Path, contents: bool) -> Path:
    """List the files under ``uri`` through the storage and mirror them under ``folder``.

    With ``contents`` False only CSVs are downloaded and the other files are empty placeholders (enough to
    list a DLCV layout); their slices are fetched later by the shard tasks. Returns ``folder``.

    Raises:
        FileNotFoundError: when nothing is stored under ``uri``.
    """
    names = storage.list_files(uri)
    if not names:
        raise FileNotFoundError(f"No files under {uri}")
    for name in names:
        local = folder / name
        if contents or name.lower().endswith(".csv"):
            storage.download(storage.join(uri, name), local)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.touch()
    logger.info("listed %d files under %s", len(names), uri)
    return folder


def read_remote_input(fmt: str, uri: str, labels: str | None, folder: Path) -> ReadResult:
    """:func:`read_input` on a mirror of ``uri`` (and ``labels``), with every path turned back into a URI."""
    import dataclasses

    from ichmodel.readers import SkipRecord, read_input

    root = mirror_input(uri, folder / "input", contents=fmt != "dlcv")
    if labels is not None and storage.is_uri(labels):
        local_labels = folder / "labels" / labels.split("?", 1)[0].rsplit("/", 1)[-1]
        if not storage.download(labels, local_labels):
            raise FileNotFoundError(f"No label file at {labels}")
        labels = str(local_labels)
    found = read_input(fmt, str(root), labels)  # headers read in this process: the mirror is only here

    def to_uri(path: str) -> str:
        rel = Path(path).relative_to(root) if Path(path).is_relative_to(root) else None
        return storage.join(uri, rel.as_posix()) if rel is not None else path

    found.series = [
        dataclasses.replace(s, slices=tuple(dataclasses.replace(sl, path=to_uri(sl.path)) for sl in s.slices))
        for s in found.series
    ]
    found.skipped = [SkipRecord(to_uri(s.path), s.reason) for s in found.skipped]
    return found


def run_shards(
    tasks: list[ShardTask], out: str, options: PreprocessOptions, num_cpus: int | None
) -> list[ShardResult]:
    """Run :func:`write_shard` for every task as a Ray task, logging progress as shards finish."""
    from ichmodel.preprocess import write_shard

    ray = init_ray(num_cpus)

    def write_shard_on_node(task: ShardTask) -> tuple[str, ShardResult]:
        return ray.get_runtime_context().get_node_id(), write_shard(task, out, options)

    # SPREAD: on a cluster, shards go to every node rather than filling the head first.
    remote = ray.remote(write_shard_on_node).options(scheduling_strategy="SPREAD")
    pending = {remote.remote(task): task for task in tasks}
    results: list[ShardResult] = []
    per_node: dict[str, int] = {}
    start, slices = time.perf_counter(), 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        pending.pop(ready[0])
        node_id, result = ray.get(ready[0])
        per_node[node_id] = per_node.get(node_id, 0) + 1
        results.append(result)
        slices += result.num_rows
        rate = slices / max(time.perf_counter() - start, 1e-9)
        note = " (reused)" if result.reused else ""
        logger.info("shard %d/%d done%s, %.0f slices/s", len(results), len(tasks), note, rate)
    logger.info("shards per node: %s", {node[:12]: n for node, n in per_node.items()})
    return results


def check_paths(job: PreprocessJob) -> dict[str, str | None]:
    """``{option: absolute path or URI}`` of --input, --labels, --out, each checked for a submitted job
    (:func:`ray_jobs.storage.check_not_in_job_dir`) and, on a cluster (``RAY_ADDRESS``), for being shared by
    every node. Without one the job's own Ray will be one node, so nothing starts Ray here: bad input is
    reported before Ray's start (~5 s on 2 cores), and input with nothing usable never starts it.

    Raises:
        ValueError: naming the option and the path.
    """
    paths = {
        "--input": job.input,
        "--labels": job.labels,
        "--out": output_folder(job.out, job.name, job.storage),
    }
    for option, location in paths.items():
        storage.check_not_in_job_dir(option, location)
    paths = {k: None if v is None else storage.absolute(v) for k, v in paths.items()}
    if os.environ.get("RAY_ADDRESS"):
        storage.check_shared(paths, init_ray(job.num_cpus))
    return paths


def restore_or_record(values: dict) -> PreprocessJob:
    """The job's values (``vars(args)``) recorded in the output folder, or with ``--resume`` the recorded ones
    (:func:`ray_jobs.cli.record_or_resume`).

    Raises:
        ValueError: when --format or --input is missing, or a value given on resume differs from the record.
        FileNotFoundError: on --resume when the folder holds no record.
    """
    if not values["resume"] and (values["format"] is None or values["input"] is None):
        raise ValueError("--format and --input are required (unless --resume)")
    if values["input"] is not None:  # one spelling, recorded and compared on resume
        values = {**values, "input": storage.absolute(values["input"])}
    restored = record_or_resume(values, get_args_parser(), "preprocess")
    windows = tuple(tuple(w) for w in restored["windows"])
    return options_from(PreprocessJob, restored, windows=windows)


def main(args: argparse.Namespace) -> int:
    """Run (or with ``--resume`` continue) the job; ``args`` from :func:`parse_args` (or a plain
    ``parse_args``, where every value other than a default counts as given on resume)."""
    setup_logging(args.verbose)
    try:
        with hold_folder(output_folder(args.out, args.name, args.storage), "preprocess.py", args.force):
            job = restore_or_record(dict(vars(args)))
            return run_preprocess(job)
    except JOB_ERRORS as exc:
        return job_failed(exc, args.verbose)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2


def run_preprocess(job: PreprocessJob) -> int:
    """Read the input, write the shards with one Ray task each, then the manifest; the exit code."""
    from ichmodel.preprocess import PreprocessOptions, plan_shards, write_outputs
    from ichmodel.readers import read_input

    with tempfile.TemporaryDirectory(prefix="ich-preprocess-") as folder:
        try:
            paths = check_paths(job)
            options = PreprocessOptions(size=job.size, windows=tuple(job.windows), min_slices=job.min_slices)
            if storage.is_uri(paths["--input"]):
                found = read_remote_input(job.format, paths["--input"], paths["--labels"], Path(folder))
            else:
                found = read_input(
                    job.format, paths["--input"], paths["--labels"], map_fn=ray_map_fn(job.num_cpus)
                )
            tasks = plan_shards(found.series, job.shard_series)
        except (ValueError, FileNotFoundError) as exc:
            logger.error("%s", exc)
            return 2
    out = paths["--out"]
    logger.info(
        "%d series, %d slices in %d shards → %s", len(found.series), found.num_slices, len(tasks), out
    )
    results = run_shards(tasks, out, options, job.num_cpus) if tasks else []
    manifest = write_outputs(out, found, options, results)
    print(
        f"series: {manifest['num_series']}, slices: {manifest['num_slices']}, skipped: {manifest['num_skipped']} "
        f"(see {storage.join(out, 'skipped.csv')}); manifest: {storage.join(out, 'manifest.json')}"
    )
    if manifest["num_series"] == 0:
        logger.error("Nothing usable in %s: every input was skipped", job.input)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with which options it gave (:func:`ray_jobs.job_record.parse_job_args`)."""
    return parse_job_args(get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
