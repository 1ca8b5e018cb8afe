"""Preprocessing speed against bare DICOM decoding, on generated RSNA-style series (single process).

    python bench/preprocess.py [--patients 8] [--slices 24] [--input-size 256] [--size 128] [--repeats 3]
                               [--also 512:256,512:512]

Prints slices/s of
  * bare decode: ``pydicom.dcmread(f).pixel_array`` over every file;
  * preprocess: ``ichmodel.preprocess.write_shard`` over the same files (read + HU + resize + windows +
    Parquet write), the work of one Ray task;
  * header scan: the reader's grouping pass (``read_rsna``), which runs once before the shards;
and the ratio preprocess / bare decode (goal >= 0.7), for ``--input-size`` → ``--size`` and for every
``INPUT:OUTPUT`` pair of ``--also`` (RSNA slices are 512 px), all in one run. Files are read once beforehand
so both run from the page cache; each figure is the best of ``--repeats`` rounds, which run the three in
turn. The last line is ``RESULT {json}`` for ``bench/run_all.py``: the keys of the ``--input-size`` →
``--size`` pair, plus ``ratio_<in>_<out>`` and ``preprocess_slices_per_s_<in>_<out>`` for every pair.
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
    rates = best_rates(
        {"decode": bare, "full": shards, "scan": lambda: read_rsna(images, labels)}, len(files), args.repeats
    )
    print(f"input {input_size} px -> output {size} px, {len(files)} slices, best of {args.repeats}")
    print(f"  bare decode (dcmread + pixel_array): {rates['decode']:8.0f} slices/s")
    print(f"  preprocess (read+HU+resize+windows+parquet): {rates['full']:8.0f} slices/s")
    print(f"  header scan (read_rsna, once per run):  {rates['scan']:8.0f} slices/s")
    print(f"  ratio preprocess / bare decode: {rates['full'] / rates['decode']:.2f} (goal >= 0.7)")
    return rates


def main(args: argparse.Namespace) -> int:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    pairs = [(args.input_size, args.size)] + [p for p in args.also if p != (args.input_size, args.size)]
    try:
        measured = {pair: measure(root, args, *pair) for pair in pairs}
        rates = measured[(args.input_size, args.size)]
        result = {
            "decode_slices_per_s": rates["decode"],
            "preprocess_slices_per_s": rates["full"],
            "scan_slices_per_s": rates["scan"],
            "ratio": rates["full"] / rates["decode"],
            "input_size": args.input_size,
            "size": args.size,
        }
        print(
            "ratio preprocess / bare decode by size: "
            + ", ".join(f"{i}->{o} {r['full'] / r['decode']:.2f}" for (i, o), r in measured.items())
        )
        for (input_size, size), r in measured.items():
            result[f"ratio_{input_size}_{size}"] = r["full"] / r["decode"]
            result[f"preprocess_slices_per_s_{input_size}_{size}"] = r["full"]
            result[f"decode_slices_per_s_{input_size}_{size}"] = r["decode"]
        print("RESULT " + json.dumps(result))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
