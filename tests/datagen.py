"""Small generated inputs, good and bad, for the tests: datasets on disk, shard subsets, real checkpoints."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ichmodel import synth
from ichmodel.checkpoint import checkpoint_dict, save_checkpoint
from ichmodel.config import Config
from ichmodel.dataset import SeriesDataset
from ichmodel.engine import fit
from ichmodel.model import build_model
from ichmodel.splits import split_series
from ichmodel.stages import TrainState

SIZE = 32  # pixels: tests stay tiny


def rsna(
    root: Path, patients: int = 3, slices: tuple[int, int] = (4, 6), seed: int = 0
) -> synth.SynthSummary:
    """RSNA layout under ``root`` (``stage_2_train/`` + ``stage_2_train.csv``)."""
    return synth.write_rsna_dataset(root, patients, slices, SIZE, seed)


def dlcv(
    root: Path, patients: int = 3, slices: tuple[int, int] = (4, 6), seed: int = 0, test_patients: int = 0
):
    """DLCV layout under ``root`` (``train/`` + ``train.csv`` [+ ``test/``])."""
    return synth.write_dlcv_dataset(root, patients, slices, SIZE, seed, test_patients)


def ct_file(
    path: Path, hu: np.ndarray | None = None, z: float = 0.0, series_uid: str = "1.2.3.4", **overrides
):
    """One valid CT DICOM slice (16-bit signed, intercept -1024) with optional header overrides.

    ``overrides`` set attributes after the dataset is built (``Modality="MR"``); a value of ``None`` deletes it.
    """
    hu = np.zeros((SIZE, SIZE), np.float32) if hu is None else hu
    pixels, representation, intercept = synth.encode_ct_pixels(hu, 16)
    ds = synth.make_ct_dataset(
        pixels,
        study_uid="1.2.3",
        series_uid=series_uid,
        sop_uid=f"1.2.3.4.{abs(hash(path)) % 10**9}",
        z_mm=z,
        instance_number=1,
        patient_id="TEST",
        bits_stored=16,
        pixel_representation=representation,
        intercept=intercept,
    )
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def wrapped_12bit_file(path: Path, hu: np.ndarray) -> Path:
    """A DICOM with the RSNA 12-bit bug: BitsStored 12, unsigned, intercept 0 (> -100), wrapped pixels."""
    ds = synth.make_ct_dataset(
        synth.encode_wrapped_12bit(hu),
        study_uid="1.2.3",
        series_uid="1.2.3.9",
        sop_uid="1.2.3.9.1",
        z_mm=0.0,
        instance_number=1,
        patient_id="TEST",
        bits_stored=12,
        pixel_representation=0,
        intercept=0,
    )
    ds.save_as(path, enforce_file_format=True)
    return path


def truncate(path: Path, keep_fraction: float = 0.6) -> Path:
    """Cut a file short (like RSNA's ``ID_6431af929``)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def text_file(path: Path, text: str = "this is not an image\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_hu(seed: int = 0) -> np.ndarray:
    """A ``[SIZE, SIZE]`` HU image spanning air, brain, blood and bone."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1000, 2000, size=(SIZE, SIZE)).astype(np.float32).round()


test_hu.__test__ = False  # not a pytest test


def write_checkpoint(path: Path, shards: Path, seed: int = 0, train: bool = False) -> Path:
    """A real checkpoint for ``shards`` (validation fraction 0.25): one trained epoch (stage 3, the sequence
    model on the frozen backbone), or a fresh model."""
    cfg = Config().with_overrides(
        {
            "data.shards": str(shards),
            "data.val_fraction": 0.25,
            "train.max_epochs": [0, 0, 1],
            "train.seed": seed,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if train:
        train_ids, val_ids = split_series(shards, 0.25, 0)
        saved: list[dict] = []
        fit(
            cfg,
            SeriesDataset(shards, train_ids),
            SeriesDataset(shards, val_ids),
            torch.device("cpu"),
            on_epoch_end=lambda metrics, make: saved.append(make()),
        )
        save_checkpoint(saved[-1], path)
    else:
        torch.manual_seed(seed)
        model = build_model(cfg.model)
        save_checkpoint(checkpoint_dict(model, cfg, TrainState()), path)
    return path


def small_dataset(shards: Path, num_series: int = 2) -> SeriesDataset:
    """The shortest series of a shard folder (keeps the CPU work of a test small)."""
    full = SeriesDataset(shards)
    order = sorted(range(len(full)), key=full.num_slices)
    return SeriesDataset(shards, [full.series_ids[i] for i in order[:num_series]])


@contextlib.contextmanager
def moto_bucket(bucket: str) -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback holding an empty ``bucket``, for the ``with`` block; yields the environment
    (endpoint and a dummy key) that boto3, pyarrow and the jobs use to reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)  # fmt: skip
    try:
        yield env
    finally:
        server.stop()


def file_tree(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``folder``: compare two to see that nothing
    in it was written between them."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip
