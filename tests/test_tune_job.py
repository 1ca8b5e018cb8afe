"""``ray_jobs/tune.py``: resumed after a kill, a Train run ending while Tune is busy, bad spaces (submitted as a
Ray job: ``tests/test_s3.py``; a retried trial: ``tests/test_side_by_side.py``)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ichmodel.checkpoint import load_checkpoint
from ray_jobs.worker import finished_run_report
from tests.conftest import job_args
from tests.datagen import file_tree

pytestmark = pytest.mark.ray
REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "ray_jobs/tune.py"


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def test_a_trial_whose_train_run_ends_while_tune_is_busy_still_completes(ray_head, tmp_path):
    """A Train run that ends ~1 s after its last report, while Tune's driver is busy for 4 s after each
    result: without ``wait_until_tune_took_the_reports`` Ray 2.60 deadlocks (the trial stays RUNNING; the
    same script with ``nowait`` runs into the timeout)."""
    proc = _ok(
        ray_head.run([sys.executable, "tests/trial_report_race.py", str(tmp_path), "wait"], timeout=240)
    )
    assert "trial ended: 1" in proc.stdout  # both reports reached Tune


def _finished_train_runs(experiment: Path) -> dict[str, dict]:
    """Trial id -> last report of each trial's Train run that Ray has recorded as finished."""
    runs = {}
    for run in (experiment / "train_runs").glob("train-*"):
        report = finished_run_report(str(run))
        if report is not None:
            runs[run.name.removeprefix("train-")] = report
    return runs


def _table_rows(trials_csv: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(trials_csv, dtype={"trial_id": str}).set_index("trial_id")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def test_interrupted_search_resumes_from_its_name_alone_in_a_copy(ray_head, demo_shards, tmp_path):
    """Resumed with ``--name --storage --resume`` only, the trials were rebuilt from the new command line
    (demo data, demo epoch caps), and a copy of the experiment wrote into the original's Optuna study."""
    # --grace-epochs 3 (= all epochs): ASHA stops no trial early, whatever their F2, so both can finish.
    args = job_args("tune", demo_shards[0], tmp_path / "runs", "interrupted", "--num-samples", "2",
                    "--max-concurrent", "1", "--grace-epochs", "3")  # fmt: skip
    # Tune saves its experiment state at the start and then at most every TUNE_GLOBAL_CHECKPOINT_S; an hour
    # makes the kill always hit the worst case: a state saved before the first trial's Train run ended.
    driver = subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        env=ray_head.env | {"TUNE_GLOBAL_CHECKPOINT_S": "3600"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    experiment = tmp_path / "runs" / "interrupted"
    deadline = time.time() + 400
    finished: dict[str, dict] = {}
    # Kill once Ray recorded a finished Train run and the trials table (refreshed as each trial ends) has it.
    while time.time() < deadline and not (
        finished and set(finished) <= set(_table_rows(experiment / "trials.csv").index)
    ):
        finished = _finished_train_runs(experiment)
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert finished, "no trial finished before the deadline"
    ((done_trial, done),) = finished.items()
    # The interrupted search's table already holds the finished trial, with its checkpoint.
    row = _table_rows(experiment / "trials.csv").loc[done_trial]
    assert row["finished"] and row["checkpoint"] == f"{done['checkpoint_path']}/checkpoint.pt"

    copy = tmp_path / "moved" / "interrupted"
    shutil.copytree(experiment, copy)
    original = file_tree(experiment)
    resumed = _ok(ray_head.run([sys.executable, SCRIPT, "--name", "interrupted", "--storage", str(copy.parent),
                                "--resume"]))  # fmt: skip
    assert "trials table" in resumed.stdout
    assert file_tree(experiment) == original, "resuming the copy changed the original experiment"
    table = pd.read_csv(copy / "trials.csv", dtype={"trial_id": str})
    assert len(table) == 2 and (table["status"] == "OK").all() and table["finished"].all()
    assert (table["epochs"] == 3).all()  # the recorded caps 1,1,1, not the demo's 1,1,2
    for checkpoint in table["checkpoint"]:
        assert checkpoint.startswith(str(copy)) and Path(checkpoint).is_file()
        config = load_checkpoint(checkpoint)["config"]
        assert config["data"]["shards"] == str(demo_shards[0]) and list(config["train"]["max_epochs"]) == [
            1,
            1,
            1,
        ]
    # The finished trial did not train again: its Train run still ends in the same record.
    again = _finished_train_runs(copy)[done_trial]
    assert {k: v for k, v in again.items() if k != "checkpoint_path"} == {
        k: v for k, v in done.items() if k != "checkpoint_path"
    }
    assert table.set_index("trial_id").loc[done_trial, "model_f2"] == done["model_f2"]
    # The copy's study holds both trials, finished, and no trial left RUNNING (one the killed driver asked for
    # after Tune's last saved state is marked FAIL); the original's was not touched (checked above, bytes).
    import optuna

    study = optuna.load_study(study_name="interrupted", storage=f"sqlite:///{copy / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and set(states) <= {"COMPLETE", "FAIL"}, states

    # The interrupted original is ensembled from the trials its table holds: a checked submission.
    out = tmp_path / "submission"
    ensembled = _ok(ray_head.run([sys.executable, "ray_jobs/ensemble.py", "--experiment", str(experiment),
                                  "--top-k", "2", "--out", str(out)], timeout=300))  # fmt: skip
    spec = json.loads((out / "ensemble.json").read_text())
    assert done_trial in spec["trial_ids"] and (out / "submission.csv").is_file(), ensembled.stderr[-3000:]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("no_such_space", "built-in spaces"),
        ("{tmp}/syntax.py", "failed to import"),
        ("{tmp}/nofn.py", "must define a function space"),
        ("{tmp}/unknown.py", "Unknown config field loss.alhpa"),
    ],
)
def test_bad_space_file_gives_a_clear_error(demo_shards, tmp_path, space, message):
    (tmp_path / "syntax.py").write_text("def space(trial):\n    return {\n")
    (tmp_path / "nofn.py").write_text("SPACE = {}\n")
    (tmp_path / "unknown.py").write_text(
        "def space(trial):\n    return {'loss.alhpa': trial.suggest_float('loss.alhpa', 0, 1)}\n"
    )
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--data", str(demo_shards[0]), "--space", space.format(tmp=tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_trials_table_ranks_trials_and_keeps_the_storage_scheme_on_checkpoints():
    from types import SimpleNamespace

    from ichmodel.trials import trials_table

    def result(trial, f2, path, error=None, val_loss=0.5):  # the fields of a ray.tune.Result the table reads
        metrics = {
            "trial_id": trial,
            "model_f2": f2,  # of the exported weights (the stage's best epoch)
            "val_f2": f2 / 2,  # of the last epoch
            "val_loss": val_loss,  # of the last epoch
            "checkpoint_path": path,
            "global_epoch": 3,
        }
        return SimpleNamespace(
            metrics=metrics, config={"loss.alpha": 0.5, "other": 1}, path=trial, error=error
        )

    results = [
        result("a", 0.2, "bucket/runs/a/ckpt", val_loss=0.3),
        result("b", 0.7, None),
        result("c", 0.5, "b/c", "boom"),
    ]
    table = trials_table(results, "s3://bucket/runs")
    assert list(table["trial_id"]) == ["b", "c", "a"] and list(table["status"]) == ["OK", "ERROR", "OK"]
    assert list(table["checkpoint"]) == [
        "",
        "s3://b/c/checkpoint.pt",
        "s3://bucket/runs/a/ckpt/checkpoint.pt",
    ]
    assert "loss.alpha" in table.columns and "other" not in table.columns
    # Each column is named for what it holds: the exported model's F2, the last epoch's F2 and loss.
    assert {"model_f2", "last_val_f2", "last_val_loss"} <= set(table.columns)
    assert not {"best_f2", "best_val_loss"} & set(table.columns)
    a = table.set_index("trial_id").loc["a"]
    assert (a["model_f2"], a["last_val_f2"], a["last_val_loss"]) == (0.2, 0.1, 0.3)
    local = trials_table(results[:1], "/data/runs")
    assert local.loc[0, "checkpoint"] == "bucket/runs/a/ckpt/checkpoint.pt"


def test_default_concurrency_is_what_the_cluster_holds_now_and_capped_before_gpu_nodes_come():
    from types import SimpleNamespace

    from ray_jobs.tune import PENDING_MAX_CONCURRENT, default_max_concurrent

    args = SimpleNamespace(workers_per_trial=2, cpus_per_worker=1.0, gpus_per_trial=0.0)
    assert default_max_concurrent({"CPU": 5.0}, args) == (2, True)
    args.gpus_per_trial = 1.0
    assert default_max_concurrent({"CPU": 16.0, "GPU": 5.0}, args) == (2, True)
    # GPU nodes not up yet: a bounded number of trials (was None: unbounded, every trial asking for nodes).
    assert default_max_concurrent({"CPU": 16.0}, args) == (PENDING_MAX_CONCURRENT, False)
    assert 1 < PENDING_MAX_CONCURRENT <= 8


def _stated_caps(parser) -> dict[str, tuple[int, int, int]]:
    """The epoch caps that ``--epochs``' help states: ``{"--data": (5, 5, 10), "demo": ..., ...}``."""
    (text,) = [a.help for a in parser._actions if "--epochs" in a.option_strings]
    found = re.findall(r"(\d+,\d+,\d+) (with --data|on the demo data|with --smoke-test)", text)
    return {where: tuple(int(e) for e in caps.split(",")) for caps, where in found}


def _search(args):
    """The typed options ``tune.main`` makes of a parsed command line."""
    from ray_jobs import tune
    from ray_jobs.job_record import options_from

    return options_from(tune.SearchOptions, vars(args), set=tuple(args.set))


@pytest.mark.parametrize(
    ("argv", "stated_as"),
    [
        (["--data", "shards/dlcv"], "with --data"),
        ([], "on the demo data"),
        (["--smoke-test"], "with --smoke-test"),
    ],
)
def test_trials_get_the_epoch_caps_that_the_help_states(monkeypatch, tmp_path, argv, stated_as):
    """The help said 2,2,3 while --data ran the config's 30,30,30 (hours per trial on real data)."""
    from ray_jobs import tune

    monkeypatch.setattr(tune, "demo_shards", lambda smoke_test: tmp_path / "demo")  # not generated here
    parser = tune.get_args_parser()
    caps = _stated_caps(parser)
    assert set(caps) == {"with --data", "on the demo data", "with --smoke-test"}
    assert caps["with --data"] == (5, 5, 10)  # a first real search: minutes per trial, not hours
    assert tune.base_config(_search(parser.parse_args(argv))).train.max_epochs == caps[stated_as]


def test_gpu_trials_and_runs_default_to_larger_batches_that_the_user_can_override(tmp_path):
    from ray_jobs import train, tune
    from ray_jobs.cli import GPU_DEFAULTS, ConfigArgs

    data = ["--data", str(tmp_path)]
    parser = tune.get_args_parser()
    cpu = tune.base_config(_search(parser.parse_args(data))).data
    gpu = tune.base_config(_search(parser.parse_args([*data, "--gpus-per-trial", "1"]))).data
    assert (cpu.batch_size, cpu.num_workers) == (4, 0)  # the paper's 4 series on CPU
    assert (gpu.batch_size, gpu.num_workers) == (
        GPU_DEFAULTS["data.batch_size"],
        GPU_DEFAULTS["data.num_workers"],
    )
    assert gpu.batch_size >= 16
    mine = parser.parse_args([*data, "--gpus-per-trial", "1", "--set", "data.batch_size=6"])
    assert tune.base_config(_search(mine)).data.batch_size == 6
    run = train.get_args_parser().parse_args([*data, "--use-gpu"])
    assert (
        train.run_config(ConfigArgs.of(vars(run)), use_gpu=run.use_gpu).data.batch_size
        == GPU_DEFAULTS["data.batch_size"]
    )


def test_epoch_caps_from_the_command_line_or_a_config_file_replace_the_jobs_default(tmp_path):
    from ray_jobs import tune

    parser = tune.get_args_parser()
    (tmp_path / "c.yaml").write_text("train:\n  max_epochs: [3, 3, 6]\n")
    data = ["--data", str(tmp_path)]
    assert tune.base_config(
        _search(parser.parse_args([*data, "--config", str(tmp_path / "c.yaml")]))
    ).train.max_epochs == (
        3,
        3,
        6,
    )
    with_set = parser.parse_args([*data, "--set", "train.max_epochs=[4,4,8]"])
    assert tune.base_config(_search(with_set)).train.max_epochs == (4, 4, 8)
    with_both = parser.parse_args([*data, "--set", "train.max_epochs=[4,4,8]", "--epochs", "2,2,2"])
    assert tune.base_config(_search(with_both)).train.max_epochs == (2, 2, 2)
    assert tune.base_config(_search(with_both)).data.shards == str(tmp_path.resolve())
