"""Validation: loss parts and F2 of an epoch's model on the validation series, the thresholds tuned there,
the score that ranks epochs, and the per-epoch record.

:func:`evaluate` runs the evaluation forward (:func:`ichmodel.predict.predict_batches`), gathers every rank's
predictions under DDP (so every rank takes the same decisions) and scores them (:func:`_score`: F2 at the
fixed threshold and at per-class thresholds tuned on these predictions). :func:`selection_score` turns the
result into the number ``train.select_metric`` ranks epochs by; :func:`epoch_metrics` is the flat record
handed to ``on_epoch_end``; :func:`warn_scarce_classes` warns once about classes with few positive series.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ichmodel import metrics as M
from ichmodel import predict
from ichmodel.constants import CLASSES
from ichmodel.dataset import SeriesDataset, series_labels
from ichmodel.model import slice_probs
from ichmodel.stages import Stage, TrainState

logger = logging.getLogger(__name__)


def _gather(local: Any) -> list[Any]:
    """``local`` of every rank (just ``[local]`` without DDP); ranks may hold different amounts."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return gathered
    return [local]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    threshold: float = 0.5,
    amp_bf16: bool = False,
    prevalence: np.ndarray | None = None,
    prediction: str | None = None,
) -> dict[str, Any]:
    """Validation loss parts, micro-F2 at ``threshold`` and at thresholds tuned on these predictions.

    The forward is :func:`ichmodel.predict.eval_outputs` (bf16 autocast on CUDA only when ``amp_bf16``).
    Under DDP each rank evaluates its own series (:func:`ichmodel.batches.eval_batches`: no series twice)
    and the results are gathered, so every rank returns the same numbers. ``probs`` / ``labels``
    (``[N, 5]`` numpy, valid slices only) are in the result too. Thresholds are searched with ties broken
    to the middle and, for a class without a positive here, :func:`ichmodel.metrics.fallback_thresholds` of the training
    ``prevalence`` (``[5]``); :func:`ichmodel.engine.fit` warns once about classes with few positive series.
    ``prediction`` overrides the model's ``model.prediction`` (the slice stage scores its AC head alone).
    """
    prediction = prediction or predict.unwrap(model).cfg.prediction
    sums: dict[str, float] = {}
    weight = 0.0
    probs, labels, groups = [], [], []
    for batch, outputs in predict.predict_batches(model, loader, device, amp_bf16):
        valid = batch["valid"].to(device)
        parts = loss_fn(outputs, batch["labels"].to(device), valid)
        n = float(valid.sum())
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        weight += n
        keep = valid.cpu()
        probs.append(slice_probs(outputs, prediction).cpu()[keep].numpy())
        labels.append(batch["labels"][keep].numpy())
        groups.extend(sid for sid, n in zip(batch["series_ids"], keep.sum(1).tolist(), strict=True)
                      for _ in range(n))  # fmt: skip
    gathered = _gather((sums, weight, probs, labels, groups))
    total_weight = sum(g[1] for g in gathered)
    keys = {k: None for g in gathered for k in g[0]}  # ordered union: a rank may have had no series
    result: dict[str, Any] = {
        f"val_{k}": sum(g[0].get(k, 0.0) for g in gathered) / max(total_weight, 1.0) for k in keys
    }
    y_prob = np.concatenate([p for g in gathered for p in g[2]]) if total_weight else np.zeros((0, 5))
    y_true = np.concatenate([p for g in gathered for p in g[3]]) if total_weight else np.zeros((0, 5))
    series = np.asarray([s for g in gathered for s in g[4]])
    result.update(_score(y_prob, (y_true > 0.5).astype(np.int8), threshold, prevalence, series))
    return result


def _score(
    y_prob: np.ndarray,
    y_true: np.ndarray,
    threshold: float,
    prevalence: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """F2 at ``threshold`` and at per-class thresholds tuned on these predictions."""
    fallback = None if prevalence is None else M.fallback_thresholds(prevalence, y_prob)
    thresholds = M.search_thresholds(y_true, y_prob, fallback=fallback, min_positives=0, groups=groups)
    tuned = y_prob >= np.asarray(thresholds)
    result: dict[str, Any] = {
        "val_f2_at_threshold": M.f2_score(y_true, y_prob >= threshold),
        "val_f2": M.f2_score(y_true, tuned),
    }
    for name, value in zip(CLASSES, M.per_class_f2(y_true, tuned), strict=True):
        result[f"val_f2_{name}"] = float(value)
    result["thresholds"] = [float(t) for t in thresholds]
    result["probs"], result["labels"] = y_prob, y_true
    return result


def warn_scarce_classes(val_set: SeriesDataset, min_positives: int = 3) -> dict[str, int]:
    """Log once per run the classes with fewer than ``min_positives`` positive validation series."""
    labels = series_labels(val_set)
    if not labels:
        return {}
    per_series = np.stack([(lab > 0).any(0) for lab in labels]).astype(np.int8)  # [S, 5]
    scarce = M.scarce_classes(per_series, min_positives)
    for name, count in scarce.items():
        logger.warning(
            "class %s has %d positive series in validation (< %d): its tuned threshold and F2 %s",
            name,
            count,
            min_positives,
            "use the training-prevalence fallback" if count == 0 else "rest on little evidence",
        )
    return scarce


def selection_score(metric: str, val: dict[str, Any]) -> float:
    """The validation score ``train.select_metric`` ranks epochs by, higher is better (−loss or F2)."""
    if metric == "f2":
        return float(val["val_f2"])
    return -float(val["val_mc" if metric == "mc_loss" else "val_loss"])


def epoch_metrics(
    val: dict[str, Any], train: dict[str, float], stage: Stage, state: TrainState, lr: float, seconds: float
) -> dict[str, Any]:
    """The flat per-epoch record handed to ``on_epoch_end`` (and kept in ``state.history``)."""
    metrics = {k: v for k, v in val.items() if k not in ("probs", "labels", "thresholds")}
    metrics.update(train)
    metrics.update(
        stage=stage.index,
        stage_epoch=state.epoch,
        global_epoch=state.global_epoch,
        lr=lr,
        epoch_s=seconds,
        nonfinite_steps=state.nonfinite_steps,
        model_f2=state.best_f2,  # validation F2 of the weights this checkpoint exports
        model_score=state.best_score,  # their selection score (train.select_metric, higher is better)
    )
    return metrics
