"""Checkpoints: one plain dict per file, saved atomically, loadable with ``torch.load(weights_only=True)``.

Layout (``docs/architecture.md``, "Checkpoints"): ``config`` (``Config.to_dict()``), ``model`` (state_dict),
``best_model`` (state_dict of the weights to export, or ``None``), ``optimizer``, ``scheduler`` (their
state_dicts, or ``None``), and every field of the engine's training state at the top level, once:
``stage``, ``epoch``, ``global_epoch``, ``stage_started``, ``best_score``, ``best_f2``, ``thresholds``,
``nonfinite_steps``, ``finished``, ``history``.

When the best weights equal the last ones (the epoch that just improved), ``best_model`` holds the very
tensors of ``model``: ``torch.save`` stores a shared storage once, and ``torch.load`` gives back two dicts of
the same tensors, so the file holds one copy and every reader (old ones too) sees two equal state_dicts.
Optionally ``rng`` (:func:`capture_rng_state`) carries the random generators' states.

**Verified files.** :func:`save_checkpoint` writes ``<file>.json`` beside each checkpoint, after it: its size
and SHA-256 (a sidecar rather than a record inside the file, because a zip written by ``torch.save`` cannot
hold the hash of its own bytes, and a sidecar is checked without unpickling anything; the checkpoint stays a
plain ``torch.load`` file). The old sidecar is removed once the new file is written, just before it replaces the old one, so
a crash leaves either a file with its own sidecar or one with none, never a sidecar describing another file,
and a save that fails (a full disk) leaves the previous file and its sidecar as they were. :func:`verify_checkpoint`
checks a file against its sidecar (a file without one, written before sidecars existed or cut off between the
two writes, is checked by the CRC of every zip member instead); :func:`newest_intact_checkpoint` returns the
newest of several candidates that verifies and loads, logging each skipped file and why.

**Smaller runs.** The optimizer state (AdamW: two fp32 copies of the weights) is only needed to continue from
the newest checkpoint: :func:`prune_checkpoint` rewrites an older one without it (and, ``best_only``, keeps
only the exported weights, for a trial that will not continue).

This module knows nothing of training: prediction and ensembling load models through :func:`load_model`
without importing the engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn

from ichmodel import io
from ichmodel.config import Config
from ichmodel.model import ICHModel, build_model
from ichmodel.storage_errors import storage_errors

logger = logging.getLogger(__name__)

#: Keys every checkpoint holds besides the training-state fields.
WEIGHT_KEYS = ("config", "model", "best_model", "optimizer", "scheduler")
#: Keys a checkpoint may hold besides those: the random generators' states (:func:`capture_rng_state`).
OPTIONAL_KEYS = ("rng",)
#: Suffix of the record written beside each checkpoint file (``checkpoint.pt`` → ``checkpoint.pt.json``).
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1
_CHUNK = 16 * 2**20


class CheckpointCorrupt(ValueError):
    """A checkpoint file that must not be resumed from, in one line: ``"<location>: <cause>"``.

    Causes: ``missing``, ``truncated (N of M bytes)``, ``size N bytes, recorded M``, ``hash mismatch``,
    ``unreadable zip (...)``, ``unreadable (...)``.
    """

    def __init__(self, location: str | Path, cause: str) -> None:
        super().__init__(f"{location}: {cause}")
        self.location, self.cause = str(location), cause


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
        rng: the random generators' states (:func:`capture_rng_state`), stored as ``rng`` when given.

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
    Use :func:`load_verified_checkpoint` to resume: it checks the file first.
    """
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------- verification


def _resolve(location: str | Path, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    return (filesystem, str(location)) if filesystem is not None else io.resolve(location)


def _read_record(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    side = sidecar_location(path)
    if fs.get_file_info(side).type != pafs.FileType.File:
        return None
    with fs.open_input_file(side) as f:
        try:
            record = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None  # a record cut short: fall back to the zip's own checks
    return record if isinstance(record, dict) and "sha256" in record and "size" in record else None


def _stream(fs: pafs.FileSystem, path: str, copy_to: Path | None) -> tuple[int, str]:
    """Read the file once: ``(size, sha256)``, copying it to ``copy_to`` on the way when given."""
    digest = hashlib.sha256()
    size = 0
    with fs.open_input_file(path) as source, open(copy_to, "wb") if copy_to else _NoFile() as target:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            target.write(chunk)
    return size, digest.hexdigest()


class _NoFile:
    def __enter__(self) -> _NoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, data: bytes) -> None:
        return None


def _check_zip(location: str | Path, local: Path) -> None:
    try:
        with zipfile.ZipFile(local) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointCorrupt(location, f"unreadable zip ({exc}), no record to check it against") from exc
    if bad is not None:
        raise CheckpointCorrupt(location, f"unreadable zip (member {bad} fails its CRC-32)")


def _check(location: str | Path, fs: pafs.FileSystem, path: str, local: Path | None) -> tuple[str, Path]:
    """Verify one checkpoint; returns ``(what was checked, a local copy to load)``.

    ``local``: where to copy a remote file (None for a local file, read where it is).
    """
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise CheckpointCorrupt(location, "missing")
    record = _read_record(fs, path)
    size, digest = _stream(fs, path, local)
    target = local if local is not None else Path(path)
    if record is None:
        _check_zip(location, target)
        return "zip CRC-32 of every member (no record beside it)", target
    if size < int(record["size"]):
        raise CheckpointCorrupt(location, f"truncated ({size} of {record['size']} bytes)")
    if size != int(record["size"]):
        raise CheckpointCorrupt(location, f"size {size} bytes, recorded {record['size']}")
    if digest != record["sha256"]:
        raise CheckpointCorrupt(
            location, f"hash mismatch (sha256 {digest[:12]}…, recorded {record['sha256'][:12]}…)"
        )
    return "size and sha256", target


def verify_checkpoint(location: str | Path, filesystem: pafs.FileSystem | None = None) -> str:
    """Check the checkpoint at ``location`` against its record; returns what was checked.

    ``filesystem``: a pyarrow filesystem ``location`` is a path in (e.g. a Ray ``Checkpoint``'s
    ``filesystem``/``path``); without it ``location`` is a local path or a URI.

    Raises:
        CheckpointCorrupt: ``"<location>: <cause>"``: missing, truncated, a size or hash that differs from the
            record, or (a file without a record) an unreadable zip.
    """
    fs, path = _resolve(location, filesystem)
    return (
        _check(location, fs, path, None)[0]
        if isinstance(fs, pafs.LocalFileSystem)
        else _verify_remote(location, fs, path)
    )


def _verify_remote(location: str | Path, fs: pafs.FileSystem, path: str) -> str:
    with tempfile.TemporaryDirectory(prefix="ich-verify-") as folder:
        return _check(location, fs, path, Path(folder) / "checkpoint.pt")[0]


def load_verified_checkpoint(
    location: str | Path, filesystem: pafs.FileSystem | None = None
) -> dict[str, Any]:
    """:func:`verify_checkpoint`, then :func:`load_checkpoint` (a remote file is read once, into a temp file).

    Raises:
        CheckpointCorrupt: as :func:`verify_checkpoint`, or ``unreadable (...)`` when torch cannot load a
            file that passed (a record written for a file that was never whole).
    """
    fs, path = _resolve(location, filesystem)
    with tempfile.TemporaryDirectory(prefix="ich-verify-") as folder:
        local = None if isinstance(fs, pafs.LocalFileSystem) else Path(folder) / "checkpoint.pt"
        _, target = _check(location, fs, path, local)
        try:
            return load_checkpoint(target)
        except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointCorrupt(location, f"unreadable ({cause})") from exc


def newest_intact_checkpoint(
    candidates: Iterable[str | Path], filesystem: pafs.FileSystem | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The first of ``candidates`` (newest first) that verifies and loads: ``(its location, its dict)``.

    Each file passed over is logged as a warning, one line naming it and the cause (``truncated (…)``,
    ``hash mismatch``, ``unreadable zip``). ``filesystem``: as in :func:`verify_checkpoint`. For a Ray Train
    run, the candidates are ``ray.train.get_checkpoint()``'s file followed by the other checkpoint folders
    of the run folder (:func:`run_checkpoints`).

    Returns:
        None when there is no candidate (a fresh run).

    Raises:
        CheckpointCorrupt: when candidates exist and none is intact, naming each file and its cause (resuming
            from nothing would silently restart the run).
    """
    skipped: list[CheckpointCorrupt] = []
    for location in candidates:
        try:
            ckpt = load_verified_checkpoint(location, filesystem)
        except CheckpointCorrupt as exc:
            logger.warning("skipping checkpoint %s", exc)
            skipped.append(exc)
            continue
        if skipped:
            logger.warning(
                "resuming from %s, the newest intact checkpoint (%d newer one(s) skipped)",
                location,
                len(skipped),
            )
        return str(location), ckpt
    if skipped:
        causes = "; ".join(str(e) for e in skipped)
        raise CheckpointCorrupt(skipped[0].location, f"no intact checkpoint to resume from ({causes})")
    return None


def run_checkpoints(
    run_folder: str | Path,
    file_name: str = "checkpoint.pt",
    filesystem: pafs.FileSystem | None = None,
) -> list[str]:
    """The checkpoint files ``<run_folder>/checkpoint_*/<file_name>``, newest first.

    Ray Train names each reported checkpoint folder ``checkpoint_<YYYY-MM-DD_HH-MM-SS.ffffff>`` inside the
    run folder, so the names sort by time. Paths are joined as ``run_folder`` is given (a path or URI; with
    ``filesystem``, a path within it).
    """
    fs, root = _resolve(run_folder, filesystem)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    folders = sorted(
        (i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
         if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
        reverse=True,
    )  # fmt: skip
    join = (lambda *p: "/".join(p)) if filesystem is not None else io.join
    found = [join(str(run_folder), name, file_name) for name in folders]
    if filesystem is not None:
        return [f for f in found if fs.get_file_info(f).type == pafs.FileType.File]
    return [f for f in found if io.is_file(f)]


# ------------------------------------------------------------------------------------------ pruning


def prune_checkpoint(location: str | Path, *, best_only: bool = False) -> tuple[int, int]:
    """Rewrite a checkpoint without its optimizer state; returns its ``(size before, size after)`` in bytes.

    For a checkpoint that is no longer the newest of its run: resuming from it (the fallback when the newest
    is unreadable) starts a fresh optimizer at the saved learning rate (the scheduler's state is kept; it is
    a few numbers). ``best_only``: also replace the last weights by the exported (best) ones, the only
    weights :func:`load_model` reads: for a trial that will not continue (ASHA stopped it, or it finished).
    A pruned file is written as :func:`save_checkpoint` writes any checkpoint (whole, with its record).

    Raises:
        CheckpointCorrupt: when the file does not verify (it is left as it is).
        ichmodel.storage_errors.StorageError: when the rewrite fails (the file is left as it was).
    """
    fs, path = io.resolve(location)
    before = fs.get_file_info(path).size
    record = _read_record(fs, path)
    if record is not None and record.get("optimizer") is False and not best_only:
        return before, before  # already pruned: known from the record, without reading the file
    ckpt = load_verified_checkpoint(location)
    if ckpt.get("optimizer") is None and not best_only:
        return before, before
    ckpt["optimizer"] = None
    if best_only:
        best = ckpt.get("best_model") or ckpt["model"]
        ckpt["model"], ckpt["best_model"], ckpt["scheduler"] = best, dict(best), None
    save_checkpoint(ckpt, location)
    return before, fs.get_file_info(path).size


# ------------------------------------------------------------------------------------ random streams


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The states of torch's CPU (and, when present, every CUDA device's), numpy's global and Python's
    ``random`` generators, plus the named ``generators``, as ``weights_only``-loadable data.

    Restore with :func:`restore_rng_state`: the draws that follow are then those that followed the capture.
    Under DDP every rank's streams differ (their batches differ in size): capture on every rank and keep
    each rank's (or re-seed each epoch from ``(seed, epoch, rank)``).
    """
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Set the generators to a :func:`capture_rng_state` result (CUDA states only where CUDA is present,
    for as many devices as both have; a named generator absent from ``state`` is left as it is)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for device, device_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": int(saved["pos"])},
            "has_gauss": int(saved["has_gauss"]),
            "gauss": float(saved["gauss"]),
        }
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"]))
    for name, generator in (generators or {}).items():
        if name in state.get("generators", {}):
            generator.set_state(state["generators"][name])


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
