"""The embedded demo: synthetic DLCV-layout head CT (``ichmodel.synth``), preprocessed into shards once."""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from ichmodel import synth
from ichmodel.preprocess import PreprocessOptions, preprocess
from ichmodel.readers import read_dlcv
from ichmodel.shards import MANIFEST_NAME

logger = logging.getLogger(__name__)


def ensure_demo_data(
    root: str | Path,
    patients: int = 24,
    test_patients: int = 8,
    size: int = 64,
    seed: int = 0,
    difficulty: synth.Difficulty | None = None,
) -> tuple[Path, Path]:
    """Generate ``patients`` + ``test_patients`` synthetic series under ``root`` and preprocess them, once.

    ``difficulty`` (default ``synth.PRESETS["default"]``) sets how hard the data is; give each setting its
    own ``root``, since what is there is reused whatever the setting.

    Returns ``(train_shards, test_shards)``: ``root/shards/train`` and ``root/shards/test``. Re-running
    reuses what is there (the raw files in ``root/Blood_data`` and each finished shard folder).
    """
    root = Path(root)
    raw, train_shards, test_shards = root / "Blood_data", root / "shards" / "train", root / "shards" / "test"

    def done() -> bool:
        return (train_shards / MANIFEST_NAME).is_file() and (test_shards / MANIFEST_NAME).is_file()

    if done():
        return train_shards, test_shards
    root.mkdir(parents=True, exist_ok=True)
    # Two jobs started at once on the same demo folder (a search and a train run, two test processes): one
    # generates, the other waits for it here and then finds the shards made.
    with open(root / ".generating.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done():
            return train_shards, test_shards
        logger.info(
            "generating demo data: %d + %d synthetic series at %d px in %s",
            patients,
            test_patients,
            size,
            raw,
        )
        if not (raw / "train.csv").is_file():
            synth.write_dlcv_dataset(raw, patients, (12, 20), size, seed, test_patients, difficulty)
        options = PreprocessOptions(size=size)
        preprocess(read_dlcv(raw / "train", raw / "train.csv"), train_shards, options)
        preprocess(read_dlcv(raw / "test"), test_shards, options)
    return train_shards, test_shards
