"""``ichmodel.lease``: one writer per folder, on local disk (real processes racing) and on moto's S3 server."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ichmodel.lease import LEASE_NAME, Holder, LeaseHeld, LeaseLost, acquire, lease_location
from ichmodel.lease_stores import _ReadBackLease
from tests.conftest import REPO_ROOT
from tests.datagen import moto_bucket

BUCKET = "ich-lease"

#: A process that races for the lease ``rounds`` times (the imports, seconds on a busy machine, paid once):
#: each round waits for its go file, tries once, reports a JSON line, holds the lease ``hold`` s if it won,
#: then says DONE.
RACER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from ichmodel.lease import LeaseHeld, acquire
    location, name, go, rounds, hold = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    print("READY", flush=True)
    for i in range(rounds):
        while not Path(f"{go}{i}").exists():
            time.sleep(0.005)
        started = time.monotonic()
        try:
            lease = acquire(location, {"job": f"{name}{i}"}, heartbeat_s=0.5, stale_after=30)
        except LeaseHeld as exc:
            print(json.dumps({"held": str(exc), "seconds": time.monotonic() - started}), flush=True)
        else:
            print(json.dumps({"won": f"{name}{i}", "seconds": time.monotonic() - started}), flush=True)
            time.sleep(hold)
            lease.release()
        print("DONE", flush=True)  # the next round starts when both racers are done with this one
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_racers(
    location: str, names: list[str], go: Path, env: dict, rounds: int = 1, hold: float = 1.0
) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, location, name, str(go), str(rounds), str(hold)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )  # fmt: skip
        for name in names
    ]
    for proc in procs:  # every racer has imported everything before the start
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    return procs


def _race(location: str, tmp_path: Path, env: dict, rounds: int = 3) -> None:
    """Two processes race ``rounds`` times: exactly one wins each time, the other is refused in seconds,
    naming the winner."""
    procs = _start_racers(location, ["racer-a", "racer-b"], tmp_path / "go", env, rounds)
    pids = {f"racer-{c}": p.pid for c, p in zip("ab", procs, strict=True)}
    try:
        for i in range(rounds):
            (tmp_path / f"go{i}").touch()
            results = [json.loads(proc.stdout.readline()) for proc in procs]
            assert [proc.stdout.readline().strip() for proc in procs] == ["DONE", "DONE"]
            winners = [r for r in results if "won" in r]
            losers = [r for r in results if "held" in r]
            assert len(winners) == 1 and len(losers) == 1, results
            winner, message = winners[0]["won"], losers[0]["held"]
            assert losers[0]["seconds"] < 5, losers  # refused at once, not after the holder's end
            assert f"in use by {winner} on host {socket.gethostname()}, pid {pids[winner[:-1]]}" in message
            assert "--force" in message and "last heartbeat" in message
        for proc in procs:
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        for proc in procs:
            proc.kill()


def test_second_acquirer_is_refused_naming_the_holder_and_release_frees_it(tmp_path):
    with acquire(tmp_path / "run", {"job": "train.py --name run"}) as lease:
        held = json.loads((tmp_path / "run" / LEASE_NAME).read_text())
        assert held["pid"] == os.getpid() and held["info"] == {"job": "train.py --name run"}
        with pytest.raises(
            LeaseHeld, match=rf"in use by train.py --name run on host .*, pid {os.getpid()}, since"
        ):
            acquire(tmp_path / "run", {"job": "second"})
        lease.check()  # still ours
    assert not (tmp_path / "run" / LEASE_NAME).exists()
    acquire(tmp_path / "run").release()  # free again


@pytest.mark.slow
def test_two_processes_racing_for_a_local_lease_one_wins(tmp_path):
    _race(str(tmp_path / "run"), tmp_path, _env())


@pytest.mark.slow
def test_a_killed_holders_lease_is_taken_over_at_once(tmp_path, caplog):
    (tmp_path / "go0").touch()
    (holder,) = _start_racers(str(tmp_path / "run"), ["doomed"], tmp_path / "go", _env(), hold=600)
    assert json.loads(holder.stdout.readline())["won"] == "doomed0"
    with pytest.raises(LeaseHeld, match="doomed0"):
        acquire(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)  # a lost node: no release, no cleanup
    holder.wait(timeout=30)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ichmodel.lease"):
        lease = acquire(tmp_path / "run", {"job": "next"})
    assert time.monotonic() - started < 2  # the dead pid on this host: no waiting for the stale timeout
    assert f"pid {holder.pid} on this host) is dead" in caplog.text and "doomed" in caplog.text
    lease.release()


def _foreign_lease(path: Path, age: float) -> None:
    """A lease written by a job on another host whose last heartbeat was ``age`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    beat = time.time() - age
    path.write_bytes(Holder("t0", "other-node", 4242, beat - 100, beat, {"job": "tune.py"}).to_bytes())
    os.utime(path, (beat, beat))


def test_a_lease_from_another_host_is_stale_only_after_its_timeout_or_with_force(tmp_path):
    path = tmp_path / "run" / LEASE_NAME
    _foreign_lease(path, age=5)
    with pytest.raises(LeaseHeld, match=r"tune.py on host other-node, pid 4242, .*last heartbeat [56] s ago"):
        acquire(tmp_path / "run", stale_after=60)
    with acquire(tmp_path / "run", force=True):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    _foreign_lease(path, age=120)
    with acquire(tmp_path / "run", stale_after=60):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_forced_takeover_makes_the_old_holder_lose_and_keep_its_hands_off(tmp_path):
    old = acquire(tmp_path / "run", {"job": "hung"}, heartbeat_s=0.05)
    new = acquire(tmp_path / "run", {"job": "forced"}, force=True, heartbeat_s=0.05)
    deadline = time.monotonic() + 5
    while not old.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(LeaseLost, match=f"Lost the lease on {tmp_path / 'run'}"):
        old.check()
    old.release()  # must not remove the new holder's lease
    assert json.loads((tmp_path / "run" / LEASE_NAME).read_text())["info"] == {"job": "forced"}
    new.check()
    new.release()


def test_the_read_back_fallback_refuses_a_second_writer(tmp_path, monkeypatch):
    monkeypatch.setattr("ichmodel.lease.SETTLE_S", 0.01)
    first, second = _ReadBackLease(str(tmp_path / "l.json")), _ReadBackLease(str(tmp_path / "l.json"))
    a = Holder("a", "h", 1, 0.0, time.time())
    assert first.try_create(a) and not second.try_create(Holder("b", "h", 2, 0.0, time.time()))
    seen = second.read()
    assert seen.holder.token == "a" and seen.age < 5
    assert not second.try_replace("other-version", Holder("b", "h", 2, 0.0, time.time()), False)
    first.delete(a)
    assert second.read() is None


# ---------------------------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3():
    """``(environment with a dummy key and the endpoint, s3://bucket)`` of a moto S3 server for this module."""
    with moto_bucket(BUCKET) as env:
        yield env, f"s3://{BUCKET}"


@pytest.mark.slow
def test_two_processes_racing_for_an_s3_lease_one_wins(s3, tmp_path):
    env, bucket = s3
    _race(f"{bucket}/experiment", tmp_path, {**_env(), **env})


@pytest.mark.slow
def test_s3_lease_refuses_takes_over_a_dead_holder_and_releases_only_its_own(s3, monkeypatch, caplog):
    env, bucket = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    port = env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    location = (
        f"{bucket}/run-q?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"  # pyarrow's form
    )
    first = acquire(location, {"job": "first"}, heartbeat_s=0.05)
    time.sleep(0.3)  # a few heartbeats: conditional PUTs with If-Match
    first.check()
    with pytest.raises(LeaseHeld, match=f"in use by first on host {socket.gethostname()}, pid {os.getpid()}"):
        acquire(f"{bucket}/run-q")  # the same object through AWS_ENDPOINT_URL
    forced = acquire(f"{bucket}/run-q", {"job": "forced"}, force=True, heartbeat_s=0.05)
    deadline = time.monotonic() + 5
    while not first.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.lost  # its If-Match heartbeat was refused
    first.release()  # a conditional delete with its old ETag: refused, the new lease stays
    with pytest.raises(LeaseHeld, match="forced"):
        acquire(lease_location(f"{bucket}/run-q").rsplit("/", 1)[0])
    forced._stop.set()  # the holder "dies": no release, its pid below is not alive
    forced._thread.join()
    from ichmodel.lease_stores import _S3Lease

    backend = _S3Lease(lease_location(f"{bucket}/run-q"))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    holder = Holder("dead", socket.gethostname(), int(dead.stdout), time.time(), time.time(), {"job": "gone"})
    assert backend.try_replace(backend.read().version, holder, False)
    with caplog.at_level(logging.WARNING, logger="ichmodel.lease"):
        lease = acquire(f"{bucket}/run-q", {"job": "next"})
    assert "gone" in caplog.text and "is dead" in caplog.text
    lease.release()
    assert backend.read() is None
