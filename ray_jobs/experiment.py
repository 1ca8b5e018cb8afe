"""The Tune parts a search keeps in its experiment folder, so that ``--name --storage --resume`` continues it
wherever the folder is now: the Optuna study, ASHA's rungs and ``trials.csv``, which Ray would otherwise pin
to where the experiment first ran. (The job's own arguments and config, ``job_args.json``, are
:mod:`ray_jobs.job_record`'s, which imports no Ray.)

Tune restores the searcher, scheduler and callbacks from its own pickles (``tuner.pkl``, the searcher state)
and gives them no say about where the experiment is now; so these parts pickle no location and are
attached to the experiment's current folder by :func:`attach_experiment` after ``Tuner(...)`` or
``Tuner.restore(...)``, before ``fit()``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from ichmodel.trials import TRIALS_FILE, trials_table
from ray_jobs.storage import is_file, is_uri, join, parent, read_bytes, write_bytes

logger = logging.getLogger("ray_jobs.experiment")

STUDY_FILE = "optuna.db"
ASHA_STATE_FILE = "asha_state.pkl"


# ── storage ───────────────────────────────────────────────────────────────────────────────────────────────


def _read_if_exists(target: str) -> bytes | None:
    """The bytes of a local file or storage URI; None when there is no such file."""
    return read_bytes(target) if is_file(target) else None


def attach_experiment(tuner, experiment: str) -> None:
    """Point the searcher, scheduler and callbacks of ``tuner`` at ``experiment``, its current location.

    Ray has no public accessor for the ``TuneConfig`` and ``RunConfig`` that ``Tuner.restore`` unpickled;
    they are the attributes of ``tuner._local_tuner`` (``TunerInternal``) that ``fit()`` uses.
    """
    internal = tuner._local_tuner
    parts = [internal._tune_config.search_alg, internal._tune_config.scheduler]
    parts += list(internal.get_run_config().callbacks or [])
    attached = 0
    for part in parts:
        if hasattr(part, "attach_experiment"):
            part.attach_experiment(experiment)
            attached += 1
    if attached != 3:
        raise RuntimeError(
            f"Expected a study, ASHA and a trials table to attach to {experiment}; got {attached}"
        )


# ── Tune parts that live with the experiment ─────────────────────────────────────────────────────────────


class ExperimentOptunaSearch(OptunaSearch):
    """``OptunaSearch`` whose study is found from where the experiment is now, not where it first ran.

    ``study_url``: ``"experiment"`` for the sqlite file :data:`STUDY_FILE` in the experiment folder, an
    Optuna RDB URL (``--optuna-storage``), or None for Optuna's in-memory storage (pickled with the state,
    as ``OptunaSearch`` does). Ray's ``OptunaSearch`` pickles its ``RDBStorage`` (absolute sqlite URL) and the
    study's trials; unpickling an ``RDBStorage`` opens that URL (and creates the file if it is gone). So for
    an RDB study this class pickles only the study's trial ids (``_ot_trial_ids``), and :meth:`attach_experiment`
    opens the study (``_storage``, ``_ot_study``) and rebuilds its ``optuna.Trial`` objects (``_ot_trials``)
    at the URL resolved now: a copied or moved experiment continues its own study.
    """

    def __init__(self, *, study_url: str | None, **kwargs) -> None:
        self._study_url = study_url
        self._experiment: str | None = None
        self._ot_trial_ids: dict[str, int] = {}
        super().__init__(**kwargs)

    def _setup_study(self, mode) -> None:
        if self._study_url is None or self._experiment is not None:
            super()._setup_study(mode)
        # else attach_experiment() sets the study up once it knows where the experiment is

    def resolved_study_url(self) -> str | None:
        if self._study_url != "experiment":
            return self._study_url
        if self._experiment is None or is_uri(self._experiment):
            raise ValueError(
                f"An Optuna sqlite study needs a local experiment folder. Got {self._experiment}"
            )
        return f"sqlite:///{Path(self._experiment, STUDY_FILE)}"

    def attach_experiment(self, experiment: str) -> None:
        import optuna

        self._experiment = experiment
        if self._study_url is None:
            return
        if self._study_url == "experiment":
            Path(experiment).mkdir(parents=True, exist_ok=True)
        self._storage = optuna.storages.RDBStorage(self.resolved_study_url())
        super()._setup_study(self._mode)  # create_study(load_if_exists=True): the study, if it exists, reused
        self._ot_trials = {
            tid: optuna.trial.Trial(self._ot_study, storage_id)
            for tid, storage_id in self._ot_trial_ids.items()
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_experiment"] = None
        if self._study_url is not None:
            if self._ot_study is not None:  # the seeded TPE sampler with its random state, not a fresh one
                state["_sampler"] = self._ot_study.sampler
            ids = {**self._ot_trial_ids, **{tid: t._trial_id for tid, t in self._ot_trials.items()}}
            state.update(_storage=None, _ot_study=None, _ot_trials={}, _ot_trial_ids=ids)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        """Tune calls this from ``fit()`` after :meth:`attach_experiment`: reattach to the same folder."""
        experiment = self._experiment
        with open(checkpoint_path, "rb") as file:
            self.__setstate__(pickle.load(file))
        if experiment is not None:
            self.attach_experiment(experiment)
            self._fail_orphans()

    def _fail_orphans(self) -> None:
        """Mark FAIL the study's RUNNING trials that the restored state does not know: asked for by the
        interrupted run after Tune last saved its state, they would stay RUNNING forever (Tune asks anew)."""
        import optuna

        if self._ot_study is None or self._study_url is None:
            return
        known = set(self._ot_trial_ids.values())
        for trial in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial._trial_id not in known:
                self._ot_study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                logger.info(
                    "Optuna trial %d was started after the last saved state: marked FAIL", trial.number
                )


class ExperimentASHA(ASHAScheduler):
    """``ASHAScheduler`` whose rungs are saved in the experiment (:data:`ASHA_STATE_FILE`) after every result
    and trial end, and restored by :meth:`attach_experiment`: Tune never calls ASHA's ``save``/``restore``."""

    _experiment: str | None = None

    def attach_experiment(self, experiment: str) -> None:
        data = _read_if_exists(join(experiment, ASHA_STATE_FILE))
        if data is not None:
            self.__dict__.update(pickle.loads(data))
            logger.info("ASHA rungs restored from %s/%s", experiment, ASHA_STATE_FILE)
        self._experiment = experiment

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_experiment"}

    def save_state(self) -> None:
        # Not the metric and mode: Tune sets them on every fit() and refuses a scheduler that has them.
        if self._experiment is not None:
            rungs = {
                k: v for k, v in self.__getstate__().items() if k not in {"_metric", "_mode", "_metric_op"}
            }
            write_bytes(join(self._experiment, ASHA_STATE_FILE), pickle.dumps(rungs))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        self.save_state()
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self.save_state()

    def on_trial_remove(self, tune_controller, trial) -> None:
        super().on_trial_remove(tune_controller, trial)
        self.save_state()


class TrialsTableCallback(Callback):
    """Rewrite ``trials.csv`` in the experiment each time a trial finishes, is stopped or fails, from every
    trial that has reported (:func:`ichmodel.trials.trials_table`)."""

    def __init__(self) -> None:
        self._experiment: str | None = None

    def attach_experiment(self, experiment: str) -> None:
        self._experiment = experiment

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_experiment": None}

    def write(self, trials: list, errored: object = None) -> str | None:
        if self._experiment is None:
            return None
        results = [
            SimpleNamespace(
                metrics=trial.last_result,
                config=trial.config,
                path=trial.trial_id,
                error=trial is errored or trial.status == "ERROR",
            )
            for trial in trials
            if trial.last_result and "global_epoch" in trial.last_result
        ]
        table = trials_table(results, parent(self._experiment))
        return write_bytes(join(self._experiment, TRIALS_FILE), table.to_csv(index=False).encode())

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.write(trials)
        keep_best_only(trial.last_result or {})

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.write(trials, errored=trial)


def keep_best_only(result: dict) -> None:
    """Shrink the checkpoints of a trial that ended (finished, or stopped by ASHA) to its exported weights
    (:func:`ichmodel.checkpoint_recovery.prune_checkpoint` with ``best_only``): it will not continue, and
    what the ensemble and the fold job read (the best weights, the config, the thresholds) stays.
    ``result``: the trial's last result, whose ``checkpoint_path`` is in its Train run folder. Best effort:
    a failure is logged and the files stay as they were."""
    from ichmodel.checkpoint_recovery import prune_checkpoint, run_checkpoints
    from ichmodel.trials import CHECKPOINT_FILE

    newest = result.get("checkpoint_path")
    if not newest:
        return
    try:
        for location in run_checkpoints(parent(newest), CHECKPOINT_FILE):
            before, after = prune_checkpoint(location, best_only=True)
            logger.info(
                "kept only the best weights of %s: %.1f → %.1f MB", location, before / 1e6, after / 1e6
            )
    except Exception as exc:  # the trial's result stands; its files keep their size
        logger.warning("could not shrink the checkpoints of %s: %s", parent(newest), exc)
