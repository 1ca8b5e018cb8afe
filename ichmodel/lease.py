"""One writer per run: a lease on the folder a job writes (a run, an experiment, a fold set, a shard folder).

A job that starts or resumes a run takes the lease on its folder with :func:`acquire` and holds it while it
lives (a heartbeat thread refreshes it); a second job on the same folder fails at once with
:class:`LeaseHeld`, whose message names the holder (host, pid, when it started, its last heartbeat) and how
to take over. A holder that is gone leaves a *stale* lease, which the next job takes over by itself: at once
when the holder ran on this host and its process is dead, otherwise ``stale_after`` seconds after its last
heartbeat. ``force=True`` takes over a live-looking lease (the ``--force`` of the jobs, for a holder known
to be gone: a node lost with its process table); the old holder, if it still runs, sees :attr:`Lease.lost`
at its next heartbeat and :meth:`Lease.check` raises :class:`LeaseLost`.

The lease is a JSON file ``<folder>/.ich-lease.json`` (:data:`LEASE_NAME`): ``token`` (unique per acquire),
``host``, ``pid``, ``since``, ``heartbeat`` (Unix seconds) and ``info`` (what the job says about itself).

How "two jobs cannot both hold it" is made true depends on the storage:

- **Local disk** (also NFS and other shared POSIX folders): the file is written complete under a temporary
  name and hard-linked to the lease name (``link`` fails when the name exists: the NFS-safe form of
  ``O_CREAT|O_EXCL``), and the holder keeps an ``fcntl.flock`` on it for its whole life. A lease whose lock
  is held is never stale; a takeover takes that lock first and checks the file is still the one it judged
  stale, so two takers cannot both win. The heartbeat rewrites the file in place (same inode, same lock).
- **S3** (``s3://``): S3's conditional writes, through botocore (pyarrow's S3 filesystem cannot send the
  headers): create with ``If-None-Match: *`` (412 when the object exists), heartbeat and takeover with
  ``If-Match: <ETag read>`` (412 when someone else wrote it since), release with a conditional delete.
  Staleness is measured on the server's clock (the response's ``Date`` minus the object's ``Last-Modified``),
  so node clocks may differ. After each write the lease is read back and its token compared, which also
  catches an S3-compatible server that ignores the condition headers. moto 5.2.5's server (the tests')
  answers these headers as S3 does (412 ``PreconditionFailed``), but checks them outside any lock: two
  requests arriving within microseconds could both pass there, which S3 itself rules out; the read-back
  catches most of that window. botocore is needed at run time for ``s3://`` leases (``boto3`` is in every
  AWS and Ray image); without it the fallback below is used, with a warning.
- **Other URIs** (``gs://``, ``hdfs://``, ...), and S3 without botocore: write-then-read-back. The job writes
  its token when no live lease is there, waits :data:`SETTLE_S`, reads the lease back and refuses unless the
  token is its own. **Weakness**: two jobs whose write and read-back interleave exactly (A writes, A reads,
  B writes, B reads, all within the settle time) can both believe they hold it; the first heartbeat after
  that tells the overwritten one (:attr:`Lease.lost`). Staleness uses the holder's own clock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ichmodel import io
from ichmodel.lease_stores import (
    HEARTBEAT_S,
    SETTLE_S,
    STALE_AFTER_S,
    Holder,
    _LocalLease,
    _pid_alive,
    _ReadBackLease,
    _S3Lease,
    _Seen,
)

logger = logging.getLogger(__name__)

LEASE_NAME = ".ich-lease.json"
TAKEOVER_HINT = "rerun with --force"


class LeaseHeld(RuntimeError):
    """Another job holds the lease; the message names it and how to take over."""

    def __init__(self, message: str, holder: Holder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """This job's lease was taken over (``--force``) or removed: it must stop writing."""


def _backend(lease_location: str | Path):
    if io.is_local(lease_location):
        return _LocalLease(
            io.local_path(lease_location) if io.is_uri(lease_location) else Path(lease_location)
        )
    if str(lease_location).lower().startswith("s3://"):
        try:
            import botocore  # noqa: F401, PLC0415
        except ImportError:
            logger.warning(
                "botocore is not installed: the lease on %s is written and read back instead of written with "
                "S3's conditional PUT, which two jobs starting within %.0f s of each other can both pass",
                lease_location,
                SETTLE_S,
            )
            return _ReadBackLease(str(lease_location))
        return _S3Lease(str(lease_location))
    return _ReadBackLease(str(lease_location))


# --------------------------------------------------------------------------------------------- the lease


class Lease:
    """A held lease: refreshed by a daemon thread until :meth:`release` (or the ``with`` block's end)."""

    def __init__(self, location: str, backend: Any, holder: Holder, heartbeat_s: float, stale_after: float):
        self.location, self.holder = location, holder
        self._backend, self._stale_after = backend, stale_after
        self._stop = threading.Event()
        self._lost: str | None = None
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="ich-lease")
        self._thread.start()

    @property
    def lost(self) -> bool:
        """True once a heartbeat found the lease taken over or removed (or could not renew it in time)."""
        return self._lost is not None

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is no longer this job's (call it before each write).

        Raises:
            LeaseLost: naming the location and what happened.
        """
        if self._lost is not None:
            raise LeaseLost(f"Lost the lease on {self.location}: {self._lost}; stop writing there")

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.holder.heartbeat = time.time()
            try:
                ok = self._backend.refresh(self.holder)
            except Exception as exc:  # storage hiccup: keep trying until the lease would look stale
                if time.monotonic() - self._last_ok > self._stale_after:
                    self._lose(f"no heartbeat could be written for {self._stale_after:.0f} s ({exc})")
                    return
                logger.warning("lease heartbeat on %s failed (%s); retrying", self.location, exc)
                continue
            if not ok:
                self._lose("another job took it over or removed it")
                return
            self._last_ok = time.monotonic()

    def _lose(self, why: str) -> None:
        self._lost = why
        logger.error("lost the lease on %s: %s", self.location, why)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (only if it is still this job's). Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        try:
            self._backend.delete(self.holder)
        except Exception as exc:  # the job is ending anyway: the lease goes stale by itself
            logger.warning(
                "could not remove the lease on %s (%s); it goes stale by itself", self.location, exc
            )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lease_location(folder: str | Path) -> str:
    """The lease file of a folder (a path or URI): ``<folder>/.ich-lease.json``."""
    return io.join(folder, LEASE_NAME)


def _is_stale(seen: _Seen, stale_after: float) -> str | None:
    """Why the lease ``seen`` may be taken over, or None while its holder may be alive."""
    if seen.locked:
        return None  # a live process holds its lock
    holder = seen.holder
    if holder is not None and holder.host == socket.gethostname() and not _pid_alive(holder.pid):
        return f"its holder (pid {holder.pid} on this host) is dead"
    if seen.age > stale_after:
        return f"no heartbeat for {seen.age:.0f} s (stale after {stale_after:.0f} s)"
    if holder is None and seen.locked is False:
        return "it is unreadable and no process holds it"
    return None


def acquire(
    location: str | Path,
    holder_info: Mapping[str, Any] | None = None,
    *,
    force: bool = False,
    heartbeat_s: float = HEARTBEAT_S,
    stale_after: float = STALE_AFTER_S,
    takeover_hint: str = TAKEOVER_HINT,
) -> Lease:
    """Take the lease on the folder ``location`` (a path or URI) for this process, or fail at once.

    Args:
        location: the folder one job at a time may write (a run, an experiment, an output folder).
        holder_info: what the job says about itself, shown to a job refused (e.g. ``{"job": "train.py",
            "name": "run-a"}``; ``job`` heads the message).
        force: take the lease over even from a holder that looks alive (only when it is known to be gone).
        heartbeat_s: how often the lease is refreshed.
        stale_after: seconds without a heartbeat after which another job takes the lease over by itself.
        takeover_hint: how a refused user takes over, put in the message (the jobs' ``--force``).

    Returns:
        The held :class:`Lease` (a context manager; :meth:`Lease.release` when done).

    Raises:
        LeaseHeld: ``"<folder> is in use by <job> on host H, pid P, since T (last heartbeat N s ago) ..."``.
        ichmodel.storage_errors.StorageError: when the lease cannot be written (no space, permission, bucket).
    """
    from ichmodel.storage_errors import storage_errors  # noqa: PLC0415

    target = lease_location(location)
    backend = _backend(target)
    now = time.time()
    holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, dict(holder_info or {}))
    with storage_errors(target, "taking the lease on"):
        for _ in range(10):  # each turn: someone released, took over or refreshed between two steps
            if backend.try_create(holder):
                return Lease(str(location), backend, holder, heartbeat_s, stale_after)
            seen = backend.read()
            if seen is None:
                continue  # released in between: create again
            why = "--force" if force else _is_stale(seen, stale_after)
            if why is None:
                raise _held(location, seen, stale_after, takeover_hint)
            holder.since = holder.heartbeat = time.time()
            if backend.try_replace(seen.version, holder, force):
                previous = seen.holder.describe(seen.age) if seen.holder else "an unreadable lease"
                logger.warning("took over the lease on %s from %s: %s", location, previous, why)
                return Lease(str(location), backend, holder, heartbeat_s, stale_after)
    seen = backend.read()
    raise (
        _held(location, seen, stale_after, takeover_hint)
        if seen
        else LeaseHeld(
            f"{location}: the lease kept changing hands while this job tried to take it; try again"
        )
    )


def _held(location: str | Path, seen: _Seen, stale_after: float, hint: str) -> LeaseHeld:
    who = seen.holder.describe(seen.age) if seen.holder else "a job whose lease file is unreadable"
    return LeaseHeld(
        f"{location} is in use by {who}: one job at a time may write there. If that job has ended, {hint} "
        f"(or wait until {stale_after:.0f} s after its last heartbeat)",
        seen.holder,
    )
