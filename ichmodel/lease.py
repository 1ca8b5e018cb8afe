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

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ichmodel import io

logger = logging.getLogger(__name__)

LEASE_NAME = ".ich-lease.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
SETTLE_S = 1.0  # write-then-read-back leases: wait this long before reading back
PAD = 1024  # local lease files are padded to this size, so an in-place heartbeat never shrinks them
TAKEOVER_HINT = "rerun with --force"


class LeaseHeld(RuntimeError):
    """Another job holds the lease; the message names it and how to take over."""

    def __init__(self, message: str, holder: Holder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """This job's lease was taken over (``--force``) or removed: it must stop writing."""


@dataclass
class Holder:
    """Who holds a lease (the JSON of the lease file)."""

    token: str
    host: str
    pid: int
    since: float
    heartbeat: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self, pad: int = 0) -> bytes:
        data = json.dumps(self.__dict__, sort_keys=True).encode()
        return data + b" " * max(pad - len(data), 0)

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder in a lease file, or None when it does not parse (cut short, or not a lease)."""
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(str(raw["token"]), str(raw["host"]), int(raw["pid"]), float(raw["since"]),
                       float(raw["heartbeat"]), dict(raw.get("info") or {}))  # fmt: skip
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def describe(self, age: float | None = None) -> str:
        job = self.info.get("job") or "a job"
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        age = time.time() - self.heartbeat if age is None else age
        return f"{job} on host {self.host}, pid {self.pid}, since {since} (last heartbeat {age:.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class _Seen:
    """What a backend read: the holder (None: unparsable), a version to compare-and-swap against, the
    heartbeat's age in seconds, and whether a live process provably holds it (local locks only)."""

    holder: Holder | None
    version: Any
    age: float
    locked: bool | None = None


# ----------------------------------------------------------------------------------------------- local


class _LocalLease:
    """A lease file on a POSIX folder: created by ``link``, held with ``flock``, refreshed in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.inode: int | None = None

    def describe_location(self) -> str:
        return str(self.path)

    def _hold(self, fd: int) -> None:
        self.fd, self.inode = fd, os.fstat(fd).st_ino

    def try_create(self, holder: Holder) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{holder.token}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows this file yet
            os.write(fd, holder.to_bytes(PAD))
            os.fsync(fd)
            os.link(tmp, self.path)  # fails when the lease exists: the atomic step
        except FileExistsError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        self._hold(fd)
        return True

    def read(self) -> _Seen | None:
        for _ in range(5):  # a heartbeat rewriting the file in place can be caught half-written
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                stat = os.fstat(fd)
                data = os.pread(fd, 1 << 16, 0)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    locked = False
                except BlockingIOError:
                    locked = True
            finally:
                os.close(fd)
            holder = Holder.from_bytes(data)
            if holder is not None or not locked:
                break
            time.sleep(0.05)
        version = (stat.st_ino, holder.token if holder else None)
        return _Seen(holder, version, max(time.time() - stat.st_mtime, 0.0), locked)

    def try_replace(self, version: Any, holder: Holder, force: bool) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not force:
                    os.close(fd)
                    return False
                os.close(fd)
                return self._replace_by_rename(holder)  # a live (hung) holder keeps the old inode's lock
            current = Holder.from_bytes(os.pread(fd, 1 << 16, 0))
            same_file = os.fstat(fd).st_ino == _inode(self.path)
            if not same_file or (os.fstat(fd).st_ino, current.token if current else None) != version:
                os.close(fd)
                return False  # released or taken over since it was read: judge again
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.to_bytes(PAD), 0)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._hold(fd)
        return True

    def _replace_by_rename(self, holder: Holder) -> bool:
        tmp = self.path.with_name(f".{self.path.name}.{holder.token}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, holder.to_bytes(PAD))
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._hold(fd)
        return True

    def refresh(self, holder: Holder) -> bool:
        if self.fd is None or _inode(self.path) != self.inode:
            return False  # removed, or replaced by a forced takeover
        current = Holder.from_bytes(os.pread(self.fd, 1 << 16, 0))
        if current is None or current.token != holder.token:
            return False
        os.pwrite(self.fd, holder.to_bytes(PAD), 0)
        return True

    def delete(self, holder: Holder) -> None:
        if self.fd is None:
            return
        try:
            if _inode(self.path) == self.inode:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


# -------------------------------------------------------------------------------------------------- S3


def _s3_client_for(location: str):
    """A botocore S3 client and ``(bucket, key)`` for an ``s3://`` URI, configured as pyarrow reads the URI:
    ``?endpoint_override=HOST:PORT&scheme=http&region=R`` and ``s3://KEY:SECRET@bucket`` if given, else the
    standard AWS environment (``AWS_ENDPOINT_URL``, credentials chain)."""
    import boto3  # noqa: PLC0415  (only s3:// leases need it)

    parts = urlsplit(location)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    bucket = parts.hostname or ""
    key = parts.path.lstrip("/")
    kwargs: dict[str, Any] = {}
    if query.get("endpoint_override"):
        kwargs["endpoint_url"] = f"{query.get('scheme', 'https')}://{query['endpoint_override']}"
    if query.get("region"):
        kwargs["region_name"] = query["region"]
    if parts.username:
        kwargs["aws_access_key_id"] = unquote(parts.username)
        kwargs["aws_secret_access_key"] = unquote(parts.password or "")
    return boto3.client("s3", **kwargs), bucket, key


def _code(exc: Exception) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"}


class _S3Lease:
    """A lease object written with S3's conditional PUT (``If-None-Match: *`` / ``If-Match: ETag``)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.client, self.bucket, self.key = _s3_client_for(location)
        self.etag: str | None = None

    def describe_location(self) -> str:
        return self.location

    def _put(self, holder: Holder, **condition: str) -> bool:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            reply = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=holder.to_bytes(), **condition
            )
        except ClientError as exc:
            if _code(exc) in _CONFLICT:
                return False
            raise
        self.etag = reply["ETag"]
        seen = self.read()  # read back: catches a server that ignored the condition
        return seen is not None and seen.holder is not None and seen.holder.token == holder.token

    def try_create(self, holder: Holder) -> bool:
        return self._put(holder, IfNoneMatch="*")

    def read(self) -> _Seen | None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        data = reply["Body"].read()
        now = reply["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        server_now = parsedate_to_datetime(now).timestamp() if now else time.time()
        age = max(server_now - reply["LastModified"].timestamp(), 0.0)  # both by the server's clock
        return _Seen(Holder.from_bytes(data), reply["ETag"], age)

    def try_replace(self, version: Any, holder: Holder, force: bool) -> bool:
        return self._put(holder, IfMatch=version)

    def refresh(self, holder: Holder) -> bool:
        return self.etag is not None and self._put(holder, IfMatch=self.etag)

    def delete(self, holder: Holder) -> None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        if self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as exc:
            if _code(exc) in _CONFLICT:
                return  # not ours any more
            seen = self.read()  # a server without conditional deletes: delete only our own lease
            if seen is not None and seen.holder is not None and seen.holder.token == holder.token:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
        finally:
            self.etag = None


# ---------------------------------------------------------------------------------- write + read back


class _ReadBackLease:
    """A lease file on a store without conditional writes: write, wait :data:`SETTLE_S`, read back (see the
    module docstring for its weakness)."""

    def __init__(self, location: str) -> None:
        self.location = location

    def describe_location(self) -> str:
        return self.location

    def _write_and_check(self, holder: Holder) -> bool:
        io.atomic_write_bytes(self.location, holder.to_bytes())
        time.sleep(SETTLE_S)
        seen = self.read()
        return seen is not None and seen.holder is not None and seen.holder.token == holder.token

    def try_create(self, holder: Holder) -> bool:
        if io.exists(self.location):
            return False
        return self._write_and_check(holder)

    def read(self) -> _Seen | None:
        try:
            data = io.read_bytes(self.location)
        except FileNotFoundError:
            return None
        holder = Holder.from_bytes(data)
        age = time.time() - holder.heartbeat if holder else STALE_AFTER_S * 1e3
        return _Seen(holder, holder.token if holder else None, max(age, 0.0))

    def try_replace(self, version: Any, holder: Holder, force: bool) -> bool:
        seen = self.read()
        if seen is not None and seen.version != version:
            return False
        return self._write_and_check(holder)

    def refresh(self, holder: Holder) -> bool:
        seen = self.read()
        if seen is None or seen.holder is None or seen.holder.token != holder.token:
            return False
        io.atomic_write_bytes(self.location, holder.to_bytes())
        return True

    def delete(self, holder: Holder) -> None:
        seen = self.read()
        if seen is not None and seen.holder is not None and seen.holder.token == holder.token:
            fs, path = io.resolve(self.location)
            fs.delete_file(path)


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
