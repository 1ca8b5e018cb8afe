"""Predict new, unlabelled head CT studies with one checkpoint or a saved ensemble (``ray_jobs/predict.py``).

Steps: :func:`load_predictor` (checkpoints, thresholds, image size, windows and TTA from ``ensemble.json`` or
one checkpoint, downloaded when on storage: :func:`local_copy`) → :func:`prepare_shards` (a shard folder
as it is, or DICOM files preprocessed into ``OUT/shards`` as the models were trained) →
:func:`predict_studies` (per-slice predictions and the files ``per_slice.csv``, ``probabilities.csv`` and
``series_summary.csv``). No Ray: the job runs in one process.
"""

from __future__ import annotations

import io as pyio
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ichmodel import io
from ichmodel.shards import MANIFEST_NAME, SKIPPED_NAME, load_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictor:
    """What predicts: local checkpoint files, thresholds ``[5]``, the training image size and windows (None
    when unknown) and the TTA the ensemble was built with."""

    checkpoints: list[str]
    thresholds: list[float]
    size: int | None
    windows: list | None
    tta: bool | list[str]


@dataclass(frozen=True)
class Predictions:
    """What :func:`predict_studies` wrote: the per-slice table, the per-series summary, the number of models
    and the TTA applied."""

    frame: pd.DataFrame
    summary: pd.DataFrame
    num_models: int
    tta: bool | list[str]


def local_copy(location: str, spec_name: str | None, cache: Path) -> str:
    """``location`` itself when it is a local path, else a download of it into ``cache``.

    ``spec_name``: the file to take when ``location`` is a folder (ensemble.json).

    Raises:
        FileNotFoundError: naming the URI when nothing is stored there.
    """
    if not io.is_uri(location):
        return location
    if spec_name and not io.is_file(location):
        location = io.join(location, spec_name)
    local = cache / f"{len(list(cache.glob('*')))}-{location.split('?', 1)[0].rsplit('/', 1)[-1]}"
    if not io.download(location, local):
        raise FileNotFoundError(f"No file at {location}")
    return str(local)


def load_predictor(checkpoint: str | None, ensemble: str | None, cache: Path) -> Predictor:
    """The predictor of ``ensemble`` (an ensemble.json or its folder) or else of one ``checkpoint``.

    Raises:
        FileNotFoundError: when the ensemble.json or checkpoint is missing.
    """
    from ichmodel.checkpoint import load_checkpoint
    from ichmodel.config import Config
    from ichmodel.ensemble import ENSEMBLE_SPEC_NAME, EnsembleSpec

    if ensemble:
        spec = EnsembleSpec.load(local_copy(ensemble, ENSEMBLE_SPEC_NAME, cache))
        models = [local_copy(m, None, cache) for m in spec.models]
        return Predictor(models, spec.thresholds, spec.size, spec.windows, spec.tta)
    local = local_copy(checkpoint, None, cache)
    if not Path(local).is_file():
        raise FileNotFoundError(f"No checkpoint at {checkpoint}")
    ckpt = load_checkpoint(local)
    cfg = Config.from_dict(ckpt["config"])
    size = windows = None
    try:
        manifest = load_manifest(cfg.data.shards)
        size, windows = manifest["size"], manifest["windows"]
    except FileNotFoundError:
        logger.warning("training shards %r are not here: pass --size and --window", cfg.data.shards)
    return Predictor([local], list(ckpt["thresholds"]), size, windows, False)


def prepare_shards(
    source: str, out: Path, size: int | None, windows: list | None, min_slices: int = 1
) -> Path | str:
    """The shard folder to predict: ``source`` itself if it is one, else its DICOM files preprocessed into
    ``out/shards`` at ``size`` and ``windows``.

    Raises:
        ValueError: when the image size or windows are unknown, or DICOM input is on storage.
    """
    from ichmodel.preprocess import PreprocessOptions, preprocess
    from ichmodel.readers import read_dicom_folder

    if io.is_file(io.join(source, MANIFEST_NAME)):
        return source if io.is_uri(source) else Path(source)
    if size is None or not windows:
        raise ValueError(f"Unknown image size {size} or windows {windows}: pass --size and --window")
    options = PreprocessOptions(
        size=int(size), windows=tuple(tuple(w) for w in windows), min_slices=min_slices
    )
    if io.is_uri(source):
        raise ValueError(f"--input {source}: DICOM folders are read from local disk; copy them here first")
    shards = Path(out) / "shards"
    preprocess(read_dicom_folder(source), shards, options)
    return shards


def read_skipped(shards: Path | str) -> tuple[pd.DataFrame, str]:
    """``(skipped inputs, where they are listed)``: the shard folder's skipped.csv, empty when absent."""
    skipped_csv = io.join(shards, SKIPPED_NAME)
    if not io.is_file(skipped_csv):
        return pd.DataFrame(), skipped_csv
    return pd.read_csv(pyio.StringIO(io.read_text(skipped_csv))), skipped_csv


def predict_studies(
    predictor: Predictor,
    shards: Path | str,
    out: Path,
    *,
    tta: bool | list[str] | None = None,
    device: str = "cpu",
    batch_size: int = 4,
) -> Predictions | None:
    """Predict every series of ``shards`` and write ``out/per_slice.csv`` (0/1 at the predictor's thresholds,
    checked against the shards' slices), ``out/probabilities.csv``, ``out/series_summary.csv`` and
    ``out/viewer/index.html`` (:func:`ichmodel.viewer.write_viewer`: the same thresholds, thumbnails from
    ``shards``).

    ``tta``: None for the predictor's own. Returns None when there is nothing to predict (every input skipped).
    """
    from ichmodel import submission as S
    from ichmodel.checkpoint import load_model
    from ichmodel.dataset import SeriesDataset
    from ichmodel.predict import predict_dataset
    from ichmodel.prediction_table import summarize_series
    from ichmodel.viewer import write_viewer

    dataset = SeriesDataset(shards)
    if len(dataset) == 0:
        return None
    models = [load_model(p, device)[0] for p in predictor.checkpoints]
    tta = predictor.tta if tta is None else tta
    thresholds = predictor.thresholds
    frame = predict_dataset(models, dataset, batch_size=batch_size, device=device, tta=tta)
    S.write_submission(frame, "per_slice", out / "per_slice.csv", S.expected_slices(shards), thresholds)
    frame.to_csv(out / "probabilities.csv", index=False, float_format="%.6f")
    summary = summarize_series(frame, thresholds)
    first = frame.groupby("series_id", sort=True)["slice_id"].first()
    summary.insert(1, "first_slice", summary["series_id"].map(first))
    summary.to_csv(out / "series_summary.csv", index=False, float_format="%.6f")
    write_viewer(out, frame, thresholds, shards, title=f"Predictions of {len(models)} model(s) on {shards}")
    return Predictions(frame, summary, len(models), tta)
