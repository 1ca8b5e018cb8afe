"""Checkpoints: one plain dict per file, saved atomically, loadable with ``torch.load(weights_only=True)``.

Layout (``docs/architecture.md``, "Checkpoints"): ``config`` (``Config.to_dict()``), ``model`` (state_dict),
``best_model`` (state_dict of the weights to export, or ``None``), ``optimizer``, ``scheduler`` (their
state_dicts, or ``None``), and every field of the engine's training state at the top level, once:
``stage``, ``epoch``, ``global_epoch``, ``stage_started``, ``best_score``, ``best_f2``, ``thresholds``,
``nonfinite_steps``, ``finished``, ``history``.

When the best weights equal the last ones (the epoch that just improved), ``best_model`` holds the very
tensors of ``model``: ``torch.save`` stores a shared storage once, and ``torch.load`` gives back two dicts of
the same tensors, so the file holds one copy and every reader (old ones too) sees two equal state_dicts.
Optionally ``rng`` (:func:`ichmodel.rng_state.capture_rng_state`) carries the random generators' states.

**Verified files.** :func:`save_checkpoint` writes ``<file>.json`` beside each checkpoint, after it: its size
and SHA-256 (a sidecar rather than a record inside the file, because a zip written by ``torch.save`` cannot
hold the hash of its own bytes, and a sidecar is checked without unpickling anything; the checkpoint stays a
plain ``torch.load`` file). The old sidecar is removed once the new file is written, just before it replaces the old one, so
a crash leaves either a file with its own sidecar or one with none, never a sidecar describing another file,
and a save that fails (a full disk) leaves the previous file and its sidecar as they were. Checking a file
against its record, falling back to an older one and pruning older ones: :mod:`ichmodel.checkpoint_recovery`.

This module knows nothing of training: prediction and ensembling load models through :func:`load_model`
without importing the engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from ichmodel import io
from ichmodel.config import Config
from ichmodel.model import ICHModel, build_model
from ichmodel.storage_errors import storage_errors

#: Keys every checkpoint holds besides the training-state fields.
WEIGHT_KEYS = ("config", "model", "best_model", "optimizer", "scheduler")
#: Keys a checkpoint may hold besides those: the random generators' states (:func:`ichmodel.rng_state.capture_rng_state`).
OPTIONAL_KEYS = ("rng",)
#: Suffix of the record written beside each checkpoint file (``checkpoint.pt`` → ``checkpoint.pt.json``).
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1
_CHUNK = 16 * 2**20


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def _same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k].to(a[k].device))
        for k in a
    )


def checkpoint_dict(
    model: nn.Module,
    cfg: Config,
    state: Any,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    best_model: Mapping[str, torch.Tensor] | None = None,
    rng: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of a run: weights, config, optimizer/scheduler and the training state, each once.

    Args:
        model: the model being trained (DDP-wrapped or not); its weights are copied to the CPU.
        cfg: the run's resolved config.
        state: the training state, a dataclass (``ichmodel.stages.TrainState``) or a mapping; its fields
            become top-level keys.
        optimizer, scheduler: their ``state_dict()`` is stored (``None`` when not given).
        best_model: state_dict of the weights to export (``None``: the last weights are exported). When it
            equals the last weights, the checkpoint's ``best_model`` is made of ``model``'s own tensors, which
            ``torch.save`` stores once.
        rng: the random generators' states (:func:`ichmodel.rng_state.capture_rng_state`), stored as ``rng`` when given.

    Raises:
        ValueError: when a state field would overwrite one of :data:`WEIGHT_KEYS` or :data:`OPTIONAL_KEYS`.
    """
    fields = dataclasses.asdict(state) if dataclasses.is_dataclass(state) else dict(state)
    clash = sorted(set(fields) & set(WEIGHT_KEYS + OPTIONAL_KEYS))
    if clash:
        raise ValueError(f"Training state fields clash with checkpoint keys: {clash}")
    weights = _cpu_state(model)
    best = dict(best_model) if best_model is not None else None
    if best is not None and _same_weights(weights, best):
        # One set of tensors for both, stored once. The caller's snapshot, not the live parameters that
        # _cpu_state aliases on the CPU: a checkpoint kept in memory must not change as training goes on.
        weights = {k: best[k] for k in weights}
    ckpt = {
        "config": cfg.to_dict(),
        "model": weights,
        "best_model": best,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        **fields,
    }
    if rng is not None:
        ckpt["rng"] = rng
    return ckpt


class _HashingWriter:
    """A binary file that counts and hashes what ``torch.save`` writes through it."""

    def __init__(self, file) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        written = self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint (each storage once): about the size of its file."""
    seen: set[int] = set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if torch.is_tensor(x):
            key = x.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(obj)
    return total


def sidecar_location(location: str | Path) -> str:
    """Where the record of the checkpoint at ``location`` lives: ``<location>.json`` (a URI keeps its query)."""
    base, sep, query = str(location).partition("?")
    return f"{base}{SIDECAR_SUFFIX}{sep}{query}"


def _delete_record(location: str | Path) -> None:
    """Remove the record beside ``location`` if there is one. A failure here is left to the write that follows
    to report (it meets the same storage), and that write's new record replaces the old one anyway."""
    try:
        fs, path = io.resolve(sidecar_location(location))
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except (OSError, ValueError):
        pass


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> str | Path:
    """Write ``checkpoint`` whole to a path or URI, then its record (size, SHA-256) beside it. Returns ``path``.

    The file goes to a temporary name and is renamed into place (uploaded whole to object storage), so a
    failed save leaves the previous file at ``path`` as it was. ``torch.save`` writes through a Python file
    object: a full disk then raises ``OSError`` (ENOSPC) rather than torch's errno-less ``RuntimeError``.

    Raises:
        ichmodel.storage_errors.StorageError: one line naming ``path`` and the cause (no space, permission
            denied, read-only, bucket missing, credentials refused), the original error as its cause.
    """
    writer: list[_HashingWriter] = []

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            writer.append(_HashingWriter(f))
            torch.save(checkpoint, writer[0])
            f.flush()
            os.fsync(f.fileno())
        _delete_record(path)  # the new file is whole: its predecessor's record must not outlive it

    with storage_errors(path, "writing", needed=_tensor_bytes(checkpoint)):
        written = io.atomic_write(path, write)
        record = {
            "format": SIDECAR_FORMAT,
            "file": str(path).partition("?")[0].rstrip("/").rsplit("/", 1)[-1],
            "size": writer[0].size,
            "sha256": writer[0].sha256.hexdigest(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "optimizer": checkpoint.get("optimizer") is not None,
        }
        io.atomic_write_text(sidecar_location(path), json.dumps(record, indent=1) + "\n")
    return written


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path``, tensors on the CPU (``weights_only``: no code is unpickled).

    Reads files of every format so far (with or without a record beside them, with or without ``rng``).
    Use :func:`ichmodel.checkpoint_recovery.load_verified_checkpoint` to resume: it checks the file first.

    Raises:
        ValueError: naming ``path`` when it is no PyTorch file at all (torch's own error is a page of advice
            about ``weights_only``) or a cut-short or damaged one (torch: ``PytorchStreamReader failed ...``).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} is not a PyTorch checkpoint file") from exc
    except (RuntimeError, EOFError) as exc:
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in str(exc):
            raise
        cause = str(exc).strip().split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is cut short or damaged ({cause})") from exc


# ---------------------------------------------------------------------------------------------- models


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
