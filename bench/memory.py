"""Peak memory and wall time of the demo pipeline's smallest search (``ray_jobs/tune.py --smoke-test``).

    python bench/memory.py [--interval 0.2] [--timeout 600]

Runs ``python ray_jobs/tune.py --smoke-test --storage <tmp> --name bench-mem`` as a subprocess (a local Ray
head of its own: ``RAY_ADDRESS`` removed, ``RAY_AUTH_MODE=disabled``, ``RAY_TMPDIR`` a fresh folder) and
samples ``/proc`` every ``--interval`` seconds. A process belongs to the run when it descends from the
driver (Ray's GCS, raylet and dashboard are started by it, and workers descend from the raylet), or when its
command line names the run's ``RAY_TMPDIR`` (a Ray process that was re-parented), or descends from one that
does. Printed:

* peak of the summed RSS (``VmRSS``) over those processes: what ``top`` users add up; it counts pages
  that processes share (libraries, Ray's object store in ``/dev/shm``) once per process, so it overstates;
* peak of the summed PSS (``/proc/PID/smaps_rollup``, shared pages split among their users): closer to the
  machine's real use; both are sampled at the same instants;
* the most processes seen at once, and the wall time of the run.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def read_processes() -> dict[int, tuple[int, str]]:
    """``{pid: (ppid, command line)}`` of every process readable in ``/proc``."""
    out: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # fields after the parenthesised name: state, ppid, ...
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        out[int(entry)] = (ppid, cmdline)
    return out


def run_tree(processes: dict[int, tuple[int, str]], root: int, tag: str) -> set[int]:
    """Descendants of ``root``, processes whose command line contains ``tag``, and their descendants."""
    members = {root} | {pid for pid, (_, cmd) in processes.items() if tag in cmd}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members.add(child)
                stack.append(child)
    return {pid for pid in members if pid in processes}


def memory_kib(pid: int) -> tuple[int, int]:
    """``(RSS, PSS)`` of ``pid`` in KiB; ``(0, 0)`` if it has gone. PSS falls back to RSS if unreadable."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
    except OSError:
        return 0, 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except OSError:
        pss = rss
    return rss, pss


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=600, help="give up (and stop the run) after this")
    parser.add_argument(
        "--command",
        nargs=argparse.REMAINDER,
        default=None,
        help="measure this command instead of the smoke search (everything after --command)",
    )
    return parser


def main(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bm-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    ray_tmp = tmp / "r"
    ray_tmp.mkdir()
    command = args.command or [
        sys.executable,
        str(REPO_ROOT / "ray_jobs" / "tune.py"),
        "--smoke-test",
        "--storage",
        str(tmp / "storage"),
        "--name",
        "bench-mem",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp / "run.log"
    peak_rss = peak_pss = 0
    peak_procs = 0
    seen: set[int] = set()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        while child.poll() is None:
            members = run_tree(read_processes(), child.pid, str(ray_tmp))
            seen |= members
            rss = pss = 0
            for pid in members:
                r, p = memory_kib(pid)
                rss, pss = rss + r, pss + p
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            peak_procs = max(peak_procs, len(members))
            if time.perf_counter() - start > args.timeout:
                timed_out = True
                os.killpg(child.pid, signal.SIGTERM)  # the run's own session: only what it started
                child.wait(30)
                break
            time.sleep(args.interval)
        wall = time.perf_counter() - start
    # Ray processes outlive a killed driver: stop those of this run only (tagged with its RAY_TMPDIR).
    leftovers = run_tree(read_processes(), child.pid, str(ray_tmp)) - {child.pid}
    for pid in leftovers:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "peak_rss_gib": peak_rss * 1024 / GIB,
        "peak_pss_gib": peak_pss * 1024 / GIB,
        "peak_processes": peak_procs,
        "processes_seen": len(seen),
        "wall_s": wall,
        "returncode": child.returncode,
        "timed_out": timed_out,
    }
    if child.returncode != 0:
        print("\n".join(tail), file=sys.stderr)
    print(f"command: {' '.join(command)}")
    print(f"exit code {child.returncode}{' (timed out)' if timed_out else ''}, wall {wall:.1f} s")
    print(
        f"peak memory of the run's process tree: RSS sum {result['peak_rss_gib']:.2f} GiB, "
        f"PSS sum {result['peak_pss_gib']:.2f} GiB; {peak_procs} processes at most, {len(seen)} seen"
    )
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
