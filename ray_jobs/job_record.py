"""What a job records in its output folder so that ``--name --storage --resume`` alone continues it, wherever
the folder is now: its resolved arguments and config (``job_args.json``), and which options a command line
gave (so that a resume can tell a value given from a default).

Imports no Ray: every job imports this module at its top (the Tune parts kept with an experiment are
:mod:`ray_jobs.experiment`). Arguments travel here as plain ``{dest: value}`` dicts (``vars(args)`` in a
job's ``main``), and a resume returns a new dict: nothing changes the caller's values.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

from ray_jobs.storage import absolute, is_file, join, read_bytes, write_bytes

JOB_ARGS_FILE = "job_args.json"
#: Options that say where this run is and how it talks, not what it computes: never recorded or compared
#: (an experiment may be moved, so ``--storage`` on resume is where it is now).
RUN_OPTIONS = frozenset({"resume", "storage", "name", "verbose", "given", "force"})
#: Options holding a local path (or URI), compared after :func:`ray_jobs.storage.absolute`.
PATH_OPTIONS = frozenset({"data", "config", "test", "input", "out", "labels"})

Options = TypeVar("Options")


def parse_job_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` plus ``given``: the names (dests) of the options the command line set, so
    that a resume can tell a value given from a default."""
    parsed = parser.parse_args(argv)
    return argparse.Namespace(**vars(parsed), given=given_options(parser, argv))


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests that ``argv`` sets, found by parsing it again with every default suppressed."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in defaults:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults.items():
            action.default = default


def options_from(cls: type[Options], values: Mapping[str, Any], **changes: Any) -> Options:
    """A job's options dataclass ``cls`` from its parsed values (``vars(args)``): each field from the value of
    the same name, ``changes`` replacing some."""
    return cls(**{f.name: changes.get(f.name, values.get(f.name)) for f in fields(cls)})


def _normalized(key: str, value: Any) -> Any:
    if key in PATH_OPTIONS and isinstance(value, str | Path):
        return absolute(value)
    if key == "space" and isinstance(value, str) and value.endswith(".py"):
        return absolute(value)
    return value


def recorded_args(values: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments a job records: every option but :data:`RUN_OPTIONS`, paths made absolute."""
    return {k: _normalized(k, v) for k, v in values.items() if k not in RUN_OPTIONS}


def write_job_record(experiment: str, job: str, values: Mapping[str, Any], config: dict) -> str:
    """Write ``experiment/job_args.json`` (atomically on a local folder): the job, its arguments, its config."""
    record = {"job": job, "args": recorded_args(values), "config": config}
    return write_bytes(join(experiment, JOB_ARGS_FILE), json.dumps(record, indent=2, sort_keys=True).encode())


def read_job_record(experiment: str) -> dict | None:
    """The record :func:`write_job_record` left in ``experiment``; None when there is none."""
    target = join(experiment, JOB_ARGS_FILE)
    return json.loads(read_bytes(target)) if is_file(target) else None


def resume_job_args(
    values: Mapping[str, Any], parser: argparse.ArgumentParser, experiment: str, job: str
) -> tuple[dict[str, Any], dict]:
    """The recorded arguments and config of the ``job`` in ``experiment``, for a resume: ``(values, config)``.

    The options of :data:`RUN_OPTIONS` come from ``values``. An option given on the command line
    (``values["given"]``, from :func:`parse_job_args`; without it, every value that differs from ``parser``'s
    default) must equal the recorded one.

    Raises:
        FileNotFoundError: when ``experiment`` holds no record.
        ValueError: naming each option given with a value other than the recorded one, with both values.
    """
    record = read_job_record(experiment)
    if record is None:
        raise FileNotFoundError(
            f"Nothing to resume at {experiment}: no {JOB_ARGS_FILE} there; run without --resume first"
        )
    if record.get("job") != job:
        raise ValueError(f"{experiment} holds a {record.get('job')!r} job, not a {job!r} job")
    recorded = record["args"]
    given = values.get("given")
    if given is None:
        given = {k for k, v in values.items() if v != parser.get_default(k)}
    conflicts = []
    for key in sorted(set(given) - RUN_OPTIONS):
        value = _normalized(key, values.get(key))
        if key in recorded and _jsonable(value) != recorded[key]:
            option = "--" + key.replace("_", "-")
            conflicts.append(f"{option} {value!r} given, but the experiment ran with {recorded[key]!r}")
    if conflicts:
        raise ValueError(
            f"Cannot resume {experiment} with other arguments: " + "; ".join(conflicts)
            + " (leave them out to resume as recorded, or start a new --name)"
        )  # fmt: skip
    restored = {**values, **recorded}
    restored.update({key: values[key] for key in RUN_OPTIONS & set(values)})
    return restored, record["config"]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def command_line(options: object) -> list[str]:
    """The options of a job's options dataclass that differ from its defaults, as command-line flags (for a log
    line a user can rerun): ``--name value``, a true flag alone, one flag per item of a tuple."""
    argv: list[str] = []
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name == "given" or (f.default is not MISSING and value == f.default) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, tuple):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv
