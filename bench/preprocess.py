"""Preprocessing speed against bare DICOM decoding, on generated RSNA-style series (single process).

    python bench/preprocess.py [--patients 8] [--slices 24] [--input-size 256] [--size 128] [--repeats 5]
                               [--also 512:256,512:512] [--compression lz4]

Prints slices/s of
  * bare decode: ``pydicom.dcmread(f).pixel_array`` over every file;
  * preprocess: ``ichmodel.preprocess.write_shard`` over the same files (read + HU + resize + windows +
    Parquet write), the work of one Ray task;
  * header scan: the reader's grouping pass (``read_rsna``), which runs once before the shards;
and the ratio preprocess / bare decode (goal >= 0.7), for ``--input-size`` → ``--size`` and for every
``INPUT:OUTPUT`` pair of ``--also`` (RSNA slices are 512 px), all in one run. Files are read once beforehand
so both run from the page cache. Each of ``--repeats`` rounds times the three in turn, so load on a shared
machine hits them alike; rates are the medians over rounds, and the ratio is the median of each round's own
ratio (bare and full timed back to back); the same ratio of CPU times (``ratio_cpu``) moves less with other
people's load. ``--compression`` swaps the shards' Parquet codec (``ichmodel.preprocess.SHARD_COMPRESSION``)
to price it. The last line is ``RESULT {json}`` for ``bench/run_all.py``: the keys of the ``--input-size`` →
``--size`` pair, plus ``ratio_<in>_<out>``, ``ratio_cpu_<in>_<out>``, ``preprocess_slices_per_s_<in>_<out>``
and ``decode_slices_per_s_<in>_<out>`` for every pair.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from ichmodel import preprocess, synth
from ichmodel.preprocess import PreprocessOptions, plan_shards, write_shard
from ichmodel.readers import read_rsna


def _size_pairs(text: str) -> list[tuple[int, int]]:
    items = [item.split(":") for item in text.split(",") if item.strip()]
    if not all(len(item) == 2 and all(v.strip().isdigit() for v in item) for item in items):
        raise argparse.ArgumentTypeError(f"expected INPUT:OUTPUT pairs like 512:256,512:512. Got {text!r}")
    return [(int(a), int(b)) for a, b in items]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--slices", type=int, default=24, help="slices per series")
    parser.add_argument("--input-size", type=int, default=256, help="side of the generated DICOM images")
    parser.add_argument("--size", type=int, default=128, help="side of the preprocessed images")
    parser.add_argument(
        "--also",
        type=_size_pairs,
        default=[(512, 256), (512, 512)],
        help="more INPUT:OUTPUT size pairs measured in the same run (default 512:256,512:512; '' for none)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder)")
    parser.add_argument(
        "--compression",
        default=preprocess.SHARD_COMPRESSION,
        help=f"Parquet codec of the shards (default: the library's, {preprocess.SHARD_COMPRESSION})",
    )
    return parser


def interleaved_times(fns: dict, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """``(wall, CPU)`` seconds of each function in each of ``repeats`` rounds that run them in turn (fair on a
    busy machine)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def measure(root: Path, args: argparse.Namespace, input_size: int, size: int) -> dict[str, float]:
    """Rates of bare decode, ``write_shard`` and the header scan for ``input_size`` → ``size`` px."""
    data = root / f"data-{input_size}"
    if not data.exists():
        start = time.perf_counter()
        synth.write_rsna_dataset(data, args.patients, (args.slices, args.slices), input_size, seed=0)
        print(
            f"generated {args.patients * args.slices} slices of {input_size} px in {time.perf_counter() - start:.1f} s"
        )
    images, labels = data / "stage_2_train", data / "stage_2_train.csv"
    files = sorted(images.iterdir())
    tasks = plan_shards(read_rsna(images, labels).series, series_per_shard=4)
    options = PreprocessOptions(size=size)

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
    times = interleaved_times(
        {"decode": bare, "full": shards, "scan": lambda: read_rsna(images, labels)}, args.repeats
    )
    rates = {name: len(files) / statistics.median(w for w, _ in rounds) for name, rounds in times.items()}
    ratios = [d[0] / f[0] for d, f in zip(times["decode"], times["full"], strict=True)]
    rates["ratio"] = statistics.median(ratios)
    rates["ratio_cpu"] = statistics.median(
        d[1] / f[1] for d, f in zip(times["decode"], times["full"], strict=True)
    )
    print(
        f"input {input_size} px -> output {size} px, {len(files)} slices, median of {args.repeats} rounds, "
        f"shards {preprocess.SHARD_COMPRESSION}"
    )
    print(f"  bare decode (dcmread + pixel_array): {rates['decode']:8.0f} slices/s")
    print(f"  preprocess (read+HU+resize+windows+parquet): {rates['full']:8.0f} slices/s")
    print(f"  header scan (read_rsna, once per run):  {rates['scan']:8.0f} slices/s")
    print(
        f"  ratio preprocess / bare decode: {rates['ratio']:.2f} (goal >= 0.7; rounds: "
        + " ".join(f"{r:.2f}" for r in ratios)
        + f"); by CPU time {rates['ratio_cpu']:.2f}"
    )
    return rates


def main(args: argparse.Namespace) -> int:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    preprocess.SHARD_COMPRESSION = args.compression  # read by write_shard at each write
    pairs = [(args.input_size, args.size)] + [p for p in args.also if p != (args.input_size, args.size)]
    try:
        measured = {pair: measure(root, args, *pair) for pair in pairs}
        rates = measured[(args.input_size, args.size)]
        result = {
            "decode_slices_per_s": rates["decode"],
            "preprocess_slices_per_s": rates["full"],
            "scan_slices_per_s": rates["scan"],
            "ratio": rates["ratio"],
            "ratio_cpu": rates["ratio_cpu"],
            "compression": args.compression,
            "input_size": args.input_size,
            "size": args.size,
        }
        print(
            "ratio preprocess / bare decode by size: "
            + ", ".join(f"{i}->{o} {r['ratio']:.2f}" for (i, o), r in measured.items())
        )
        for (input_size, size), r in measured.items():
            result[f"ratio_{input_size}_{size}"] = r["ratio"]
            result[f"ratio_cpu_{input_size}_{size}"] = r["ratio_cpu"]
            result[f"preprocess_slices_per_s_{input_size}_{size}"] = r["full"]
            result[f"decode_slices_per_s_{input_size}_{size}"] = r["decode"]
        print("RESULT " + json.dumps(result))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
