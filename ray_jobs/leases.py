"""One writer per folder for the jobs, and the one line a job ends with when its storage or its lease fails.

Each job's ``main`` takes the lease on the folder it writes (:func:`hold_folder`: a train run's
``STORAGE/NAME``, a search's experiment folder, an ensemble's or fold set's output folder, preprocessing's
shards folder) right after reading its arguments, and turns :data:`JOB_ERRORS` into one logged line
(:func:`job_failed`; the traceback only with ``-v``). A second job on the same folder ends at once naming the
holder; ``--force`` takes the lease over from a holder known to be gone (:func:`add_force_argument`).

Jobs that run other jobs' glue in one process (``ensemble.py --folds``, ``--smoke-test``, the demo) take it
once, at the outermost job (only a ``main`` takes one); a :func:`hold_folder` inside another on the same
folder in this process gets the held lease instead of refusing itself.

Light to import (no torch, no Ray): every job's ``--help`` imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from ichmodel.lease import Lease, LeaseHeld, LeaseLost, acquire
from ichmodel.storage_errors import StorageError, storage_error

logger = logging.getLogger("ray_jobs")

#: What a job's ``main`` reports as one line (:func:`job_failed`) instead of a traceback.
JOB_ERRORS = (LeaseHeld, LeaseLost, StorageError)
#: Exit code of a job refused because another holds its folder (or its lease was taken over).
EXIT_LEASE = 3
#: Exit code of a job ended by its storage (no space, permission, read-only, bucket, credentials).
EXIT_STORAGE = 4

_HELD: dict[str, Lease] = {}


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: take over the folder's lease from a job that has ended without releasing it."""
    parser.add_argument("--force", action="store_true", help="take the output folder over from the job named "
                        "as holding it, when that job is gone (its node lost); never while it still runs")  # fmt: skip


@contextlib.contextmanager
def hold_folder(folder: str, job: str, force: bool = False) -> Iterator[Lease]:
    """Hold the lease on ``folder`` (a path or URI) for the block; released at its end (a job killed holds it
    until its pid is found dead, or its heartbeat is :data:`ichmodel.lease.STALE_AFTER_S` old). Inside a
    block of this process on the same folder, the lease already held (nothing taken, nothing released).
    A storage failure raised in the block (no space, read-only, permission, bucket, credentials) comes out
    as a :class:`~ichmodel.storage_errors.StorageError` naming ``folder``; other errors pass unchanged.

    Raises:
        ichmodel.lease.LeaseHeld: one line naming the job holding it and how to take over (``--force``).
        ichmodel.storage_errors.StorageError: when the lease cannot be written there.
    """
    key = str(folder).rstrip("/")
    held = _HELD.get(key)
    if held is not None and not held.lost:
        yield held
        return
    new_folder = None if "://" in key or Path(key).exists() else Path(key)  # removed again if left empty
    lease = acquire(key, {"job": job, "command": " ".join(sys.argv)[:300]}, force=force)
    _HELD[key] = lease
    try:
        yield lease
    except OSError as exc:  # a storage failure the job met (pyarrow's, the OS's) as one StorageError line
        error = storage_error(exc, key)
        if error is None or error is exc:
            raise
        raise error from exc
    finally:
        _HELD.pop(key, None)
        lease.release()
        if new_folder is not None:  # a job refused before it wrote anything leaves no folder behind
            with contextlib.suppress(OSError):
                new_folder.rmdir()


def job_failed(exc: BaseException, verbose: bool = False) -> int:
    """Log one of :data:`JOB_ERRORS` as one line (with its traceback when ``verbose``); the exit code."""
    logger.error("%s", exc, exc_info=exc if verbose else None)
    return EXIT_LEASE if isinstance(exc, LeaseHeld | LeaseLost) else EXIT_STORAGE


#: How a library error that crossed a Ray process boundary still shows in the text of Ray's error.
_ONE_LINE = re.compile(r"(?:StorageError|CheckpointCorrupt|LeaseLost): ([^\n]+)")


def failure_line(error: BaseException, location: str) -> str | None:
    """The one line for a failed Train run whose error (``ray.train.TrainingFailedError``) comes from its
    storage or an unusable checkpoint, or None for any other failure.

    Looks through what Ray wraps (the workers' failures, the controller's, each ``cause``, ``__cause__``);
    a storage failure without a line of its own is named at ``location`` (the run folder).
    """
    for exc in _chain(error):
        if type(exc).__name__ in ("StorageError", "CheckpointCorrupt", "LeaseLost"):
            return str(exc)
    for exc in _chain(error):
        found = storage_error(exc, location)
        if found is not None:
            return str(found)
    match = _ONE_LINE.search(str(error))
    return match.group(1).strip() if match else None


def _chain(error: BaseException) -> Iterator[BaseException]:
    todo, seen = [error], set()
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen or not isinstance(exc, BaseException):
            continue
        seen.add(id(exc))
        yield exc
        todo.extend((getattr(exc, "worker_failures", None) or {}).values())
        todo += [getattr(exc, "controller_failure", None), getattr(exc, "cause", None)]
        todo += [exc.__cause__, exc.__context__]
