"""The jobs' numeric options refuse values out of range at parsing (``ray_jobs/arg_types.py``): before, ``train.py
--num-workers 0`` and ``tune.py --num-samples 0`` started Ray and waited for ever."""

from __future__ import annotations

import argparse
import importlib

import pytest

from ray_jobs import arg_types as T

JOBS = ("preprocess", "train", "tune", "ensemble", "folds", "predict", "demo")
#: Options that may keep a bare int/float: seeds take any integer, the test hook is hidden, and --holdout is
#: checked as a fraction by the ensemble job itself.
FREE = {"--seed", "--fold-seed", "--fail-at-epoch", "--holdout"}


def _parser(job: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"ray_jobs.{job}").get_args_parser()


@pytest.mark.parametrize("job", JOBS)
def test_no_numeric_option_of_a_job_takes_an_unchecked_number(job):
    bare = [
        a.option_strings[0]
        for a in _parser(job)._actions
        if a.type in (int, float) and not FREE & set(a.option_strings)
    ]
    assert bare == [], f"{job}.py: give these a ray_jobs.arg_types type: {bare}"


@pytest.mark.parametrize(
    ("job", "argv", "message"),
    [
        ("train", ["--num-workers", "0"], "argument --num-workers: must be an integer >= 1. Got '0'"),
        ("train", ["--max-failures", "-1"], "argument --max-failures: must be an integer >= 0. Got '-1'"),
        ("tune", ["--num-samples", "0"], "argument --num-samples: must be an integer >= 1. Got '0'"),
        ("tune", ["--cpus-per-worker", "0"], "argument --cpus-per-worker: must be a number > 0. Got '0'"),
        ("tune", ["--gpus-per-trial", "nan"], "argument --gpus-per-trial: must be a number >= 0. Got 'nan'"),
        ("tune", ["--time-budget", "x"], "argument --time-budget: must be a number > 0. Got 'x'"),
        ("ensemble", ["--folds", "1"], "argument --folds: must be 0 (no folds) or an integer >= 2. Got '1'"),
        ("folds", ["--folds", "0"], "argument --folds: must be an integer >= 2. Got '0'"),
        ("preprocess", ["--size", "-3"], "argument --size: must be an integer >= 1. Got '-3'"),
        ("predict", ["--batch-size", "2.5"], "argument --batch-size: must be an integer >= 1. Got '2.5'"),
    ],
)
def test_an_out_of_range_value_ends_parsing_naming_the_option(job, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser(job).parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_types_accept_their_range():
    assert (T.positive_int("1"), T.non_negative_int("0"), T.two_or_more("2")) == (1, 0, 2)
    assert (T.fold_count("0"), T.fold_count("5")) == (0, 5)
    assert (T.positive_float("0.5"), T.non_negative_float("0")) == (0.5, 0.0)
    assert isinstance(T.positive_int("3"), int) and isinstance(T.positive_float("3"), float)
