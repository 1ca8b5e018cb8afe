"""Checkpoints: one plain dict per file, saved atomically, loadable with ``torch.load(weights_only=True)``.

Layout (``docs/architecture.md``, "Checkpoints"): ``config`` (``Config.to_dict()``), ``model`` (state_dict),
``best_model`` (state_dict of the weights to export, or ``None``), ``optimizer``, ``scheduler`` (their
state_dicts, or ``None``), and every field of the engine's training state at the top level, once:
``stage``, ``epoch``, ``global_epoch``, ``stage_started``, ``best_score``, ``best_f2``, ``thresholds``,
``nonfinite_steps``, ``finished``, ``history``.

This module knows nothing of training: prediction and ensembling load models through :func:`load_model`
without importing the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ichmodel.config import Config
from ichmodel.io import atomic_write
from ichmodel.model import ICHModel, build_model

#: Keys every checkpoint holds besides the training-state fields.
WEIGHT_KEYS = ("config", "model", "best_model", "optimizer", "scheduler")


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def checkpoint_dict(
    model: nn.Module,
    cfg: Config,
    state: Any,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    best_model: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The checkpoint of a run: weights, config, optimizer/scheduler and the training state, each once.

    Args:
        model: the model being trained (DDP-wrapped or not); its weights are copied to the CPU.
        cfg: the run's resolved config.
        state: the training state, a dataclass (``ichmodel.stages.TrainState``) or a mapping; its fields
            become top-level keys.
        optimizer, scheduler: their ``state_dict()`` is stored (``None`` when not given).
        best_model: state_dict of the weights to export (``None``: the last weights are exported).

    Raises:
        ValueError: when a state field would overwrite one of :data:`WEIGHT_KEYS`.
    """
    fields = dataclasses.asdict(state) if dataclasses.is_dataclass(state) else dict(state)
    clash = sorted(set(fields) & set(WEIGHT_KEYS))
    if clash:
        raise ValueError(f"Training state fields clash with checkpoint keys: {clash}")
    return {
        "config": cfg.to_dict(),
        "model": _cpu_state(model),
        "best_model": dict(best_model) if best_model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        **fields,
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write ``checkpoint`` atomically (a crash mid-write never leaves a truncated file). Returns ``path``."""
    return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path``, tensors on the CPU (``weights_only``: no code is unpickled)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[ICHModel, Config, dict[str, Any]]:
    """Rebuild a model for inference from a checkpoint's best weights (its last weights when it has none).

    The model is built with ``pretrained_weights=None``: the checkpoint holds every weight, so the ImageNet
    file named in the saved config need not exist where the model is loaded. The returned config is the
    saved one, unchanged, except that a checkpoint written before ``model.prediction`` existed predicts
    with MC alone, as its thresholds were tuned.

    Returns:
        ``(model in eval mode on device, saved config, checkpoint dict)``.
    """
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    if "model" in saved and "prediction" not in saved["model"]:  # written before model.prediction: MC only
        saved = {**saved, "model": {**saved["model"], "prediction": "mc"}}
    cfg = Config.from_dict(saved)
    model = build_model(dataclasses.replace(cfg.model, pretrained_weights=None))
    model.load_state_dict(ckpt["best_model"] or ckpt["model"])
    model.to(device).eval()
    return model, cfg, ckpt
