"""Where a lease lives, per storage: the lease file's content (:class:`Holder`) and the three stores that
write it so that two jobs cannot both hold it (:mod:`ichmodel.lease` is the API and says which store is used).

Each store has the same methods: ``try_create(holder)`` (False when a lease is there), ``read()`` (a
:class:`_Seen`, None when there is none), ``try_replace(version, holder, force)`` (compare-and-swap against
what ``read`` saw), ``refresh(holder)`` (False once it is no longer this holder's) and ``delete(holder)``.

- :class:`_LocalLease`, local disk (also NFS and other shared POSIX folders): the file is written complete under
  a temporary name and hard-linked to the lease name (``link`` fails when the name exists: the NFS-safe form of
  ``O_CREAT|O_EXCL``), and the holder keeps an ``fcntl.flock`` on it for its whole life. A lease whose lock is
  held is never stale; a takeover takes that lock first and checks the file is still the one it judged stale,
  so two takers cannot both win. The heartbeat rewrites the file in place (same inode, same lock).
- :class:`_S3Lease`, ``s3://``: S3's conditional writes through botocore (see :mod:`ichmodel.lease`).
- :class:`_ReadBackLease`, other URIs: write, wait :data:`SETTLE_S`, read back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ichmodel import io

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
SETTLE_S = 1.0  # write-then-read-back leases: wait this long before reading back
PAD = 1024  # local lease files are padded to this size, so an in-place heartbeat never shrinks them


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
