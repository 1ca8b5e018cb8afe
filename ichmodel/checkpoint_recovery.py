"""Which checkpoint to resume from, and what older ones keep.

**Verified files.** :func:`ichmodel.checkpoint.save_checkpoint` writes ``<file>.json`` beside each checkpoint
(size, SHA-256). :func:`verify_checkpoint` checks a file against it (a file without one, written before
records existed or cut off between the two writes, is checked by the CRC of every zip member instead);
:func:`newest_intact_checkpoint` returns the newest of several candidates that verifies and loads, logging
each skipped file and why, and :func:`run_checkpoints` lists a Ray Train run folder's checkpoints newest first.

**Smaller runs.** The optimizer state (AdamW: two fp32 copies of the weights) is only needed to continue from
the newest checkpoint: :func:`prune_checkpoint` rewrites an older one without it (and, ``best_only``, keeps
only the exported weights, for a trial that will not continue).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ichmodel import io
from ichmodel.checkpoint import load_checkpoint, save_checkpoint, sidecar_location

logger = logging.getLogger(__name__)

_CHUNK = 16 * 2**20


class CheckpointCorrupt(ValueError):
    """A checkpoint file that must not be resumed from, in one line: ``"<location>: <cause>"``.

    Causes: ``missing``, ``truncated (N of M bytes)``, ``size N bytes, recorded M``, ``hash mismatch``,
    ``unreadable zip (...)``, ``unreadable (...)``.
    """

    def __init__(self, location: str | Path, cause: str) -> None:
        super().__init__(f"{location}: {cause}")
        self.location, self.cause = str(location), cause


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
