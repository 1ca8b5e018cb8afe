"""What every job script does first: parse its config arguments, set up logging, start or join Ray."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from ichmodel.config import Config, load_overrides
from ray_jobs.storage import absolute

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_ROOT = REPO_ROOT / "runs" / "demo_data"  # ichmodel.demo_data.ensure_demo_data(DEMO_ROOT) for the jobs
TRAIN_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def init_ray(num_cpus: int | None = None):
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one.

    A local start never attaches to some other head that happens to run on this machine.
    The repository root is put on the workers' ``PYTHONPATH`` so ``ray_jobs`` and ``ichmodel`` import
    there even without an installed package.
    """
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {
        "env_vars": {
            "PYTHONPATH": _pythonpath(),
            # Train's workers may wait for the autoscaler to boot a GPU node, which takes minutes, not 60 s.
            TRAIN_START_TIMEOUT: os.environ.get(TRAIN_START_TIMEOUT, "900"),
        }
    }
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # The dashboard serves the state API that Train's placement-group cleaner polls: without it a failed
        # run's CPU reservation can outlive it and stall the next trial.
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=True,
                 dashboard_port=_free_port())  # fmt: skip
    return ray


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


def build_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Config:
    """The run's config from :func:`add_config_arguments`' options; each layer overrides the ones before:

    :class:`Config`'s defaults → ``defaults`` (the job's, e.g. demo shards or its epoch caps) → the
    ``--config`` file → each ``--set`` → ``--epochs`` → ``--data`` (made absolute unless it is a URI).

    Raises:
        ValueError: naming the field of a bad value or an unknown name (``FileNotFoundError`` for --config).
    """
    overrides = dict(defaults or {})
    if args.config:
        overrides.update(load_overrides(args.config))
    overrides.update(parse_overrides(args.set))
    if args.epochs:
        overrides["train.max_epochs"] = args.epochs.split(",")
    if args.data is not None:
        overrides["data.shards"] = absolute(args.data)
    return Config().with_overrides(overrides)
