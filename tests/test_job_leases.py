"""Every writing job's ``main`` takes the lease on its folder first (``ray_jobs/leases.py``): a folder held by
another process ends the job at once with one line naming the holder (the traceback only with ``-v``);
nested in one process, the held lease is reused rather than refused."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import time

import pytest

from ichmodel.lease import LEASE_NAME, LeaseHeld, acquire
from ichmodel.storage_errors import StorageError
from ray_jobs.leases import EXIT_LEASE, hold_folder
from tests.conftest import REPO_ROOT

_HOLDER = textwrap.dedent("""
    import sys, time
    from ichmodel.lease import acquire
    acquire(sys.argv[1], {"job": "holder.py"})
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def held(tmp_path):
    """``(folder, pid)`` of a folder whose lease another live process holds."""
    folder = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    "job, args",
    [
        ("preprocess", ["--format", "dlcv", "--input", "{tmp}/none"]),
        ("ensemble", ["--experiment", "{tmp}/none"]),
        ("folds", ["--experiment", "{tmp}/none"]),
        ("train", None),
        ("tune", None),
    ],
)
def test_a_job_on_a_held_folder_ends_at_once_naming_the_holder(held, tmp_path, job, args):
    folder, pid = held
    if args is None:  # train and tune write STORAGE/NAME
        where = ["--storage", str(folder.parent), "--name", folder.name]
    else:
        where = [*(a.format(tmp=tmp_path) for a in args), "--out", str(folder)]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, f"ray_jobs/{job}.py", *where], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == EXIT_LEASE, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "is in use by" in line]
    assert (
        len(lines) == 1
        and f"{folder} is in use by holder.py on host" in lines[0]
        and f"pid {pid}," in lines[0]
    )
    assert "Traceback" not in proc.stderr and not (folder / "job_args.json").exists()  # nothing written
    assert time.monotonic() - started < 60  # before any data is read or Ray started (a busy machine: imports)
    verbose = subprocess.run([sys.executable, f"ray_jobs/{job}.py", *where, "-v"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert verbose.returncode == EXIT_LEASE and "Traceback" in verbose.stderr


def test_nested_holds_in_one_process_reuse_the_lease_and_release_it_once(tmp_path):
    folder = tmp_path / "run"
    with hold_folder(str(folder), "outer.py") as outer:
        with hold_folder(str(folder) + "/", "inner.py") as inner:
            assert inner is outer
        assert (folder / LEASE_NAME).exists()  # the inner block did not release the outer's lease
        with pytest.raises(LeaseHeld, match="in use by outer.py"):
            acquire(folder)  # another taker (this process, not through hold_folder) is refused
    assert not (folder / LEASE_NAME).exists()
    with hold_folder(str(folder), "again.py"):
        pass


def test_a_storage_failure_inside_a_held_folder_comes_out_as_one_line_naming_it(tmp_path):
    folder = tmp_path / "run"
    full = f"Out of space writing {folder} \\(No space left on device\\)"
    with pytest.raises(StorageError, match=full), hold_folder(str(folder), "job.py"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(FileNotFoundError), hold_folder(str(folder), "job.py"):  # not a storage failure: as is
        raise FileNotFoundError("no such input")
    assert not (folder / LEASE_NAME).exists()
