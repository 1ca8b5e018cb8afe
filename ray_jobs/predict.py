"""Predict hemorrhages on new, unlabelled head CT studies with one checkpoint or a saved ensemble.

Examples (from the repository root):

    python ray_jobs/predict.py --ensemble runs/demo/submission --input new_studies/ --out runs/new
    python ray_jobs/predict.py --checkpoint runs/search/.../checkpoint.pt --input new_studies/ --out runs/new --tta
    python ray_jobs/predict.py --ensemble runs/submission --input shards/new --out runs/new   # already preprocessed

--input is a folder of DICOM files (searched recursively, any names; series are grouped by
SeriesInstanceUID and ordered by position) or a shard folder written by ray_jobs/preprocess.py. DICOM input
is preprocessed into OUT/shards with the image size and CT windows the models were trained with (from
ensemble.json, or from the checkpoint's training manifest; --size/--window override). Files that cannot be
used are listed with the reason (OUT/shards/skipped.csv).

Writes OUT/per_slice.csv (dirname,ID,ich,ivh,sah,sdh,edh 0/1 at the ensemble's thresholds; dirname is the
series UID, ID the file path), OUT/probabilities.csv (per-slice probabilities) and OUT/series_summary.csv
(per series: slices, highest probability and positive slices per class), and OUT/viewer/index.html (per
series, a strip per class of per-slice probability against the threshold, the decision and thumbnails of the
slices that fired; opens from disk), and prints the summary.
Runs in this process (no Ray cluster needed); --device cuda uses a GPU with bf16. --checkpoint, --ensemble,
--input (shards) and --out may be storage URIs (s3://, gs://, file://); so may the models in ensemble.json.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python ray_jobs/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray_jobs import storage
from ray_jobs.arg_types import positive_int
from ray_jobs.cli import parse_window, setup_logging
from ray_jobs.job_record import options_from

logger = logging.getLogger("ray_jobs.predict")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-slice and per-series hemorrhage predictions for new DICOM studies.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="one checkpoint.pt (thresholds from the checkpoint)")
    source.add_argument(
        "--ensemble", help="folder (or file) with ensemble.json written by ray_jobs/ensemble.py"
    )
    parser.add_argument(
        "--input", required=True, help="folder of DICOM studies, or a preprocessed shard folder"
    )
    parser.add_argument(
        "--out", required=True, help="output folder (shards/, per_slice.csv, series_summary.csv, ...)"
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time augmentation: --tta also predicts left-right flipped slices and averages (flip); "
        "--no-tta turns it off (default: as ensemble.json records it, which may name flip and/or reverse = "
        "reversed slice order; off for --checkpoint)",
    )
    parser.add_argument(
        "--size", type=positive_int, default=None, help="image side in pixels (default: as trained)"
    )
    parser.add_argument(
        "--window",
        type=parse_window,
        action="append",
        default=None,
        metavar="LEVEL,WIDTH",
        help="CT window in HU, one per channel, repeat the flag (default: as trained)",
    )
    parser.add_argument(
        "--min-slices", type=positive_int, default=1, help="skip series with fewer slices (default 1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=4, help="series per forward pass (default 4)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


@dataclass(frozen=True)
class PredictOptions:
    """One prediction job, typed: the options of :func:`get_args_parser`."""

    input: str
    out: str
    checkpoint: str | None = None
    ensemble: str | None = None
    tta: bool | None = None
    size: int | None = None
    window: tuple[tuple[float, float], ...] | None = None
    min_slices: int = 1
    device: str = "cpu"
    batch_size: int = 4


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    options = options_from(PredictOptions, vars(args), window=args.window and tuple(args.window))
    with tempfile.TemporaryDirectory(prefix="ich-predict-") as folder:
        out = Path(folder, "out") if storage.is_uri(options.out) else Path(options.out)  # then copied
        cache = Path(folder, "downloads")
        cache.mkdir()
        code = run(options, out, cache)
        if code == 0 and storage.is_uri(options.out):
            storage.copy_folder(out, options.out)
            print(f"copied to {options.out}")
    return code


def run(options: PredictOptions, out: Path, cache: Path) -> int:
    """The prediction job writing into the local folder ``out`` (downloads into ``cache``); the exit code."""
    import pandas as pd

    from ichmodel.constants import CLASSES
    from ichmodel.predict_studies import load_predictor, predict_studies, prepare_shards, read_skipped

    try:
        predictor = load_predictor(options.checkpoint, options.ensemble, cache)
        size, windows = options.size or predictor.size, options.window or predictor.windows
        shards = prepare_shards(options.input, out, size, windows, options.min_slices)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    skipped, skipped_csv = read_skipped(shards)
    if len(skipped):
        print(f"skipped {len(skipped)} file(s) (see {skipped_csv}):")
        for row in skipped.itertuples():
            print(f"  {row.path}: {row.reason}")
    result = predict_studies(
        predictor, shards, out, tta=options.tta, device=options.device, batch_size=options.batch_size
    )
    if result is None:
        logger.error("Nothing to predict: every input in %s was skipped", options.input)
        return 1
    thresholds = predictor.thresholds
    print(
        f"\n{result.num_models} model(s){' + TTA' if result.tta else ''}, thresholds "
        + ", ".join(f"{c}={t:.2f}" for c, t in zip(CLASSES, thresholds, strict=True))
    )
    table = result.summary[["first_slice", "num_slices", *(f"max_{c}" for c in CLASSES), "positive_any"]]
    with pd.option_context("display.width", 200, "display.max_colwidth", 48, "display.precision", 3):
        print(table.to_string(index=False))
    print(f"\nfiles: {out / 'per_slice.csv'}, {out / 'probabilities.csv'}, {out / 'series_summary.csv'}")
    print(f"viewer: {out / 'viewer' / 'index.html'} (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
