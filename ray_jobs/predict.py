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
(per series: slices, highest probability and positive slices per class), and prints the summary.
Runs in this process (no Ray cluster needed); --device cuda uses a GPU with bf16. --checkpoint, --ensemble,
--input (shards) and --out may be storage URIs (s3://, gs://, file://); so may the models in ensemble.json.
"""

from __future__ import annotations

if not __package__:  # run as a script: this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import io as pyio
import logging
import sys
import tempfile
from pathlib import Path

import pandas as pd

from ichmodel import ensemble as E
from ichmodel import submission as S
from ichmodel.checkpoint import load_checkpoint, load_model
from ichmodel.config import Config
from ichmodel.constants import CLASSES
from ichmodel.dataset import SeriesDataset
from ichmodel.predict import predict_dataset, summarize_series
from ichmodel.preprocess import PreprocessOptions, preprocess
from ichmodel.readers import read_dicom_folder
from ichmodel.shards import MANIFEST_NAME, SKIPPED_NAME, load_manifest
from ray_jobs import storage
from ray_jobs.cli import parse_window, setup_logging

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
        help="reversed-sequence TTA (default: as the ensemble was built; off for --checkpoint)",
    )
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: as trained)")
    parser.add_argument(
        "--window",
        type=parse_window,
        action="append",
        default=None,
        metavar="LEVEL,WIDTH",
        help="CT window in HU, one per channel, repeat the flag (default: as trained)",
    )
    parser.add_argument("--min-slices", type=int, default=1, help="skip series with fewer slices (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="series per forward pass (default 4)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def load_predictor(args: argparse.Namespace) -> tuple[list[str], list[float], int | None, list | None, bool]:
    """``(checkpoints, thresholds, size, windows, tta)`` from --ensemble or --checkpoint.

    Raises:
        FileNotFoundError: when the ensemble.json or checkpoint is missing.
    """
    if args.ensemble:
        spec = E.EnsembleSpec.load(local_copy(args.ensemble, E.ENSEMBLE_SPEC_NAME, args.cache))
        models = [local_copy(m, None, args.cache) for m in spec.models]
        return models, spec.thresholds, spec.size, spec.windows, spec.tta
    checkpoint = local_copy(args.checkpoint, None, args.cache)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"No checkpoint at {args.checkpoint}")
    ckpt = load_checkpoint(checkpoint)
    cfg = Config.from_dict(ckpt["config"])
    size = windows = None
    try:
        manifest = load_manifest(cfg.data.shards)
        size, windows = manifest["size"], manifest["windows"]
    except FileNotFoundError:
        logger.warning("training shards %r are not here: pass --size and --window", cfg.data.shards)
    return [checkpoint], list(ckpt["thresholds"]), size, windows, False


def local_copy(location: str, spec_name: str | None, cache: Path) -> str:
    """``location`` itself when it is a local path, else a download of it into ``cache``.

    ``spec_name``: the file to take when ``location`` is a folder (ensemble.json).

    Raises:
        FileNotFoundError: naming the URI when nothing is stored there.
    """
    if not storage.is_uri(location):
        return location
    if spec_name and not storage.is_file(location):
        location = storage.join(location, spec_name)
    local = cache / f"{len(list(cache.glob('*')))}-{location.split('?', 1)[0].rsplit('/', 1)[-1]}"
    if not storage.download(location, local):
        raise FileNotFoundError(f"No file at {location}")
    return str(local)


def prepare_shards(args: argparse.Namespace, size: int | None, windows: list | None) -> Path | str:
    """The shard folder to predict: --input itself if it is one, else DICOM preprocessed into OUT/shards.

    Raises:
        ValueError: when the image size or windows are unknown.
    """
    if storage.is_file(storage.join(args.input, MANIFEST_NAME)):
        return args.input if storage.is_uri(args.input) else Path(args.input)
    size, windows = args.size or size, args.window or windows
    if size is None or not windows:
        raise ValueError(f"Unknown image size {size} or windows {windows}: pass --size and --window")
    options = PreprocessOptions(
        size=int(size), windows=tuple(tuple(w) for w in windows), min_slices=args.min_slices
    )
    if storage.is_uri(args.input):
        raise ValueError(
            f"--input {args.input}: DICOM folders are read from local disk; copy them here first"
        )
    shards = Path(args.out) / "shards"
    preprocess(read_dicom_folder(args.input), shards, options)
    return shards


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    with tempfile.TemporaryDirectory(prefix="ich-predict-") as folder:
        target = args.out
        if storage.is_uri(target):  # write here, then copy the finished folder
            args.out = str(Path(folder, "out"))
        args.cache = Path(folder, "downloads")
        args.cache.mkdir()
        code = run(args)
        args.out = target
        if code == 0 and storage.is_uri(target):
            storage.copy_folder(Path(folder, "out"), target)
            print(f"copied to {target}")
    return code


def run(args: argparse.Namespace) -> int:
    """The prediction job writing into the local folder ``args.out``; returns the exit code."""
    out = Path(args.out)
    try:
        checkpoints, thresholds, size, windows, tta = load_predictor(args)
        shards = prepare_shards(args, size, windows)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    skipped_csv = storage.join(shards, SKIPPED_NAME)
    skipped = (
        pd.read_csv(pyio.StringIO(storage.read_text(skipped_csv)))
        if storage.is_file(skipped_csv)
        else pd.DataFrame()
    )
    if len(skipped):
        print(f"skipped {len(skipped)} file(s) (see {skipped_csv}):")
        for row in skipped.itertuples():
            print(f"  {row.path}: {row.reason}")
    dataset = SeriesDataset(shards)
    if len(dataset) == 0:
        logger.error("Nothing to predict: every input in %s was skipped", args.input)
        return 1
    models = [load_model(p, args.device)[0] for p in checkpoints]
    tta = tta if args.tta is None else args.tta
    frame = predict_dataset(models, dataset, batch_size=args.batch_size, device=args.device, tta=tta)
    S.write_submission(frame, "per_slice", out / "per_slice.csv", S.expected_slices(shards), thresholds)
    frame.to_csv(out / "probabilities.csv", index=False, float_format="%.6f")
    summary = summarize_series(frame, thresholds)
    first = frame.groupby("series_id", sort=True)["slice_id"].first()
    summary.insert(1, "first_slice", summary["series_id"].map(first))
    summary.to_csv(out / "series_summary.csv", index=False, float_format="%.6f")

    print(
        f"\n{len(models)} model(s){' + TTA' if tta else ''}, thresholds "
        + ", ".join(f"{c}={t:.2f}" for c, t in zip(CLASSES, thresholds, strict=True))
    )
    table = summary[["first_slice", "num_slices", *(f"max_{c}" for c in CLASSES), "positive_any"]]
    with pd.option_context("display.width", 200, "display.max_colwidth", 48, "display.precision", 3):
        print(table.to_string(index=False))
    print(f"\nfiles: {out / 'per_slice.csv'}, {out / 'probabilities.csv'}, {out / 'series_summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
