"""``ray_jobs/experiment.py`` without a Ray cluster: recorded arguments and their conflicts on resume, the
Optuna study found where the experiment is now, ASHA's rungs saved and restored."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ray_jobs import experiment as X
from ray_jobs import job_record as R


def _tune_args(argv: list[str]):
    from ray_jobs import tune

    return tune.parse_args(argv)


def test_resume_restores_the_recorded_arguments_and_refuses_a_conflicting_one(tmp_path):
    from ray_jobs import tune

    first = _tune_args(["--data", str(tmp_path), "--storage", str(tmp_path), "--name", "s", "--epochs", "3,3,6",
                        "--num-samples", "5"])  # fmt: skip
    R.write_job_record(str(tmp_path / "s"), "tune", vars(first), {"train": {"max_epochs": [3, 3, 6]}})
    plain = _tune_args(["--storage", str(tmp_path), "--name", "s", "--resume"])
    assert plain.given == {"storage", "name", "resume"}  # defaults are not "given"
    args, config = R.resume_job_args(vars(plain), tune.get_args_parser(), str(tmp_path / "s"), "tune")
    assert (args["epochs"], args["num_samples"], args["data"]) == ("3,3,6", 5, str(tmp_path.resolve()))
    assert args["resume"] and config == {"train": {"max_epochs": [3, 3, 6]}}
    # The same value given again (here a relative spelling of the same folder) is no conflict.
    same = _tune_args(["--storage", str(tmp_path), "--name", "s", "--resume", "--epochs", "3,3,6"])
    assert (
        R.resume_job_args(vars(same), tune.get_args_parser(), str(tmp_path / "s"), "tune")[0]["epochs"]
        == "3,3,6"
    )
    # Given values equal to the record (--num-samples 5, --seed 0) pass; one that differs (--epochs) is an
    # error naming the option and both values.
    other = _tune_args(["--storage", str(tmp_path), "--name", "s", "--resume", "--epochs", "1,1,1",
                        "--num-samples", "5", "--seed", "0"])  # fmt: skip
    with pytest.raises(ValueError, match=r"--epochs '1,1,1' given, but the experiment ran with '3,3,6'"):
        R.resume_job_args(vars(other), tune.get_args_parser(), str(tmp_path / "s"), "tune")
    with pytest.raises(FileNotFoundError, match="no job_args.json"):
        R.resume_job_args(vars(plain), tune.get_args_parser(), str(tmp_path / "nothing"), "tune")
    with pytest.raises(ValueError, match="holds a 'tune' job, not a 'train' job"):
        R.resume_job_args(vars(plain), tune.get_args_parser(), str(tmp_path / "s"), "train")


def test_tune_resume_with_a_conflicting_value_exits_with_both_values_named(tmp_path, caplog):
    from ray_jobs import tune

    first = _tune_args(["--data", str(tmp_path / "a"), "--storage", str(tmp_path), "--name", "s"])
    R.write_job_record(str(tmp_path / "s"), "tune", vars(first), {})
    code = tune.main(
        _tune_args(["--storage", str(tmp_path), "--name", "s", "--resume", "--data", str(tmp_path / "b")])
    )
    assert code == 2
    assert f"--data '{tmp_path / 'b'}' given, but the experiment ran with '{tmp_path / 'a'}'" in caplog.text


def _space(trial):
    return {"loss.alpha": trial.suggest_float("loss.alpha", 0.0, 1.0)}


def _searcher():
    return X.ExperimentOptunaSearch(study_url="experiment", space=_space, metric="m", mode="max", seed=0,
                                    study_name="s")  # fmt: skip


def _study_trials(db: Path) -> list[tuple[int, str]]:
    import optuna

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    return [(t.number, t.state.name) for t in study.trials]


def test_a_copied_experiment_continues_its_own_study_and_leaves_the_originals_alone(tmp_path):
    original, copy = tmp_path / "runs" / "s", tmp_path / "moved" / "s"
    searcher = _searcher()
    searcher.attach_experiment(str(original))
    first = searcher.suggest("t1")
    searcher.suggest("t2")
    searcher.on_trial_complete("t1", {"m": 0.5})
    searcher.save(str(original / "searcher-state.pkl"))  # what Tune saves with the experiment
    searcher.suggest("late")  # asked for after Tune's last save, then the driver was killed
    pickled = pickle.dumps(searcher)  # what tuner.pkl holds
    assert str(original).encode() not in pickled  # no location is pickled
    shutil.copytree(original, copy)
    before = (original / X.STUDY_FILE).read_bytes(), (original / X.STUDY_FILE).stat().st_mtime_ns

    # The copy resumed as Tune does it: tuner.pkl unpickled, attached, then the saved state restored.
    restored = pickle.loads(pickled)
    restored.attach_experiment(str(copy))
    restored.restore(str(copy / "searcher-state.pkl"))
    restored.on_trial_complete("t2", {"m": 0.7})  # the trial left running finishes in the copy
    # The seeded sampler continues its random state: a fresh one would propose t1's values again.
    assert restored.suggest("t3") != first

    # "late" is unknown to the restored state: FAIL, not RUNNING forever; t3 is a new Optuna trial.
    assert _study_trials(copy / X.STUDY_FILE) == [
        (0, "COMPLETE"),
        (1, "COMPLETE"),
        (2, "FAIL"),
        (3, "RUNNING"),
    ]
    assert _study_trials(original / X.STUDY_FILE) == [(0, "COMPLETE"), (1, "RUNNING"), (2, "RUNNING")]
    assert before == ((original / X.STUDY_FILE).read_bytes(), (original / X.STUDY_FILE).stat().st_mtime_ns)


def test_a_moved_experiment_does_not_recreate_the_old_study_file(tmp_path):
    searcher = _searcher()
    searcher.attach_experiment(str(tmp_path / "old"))
    searcher.suggest("t1")
    pickled = pickle.dumps(searcher)
    shutil.move(tmp_path / "old", tmp_path / "new")
    restored = pickle.loads(pickled)
    restored.attach_experiment(str(tmp_path / "new"))
    restored.on_trial_complete("t1", {"m": 0.1})
    assert not (tmp_path / "old").exists()
    assert _study_trials(tmp_path / "new" / X.STUDY_FILE) == [(0, "COMPLETE")]


def _asha(tmp_path: Path) -> X.ExperimentASHA:
    asha = X.ExperimentASHA(time_attr="global_epoch", max_t=9, grace_period=1, reduction_factor=2)
    asha.set_search_properties("model_f2", "max")
    asha.attach_experiment(str(tmp_path))
    return asha


def test_a_trial_below_an_asha_rung_after_a_resume_is_still_stopped(tmp_path):
    strong, weak = SimpleNamespace(trial_id="strong"), SimpleNamespace(trial_id="weak")
    asha = _asha(tmp_path)
    at_start = pickle.dumps(asha)  # what tuner.pkl holds: no rung recorded yet
    asha.on_trial_add(None, strong)
    assert asha.on_trial_result(None, strong, {"global_epoch": 1, "model_f2": 0.9}) == "CONTINUE"
    assert (tmp_path / X.ASHA_STATE_FILE).is_file()

    resumed = pickle.loads(at_start)  # as Tune.restore unpickles it, then attached
    resumed.attach_experiment(str(tmp_path))
    resumed.set_search_properties(
        "model_f2", "max"
    )  # as Tune's fit() does; it refuses a scheduler that has them
    resumed.on_trial_add(None, strong)
    resumed.on_trial_add(None, weak)
    assert resumed.on_trial_result(None, weak, {"global_epoch": 1, "model_f2": 0.1}) == "STOP"

    fresh = _asha(tmp_path / "fresh")  # without the saved rungs the same result would continue
    fresh.on_trial_add(None, weak)
    assert fresh.on_trial_result(None, weak, {"global_epoch": 1, "model_f2": 0.1}) == "CONTINUE"
