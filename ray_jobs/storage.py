"""Where the jobs read and write: a local path or a storage URI (``s3://``, ``gs://``, through ``pyarrow.fs``)."""

from __future__ import annotations

from pathlib import Path

from ichmodel.io import atomic_write_bytes


def is_uri(path: str | Path) -> bool:
    """True for a storage URI (``s3://bucket/x``, ``gs://``, ``file:///x``), False for a plain path."""
    return "://" in str(path)


def absolute(location: str | Path) -> str:
    """A storage URI unchanged, a local path made absolute (Ray's workers do not share the driver's cwd)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def write_bytes(target: str | Path, data: bytes) -> str:
    """Write ``data`` to a local path (atomically) or a storage URI; returns where it went."""
    if not is_uri(target):
        atomic_write_bytes(target, data)
        return str(target)
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(str(target))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
    return str(target)


def fetch(uri: str, local: Path) -> bool:
    """Copy one file from a storage URI to ``local``; False when it does not exist there."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(local.resolve()), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
    return True
