"""``ichmodel.storage_errors``: real storage failures (a full tmpfs, a read-only mount, an immutable folder,
moto's S3 without the bucket or with refused credentials) become one line naming the location and the cause,
and a checkpoint save that fails leaves the previous checkpoint readable.

The local failures need root with ``mount`` (tmpfs, read-only bind) and ``chattr``; the tests are skipped,
saying so, where the machine does not allow them. As root, ``chmod`` stops nothing, hence the mounts.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ichmodel.checkpoint import save_checkpoint
from ichmodel.checkpoint_recovery import load_verified_checkpoint, verify_checkpoint
from ichmodel.lease import acquire
from ichmodel.storage_errors import StorageError, classify, storage_error


def _run(*args: str) -> bool:
    return subprocess.run(list(args), capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted at ``tmp_path/disk``."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield disk
    finally:
        _run("umount", str(disk))


def _ckpt(megabytes: float, value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((int(megabytes * 2**18),), value)}, "global_epoch": int(value)}


def _assert_one_line(error: BaseException, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message and all(p in message for p in parts), message


def test_a_full_disk_names_the_file_and_the_space_and_keeps_the_previous_checkpoint(small_disk):
    path = small_disk / "run" / "checkpoint.pt"
    save_checkpoint(_ckpt(0.5), path)
    with pytest.raises(StorageError) as raised:
        save_checkpoint(_ckpt(4, value=2.0), path)
    _assert_one_line(raised.value, f"Out of space writing {path}", "No space left on device", "about 4 MB needed",
                     "free space there")  # fmt: skip
    chain, error = [], raised.value.__cause__  # the original (torch's RuntimeError over the OSError) for -v
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert raised.value.kind == "no_space" and any(getattr(e, "errno", None) == errno.ENOSPC for e in chain)
    assert verify_checkpoint(path) == "size and sha256"  # the previous file and its record, untouched
    assert load_verified_checkpoint(path)["global_epoch"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "checkpoint.pt",
        "checkpoint.pt.json",
    ]  # no temp left


def test_a_read_only_mount_and_an_immutable_folder_are_named(tmp_path):
    source, mounted = tmp_path / "source", tmp_path / "ro"
    source.mkdir()
    mounted.mkdir()
    save_checkpoint(_ckpt(0.1), source / "checkpoint.pt")
    if not (
        _run("mount", "--bind", str(source), str(mounted))
        and _run("mount", "-o", "remount,bind,ro", str(mounted))
    ):
        _run("umount", str(mounted))
        pytest.skip("cannot make a read-only bind mount here (needs root with CAP_SYS_ADMIN)")
    try:
        with pytest.raises(StorageError) as raised:
            save_checkpoint(_ckpt(0.1, value=2.0), mounted / "checkpoint.pt")
        _assert_one_line(raised.value, f"Read-only storage writing {mounted / 'checkpoint.pt'}")
        assert load_verified_checkpoint(mounted / "checkpoint.pt")["global_epoch"] == 1
        with pytest.raises(StorageError, match=f"Read-only storage taking the lease on {mounted}"):
            acquire(mounted)
    finally:
        _run("umount", str(mounted))

    if shutil.which("chattr") is None or not _run("chattr", "+i", str(source)):
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(StorageError) as raised:
            save_checkpoint(_ckpt(0.1, value=3.0), source / "checkpoint.pt")
        _assert_one_line(
            raised.value, f"Permission denied writing {source / 'checkpoint.pt'}", "write access"
        )
        assert load_verified_checkpoint(source / "checkpoint.pt")["global_epoch"] == 1
    finally:
        _run("chattr", "-i", str(source))


def test_classify_follows_wrapped_errors_and_pyarrow_text():
    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    wrapped.__context__ = full  # what torch.save raises while an OSError is being handled
    assert classify(wrapped) == ("no_space", "No space left on device")
    pyarrow_text = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert classify(pyarrow_text)[0] == "no_space"
    assert classify(ValueError("bad value")) is None and storage_error(KeyError("x"), "/a") is None


@pytest.fixture
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_missing_bucket_and_refused_credentials_are_named(s3_server, monkeypatch):
    import moto.settings

    for key, value in {"AWS_ENDPOINT_URL": f"http://{s3_server}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    query = f"?endpoint_override={s3_server}&scheme=http&region=us-east-1"
    with pytest.raises(StorageError) as raised:
        save_checkpoint(_ckpt(0.1), f"s3://no-such-bucket/run/checkpoint.pt{query}")
    _assert_one_line(raised.value, "Bucket missing writing s3://no-such-bucket/run/checkpoint.pt", "NoSuchBucket",
                     "create the bucket")  # fmt: skip
    with pytest.raises(
        StorageError, match=r"Bucket missing taking the lease on s3://no-such-bucket/run/.*NoSuchBucket"
    ):
        acquire(f"s3://no-such-bucket/run{query}")

    monkeypatch.setattr(
        moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0
    )  # moto now checks every key: none known
    with pytest.raises(StorageError) as raised:  # pyarrow's first request is a HEAD: a bare 403
        save_checkpoint(_ckpt(0.1), f"s3://any-bucket/run/checkpoint.pt{query}")
    _assert_one_line(raised.value, "Access refused writing s3://any-bucket/run/checkpoint.pt (ACCESS_DENIED",
                     "unknown, expired", "AWS_ACCESS_KEY_ID")  # fmt: skip
    assert "?" not in str(raised.value)  # the URI's query is left out of the message
    with pytest.raises(StorageError, match=r"Credentials refused taking the lease on s3://any-bucket/run/.*"
                       r"\(InvalidAccessKeyId\): check the credentials"):  # fmt: skip
        acquire(f"s3://any-bucket/run{query}")


def test_storage_error_is_an_oserror_with_its_location_and_hides_uri_secrets():
    error = StorageError(Path("/x/y"), "no_space", "No space left on device", needed=3_000_000)
    assert isinstance(error, OSError) and error.location == "/x/y" and "about 3 MB needed" in str(error)
    error = StorageError("s3://KEY:SECRET@bucket/a?endpoint_override=h:1", "no_bucket", "NoSuchBucket")
    assert str(error).startswith(
        "Bucket missing writing s3://bucket/a (NoSuchBucket): "
    ) and "SECRET" not in str(error)
