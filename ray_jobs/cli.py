"""What every job script does first: parse its config arguments, set up logging, start or join Ray.

Light to import (no torch, no Ray at the top): every job's ``--help`` builds its parser from here.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ichmodel.config import Config, load_overrides
from ray_jobs.job_record import resume_job_args, write_job_record
from ray_jobs.storage import absolute, check_job_paths, job_runtime_env, join, storage_env

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_ROOT = REPO_ROOT / "runs" / "demo_data"  # ichmodel.demo_data.ensure_demo_data(DEMO_ROOT) for the jobs
TRAIN_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
#: How often a Train run's controller polls its workers (Ray's default 2 s): a finished run is seen in several
#: polls, so 2 s left each run ~5 s of idling after its last epoch (the demo makes 5 runs, a search one per
#: trial); 0.5 s leaves ~1 s. A poll is one small RPC per worker.
TRAIN_POLL_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def init_ray(num_cpus: int | None = None):
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one.

    A local start never attaches to some other head that happens to run on this machine, and everything it
    starts talks to it alone: Train's placement-group cleaner (an actor) queries Ray's state API without an
    address, which otherwise searches the machine and fails on finding two instances ("Found multiple active
    Ray instances"); so ``RAY_API_SERVER_ADDRESS`` (this instance's dashboard) is set for the workers and the
    driver, and ``RAY_ADDRESS`` for what the driver starts afterwards. A local start also starts a watchdog
    (:func:`start_reaper`): Ray's agents outlive a driver killed with ``kill -9``, the watchdog ends them.
    The repository root is put on the workers' ``PYTHONPATH`` so ``ray_jobs`` and ``ichmodel`` import
    there even without an installed package. A variable that a submitted job's own runtime env sets
    (``ray job submit --runtime-env-json '{"env_vars": ...}'``) is left to it.
    """
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {
        "env_vars": {
            "PYTHONPATH": _pythonpath(),
            # Train's workers may wait for the autoscaler to boot a GPU node, which takes minutes, not 60 s.
            TRAIN_START_TIMEOUT: os.environ.get(TRAIN_START_TIMEOUT, "900"),
            TRAIN_POLL_INTERVAL: os.environ.get(TRAIN_POLL_INTERVAL, "0.5"),
            **storage_env(),  # an S3-compatible endpoint set for the driver (AWS_ENDPOINT_URL) reaches the workers
        }
    }
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if "://" not in address and address != "auto":  # the cleaner (above) finds this cluster, not another
            runtime_env["env_vars"]["RAY_ADDRESS"] = address
        # A submitted job's own env_vars (--runtime-env-json) already reach its workers, and Ray refuses a
        # driver's runtime env that names one of them again ("Failed to merge the Job's runtime env").
        for key in job_runtime_env().get("env_vars") or {}:
            runtime_env["env_vars"].pop(key, None)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        atexit.register(release_placement_groups, ray)  # runs before ray.init's own atexit shutdown
        return ray
    # The dashboard serves the state API that Train's placement-group cleaner polls: without it a failed
    # run's CPU reservation can outlive it and stall the next trial.
    dashboard_port = _free_port()
    api_server = f"http://127.0.0.1:{dashboard_port}"
    os.environ[API_SERVER_ENV] = runtime_env["env_vars"][API_SERVER_ENV] = api_server
    os.environ[LOCAL_RAY_MARKER] = str(os.getpid())  # inherited by every process this Ray starts
    ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=True,
             dashboard_port=dashboard_port)  # fmt: skip
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # The session folder of this (one-node) instance, from its object store's socket path.
    start_reaper(os.getpid(), str(Path(ray.nodes()[0]["ObjectStoreSocketName"]).parent.parent))
    return ray


def release_placement_groups(ray) -> int:
    """Remove the placement groups this job created that are still held; returns how many (at the driver's
    exit on a cluster, from :func:`init_ray`).

    A Train run's controller that is killed while it restarts its workers (Tune stopping its trial: the run's
    workers die with it, the controller retries) can die between reserving a new placement group and handing
    it to Train's ``PlacementGroupCleaner``. On a cluster that reservation outlived the job (seen with ``ray
    job submit``, when ASHA still stopped trials at their last report: 1 of the head's 2 CPUs held after the
    job succeeded, and the next 2-worker run waited for ever; ``ray_jobs/tune.py`` no longer stops them there,
    ASHA's rungs still do). A placement group's id ends with its job's id.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        job = ray.get_runtime_context().get_job_id()
        table = ray.util.placement_group_table()
    except Exception:  # Ray already shut down or the cluster gone: nothing to release
        return 0
    held = [pg for pg, info in table.items() if pg.endswith(job) and info.get("state") != "REMOVED"]
    for pg in held:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
    if held:
        logging.getLogger("ray_jobs").info(
            "released %d placement group(s) this job's runs left held", len(held)
        )
    return len(held)


#: In the environment of every process of a Ray that a job started locally: the pid of that job's driver.
LOCAL_RAY_MARKER = "ICH_LOCAL_RAY_DRIVER"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
#: The watchdog (stdlib only, run with ``python -c``): once the driver ``argv[1]`` is gone, SIGTERM then SIGKILL
#: every process of its Ray: those whose environment holds ``argv[2]`` (``LOCAL_RAY_MARKER=<driver pid>``) or
#: whose command line or open files name the session folder ``argv[3]``. The last matters: Ray's agents
#: rename themselves with setproctitle, which overwrites their command line and environment.
_REAPER = r"""
import os, signal, sys, time
driver, marker, session = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3].rstrip("/") + "/"
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False
def of_this_ray(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if marker in f.read().split(b"\0"):
                return True
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if session.encode() in f.read():
                return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session):
                return True
    except OSError:
        pass
    return False
def marked():
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != os.getpid() and of_this_ray(n)]
while alive(driver):
    time.sleep(1)
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
    for pid in marked():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.time() + wait
    while marked() and time.time() < deadline:
        time.sleep(0.2)
"""


def start_reaper(driver_pid: int, session_dir: str) -> None:
    """Start the watchdog that ends this driver's local Ray once the driver is gone (Linux; elsewhere nothing).

    Ray ties its GCS and raylet to the driver that started them, but not the dashboard and runtime-env agents
    (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``), which the raylet starts: after ``kill -9`` of the
    driver they keep running. The watchdog is its own session, so a signal to the driver's group spares it.
    """
    if not sys.platform.startswith("linux"):
        return
    env = {k: v for k, v in os.environ.items() if k != LOCAL_RAY_MARKER}
    subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(driver_pid), f"{LOCAL_RAY_MARKER}={driver_pid}", session_dir],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pythonpath() -> str:
    parts = [str(REPO_ROOT)]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        parts.append(existing)
    return os.pathsep.join(parts)


def parse_window(text: str) -> tuple[float, float]:
    """``"40,80"`` → ``(40.0, 80.0)``: one CT window as LEVEL,WIDTH in HU (an argparse ``type``)."""
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a window is LEVEL,WIDTH in HU (e.g. 40,80). Got {text!r}"
        ) from None
    return level, width


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["loss.alpha=0.5", "train.max_epochs=[2,2,2]"]`` → ``{"loss.alpha": 0.5, ...}`` (values parsed as YAML).

    The config converts and checks each value (:mod:`ichmodel.config`), naming the field when it is bad.
    """
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"An override is section.field=value (e.g. loss.alpha=0.5). Got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def add_config_arguments(parser: argparse.ArgumentParser, epochs_help: str) -> None:
    """The options :func:`build_config` reads: ``--data``, ``--config``, ``--set`` and ``--epochs``."""
    parser.add_argument(
        "--data",
        default=None,
        help="preprocessed training shards, a folder or URI (default: generated demo data)",
    )
    parser.add_argument(
        "--config", default=None, help="YAML/JSON file with config overrides (see ichmodel/config.py)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set train.amp_bf16=false (repeatable)")  # fmt: skip
    parser.add_argument("--epochs", default=None, metavar="E1,E2,E3", help=epochs_help)


#: Defaults of a run whose workers each have a GPU (``train.py --use-gpu``, ``tune.py --gpus-per-trial``):
#: a batch well above the paper's 4 series keeps the GPU busy (``bench/gpu.py`` measures 16 at 256 px) and
#: loader workers decode the next batches meanwhile (3: a g5.xlarge has 4 vCPUs per GPU). ``--config`` and
#: ``--set`` override them; a 24 GB card with long series may need ``data.max_slices`` or a smaller batch.
GPU_DEFAULTS: dict[str, Any] = {"data.batch_size": 16, "data.num_workers": 3}


@dataclass(frozen=True)
class ConfigArgs:
    """The values of :func:`add_config_arguments`' options: ``--data``, ``--config``, each ``--set``, ``--epochs``."""

    data: str | None = None
    config: str | None = None
    set: tuple[str, ...] = ()
    epochs: str | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> ConfigArgs:
        """From a job's parsed values (``vars(args)``)."""
        return cls(
            values.get("data"), values.get("config"), tuple(values.get("set") or ()), values.get("epochs")
        )


def build_config(
    config_args: ConfigArgs, defaults: dict[str, Any] | None = None, *, gpu: bool = False
) -> Config:
    """The run's config from :func:`add_config_arguments`' options; each layer overrides the ones before:

    :class:`Config`'s defaults → :data:`GPU_DEFAULTS` when ``gpu`` → ``defaults`` (the job's, e.g. demo
    shards or its epoch caps) → the ``--config`` file → each ``--set`` → ``--epochs`` → ``--data`` (made
    absolute unless it is a URI).

    The config is checked as the Train workers check it before training (:func:`ichmodel.stages.
    check_prediction_trained`), so a wrong combination ends the job here, not in the workers after Ray's start.

    Raises:
        ValueError: naming the field of a bad value or an unknown name (``FileNotFoundError`` for --config).
    """
    from ichmodel.stages import check_prediction_trained  # noqa: PLC0415

    overrides = (dict(GPU_DEFAULTS) if gpu else {}) | dict(defaults or {})
    if config_args.config:
        overrides.update(load_overrides(config_args.config))
    overrides.update(parse_overrides(list(config_args.set)))
    if config_args.epochs:
        overrides["train.max_epochs"] = config_args.epochs.split(",")
    if config_args.data is not None:
        overrides["data.shards"] = absolute(config_args.data)
    cfg = Config().with_overrides(overrides)
    check_prediction_trained(cfg)
    return cfg


def training_data_ok(data: str | None) -> bool:
    """False, after one line naming the folder, when ``data`` (``--data``'s shards; None: nothing to check)
    holds no readable ``manifest.json``, or shards without labels (a test folder: training on it "finishes"
    at F2 0, every label unknown). Jobs ask before they record anything or start Ray: the Train workers
    found a missing manifest only after Ray's start and Train's retries, as a traceback (30-40 s here)."""
    if data is None:
        return True
    from ichmodel.shards import load_manifest  # noqa: PLC0415  (pyarrow: not for --help)

    try:
        manifest = load_manifest(data)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: not JSON
        logging.getLogger("ray_jobs").error("--data: %s", exc)
        return False
    if manifest.get("has_labels") is False:
        logging.getLogger("ray_jobs").error(
            "--data: %s holds no labels (preprocessed without labels, like a test folder): training needs "
            "the labelled training shards",
            data,
        )
        return False
    return True


def init_ray_for_job(storage: str, data: str | None):
    """:func:`init_ray`, then check ``--storage`` and ``--data`` for a submitted job and a cluster
    (:func:`ray_jobs.storage.check_job_paths`). Returns the ``ray`` module, or ``None`` after logging why not.

    A ``data`` that :func:`training_data_ok` refuses ends the job here, before Ray starts.
    """
    if not training_data_ok(data):
        return None
    ray = init_ray()
    try:  # a submitted job's cwd is temporary; other nodes must see the same folders
        check_job_paths({"--storage": storage, "--data": data}, ray)
    except ValueError as exc:
        logging.getLogger("ray_jobs").error("%s", exc)
        return None
    return ray


def workers_fit(ray, scaling: Mapping[str, Any], option: str) -> bool:
    """Whether the workers of one Train run (``scaling``: its ``ScalingConfig`` arguments) fit the Ray cluster
    now. When they do not: on the job's own local Ray, which cannot grow, one line naming ``option`` and
    False (Train would wait for them silently, up to ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 900 s); on a
    cluster a warning, as its autoscaler may add nodes, and True."""
    from ray.train import ScalingConfig  # noqa: PLC0415

    have = ray.cluster_resources()
    need = ScalingConfig(**scaling).total_resources
    wanted = {key: amount for key, amount in need.items() if amount > 0}
    if all(have.get(key, 0.0) >= amount for key, amount in wanted.items()):
        return True
    needs = ", ".join(f"{amount:g} {key}" for key, amount in wanted.items())
    has = ", ".join(f"{have.get(key, 0.0):g} {key}" for key in wanted)
    log = logging.getLogger("ray_jobs")
    if os.environ.get(LOCAL_RAY_MARKER) == str(os.getpid()):
        log.error("one Train run needs %s at once; this machine's Ray has %s and cannot grow: lower %s", needs,
                  has, option)  # fmt: skip
        return False
    log.warning(
        "one Train run needs %s at once; the cluster has %s now: waiting for the autoscaler", needs, has
    )
    return True


def add_output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--name``, ``--storage`` and ``--resume`` of a job whose output folder is ``--out`` or STORAGE/NAME."""
    parser.add_argument("--name", default=None, help=f"{what} folder STORAGE/NAME, instead of --out")
    parser.add_argument("--storage", default=str(REPO_ROOT / "runs"),
                        help="local folder or URI that holds NAME (default runs/)")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help=f"continue the {what} at --out (or STORAGE/NAME) "
                        "with its recorded arguments (job_args.json there); others given must equal them")  # fmt: skip


def output_folder(out: str | None, name: str | None, storage: str) -> str:
    """The job's output folder: ``--out``, else ``STORAGE/NAME`` (absolute unless a URI).

    Raises:
        ValueError: when neither --out nor --name is given.
    """
    if out is not None:
        return absolute(out)
    if name is not None:
        return join(absolute(storage), name)
    raise ValueError("Give the output folder: --out FOLDER, or --name NAME (under --storage)")


def record_or_resume(values: Mapping[str, Any], parser: argparse.ArgumentParser, job: str) -> dict[str, Any]:
    """Record ``values`` (a job's ``vars(args)``) in the output folder (:func:`output_folder`), or with
    ``--resume`` return the recorded ones (:func:`ray_jobs.job_record.resume_job_args`). A folder named by
    ``--name`` is where it is now, so a resume by name does not restore a recorded ``--out``.

    Raises:
        FileNotFoundError: on --resume when the folder holds no record.
        ValueError: naming an option given with another value than the recorded one, and both values.
    """
    folder = output_folder(values.get("out"), values.get("name"), values["storage"])
    if not values.get("resume"):
        write_job_record(folder, job, values, {})
        return dict(values)
    restored, _ = resume_job_args(values, parser, folder, job)
    if values.get("out") is None:
        restored["out"] = None
    return restored
