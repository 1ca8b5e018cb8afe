"""Train a search's shared stages once, before any trial starts (``ray_jobs/tune.py --share-stages``).

What is shared is decided by :func:`ichmodel.stages.plan_sharing` from the searched fields. The shared
stages are one Ray Train run, ``EXPERIMENT/shared/<key>`` (:func:`ichmodel.stages.shared_key`: a hash of
what those stages read), trained by the search's driver before the Tuner runs, so concurrent trials can never
train it twice; an interrupted run resumes from its own last checkpoint under that stable name. Its final
checkpoint is copied to ``EXPERIMENT/shared/<key>.pt`` when the run ends: that file's presence means "done",
and every trial's Train run that has no checkpoint of its own continues from it
(``ray_jobs.worker.train_fn_per_worker``'s ``start_from``). The decision and the checkpoint are recorded in
``EXPERIMENT/shared_stages.json``.
"""

from __future__ import annotations

import io
import json
import logging

from ichmodel.config import Config
from ichmodel.stages import SharePlan, shared_config, shared_key
from ray_jobs.storage import copy_from, is_file, join, read_bytes, write_bytes
from ray_jobs.worker import CHECKPOINT_FILE, build_trainer

logger = logging.getLogger("ray_jobs.shared_stages")

SHARED_FOLDER = "shared"
SHARED_RECORD = "shared_stages.json"


def shared_checkpoint(experiment: str, base: Config, share: SharePlan) -> tuple[str, str]:
    """``(run name, checkpoint location)`` of the shared stages of ``base`` under ``experiment``."""
    key = shared_key(shared_config(base, share), share.stages)
    return key, join(experiment, SHARED_FOLDER, f"{key}.pt")


def prepare_shared_stages(
    experiment: str, base: Config, share: SharePlan, *, scaling: dict, max_failures: int
) -> dict:
    """Train the shared stages of ``share`` once (or find them trained) and record the decision.

    Returns the record written to ``EXPERIMENT/shared_stages.json``: ``plan`` (the :class:`SharePlan`), and
    when a stage is shared ``run`` (its Train run), ``checkpoint`` (what trials start from) and ``epochs``
    (the global epochs it holds).

    Raises:
        RuntimeError: when the shared Train run failed, or its checkpoint is not at the end of the shared stages.
    """
    record: dict = {"plan": share.to_dict()}
    if share.stages > 0:
        key, checkpoint = shared_checkpoint(experiment, base, share)
        folder = join(experiment, SHARED_FOLDER)
        if is_file(checkpoint):
            logger.info(
                "shared stages 1..%d already trained: %s (not trained again)", share.stages, checkpoint
            )
        else:
            logger.info(
                "training stages 1..%d once for every trial: Train run %s", share.stages, join(folder, key)
            )
            cfg = shared_config(base, share)
            trainer = build_trainer(
                {"config": cfg.to_dict(), "overrides": {}},
                name=key,
                storage_path=folder,
                max_failures=max_failures,
                **scaling,
            )
            result = trainer.fit()
            if result.error or result.checkpoint is None:
                raise RuntimeError(
                    f"The shared stages' Train run {join(folder, key)} failed: {result.error!r}"
                )
            ckpt = result.checkpoint  # copied where it lies (a server-side copy within one bucket)
            copy_from(ckpt.filesystem, f"{ckpt.path}/{CHECKPOINT_FILE}", checkpoint)
        epochs = _check_stage(checkpoint, share, base.train.max_epochs)
        record.update(run=join(folder, key), checkpoint=checkpoint, epochs=epochs)
    write_bytes(join(experiment, SHARED_RECORD), json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def _check_stage(checkpoint: str, share: SharePlan, max_epochs: tuple[int, ...]) -> int:
    """The global epochs the shared checkpoint holds, after checking it ends the shared stages.

    A run stands at the start of the first stage after the shared ones, or at the start of an earlier stage
    when every stage from there to the end of the shared ones has no epoch (``--epochs 2,0,4``: after stage 1
    the run stands at stage 2, which the trial skips).
    """
    import torch

    state = torch.load(io.BytesIO(read_bytes(checkpoint)), map_location="cpu", weights_only=True)
    stage = state.get("stage")
    at_end = isinstance(stage, int) and stage <= share.stages and not any(max_epochs[stage : share.stages])
    if not at_end or state.get("stage_started") or state.get("finished"):
        raise RuntimeError(
            f"{checkpoint} should stand at the start of stage {share.stages + 1}; it is at stage "
            f"{state.get('stage', 0) + 1} (started: {state.get('stage_started')}, finished: {state.get('finished')})"
        )
    return int(state["global_epoch"])
