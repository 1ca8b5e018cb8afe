"""A node-local cache of whole shard files, for shard folders in object storage (``s3://...``).

Reading a series straight from a bucket costs a ranged GET (20-60 ms to first byte on S3) per series, per
epoch, per loader worker. Instead, each shard file is downloaded whole once per node into a local folder and
read from there with ``read_row_group``; :class:`ichmodel.dataset.SeriesDataset` does this by itself for a
URI shard folder, and :func:`ichmodel.dataset.make_loader` starts downloading the files a loader will need,
in background threads, while the first batches are read.

Guarantees:

* **Whole files only.** A download goes to a temporary name (``<name>.<pid>.<thread>.tmp``) and is renamed
  into place only after its size matches the folder listing's and it ends with Parquet's magic bytes; a
  download that is killed or fails leaves at most a ``.tmp`` file, which no reader opens and the next
  download of that file removes.
* **One download per node.** Every process on the node takes an exclusive ``flock`` on the file's sidecar
  ``<name>.lock`` before downloading; one that waited finds the finished file and reads it.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from ichmodel import io

if TYPE_CHECKING:
    from ichmodel.config import DataConfig

logger = logging.getLogger(__name__)

#: Name of the cache folder under the node's temporary directory when none is configured.
DEFAULT_FOLDER_NAME = "ichmodel-shard-cache"
#: Size bound when none is configured (``data.cache_max_gib``).
DEFAULT_MAX_BYTES = 100 * 2**30
#: Background download threads per process (:meth:`ShardCache.prefetch`).
PREFETCH_THREADS = 8
#: Bytes per ranged read of a download (one GET each); a shard below this is one GET.
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
        threads: background download threads of :meth:`prefetch`.

    Raises:
        ValueError: when ``max_bytes`` or ``threads`` is < 1.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        threads: int = PREFETCH_THREADS,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1. Got {max_bytes}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1. Got {threads}")
        self.folder = Path(folder) if folder else default_cache_dir()
        self.max_bytes = int(max_bytes)
        self.threads = threads

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
        path = self.path(remote)
        if _is_complete(path, remote.size):
            _touch(path)
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock")):
            if _is_complete(path, remote.size):  # another process finished it while this one waited
                _touch(path)
                return path
            _download(remote, path)
        self.evict(keep=path)
        return path

    def prefetch(self, remotes: Sequence[RemoteFile]) -> Prefetch:
        """Start downloading ``remotes`` (in this order) in :attr:`threads` daemon threads; returns at once.

        Files already cached cost one ``stat``. A failed download is logged; a reader's own :meth:`fetch`
        then tries again and raises.
        """
        return Prefetch(self, remotes, self.threads)

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
    """Background downloads of :meth:`ShardCache.prefetch`: daemon threads that take files from a queue."""

    def __init__(self, cache: ShardCache, remotes: Sequence[RemoteFile], threads: int) -> None:
        self.cache = cache
        self.errors: list[BaseException] = []
        self._queue: queue.SimpleQueue[RemoteFile | None] = queue.SimpleQueue()
        for remote in remotes:
            self._queue.put(remote)
        count = min(threads, len(remotes))
        for _ in range(count):
            self._queue.put(None)  # one stop mark per thread
        self._threads = [
            threading.Thread(target=self._run, name=f"shard-prefetch-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while (remote := self._queue.get()) is not None:
            try:
                self.cache.fetch(remote)
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
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (never deleted: a deleted lock file would let two holders in).
    The kernel releases it when the holder dies, so a killed download never blocks the node."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
            except OSError as exc:  # EINTR from a signal handler (DataLoader workers install some)
                if exc.errno != errno.EINTR:
                    raise
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _download(remote: RemoteFile, path: Path) -> None:
    """Copy ``remote`` to ``path`` through a temporary file; the caller holds the file's lock."""
    for stale in path.parent.glob(f"{path.name}.*.tmp"):  # killed earlier: nobody else can write it now
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    start = time.perf_counter()
    try:
        fs, source_path = io.resolve(remote.location)
        with fs.open_input_file(source_path) as source, open(tmp, "wb") as target:
            while chunk := source.read(READ_CHUNK):  # one ranged GET per chunk
                target.write(chunk)
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
