"""Files on a local disk or in object storage, and writes that never leave a truncated file.

A *location* is a local path or a storage URI that :func:`pyarrow.fs.FileSystem.from_uri` understands:
``s3://bucket/key``, ``gs://bucket/key``, ``file:///abs/path``, optionally with a query
(``s3://bucket/key?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1``) that configures the
filesystem. :func:`join` keeps such a query at the end, so ``join(uri, "manifest.json")`` still names the same
server. Credentials and endpoints may also come from the standard ``AWS_*`` environment (pyarrow reads it).

Local writes go to a temporary name beside the target and are renamed into place. An object store has no
rename, but an object appears only when its upload completes, so writes there are whole too: every write
here uploads a finished byte string or a finished local file, never a stream a failure could cut short.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str | Path) -> bool:
    """True for a storage URI (``s3://bucket/x``, ``gs://``, ``file:///x``), False for a plain path."""
    return "://" in str(location)


def _split_query(location: str) -> tuple[str, str]:
    base, sep, query = location.partition("?")
    return base, sep + query


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` for a path or a URI (a URI's ``?query`` stays at the end)."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, query = _split_query(str(location))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + query


def parent(location: str | Path) -> str:
    """The folder holding ``location`` (a URI's ``?query`` is kept)."""
    if not is_uri(location):
        return str(Path(location).parent)
    base, query = _split_query(str(location))
    return base.rstrip("/").rsplit("/", 1)[0] + query


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path within it)`` of a location; a local path is made absolute.

    Raises:
        ValueError: naming the location when pyarrow cannot build a filesystem for it.
    """
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).absolute())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as exc:  # unknown scheme, or a pyarrow built without that filesystem
        raise ValueError(f"Cannot open storage location {location}: {exc}") from exc


def is_local(location: str | Path) -> bool:
    """True for a plain path or a ``file://`` URI (the local disk of the node that looks at it)."""
    return not is_uri(location) or str(location).lower().startswith("file://")  # no network look-up


def local_path(location: str | Path) -> Path:
    """A local location (path or ``file://`` URI) as an absolute :class:`Path`.

    Raises:
        ValueError: for a location in object storage.
    """
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise ValueError(f"{location} is not on the local disk")
    return Path(path)


def file_type(location: str | Path) -> pafs.FileType:
    fs, path = resolve(location)
    return fs.get_file_info(path).type


def is_file(location: str | Path) -> bool:
    return file_type(location) == pafs.FileType.File


def exists(location: str | Path) -> bool:
    """True when a file or folder is there (an object-store "folder" exists once it holds a file)."""
    return file_type(location) != pafs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes:
    """The whole file.

    Raises:
        FileNotFoundError: naming the location when there is no file.
    """
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"No file at {location}")
    with fs.open_input_file(path) as f:  # one ranged read of the known size (a stream reads in small parts)
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def open_input_file(location: str | Path):
    """A seekable pyarrow file (e.g. for ``pyarrow.parquet.ParquetFile``); close it when done."""
    fs, path = resolve(location)
    return fs.open_input_file(path)


def list_files(location: str | Path) -> list[str]:
    """Paths of every file under a folder, relative to it (``/``-separated, sorted); [] when it is absent."""
    fs, root = resolve(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    root = root.rstrip("/")
    return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    The temporary name starts with a dot and carries the process id, so concurrent writers (Ray tasks on
    one node) never share one and listings that skip dot files never see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(location: str | Path, write_fn: Callable[[Path], object]) -> str | Path:
    """``write_fn(tmp)`` writes the whole file to a local temporary path; then it becomes ``location``.

    Locally the file is renamed into place (returns a :class:`Path`); in object storage the finished file
    is uploaded (returns the URI).
    """
    if is_local(location):
        target = local_path(location) if is_uri(location) else Path(location)
        with atomic_path(target) as tmp:
            write_fn(tmp)
        return Path(location) if not is_uri(location) else location
    with tempfile.TemporaryDirectory(prefix="ich-upload-") as folder:
        tmp = Path(folder) / "file"
        write_fn(tmp)
        upload(tmp, location)
    return str(location)


def upload(local: str | Path, location: str | Path) -> None:
    """Copy one finished local file to ``location`` (its folders are created)."""
    fs, path = resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(Path(local).absolute()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)  # fmt: skip


def atomic_write_text(location: str | Path, text: str) -> str | Path:
    return atomic_write(location, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(location: str | Path, data: bytes) -> str | Path:
    return atomic_write(location, lambda tmp: tmp.write_bytes(data))


DOWNLOAD_CHUNK = 64 * 2**20


def download(location: str | Path, local: str | Path) -> bool:
    """Copy one file from ``location`` to the local path ``local``; False when there is no file there."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    with atomic_path(local) as tmp, fs.open_input_file(path) as source:
        _copy_stream(source, tmp)
    return True


def copy_from(fs: pafs.FileSystem, path: str, target: str | Path) -> None:
    """Copy the file ``path`` of the filesystem ``fs`` (e.g. a Ray checkpoint's) whole to ``target``.

    Within one object store the server copies it (nothing passes through this machine; an object appears
    only when the copy completes); otherwise the bytes are read with large ranged reads and written whole.
    """
    target_fs, target_path = resolve(target)
    if not is_local(target) and target_fs.equals(fs):
        target_fs.copy_file(path, target_path)
        return
    with fs.open_input_file(path) as source:
        atomic_write(target, lambda tmp: _copy_stream(source, tmp))


def _copy_stream(source, local: Path) -> None:
    with open(local, "wb") as target:
        while chunk := source.read(DOWNLOAD_CHUNK):  # large ranged reads: copy_files reads 1 MiB at a time
            target.write(chunk)


def copy_folder(source: str | Path, target: str | Path) -> list[str]:
    """Copy every file under ``source`` to the same relative path under ``target`` (either may be a URI).

    Each file is written whole (:func:`atomic_write`); returns the relative paths copied.

    Raises:
        FileNotFoundError: when ``source`` holds no file.
    """
    names = list_files(source)
    if not names:
        raise FileNotFoundError(f"No files under {source}")
    for name in names:
        if is_local(source):
            src = local_path(source) / name
            atomic_write(join(target, name), lambda tmp, src=src: shutil.copyfile(src, tmp))
        else:
            atomic_write_bytes(join(target, name), read_bytes(join(source, name)))
    return names
