"""Preprocessing speed against bare DICOM decoding, on generated RSNA-style series (single process).

    python bench/preprocess.py [--patients 8] [--slices 24] [--input-size 256] [--size 128] [--repeats 3]

Prints slices/s of
  * bare decode: ``pydicom.dcmread(f).pixel_array`` over every file;
  * preprocess: ``ichmodel.preprocess.write_shard`` over the same files (read + HU + resize + windows +
    Parquet write), the work of one Ray task;
  * header scan: the reader's grouping pass (``read_rsna``), which runs once before the shards;
and the ratio preprocess / bare decode (goal >= 0.7). Files are read once beforehand so both run from the
page cache; each figure is the best of ``--repeats`` rounds, which run the three in turn. The last line is
``RESULT {json}`` for ``bench/run_all.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pydicom  # noqa: E402

from ichmodel import synth  # noqa: E402
from ichmodel.preprocess import PreprocessOptions, plan_shards, write_shard  # noqa: E402
from ichmodel.readers import read_rsna  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--slices", type=int, default=24, help="slices per series")
    parser.add_argument("--input-size", type=int, default=256, help="side of the generated DICOM images")
    parser.add_argument("--size", type=int, default=128, help="side of the preprocessed images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder)")
    return parser


def best_rates(fns: dict, num_slices: int, repeats: int) -> dict[str, float]:
    """Slices/s of each function, best of ``repeats`` rounds that run them in turn (fair on a busy machine)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: num_slices / seconds for name, seconds in best.items()}


def main(args: argparse.Namespace) -> int:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        start = time.perf_counter()
        synth.write_rsna_dataset(
            root / "data", args.patients, (args.slices, args.slices), args.input_size, seed=0
        )
        print(
            f"generated {args.patients * args.slices} slices of {args.input_size} px in {time.perf_counter() - start:.1f} s"
        )
        images, labels = root / "data" / "stage_2_train", root / "data" / "stage_2_train.csv"
        files = sorted(images.iterdir())
        n = len(files)
        found = read_rsna(images, labels)
        tasks = plan_shards(found.series, series_per_shard=4)
        options = PreprocessOptions(size=args.size)

        def bare() -> None:
            for f in files:
                pydicom.dcmread(f).pixel_array  # noqa: B018

        def shards() -> None:
            out = root / "shards"
            shutil.rmtree(out, ignore_errors=True)
            for task in tasks:
                write_shard(task, out, options)

        bare()  # warm the page cache and imports
        shards()
        rates = best_rates(
            {"decode": bare, "full": shards, "scan": lambda: read_rsna(images, labels)}, n, args.repeats
        )
        decode_rate, full_rate, scan_rate = rates["decode"], rates["full"], rates["scan"]
        print(f"input {args.input_size} px -> output {args.size} px, {n} slices, best of {args.repeats}")
        print(f"bare decode (dcmread + pixel_array): {decode_rate:8.0f} slices/s")
        print(f"preprocess (read+HU+resize+windows+parquet): {full_rate:8.0f} slices/s")
        print(f"header scan (read_rsna, once per run):  {scan_rate:8.0f} slices/s")
        print(f"ratio preprocess / bare decode: {full_rate / decode_rate:.2f} (goal >= 0.7)")
        result = {
            "decode_slices_per_s": decode_rate,
            "preprocess_slices_per_s": full_rate,
            "scan_slices_per_s": scan_rate,
            "ratio": full_rate / decode_rate,
            "input_size": args.input_size,
            "size": args.size,
        }
        print("RESULT " + json.dumps(result))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
