"""A node-local cache of whole shard files, for shard folders in object storage (``s3://...``).

Reading a series straight from a bucket costs a ranged GET (20-60 ms to first byte on S3) per series, per
epoch, per loader worker. Instead, each shard file is downloaded whole once per node into a local folder and
read from there with ``read_row_group``; :class:`ichmodel.dataset.SeriesDataset` does this by itself for a
URI shard folder, and :func:`ichmodel.dataset.make_loader` starts downloading the files a loader will need,
in background threads, while the first batches are read.

Prefetch (:meth:`ShardCache.prefetch`) takes the files in the order the batches need them, a bounded number at
once; a file another thread or process of the node is downloading already is skipped (a non-blocking try of
its lock) and waited for only at the end, so the loader workers of one node share one list instead of
queueing behind each other's downloads, and a reader opens each file as soon as its download is renamed into
place. A file larger than ``part_bytes`` is fetched as parallel ranged GETs (one S3 stream tops out near
100 MB/s). Each process opens its filesystem (S3 client) once per bucket and endpoint, not per file.

Guarantees:

* **Whole files only.** A download goes to a temporary name (``<name>.<pid>.<thread>.tmp``) and is renamed
  into place only after its size matches the folder listing's and it ends with Parquet's magic bytes; a
  download that is killed or fails leaves at most a ``.tmp`` file, which no reader opens and the next
  download of that file removes.
* **One download per node.** Every process on the node takes an exclusive ``flock`` on the file's sidecar
  ``<name>.lock`` before downloading; one that waited finds the finished file and reads it. Parts of one
  file are written by the lock holder's threads into its own temporary file.
* **Never stale.** A file's cache name is a digest of its location, its size and modification time from the
  listing, and its entry in ``manifest.json``; a shard rewritten in the bucket or listed differently by a new
  manifest gets a new name (the old copy ages out). pyarrow does not expose S3's ETag; an object rewritten
  in place gets a new LastModified time, which the key contains.
* **Bounded.** After each download, the least recently used files (by modification time, refreshed on every
  open) are deleted until the folder holds at most ``max_bytes``. A reader that has a file open keeps reading
  it after deletion (POSIX); the next open downloads it again.

Library choice (``docs/benchmarks.md``, "Shards from object storage"): fsspec's ``simplecache``/``filecache``
through ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))`` were measured with ``bench/remote_loader.py``;
neither takes a cross-process lock, has a size bound, or keys on the manifest, which this module needs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from ichmodel import io

if TYPE_CHECKING:
    from ichmodel.config import DataConfig

logger = logging.getLogger(__name__)

#: Name of the cache folder under the node's temporary directory when none is configured.
DEFAULT_FOLDER_NAME = "ichmodel-shard-cache"
#: Size bound when none is configured (``data.cache_max_gib``).
DEFAULT_MAX_BYTES = 100 * 2**30
#: Downloads at once of one :meth:`ShardCache.prefetch` (a loader splits them among its workers).
PREFETCH_THREADS = 4
#: A file larger than this is downloaded as parallel ranged GETs of this size; a smaller one is one GET.
PART_BYTES = 16 * 2**20
#: Ranged GETs at once within one file's download.
PART_THREADS = 4
#: Bytes per read of a one-part download (one GET each).
READ_CHUNK = 64 * 2**20
PARQUET_MAGIC = b"PAR1"
SUFFIX = ".parquet"


@dataclass(frozen=True)
class RemoteFile:
    """One shard file in object storage as the folder listing saw it.

    ``location``: its URI (with the folder's ``?query``); ``size``: bytes; ``key``: its cache name's digest
    (see :func:`list_remote_shards`).
    """

    name: str
    location: str
    size: int
    key: str


def default_cache_dir() -> Path:
    """``<the node's temporary directory>/ichmodel-shard-cache``."""
    return Path(tempfile.gettempdir()) / DEFAULT_FOLDER_NAME


def list_remote_shards(shard_dir: str, manifest: dict) -> dict[str, RemoteFile]:
    """``{file name: RemoteFile}`` for every shard of ``manifest``, from one listing of ``shard_dir``.

    The key digests the location, the listed size and modification time and the file's manifest entry.

    Raises:
        FileNotFoundError: naming the folder and the first shard the manifest lists that is not there.
    """
    fs, root = io.resolve(shard_dir)
    root = root.rstrip("/")
    listed = {
        info.path[len(root) + 1 :]: info
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        if info.type == pafs.FileType.File
    }
    out: dict[str, RemoteFile] = {}
    for shard in manifest["shards"]:
        name = shard["file"]
        info = listed.get(name)
        if info is None:
            raise FileNotFoundError(f"{shard_dir}: the manifest lists {name}, which is not in the folder")
        location = io.join(shard_dir, name)
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        identity = json.dumps([location, info.size, mtime, shard], sort_keys=True)
        key = hashlib.sha256(identity.encode()).hexdigest()[:32]
        out[name] = RemoteFile(name, location, int(info.size), key)
    return out


class ShardCache:
    """Whole shard files from object storage, kept in a local folder shared by every process of a node.

    Picklable (a folder and a bound): loader workers each use their own copy, and the locks are the files'.

    Args:
        folder: the cache folder (created on first use); ``None`` or ``""``: :func:`default_cache_dir`.
            On a cluster, a local NVMe or the instance's EBS volume.
        max_bytes: the size bound; least recently used files are deleted above it.
        threads: downloads at once of :meth:`prefetch` (:func:`ichmodel.dataset.make_loader` splits them
            among its worker processes).
        part_bytes: files larger than this are downloaded as parallel ranged GETs of this size.

    Raises:
        ValueError: when ``max_bytes``, ``threads`` or ``part_bytes`` is < 1.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        threads: int = PREFETCH_THREADS,
        part_bytes: int = PART_BYTES,
    ) -> None:
        for name, value in (("max_bytes", max_bytes), ("threads", threads), ("part_bytes", part_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1. Got {value}")
        self.folder = Path(folder) if folder else default_cache_dir()
        self.max_bytes = int(max_bytes)
        self.threads = threads
        self.part_bytes = int(part_bytes)

    @classmethod
    def from_config(cls, data: DataConfig) -> ShardCache:
        """The cache a :class:`ichmodel.config.DataConfig` names (``cache_dir``, ``cache_max_gib``)."""
        return cls(data.cache_dir or None, max(1, int(data.cache_max_gib * 2**30)))

    def __repr__(self) -> str:
        return f"ShardCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def path(self, remote: RemoteFile) -> Path:
        """Where ``remote`` is (or will be) in the cache: ``<folder>/<key>-<name>``."""
        return self.folder / f"{remote.key}-{Path(remote.name).name}"

    def fetch(self, remote: RemoteFile) -> Path:
        """The local copy of ``remote``, downloaded first unless a finished copy is there.

        Blocks while another process or thread of the node downloads the same file, then uses its copy.

        Raises:
            OSError: naming the location when the download fails (nothing is left under the final name).
            ValueError: when the downloaded bytes do not match the listing (size or Parquet footer).
        """
        path = self._fetch(remote, wait=True)
        assert path is not None  # a blocking fetch always ends with the file or raises
        return path

    def try_fetch(self, remote: RemoteFile) -> Path | None:
        """Like :meth:`fetch`, but None at once when another thread or process holds the file's lock (it is
        downloading it)."""
        return self._fetch(remote, wait=False)

    def _fetch(self, remote: RemoteFile, wait: bool) -> Path | None:
        path = self.path(remote)
        if _is_complete(path, remote.size):
            _touch(path)
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock"), wait) as got:
            if not got:
                return None
            if _is_complete(path, remote.size):  # another process finished it while this one waited
                _touch(path)
                return path
            _download(remote, path, self.part_bytes)
        self.evict(keep=path)
        return path

    def prefetch(self, remotes: Sequence[RemoteFile], threads: int | None = None) -> Prefetch:
        """Start downloading ``remotes`` (in this order) in ``threads`` (default :attr:`threads`) daemon
        threads; returns at once.

        Files already cached cost one ``stat``; a file another thread or process is downloading is skipped
        and waited for after the rest. A failed download is logged; a reader's own :meth:`fetch` then tries
        again and raises.
        """
        return Prefetch(self, remotes, threads or self.threads)

    def usage(self) -> int:
        """Bytes of finished files in the cache folder."""
        return sum(size for _, size, _ in self._entries())

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used files until the folder holds at most :attr:`max_bytes` (``keep`` stays);
        returns the bytes freed. Also removes ``.tmp`` files left by killed downloads over an hour old."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        freed = 0
        for path, size, _ in sorted(entries, key=lambda e: e[2]):  # oldest use first
            if total - freed <= self.max_bytes:
                break
            if path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue  # another process evicted it
            freed += size
            logger.debug("shard cache %s: evicted %s (%d bytes)", self.folder, path.name, size)
        if freed:
            logger.info("shard cache %s: evicted %.1f MiB to stay under %.1f GiB", self.folder,
                        freed / 2**20, self.max_bytes / 2**30)  # fmt: skip
        return freed

    def _entries(self) -> list[tuple[Path, int, float]]:
        out = []
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        now = time.time()
        for name in names:
            path = self.folder / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if name.endswith(SUFFIX):
                out.append((path, stat.st_size, stat.st_mtime))
            elif name.endswith(".tmp") and now - stat.st_mtime > 3600:
                path.unlink(missing_ok=True)  # a download killed long ago (a live one writes it now)
        return out


class Prefetch:
    """Background downloads of :meth:`ShardCache.prefetch`: daemon threads that take files from a queue in
    order. A file whose lock is held elsewhere (being downloaded) is put aside; once the queue is empty each
    thread waits for the files put aside, so :meth:`wait` still means "all of them are in the cache"."""

    def __init__(self, cache: ShardCache, remotes: Sequence[RemoteFile], threads: int) -> None:
        self.cache = cache
        self.errors: list[BaseException] = []
        self._queue: queue.SimpleQueue[RemoteFile] = queue.SimpleQueue()
        self._busy: queue.SimpleQueue[RemoteFile] = queue.SimpleQueue()  # downloading elsewhere
        for remote in remotes:
            self._queue.put(remote)
        count = min(threads, len(remotes))
        self._threads = [
            threading.Thread(target=self._run, name=f"shard-prefetch-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        for source, fetch in ((self._queue, self.cache.try_fetch), (self._busy, self.cache.fetch)):
            while True:
                try:
                    remote = source.get_nowait()
                except queue.Empty:
                    break
                try:
                    if fetch(remote) is None:
                        self._busy.put(remote)
                except Exception as exc:  # the reader's own fetch raises it again
                    logger.warning("prefetch of %s failed: %s", remote.location, exc)
                    self.errors.append(exc)

    def join(self) -> None:
        """Block until the threads are done (errors stay in :attr:`errors`)."""
        for thread in self._threads:
            thread.join()

    def wait(self) -> None:
        """Block until every file is downloaded.

        Raises:
            the first download error.
        """
        self.join()
        if self.errors:
            raise self.errors[0]


def _is_complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _touch(path: Path) -> None:
    """Mark a use (eviction deletes the oldest modification times first)."""
    with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: the caller's open fails, then fetches
        os.utime(path)


@contextmanager
def _locked(lock_path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``lock_path`` (never deleted: a deleted lock file would let two holders in).
    The kernel releases it when the holder dies, so a killed download never blocks the node.

    Yields True once held; with ``wait=False``, False at once when another descriptor holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # held elsewhere (only without wait)
                yield False
                return
            except OSError as exc:  # EINTR from a signal handler (DataLoader workers install some)
                if exc.errno != errno.EINTR:
                    raise
        yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


_filesystems: dict[str, pafs.FileSystem] = {}
_filesystems_lock = threading.Lock()


def _forget_filesystems() -> None:
    """In a forked child (a loader worker): its own S3 clients, and a lock no parent thread can hold."""
    global _filesystems_lock
    _filesystems.clear()
    _filesystems_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_filesystems)


def _open_source(location: str) -> tuple[pafs.FileSystem, str]:
    """``io.resolve(location)`` with one filesystem per process and scheme + bucket + query: building an S3
    client costs 10-200 ms (more with several threads at once), and Arrow's filesystems are safe to share
    between threads."""
    parts = urlsplit(location)
    key = f"{parts.scheme}://{parts.netloc}?{parts.query}"
    with _filesystems_lock:
        fs = _filesystems.get(key)
    if fs is not None:
        return fs, unquote(f"{parts.netloc}{parts.path}")  # what FileSystem.from_uri gives for a bucket
    fs, path = io.resolve(location)
    with _filesystems_lock:
        _filesystems[key] = fs
    return fs, path


def _download(remote: RemoteFile, path: Path, part_bytes: int = PART_BYTES) -> None:
    """Copy ``remote`` to ``path`` through a temporary file; the caller holds the file's lock.

    One GET (the file opens with one HEAD) when it is at most ``part_bytes``, else ranged GETs of
    ``part_bytes``, :data:`PART_THREADS` at once, each written at its offset."""
    for stale in path.parent.glob(f"{path.name}.*.tmp"):  # killed earlier: nobody else can write it now
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    start = time.perf_counter()
    try:
        fs, source_path = _open_source(remote.location)
        with fs.open_input_file(source_path) as source, open(tmp, "wb") as target:
            if remote.size <= part_bytes:
                while chunk := source.read(READ_CHUNK):  # one ranged GET per chunk
                    target.write(chunk)
            else:
                _copy_parts(source, target.fileno(), remote.size, part_bytes)
        got = tmp.stat().st_size
        if got != remote.size:
            raise ValueError(f"{remote.location}: downloaded {got} bytes, the listing says {remote.size}")
        with open(tmp, "rb") as f:
            f.seek(-len(PARQUET_MAGIC), os.SEEK_END)
            if f.read() != PARQUET_MAGIC:
                raise ValueError(f"{remote.location}: the download does not end with a Parquet footer")
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(f"Download of {remote.location} to {path.parent} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    logger.debug(
        "shard cache: downloaded %s (%.1f MiB) in %.2f s", remote.location, remote.size / 2**20, seconds
    )


def _copy_parts(source: pafs.NativeFile, target_fd: int, size: int, part_bytes: int) -> None:
    """Ranged reads of ``part_bytes`` from ``source`` (``read_at`` is safe from several threads), written
    at their offsets in ``target_fd``, :data:`PART_THREADS` at once."""

    def copy(offset: int) -> None:
        want = min(part_bytes, size - offset)
        view = memoryview(source.read_at(want, offset))
        if len(view) != want:  # a short part would leave a hole that the size check cannot see
            raise OSError(f"got {len(view)} bytes at offset {offset}, asked for {want}")
        while view:
            written = os.pwrite(target_fd, view, offset)
            view, offset = view[written:], offset + written

    offsets = range(0, size, part_bytes)
    with ThreadPoolExecutor(min(PART_THREADS, len(offsets)), thread_name_prefix="shard-part") as pool:
        for _ in pool.map(copy, offsets):  # re-raises the first failed part
            pass
