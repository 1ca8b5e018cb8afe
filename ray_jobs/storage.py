"""Where the jobs read and write: a local path or a storage URI (``s3://``, ``gs://``, ``file://``).

Every job path goes through here. The file operations are :mod:`ichmodel.io`'s (one ``pyarrow.fs`` helper
for the library and the jobs alike); this module adds what only a Ray job needs: making a path usable from
other processes (:func:`absolute`), refusing a path inside a submitted job's temporary working directory
(:func:`check_not_in_job_dir`) and checking that a local path is the same folder on every node of the cluster
(:func:`check_shared`). For S3-compatible servers other than AWS, set ``AWS_ENDPOINT_URL`` (it reaches the
workers, see :func:`storage_env`) or put ``?endpoint_override=HOST:PORT&scheme=http`` on the URI.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ichmodel.io import (  # noqa: F401  (re-exported: the jobs import every file operation from here)
    atomic_write_bytes,
    atomic_write_text,
    copy_folder,
    copy_from,
    download,
    exists,
    is_file,
    is_local,
    is_uri,
    join,
    list_files,
    local_path,
    parent,
    read_bytes,
    read_text,
)

#: Environment that says where object storage is (not who may use it): forwarded to every Ray worker of a job,
#: so a driver pointed at a MinIO/moto endpoint has workers pointed at it too. Credentials are not forwarded:
#: nodes get theirs from their instance profile (cluster.yaml) or their own environment.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_EC2_METADATA_DISABLED")  # fmt: skip
#: Set by Ray in the driver of a submitted job: its runtime env (and working_dir) as JSON.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SHARED_MARKER = ".ich-shared-check-{}"


def storage_env() -> dict[str, str]:
    """The :data:`STORAGE_ENV` variables set in this process (for a job's ``runtime_env``)."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def absolute(location: str | Path) -> str:
    """A storage URI unchanged, a local path made absolute (Ray's workers do not share the driver's cwd)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def write_bytes(target: str | Path, data: bytes) -> str:
    """Write ``data`` whole to a local path or a storage URI; returns where it went."""
    atomic_write_bytes(target, data)
    return str(target)


def fetch(uri: str, local: Path) -> bool:
    """Copy one file from a location (URI or path) to ``local``; False when it does not exist there."""
    return download(uri, local)


def job_runtime_env() -> dict[str, Any]:
    """The runtime env this process was submitted with (``ray job submit --working-dir/--runtime-env-json``),
    else ``{}``."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}
    return runtime_env if isinstance(runtime_env, dict) else {}


def job_working_dir() -> Path | None:
    """The temporary working directory of a job sent with ``ray job submit --working-dir``, else None.

    Ray runs such a job's driver in a copy of the working dir that it deletes when the job ends.
    """
    return Path.cwd().resolve() if job_runtime_env().get("working_dir") else None


def check_not_in_job_dir(option: str, location: str | Path | None, job_dir: Path | None = None) -> None:
    """Refuse a local path that lies in a submitted job's temporary working directory.

    Raises:
        ValueError: naming the option and the path, and what to use instead.
    """
    job_dir = job_dir if job_dir is not None else job_working_dir()
    if job_dir is None or location is None or not is_local(location):
        return
    path = local_path(location).resolve()
    if path == job_dir or job_dir in path.parents:
        raise ValueError(
            f"{option} {location} resolves to {path}, inside this job's temporary working directory "
            f"{job_dir}, which Ray deletes when the job ends (and which other nodes do not have): "
            "pass an absolute path on storage every node shares, or a URI (s3://bucket/...)"
        )


def check_shared(locations: dict[str, str | None], ray) -> None:
    """Check that each local path of ``locations`` (``{option: path}``) is one folder seen by every node.

    The driver writes a marker file in the folder (creating it) and a task on each alive node looks for
    it. URIs and ``None`` are skipped, and so is everything on a one-node cluster.

    Raises:
        ValueError: naming the option, the path and the nodes that do not see it.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    local = {opt: loc for opt, loc in locations.items() if loc is not None and is_local(loc)}
    if len(nodes) < 2 or not local:
        return
    markers = {}
    for option, location in local.items():
        folder = local_path(location)
        while not folder.is_dir() and folder != folder.parent:  # a file, or an output not made yet
            folder = folder.parent
        markers[option] = folder / SHARED_MARKER.format(uuid.uuid4().hex)
        try:
            markers[option].write_text("written by the job's driver")
        except OSError:  # a read-only input: nothing to check with
            markers.pop(option)
    local = {opt: local[opt] for opt in markers}
    try:
        seen_fn = ray.remote(num_cpus=0)(_markers_seen)
        refs = {node: seen_fn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote([str(m) for m in markers.values()]) for node in nodes}  # fmt: skip
        seen = {node: ray.get(ref, timeout=300) for node, ref in refs.items()}
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    for i, (option, location) in enumerate(local.items()):
        blind = [node[:12] for node, flags in seen.items() if not flags[i]]
        if blind:
            raise ValueError(
                f"{option} {location} is a local path that {len(blind)} of {len(nodes)} nodes do not share "
                f"(a file the driver wrote there is missing on node(s) {blind}): on a cluster, pass a folder on "
                "storage every node mounts (NFS, EFS) or a URI (s3://bucket/...)"
            )


def _markers_seen(paths: list[str]) -> list[bool]:
    return [Path(p).is_file() for p in paths]


def check_job_paths(locations: dict[str, str | None], ray) -> None:
    """:func:`check_not_in_job_dir` then :func:`check_shared` for each ``{option: path or URI}``.

    Raises:
        ValueError: naming the option and the path.
    """
    for option, location in locations.items():
        check_not_in_job_dir(option, location)
    check_shared(locations, ray)
