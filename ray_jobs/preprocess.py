"""Preprocess CT slices into Parquet shards with Ray tasks (one task per shard).

Examples (from the repository root):

    python ray_jobs/preprocess.py --format dlcv --input Blood_data/train --labels Blood_data/train.csv --out shards/dlcv --size 256
    python ray_jobs/preprocess.py --format rsna --input rsna/stage_2_train --labels rsna/stage_2_train.csv --out shards/rsna
    python ray_jobs/preprocess.py --format dicom --input new_studies/ --out shards/new --size 256

Joins the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``), else starts a local Ray. Re-running with
the same arguments reuses finished shards. Exits non-zero only when nothing usable is left.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from ichmodel.constants import DEFAULT_WINDOWS  # noqa: E402
from ichmodel.preprocess import (
    PreprocessOptions,
    ShardResult,
    ShardTask,
    plan_shards,
    write_outputs,
    write_shard,
)  # noqa: E402
from ichmodel.readers import read_input  # noqa: E402
from ray_jobs.cli import init_ray, parse_window, setup_logging  # noqa: E402

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
        required=True,
        choices=["dlcv", "rsna", "dicom"],
        help="dlcv: <input>/<dirname>/<ID>.jpg (+ train.csv); rsna: flat folder of ID_<hex>.dcm "
        "(+ stage_2_train.csv); dicom: any folder of DICOM series, searched recursively, no labels",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="image folder; a Blood_data root (train/ + train.csv) or an RSNA root "
        "(stage_2_train/ + stage_2_train.csv) also works without --labels",
    )
    parser.add_argument("--labels", default=None, help="label CSV (dlcv: train.csv, rsna: stage_2_train.csv)")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument(
        "--size", type=int, default=256, help="side of the square output images (default 256)"
    )
    parser.add_argument(
        "--shard-series", type=int, default=16, help="series per shard / Ray task (default 16)"
    )
    parser.add_argument(
        "--windows",
        type=parse_window,
        nargs="+",
        default=list(DEFAULT_WINDOWS),
        metavar="LEVEL,WIDTH",
        help="CT windows in HU, one output channel each (default: 40,80 80,200 600,2800)",
    )
    parser.add_argument("--min-slices", type=int, default=2, help="skip series with fewer usable slices")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def ray_map_fn(num_cpus: int | None):
    """A ``map_fn`` for the readers: one Ray task per chunk (in-process when there is only one chunk)."""

    def map_fn(fn, chunks):
        if len(chunks) <= 1:
            return [fn(c) for c in chunks]
        ray = init_ray(num_cpus)
        remote = ray.remote(fn)
        return ray.get([remote.remote(c) for c in chunks])

    return map_fn


def run_shards(
    tasks: list[ShardTask], out: Path, options: PreprocessOptions, num_cpus: int | None
) -> list[ShardResult]:
    """Run :func:`write_shard` for every task as a Ray task, logging progress as shards finish."""
    ray = init_ray(num_cpus)

    def write_shard_on_node(task: ShardTask) -> tuple[str, ShardResult]:
        return ray.get_runtime_context().get_node_id(), write_shard(task, str(out), options)

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


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    try:
        options = PreprocessOptions(size=args.size, windows=tuple(args.windows), min_slices=args.min_slices)
        found = read_input(args.format, args.input, args.labels, map_fn=ray_map_fn(args.num_cpus))
        tasks = plan_shards(found.series, args.shard_series)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    out = Path(args.out)
    logger.info(
        "%d series, %d slices in %d shards → %s", len(found.series), found.num_slices, len(tasks), out
    )
    results = run_shards(tasks, out, options, args.num_cpus) if tasks else []
    manifest = write_outputs(out, found, options, results)
    print(
        f"series: {manifest['num_series']}, slices: {manifest['num_slices']}, skipped: {manifest['num_skipped']} "
        f"(see {out / 'skipped.csv'}); manifest: {out / 'manifest.json'}"
    )
    if manifest["num_series"] == 0:
        logger.error("Nothing usable in %s: every input was skipped", args.input)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
