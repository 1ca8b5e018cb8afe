"""Ray glue shared by the job scripts: start-up, logging, paths."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def init_ray(num_cpus: int | None = None):
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one.

    A local start never attaches to some other head that happens to run on this machine.
    The repository root is put on the workers' ``PYTHONPATH`` so ``ray_jobs`` and ``ichmodel`` import
    there even without an installed package.
    """
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {
        "env_vars": {
            "PYTHONPATH": _pythonpath(),
            # Train's workers may wait for the autoscaler to boot a GPU node, which takes minutes, not 60 s.
            TRAIN_START_TIMEOUT: os.environ.get(TRAIN_START_TIMEOUT, "900"),
        }
    }
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # The dashboard serves the state API that Train's placement-group cleaner polls: without it a failed
        # run's CPU reservation can outlive it and stall the next trial.
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=True,
                 dashboard_port=_free_port())  # fmt: skip
    return ray


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pythonpath() -> str:
    parts = [str(REPO_ROOT)]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        parts.append(existing)
    return os.pathsep.join(parts)


# ------------------------------------------------------------------------------------------ training

CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def train_fn_per_worker(loop_config: dict) -> None:
    """Ray Train worker: build data and model from the config, run the stages, report every epoch.

    ``loop_config`` keys: ``config`` (a ``Config.to_dict()`` tree), ``overrides`` (dotted names, e.g. from
    a Tune trial), and for tests ``fail_at_epoch`` + ``fail_marker``: raise once after that global epoch,
    to exercise Train's retry from the last checkpoint.
    Rank 0 writes the checkpoint; every rank reports the same metrics (validation is gathered).
    """
    import tempfile

    import ray.train
    import ray.train.torch

    from ichmodel.config import Config
    from ichmodel.dataset import SeriesDataset, split_series
    from ichmodel.engine import fit, load_checkpoint, save_checkpoint

    setup_logging()
    quiet_train_worker_logs()
    cfg = Config.from_dict(loop_config["config"]).with_overrides(loop_config.get("overrides") or {})
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    train_ids, val_ids = split_series(cfg.data.shards, cfg.data.val_fraction, cfg.data.split_seed)
    train_set = SeriesDataset(cfg.data.shards, train_ids, max_slices=cfg.data.max_slices, seed=cfg.train.seed)
    val_set = SeriesDataset(cfg.data.shards, val_ids)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_checkpoint(Path(folder) / CHECKPOINT_FILE)

    fail_at = loop_config.get("fail_at_epoch")
    fail_marker = loop_config.get("fail_marker")

    node_id = ray.get_runtime_context().get_node_id()

    def on_epoch_end(metrics: dict, make_checkpoint) -> None:
        first = (
            "global_epoch",
            "stage",
            "val_f2",
            "model_f2",
            "val_loss",
            "train_loss",
            "lr",
        )  # Tune's table columns
        metrics = {k: metrics[k] for k in first if k in metrics} | {
            k: v for k, v in metrics.items() if isinstance(v, int | float | bool) and k not in first
        }
        metrics["node_id"] = node_id  # where rank 0 ran: shows trial placement on a cluster
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(make_checkpoint(), Path(folder) / CHECKPOINT_FILE)
                cfg.save(Path(folder) / "config.json")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics, checkpoint=None)
        if fail_at is not None and metrics["global_epoch"] == fail_at and not Path(fail_marker).exists():
            Path(fail_marker).touch()
            raise RuntimeError(f"injected failure after global epoch {fail_at} (test hook)")

    fit(cfg, train_set, val_set, device, resume=resume, on_epoch_end=on_epoch_end)


def quiet_train_worker_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO; our own per-epoch line says the same, once."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # a Ray without Train V2's internals: keep its logs
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)


def build_trainer(
    loop_config: dict,
    *,
    name: str,
    storage_path: str,
    num_workers: int,
    use_gpu: bool,
    max_failures: int = 1,
    callbacks: list | None = None,
    resources_per_worker: dict | None = None,
):
    """A ``TorchTrainer`` that runs :func:`train_fn_per_worker` with DDP over ``num_workers`` workers.

    The fixed ``name`` makes a re-run (or a retried Tune trial) resume from the last checkpoint in
    ``storage_path/name``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )


def recorded_result(run_path: str):
    """Ray Train's own record of the run at ``run_path`` (local path or URI) as a ``ray.train.Result``.

    None while there is nothing to read: no run there yet, no record yet, or one being written. Its
    ``checkpoint`` is the one a rerun with the same name resumes from (None before the first).
    """
    import ray.train

    # Reading the record logs a long INFO note meant for a run being resumed; this only looks.
    logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager").setLevel(
        logging.WARNING
    )
    try:
        return ray.train.Result.from_path(run_path)
    except Exception:  # whatever the reason, the caller just trains (or waits)
        return None


def finished_run_report(run_path: str) -> dict | None:
    """The last report of the Train run at ``run_path`` if that run already finished every stage, else None.

    It comes from :func:`recorded_result` and carries ``checkpoint_path``, as a report relayed by
    ``TuneReportCallback`` does. A Tune trial restored from an experiment state saved just before its Train
    run ended would otherwise rerun that run, get no new report, and keep a stale result.
    """
    result = recorded_result(run_path)
    if result is None or result.checkpoint is None or not (result.metrics or {}).get("finished"):
        return None
    return {**result.metrics, "checkpoint_path": result.checkpoint.path}


# ------------------------------------------------------------------------------------------ demo data

DEMO_ROOT = REPO_ROOT / "runs" / "demo_data"


def ensure_demo_data(
    root: Path = DEMO_ROOT, patients: int = 24, test_patients: int = 8, size: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """Generate the embedded demo (synthetic DLCV-layout head CT) and preprocess it, once.

    Returns ``(train_shards, test_shards)``. Re-running reuses what is there.
    """
    from ichmodel import synth
    from ichmodel.preprocess import PreprocessOptions, preprocess
    from ichmodel.readers import read_dlcv

    root = Path(root)
    raw, train_shards, test_shards = root / "Blood_data", root / "shards" / "train", root / "shards" / "test"
    if (train_shards / "manifest.json").is_file() and (test_shards / "manifest.json").is_file():
        return train_shards, test_shards
    logger = logging.getLogger("ray_jobs.demo")
    logger.info(
        "generating demo data: %d + %d synthetic series at %d px in %s", patients, test_patients, size, raw
    )
    if not (raw / "train.csv").is_file():
        synth.write_dlcv_dataset(raw, patients, (12, 20), size, seed, test_patients)
    options = PreprocessOptions(size=size)
    preprocess(read_dlcv(raw / "train", raw / "train.csv"), train_shards, options)
    preprocess(read_dlcv(raw / "test"), test_shards, options)
    return train_shards, test_shards


def is_uri(path: str) -> bool:
    """True for a storage URI (``s3://bucket/x``, ``gs://``, ``file:///x``), False for a plain path."""
    return "://" in str(path)


def write_bytes(target: str | Path, data: bytes) -> str:
    """Write ``data`` to a local path or a storage URI (through ``pyarrow.fs``); returns where it went."""
    if not is_uri(str(target)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(data)
        return str(target)
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(str(target))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
    return str(target)


def fetch(uri: str, local: Path) -> bool:
    """Copy one file from a storage URI to ``local``; False when it does not exist there."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(local.resolve()), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
    return True


def parse_window(text: str) -> tuple[float, float]:
    """``"40,80"`` → ``(40.0, 80.0)``: one CT window as LEVEL,WIDTH in HU (an argparse ``type``)."""
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a window is LEVEL,WIDTH in HU (e.g. 40,80). Got {text!r}"
        ) from None
    return level, width


def parse_overrides(items: list[str]) -> dict:
    """``["loss.alpha=0.5", "train.max_epochs=[2,2,2]"]`` → ``{"loss.alpha": 0.5, ...}`` (values parsed as YAML)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"An override is section.field=value (e.g. loss.alpha=0.5). Got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides
