"""Ray Train glue: the per-worker training function, the ``TorchTrainer`` that runs it, and its run record.

Three layers, as in Ray's Train + Tune examples: :func:`train_fn_per_worker` (one DDP worker) ← a
``TorchTrainer`` from :func:`build_trainer` (one run, ``ray_jobs/train.py``) ← a Tune trial
(``ray_jobs/tune.py``). The library (``ichmodel``) does the training; this module only connects it to Ray.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ichmodel.trials import CHECKPOINT_FILE  # in each checkpoint folder Train reports, beside config.json
from ray_jobs.cli import setup_logging

#: Checkpoints Train keeps per run: the newest, and one to fall back to when it is unreadable (pruned of its
#: optimizer state after each report: :func:`prune_older`).
NUM_TO_KEEP = 2
#: The metrics first in each report, in this order: Tune's status table shows them as its columns.
REPORT_COLUMNS = ("global_epoch", "stage", "val_f2", "model_f2", "val_loss", "train_loss", "lr")


def train_fn_per_worker(loop_config: dict) -> None:
    """Ray Train worker: build data and model from the config, run the stages, report every epoch.

    ``loop_config`` keys: ``config`` (a ``Config.to_dict()`` tree), ``overrides`` (dotted names, e.g. from
    a Tune trial), optionally ``split`` (``{"train": ids, "val": ids}``: explicit series instead of the
    config's random split), ``start_from`` (a ``checkpoint.pt`` path or URI, e.g. a search's shared stages,
    that a run without a checkpoint of its own continues; reported as ``shared_from``, with
    ``shared_epochs``, the epochs it holds), and for tests ``fail_at_epoch`` + ``fail_marker``: raise once
    after that global epoch, to exercise Train's retry from the last checkpoint.
    Rank 0 writes the checkpoint; every rank reports the same metrics (validation is gathered).
    """
    import ray.train
    import ray.train.torch

    from ichmodel.config import Config
    from ichmodel.dataset import SeriesDataset
    from ichmodel.engine import fit
    from ichmodel.shard_cache import ShardCache
    from ichmodel.splits import split_series

    setup_logging()
    quiet_train_worker_logs()
    cfg = Config.from_dict(loop_config["config"]).with_overrides(loop_config.get("overrides") or {})
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if loop_config.get("split"):  # explicit series ids, e.g. a cross-validation fold (ray_jobs/folds.py)
        train_ids, val_ids = list(loop_config["split"]["train"]), list(loop_config["split"]["val"])
    else:
        train_ids, val_ids = split_series(cfg.data.shards, cfg.data.val_fraction, cfg.data.split_seed)
    cache = ShardCache.from_config(cfg.data)  # used only when the shards are a storage URI
    train_set = SeriesDataset(
        cfg.data.shards, train_ids, max_slices=cfg.data.max_slices, seed=cfg.train.seed, cache=cache
    )
    val_set = SeriesDataset(cfg.data.shards, val_ids, cache=cache)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume = newest_intact(checkpoint)
    start_from = loop_config.get("start_from")
    if resume is None and start_from:
        resume = load_start_checkpoint(start_from)

    fail_at = loop_config.get("fail_at_epoch")
    fail_marker = loop_config.get("fail_marker")
    node_id = ray.get_runtime_context().get_node_id()

    def on_epoch_end(metrics: dict, make_checkpoint) -> None:
        metrics = {k: metrics[k] for k in REPORT_COLUMNS if k in metrics} | {
            k: v for k, v in metrics.items() if isinstance(v, int | float | bool) and k not in REPORT_COLUMNS
        }
        metrics["node_id"] = node_id  # where rank 0 ran: shows trial placement on a cluster
        if start_from:
            metrics.update(shared_from=start_from, shared_epochs=loop_config.get("shared_epochs", 0))
        if rank == 0:
            report_with_checkpoint(metrics, make_checkpoint, cfg, loop_config.get("run_folder"))
        else:
            ray.train.report(metrics, checkpoint=None)
        if fail_at is not None and metrics["global_epoch"] == fail_at and not Path(fail_marker).exists():
            Path(fail_marker).touch()
            raise RuntimeError(f"injected failure after global epoch {fail_at} (test hook)")

    fit(cfg, train_set, val_set, device, resume=resume, on_epoch_end=on_epoch_end)


def report_with_checkpoint(
    metrics: dict, make_checkpoint: Callable[[], dict], cfg, run_folder: str | None, report=None
) -> None:
    """Rank 0's report of one epoch: ``make_checkpoint()`` saved with ``cfg`` in a folder that ``report``
    (default ``ray.train.report``) hands to Train, which copies it into ``run_folder`` as its newest
    ``checkpoint_*`` folder.

    The run's older checkpoints then lose their optimizer state (:func:`prune_older`): after the report, so
    that the newest always keeps it; but before the report that ends the run (``metrics["finished"]``),
    since Train records the run finished at that report, and from then on nothing in its folder may change:
    a resume or a fold job that finds the run finished reads its files as final, and a driver killed right
    then must not leave a rewrite half done.
    """
    import ray.train

    from ichmodel.checkpoint import save_checkpoint

    report = report or ray.train.report
    finished = bool(metrics.get("finished"))
    if run_folder and finished:
        prune_older(run_folder, keep=0)  # the newest so far becomes the fallback at this report
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(make_checkpoint(), Path(folder) / CHECKPOINT_FILE)
        cfg.save(Path(folder) / "config.json")
        report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    if run_folder and not finished:
        prune_older(run_folder)


def newest_intact(checkpoint) -> dict | None:
    """The checkpoint dict to resume from: the file of ``checkpoint`` (``ray.train.get_checkpoint()``, the
    newest Train recorded) when it verifies against its record and loads, else the newest intact one of the
    other ``checkpoint_*`` folders of its run (each file passed over is logged, naming it and why).

    Raises:
        ichmodel.checkpoint_recovery.CheckpointCorrupt: when none is intact, naming each file and its cause.
    """
    from ichmodel.checkpoint_recovery import newest_intact_checkpoint, run_checkpoints

    newest = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    run_folder = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    older = run_checkpoints(run_folder, CHECKPOINT_FILE, filesystem=checkpoint.filesystem)
    found = newest_intact_checkpoint([newest, *(c for c in older if c != newest)], checkpoint.filesystem)
    return found[1] if found else None


def prune_older(run_folder: str, keep: int = 1) -> None:
    """Drop the optimizer state from every checkpoint of the run but the ``keep`` newest (:data:`NUM_TO_KEEP`
    are kept: the older one is the fallback when the newest is unreadable). Best effort: Train may be
    deleting the oldest meanwhile; a failure is logged, and the file stays as it was."""
    from ichmodel.checkpoint_recovery import prune_checkpoint, run_checkpoints

    try:
        for location in run_checkpoints(run_folder, CHECKPOINT_FILE)[keep:]:
            before, after = prune_checkpoint(location)
            if after < before:
                logging.getLogger("ray_jobs.worker").info(
                    "pruned %s: %.1f → %.1f MB (no optimizer state)", location, before / 1e6, after / 1e6
                )
    except Exception as exc:  # a folder Train removed meanwhile, a storage hiccup: keep training
        logging.getLogger("ray_jobs.worker").warning(
            "could not prune older checkpoints of %s: %s", run_folder, exc
        )


def load_start_checkpoint(location: str) -> dict:
    """The checkpoint dict at ``location`` (a local path or a storage URI, downloaded to a temporary file).

    Raises:
        FileNotFoundError: naming ``location`` when nothing is there.
    """
    from ichmodel.checkpoint import load_checkpoint
    from ray_jobs.storage import fetch, is_uri

    if not is_uri(location):
        if not Path(location).is_file():
            raise FileNotFoundError(f"No checkpoint to start from at {location}")
        return load_checkpoint(location)
    with tempfile.TemporaryDirectory(prefix="ich-start-") as folder:
        if not fetch(location, Path(folder) / CHECKPOINT_FILE):
            raise FileNotFoundError(f"No checkpoint to start from at {location}")
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE)


def quiet_train_worker_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO; our own per-epoch line says the same, once.

    No public API does just this: ``ray.train.LoggingConfig(log_level=...)`` raises the level of every
    ``ray.train.*`` logger of the run at once (it would also hide the worker-group start lines one waits on
    while the autoscaler boots a GPU node), and it does not reach ``context``'s logger, which Ray 2.60 names
    by the module's file path. So the two modules' own ``logger`` objects are set, whatever their names.
    """
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # a Ray without Train V2's internals: keep its logs
        return
    for module in (context, storage):
        logger = getattr(module, "logger", None)
        if isinstance(logger, logging.Logger):
            logger.setLevel(logging.WARNING)


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

    from ray_jobs.storage import join

    return _trainer_class()(
        train_fn_per_worker,
        train_loop_config={**loop_config, "run_folder": join(storage_path, name)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=NUM_TO_KEEP),
            callbacks=callbacks,
        ),
    )


@functools.cache
def _trainer_class() -> type:
    """``TorchTrainer`` without Ray Data's callback, which starts a ``DatasetManager`` actor for every Train
    run even when the run has no Ray Dataset (Ray 2.60); these runs read their shards themselves.

    That actor is one more process importing Ray and Ray Data per run: ~1.2 of the ~11 CPU-seconds a trivial
    run costs on a 2-core node (``docs/benchmarks.md``). ``tests/test_train_job.py`` checks that a run
    starts none, so a Ray upgrade that renames the hook fails there.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class TorchTrainerWithoutDatasets(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if self.datasets or not isinstance(c, DatasetsCallback)]

    return TorchTrainerWithoutDatasets


def recorded_result(run_path: str):
    """Ray Train's own record of the run at ``run_path`` (local path or URI) as a ``ray.train.Result``.

    None while there is nothing to read: no run there yet, no record yet, or one being written. Its
    ``checkpoint`` is the one a rerun with the same name resumes from (None before the first).
    """
    import ray.train

    # Reading the record logs a long INFO note meant for a run being resumed; this only looks.
    with _logger_level("ray.train", logging.WARNING):
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


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    """Raise the logger ``name`` (and the children that inherit its level) to ``level`` for the block."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


def predict_fn(
    checkpoint: str,
    shard_dirs: list[str],
    series: list[list[str] | None],
    tta: bool | list[str],
    batch_size: int,
    use_gpu: bool,
) -> list:
    """Ray task body: one model's prediction tables for each shard folder (``series[i]``: ids or all).

    Used by the ensemble and the fold jobs. A ``checkpoint`` on storage (URI) is downloaded here, on the
    node that runs the task. ``tta`` is checked against the augmentation the model was trained with
    (:func:`ichmodel.predict.resolve_tta`).
    """
    import torch

    from ichmodel.checkpoint import load_model
    from ichmodel.dataset import SeriesDataset
    from ichmodel.predict import predict_dataset
    from ichmodel.shard_cache import ShardCache
    from ray_jobs.storage import fetch, is_uri

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    if is_uri(checkpoint):
        with tempfile.TemporaryDirectory(prefix="ich-checkpoint-") as folder:
            if not fetch(checkpoint, Path(folder) / CHECKPOINT_FILE):
                raise FileNotFoundError(f"No checkpoint at {checkpoint}")
            model, cfg, _ = load_model(Path(folder) / CHECKPOINT_FILE, device)
    else:
        model, cfg, _ = load_model(checkpoint, device)
    return [
        predict_dataset(
            model,
            SeriesDataset(d, ids, cache=ShardCache.from_config(cfg.data)),
            batch_size=batch_size,
            device=device,
            tta=tta if isinstance(tta, bool) else tuple(tta),
            amp_bf16=cfg.train.amp_bf16,
            trained=cfg.augment,
        )
        for d, ids in zip(shard_dirs, series, strict=True)
    ]
