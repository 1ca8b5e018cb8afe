"""Loader-only throughput from local disk vs. from S3 with real request latency, and GETs per epoch.

    python bench/remote_loader.py [--patients 48] [--delay-ms 30] [--num-workers 2] [--shuffle-window 4]
                                  [--compare-fsspec] [--server-in-process] [--smoke]

The same 256 px shards (synthetic, ``series_per_shard`` 4) are served (a) from local disk and (b) from moto's
S3 server (``ThreadedMotoServer`` on 127.0.0.1) behind :class:`DelayProxy`, a loopback TCP proxy that holds
every HTTP request for ``--delay-ms`` before passing it on (what a real bucket's time to first byte costs;
moto answers in microseconds) and counts the requests. Moto and the proxy run in a process of their own
(:class:`S3Server`, this script with ``--serve``), as a bucket is not inside the training process: in this
process their Python threads would hold the GIL the loader's main thread needs to take each batch
(``--server-in-process`` measures that way). Their CPU time is reported (``server_cpu_s_epoch1``): on a
2-core machine it comes out of the loader's share, which no real bucket takes.

Each source is read for two epochs through ``SeriesDataset`` + ``make_loader`` over ``training_batches`` (the
engine's training loader: decode, collate, pinned memory on a GPU; persistent workers, so epoch 1 includes
their start), no model; the S3 source in the order the engine reads object storage in (shuffled within
windows of ``--shuffle-window`` shard files, ``data.shuffle_window``), the local one shuffled all at once. The S3 source goes through the node-local shard cache (``ichmodel.shard_cache``),
cold at epoch 1. Rounds alternate the sources, in turn first; figures are medians.

Printed: slices/s per epoch and source, time to the first batch, object GETs of shard files per epoch, the
server's CPU seconds, and the loader-only rate of one core (``num_workers = 0``, one torch thread) from the
warm cache. ``--compare-fsspec`` also reads the S3 source through fsspec's ``simplecache`` and ``filecache``
(``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``) for the library choice in ``ichmodel/shard_cache.py``. Ends
with ``RESULT {json}``: ``remote_epoch2_over_local``, ``remote_epoch1_over_local``, ``gets_epoch2``,
``local_slices_per_s_per_core`` and the rest.
"""

from __future__ import annotations

from pathlib import Path

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

from ichmodel.config import DataConfig

#: Longest delay per request the proxy accepts, and its default lifetime: it stops by itself after that.
MAX_DELAY_S = 1.0
DEFAULT_LIFETIME_S = 900.0
REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class DelayProxy:
    """A loopback TCP proxy in front of ``target`` (host, port) that delays and counts HTTP requests.

    Each request line seen from a client (``GET /bucket/key HTTP/1.1``) holds that connection for ``delay``
    seconds before the bytes go on, and is counted in :attr:`requests` as ``(method, kind)`` where kind is
    ``"shard"`` for a ``.parquet`` object and ``"other"`` otherwise (listings, the manifest, HEADs).
    ``rate`` (bytes/s), if set, slows the answers down (for tests that kill a download midway). The proxy
    stops by itself after ``lifetime`` seconds, or at :meth:`stop`.

    Raises:
        ValueError: when ``delay`` is not in ``[0, MAX_DELAY_S]`` or ``lifetime`` <= 0.
    """

    def __init__(
        self,
        target: tuple[str, int],
        delay: float = 0.03,
        lifetime: float = DEFAULT_LIFETIME_S,
        rate: float | None = None,
    ) -> None:
        if not 0.0 <= delay <= MAX_DELAY_S:
            raise ValueError(f"delay must be in [0, {MAX_DELAY_S}] s. Got {delay}")
        if lifetime <= 0:
            raise ValueError(f"lifetime must be > 0 s. Got {lifetime}")
        self.target, self.delay, self.rate = target, delay, rate
        self.requests: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, method: str = "GET", kind: str = "shard") -> int:
        with self._lock:
            return self.requests[(method, kind)]

    def counts(self) -> dict[tuple[str, str], int]:
        """A copy of :attr:`requests`."""
        with self._lock:
            return dict(self.requests)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def stop(self) -> None:
        self._stopped.set()
        self._timer.cancel()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while not self._stopped.is_set() and (data := source.recv(1 << 20)):
                if requests:
                    found = REQUEST_LINE.findall(data)
                    with self._lock:
                        for method, path in found:
                            kind = "shard" if path.split(b"?")[0].endswith(b".parquet") else "other"
                            self.requests[(method.decode(), kind)] += 1
                    if found:
                        time.sleep(self.delay * len(found))
                elif self.rate:
                    time.sleep(len(data) / self.rate)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def start_moto() -> tuple[Any, tuple[str, int]]:
    """A moto S3 server on 127.0.0.1 (a free port): ``(server, (host, port))``; stop it with ``.stop()``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, (host, port)


class S3Server:
    """Moto's S3 server behind a :class:`DelayProxy`, in a child process (this script with ``--serve``).

    ``direct``: moto's ``host:port``; ``endpoint``: the proxy's. :meth:`count`, :meth:`reset` ask the child's
    proxy; :meth:`cpu_seconds` is the child's CPU time so far (moto and the proxy together). The child stops
    at :meth:`stop`, when this process's end closes its stdin, or after ``lifetime`` seconds.
    ``in_process``: moto and the proxy in this process instead (``cpu_seconds`` is then None).
    """

    def __init__(self, delay: float, lifetime: float = DEFAULT_LIFETIME_S, in_process: bool = False) -> None:
        self._proc: subprocess.Popen | None = None
        if in_process:
            self._server, target = start_moto()
            self._proxy: DelayProxy | None = DelayProxy(target, delay, lifetime)
            self.direct, self.endpoint = f"{target[0]}:{target[1]}", self._proxy.endpoint
            return
        self._proxy = None
        script = str(Path(__file__).resolve())
        command = [sys.executable, script, "--serve", f"--delay-ms={delay * 1000}", f"--lifetime={lifetime}"]
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"The S3 server process exited with {self._proc.wait()} before it started")
        info = json.loads(line)
        self.direct, self.endpoint = info["direct"], info["proxy"]

    def _ask(self, command: str) -> dict[str, Any]:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def count(self, method: str = "GET", kind: str = "shard") -> int:
        if self._proxy is not None:
            return self._proxy.count(method, kind)
        return self._ask("stats")["requests"].get(f"{method} {kind}", 0)

    def reset(self) -> None:
        if self._proxy is not None:
            self._proxy.reset()
        else:
            self._ask("reset")

    def cpu_seconds(self) -> float | None:
        return None if self._proc is None else self._ask("stats")["cpu_s"]

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._server.stop()
        elif self._proc.poll() is None:
            self._proc.stdin.close()  # the child's loop ends and it stops moto and the proxy
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def serve(delay: float, lifetime: float) -> None:
    """The child of :class:`S3Server`: prints ``{"direct", "proxy"}``, then answers ``stats`` and ``reset``
    lines on stdin with one JSON line each until stdin ends; exits after ``lifetime`` seconds regardless."""
    timer = threading.Timer(lifetime, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    server, target = start_moto()
    proxy = DelayProxy(target, delay, lifetime)
    print(json.dumps({"direct": f"{target[0]}:{target[1]}", "proxy": proxy.endpoint}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "reset":
                proxy.reset()
                print("{}", flush=True)
            elif line.strip() == "stats":
                requests = {f"{method} {kind}": n for (method, kind), n in proxy.counts().items()}
                print(json.dumps({"requests": requests, "cpu_s": time.process_time()}), flush=True)
    finally:
        proxy.stop()
        server.stop()


def s3_uri(bucket_path: str, endpoint: str) -> str:
    """``s3://bucket/path`` naming a server at ``endpoint`` (``host:port``) in the URI's query."""
    return f"s3://{bucket_path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def make_shards(root: Path, patients: int, size: int, series_per_shard: int) -> Path:
    """Synthetic DLCV series (12-20 slices) preprocessed at ``size`` px into ``root/shards``."""
    from ichmodel import synth
    from ichmodel.preprocess import PreprocessOptions, preprocess
    from ichmodel.readers import read_dlcv

    raw = root / "Blood_data"
    synth.write_dlcv_dataset(raw, patients, (12, 20), size, 0, 1)
    out = root / "shards"
    preprocess(
        read_dlcv(raw / "train", raw / "train.csv"), out, PreprocessOptions(size=size), series_per_shard
    )
    return out


def read_epochs(
    dataset, batch: int, num_workers: int, epochs: int, server: Any = None, window: int = 0
) -> list[dict]:
    """Read ``epochs`` epochs of ``dataset`` through one persistent ``make_loader`` over the engine's training
    batches (``training_batches``, shuffled within windows of ``window`` shard files when ``dataset`` is in
    object storage); per epoch: slices/s, seconds, seconds to the first batch, and, with a ``server``
    (:class:`S3Server` or :class:`DelayProxy`), its GETs of shard files and its CPU seconds (None where
    unknown)."""
    from ichmodel.dataset import make_loader, training_batches

    batches = training_batches(dataset, batch, 0, window=window)
    loader = make_loader(dataset, batches, num_workers)
    out = []
    try:
        for epoch in range(epochs):
            batches.set_epoch(epoch)
            if server is not None:
                server.reset()
            cpu = getattr(server, "cpu_seconds", lambda: None)()
            start, slices, first = time.perf_counter(), 0, None
            for item in loader:
                slices += int(item["lengths"].sum())
                first = time.perf_counter() - start if first is None else first
            seconds = time.perf_counter() - start
            gets = server.count("GET", "shard") if server is not None else 0
            if cpu is not None:
                cpu = server.cpu_seconds() - cpu
            out.append({"slices_per_s": slices / seconds, "seconds": seconds, "first_batch_s": first,
                        "shard_gets": gets, "server_cpu_s": cpu})  # fmt: skip
    finally:
        del loader
        gc.collect()  # end this loader's workers before the next loader forks its own
    return out


class FsspecOpener:
    """Opens shard files through fsspec's ``protocol`` cache (``simplecache``/``filecache``) over pyarrow's S3,
    handed to Parquet as ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``."""

    def __init__(self, protocol: str, s3_endpoint: str, cache_dir: Path) -> None:
        self.protocol, self.s3_endpoint, self.cache_dir = protocol, s3_endpoint, cache_dir

    def open(self, bucket_path: str):
        import fsspec
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq
        from fsspec.implementations.arrow import ArrowFSWrapper

        s3 = pafs.S3FileSystem(endpoint_override=self.s3_endpoint, scheme="http", region="us-east-1")
        cached = fsspec.filesystem(self.protocol, fs=ArrowFSWrapper(s3), cache_storage=str(self.cache_dir))
        return pq.ParquetFile(pafs.PyFileSystem(pafs.FSSpecHandler(cached)).open_input_file(bucket_path))


def fsspec_dataset(uri: str, opener: FsspecOpener, bucket_dir: str):
    """A ``SeriesDataset`` of ``uri`` whose shard files open through ``opener`` (no ichmodel cache/prefetch)."""
    from ichmodel.dataset import SeriesDataset

    class FsspecSeriesDataset(SeriesDataset):
        def open_file(self, name: str):
            return opener.open(f"{bucket_dir}/{name}")

    dataset = FsspecSeriesDataset(uri)
    dataset.remote = None  # make_loader starts no prefetch
    return dataset


def per_core_rate(dataset, batch: int, epochs: int = 5) -> tuple[float, float]:
    """Loader-only rate in this process (0 workers, one torch thread): ``(median slices/s of ``epochs``
    epochs, slices per CPU-second of this process)``; the second moves less with other people's load."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        read_epochs(dataset, batch, 0, 1, None)  # warm-up: page cache, first opens
        cpu = time.process_time()
        runs = read_epochs(dataset, batch, 0, epochs, None)
        cpu = time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
    slices = sum(r["slices_per_s"] * r["seconds"] for r in runs)
    return statistics.median(r["slices_per_s"] for r in runs), slices / cpu


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="image side of the shards")
    parser.add_argument("--patients", type=int, default=48, help="series (12-20 slices each)")
    parser.add_argument("--series-per-shard", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="series per batch")
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers of the epoch runs")
    parser.add_argument("--delay-ms", type=float, default=30.0, help="added per HTTP request (max 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each reads every source cold")
    parser.add_argument("--shuffle-window", type=int, default=DataConfig().shuffle_window,
                        help="shard files per shuffle window of the S3 source (data.shuffle_window; "
                        "0: one shuffle of all series, as a local folder); default %(default)s")  # fmt: skip
    parser.add_argument("--compare-fsspec", action="store_true", help="also read through fsspec's caches")
    parser.add_argument("--server-in-process", action="store_true",
                        help="moto and the proxy in this process (threads), as before: they share its GIL")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="12 series, 1 round: under a minute")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # S3Server's child
    parser.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME_S, help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        args.patients, args.rounds = 12, 1
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)  # moto takes any key; pyarrow must not look for real ones
    from ichmodel import io
    from ichmodel.dataset import SeriesDataset
    from ichmodel.shard_cache import ShardCache

    root = Path(tempfile.mkdtemp(prefix="bench-remote-loader-"))
    load_before = os.getloadavg()[0]
    server = S3Server(args.delay_ms / 1000.0, in_process=args.server_in_process)
    try:
        start = time.perf_counter()
        local = make_shards(root, args.patients, args.size, args.series_per_shard)
        print(f"shards {local} ({args.size} px) ready in {time.perf_counter() - start:.1f} s")
        import pyarrow.fs as pafs

        direct = pafs.S3FileSystem(endpoint_override=server.direct, scheme="http", region="us-east-1",
                                   allow_bucket_creation=True)  # fmt: skip
        direct.create_dir("bench")
        io.copy_folder(local, s3_uri("bench/shards", server.direct))
        remote = s3_uri("bench/shards", server.endpoint)
        manifest = json.loads((local / "manifest.json").read_text())
        files = len(manifest["shards"])
        size_mb = sum(p.stat().st_size for p in local.glob("*.parquet")) / 2**20
        print(f"{manifest['num_series']} series, {manifest['num_slices']} slices in {files} shard files "
              f"({size_mb:.1f} MiB); proxy delay {args.delay_ms:.0f} ms per request; moto and the proxy "
              f"{'in this process' if args.server_in_process else 'in a process of their own'}")  # fmt: skip

        sources: dict[str, Any] = {
            "local": lambda r: SeriesDataset(local),
            "remote": lambda r: SeriesDataset(remote, cache=ShardCache(root / f"cache-{r}")),
        }
        if args.compare_fsspec:
            for protocol in ("simplecache", "filecache"):
                sources[f"fsspec_{protocol}"] = lambda r, p=protocol: fsspec_dataset(
                    remote, FsspecOpener(p, server.endpoint, root / f"{p}-{r}"), "bench/shards"
                )
        runs: dict[str, list[list[dict]]] = {name: [] for name in sources}
        errors: dict[str, str] = {}
        for r in range(args.rounds):
            order = list(sources) if r % 2 == 0 else list(sources)[::-1]  # neither always goes first
            for name in order:
                build = sources[name]
                if name in errors:
                    continue
                try:
                    runs[name].append(
                        read_epochs(build(r), args.batch, args.num_workers, 2, server, args.shuffle_window)
                    )
                except Exception as exc:  # fsspec's caches: two workers may read each other's partial file
                    if not name.startswith("fsspec"):
                        raise
                    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
                    errors[name] = f"round {r}: {type(exc).__name__}: {lines[-1] if lines else ''}"[:300]
                    print(f"{name} failed in {errors[name]}")
        core, core_cpu = per_core_rate(SeriesDataset(remote, cache=ShardCache(root / "cache-0")), args.batch)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()[0]

    def med(name: str, epoch: int, key: str) -> float | None:
        values = [run[epoch][key] for run in runs[name]]
        return None if None in values else statistics.median(values)

    print(f"{args.num_workers} loader workers, batch {args.batch}, medians of {args.rounds} round(s); "
          f"load average {load_before:.1f} at the start, {load_after:.1f} at the end")  # fmt: skip
    print(f"{'source':>22}{'epoch 1 sl/s':>14}{'1st batch s':>12}{'GETs':>6}{'epoch 2 sl/s':>14}{'GETs':>6}")
    for name in [n for n in runs if runs[n]]:
        print(f"{name:>22}{med(name, 0, 'slices_per_s'):>14.0f}{med(name, 0, 'first_batch_s'):>12.3f}"
              f"{med(name, 0, 'shard_gets'):>6.0f}{med(name, 1, 'slices_per_s'):>14.0f}"
              f"{med(name, 1, 'shard_gets'):>6.0f}")  # fmt: skip
    server_cpu = med("remote", 0, "server_cpu_s")
    if server_cpu is not None:
        print(f"moto + proxy CPU in the remote source's epoch 1: {server_cpu:.2f} s "
              f"(the epoch took {med('remote', 0, 'seconds'):.2f} s on {os.cpu_count()} cores)")  # fmt: skip
    print(f"one core (0 workers, 1 torch thread) from the local cache: {core:.0f} slices/s "
          f"({core_cpu:.0f} per CPU-second)")  # fmt: skip
    local1, local2 = med("local", 0, "slices_per_s"), med("local", 1, "slices_per_s")
    result: dict[str, Any] = {
        "size": args.size,
        "delay_ms": args.delay_ms,
        "num_workers": args.num_workers,
        "shuffle_window": args.shuffle_window,
        "shard_files": files,
        "remote_epoch1_over_local": med("remote", 0, "slices_per_s") / local1,
        "remote_epoch2_over_local": med("remote", 1, "slices_per_s") / local2,
        "gets_epoch1": med("remote", 0, "shard_gets"),
        "gets_epoch2": med("remote", 1, "shard_gets"),
        "local_first_batch_s": med("local", 0, "first_batch_s"),
        "remote_first_batch_s": med("remote", 0, "first_batch_s"),
        "server_cpu_s_epoch1": server_cpu,
        "server_in_process": args.server_in_process,
        "load_average": [load_before, load_after],
        "local_slices_per_s": local2,
        "local_slices_per_s_per_core": core,
        "local_slices_per_cpu_s": core_cpu,
    }
    for name, message in errors.items():
        result[f"{name}_error"] = message
    for name in [n for n in runs if runs[n]]:
        if name.startswith("fsspec"):
            result[f"{name}_epoch1_over_local"] = med(name, 0, "slices_per_s") / local1
            result[f"{name}_epoch2_over_local"] = med(name, 1, "slices_per_s") / local2
            result[f"{name}_gets_epoch1"] = med(name, 0, "shard_gets")
            result[f"{name}_gets_epoch2"] = med(name, 1, "shard_gets")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    if arguments.serve:
        serve(arguments.delay_ms / 1000.0, arguments.lifetime)
    else:
        main(arguments)
