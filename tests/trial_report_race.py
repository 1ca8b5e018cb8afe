"""A Tune trial whose Train run ends right after its last report while Tune's driver is slow to ask for the
next result (tests/test_tune_job.py runs it against the session's head; ``python tests/trial_report_race.py
STORAGE wait|nowait``). With ``nowait`` Ray 2.60 deadlocks: the trial stays RUNNING for ever."""

from __future__ import annotations

import os
import sys
import time

import ray
from ray import tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from ray_jobs.tune import wait_until_tune_took_the_reports


def loop() -> None:
    for step in range(2):
        ray.train.report({"step": step})


def trial(config: dict) -> None:
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # the run ends ~1 s after its last report
    run = RunConfig(
        name=f"run-{config['wait']}", storage_path=config["storage"], callbacks=[TuneReportCallback()]
    )
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1), run_config=run).fit()
    if config["wait"]:
        wait_until_tune_took_the_reports()


class SlowDriver(tune.Callback):
    """Tune's driver busy for 4 s after each result (as when the machine is loaded)."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        time.sleep(4)


if __name__ == "__main__":
    storage, wait = sys.argv[1], sys.argv[2] == "wait"
    ray.init()
    tuner = tune.Tuner(
        trial,
        param_space={"wait": wait, "storage": storage},
        run_config=tune.RunConfig(storage_path=storage, name="race", callbacks=[SlowDriver()], verbose=0),
    )
    results = tuner.fit()
    print("trial ended:", results[0].metrics.get("step"))
