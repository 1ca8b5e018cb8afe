"""Search loss weights and training strategies with Ray Tune + Optuna; each trial is a staged Ray Train run.

Examples (from the repository root):

    python ray_jobs/tune.py                          # embedded demo: synthetic data, local Ray, CPU, minutes
    python ray_jobs/tune.py --smoke-test             # the smallest end-to-end search (CI)
    ray job submit --working-dir . -- python ray_jobs/tune.py --data /shared/shards/dlcv \\
        --num-samples 64 --max-concurrent 8 --workers-per-trial 2 --gpus-per-trial 1 --storage s3://bucket/runs
    python ray_jobs/tune.py --name my-search --storage runs --resume   # continue an interrupted search

Search: OptunaSearch (TPE, seeded; constant liar when trials run at once) proposes a config from --space;
ASHA stops weak trials early on validation micro-F2, with the global epoch as its time attribute and a grace
period that ends one epoch into the stage where the last searched parameter begins to act. Each trial
trains with --workers-per-trial DDP workers; a failed trial is retried from its last checkpoint.
--time-budget stops the search after that many seconds (Tune's time_budget_s).

Shared stages (--share-stages, ichmodel/stages.py): the leading stages that every trial would train
alike are trained once, as the Train run STORAGE/NAME/shared/<key>, before the trials start; each trial
continues from its checkpoint (trials.csv: shared_from, shared_epochs). "auto" (default) trains the two
pretraining stages once at the base config; searched parameters those stages read (γ±, soft F2, p1, p2, ε
in the default space) then act from fine-tuning on, which the log says. "exact" shares only the
stages that no searched parameter reads (stages 1-2 for --space loss_weights); "off" shares nothing.

Resuming needs only --name and --storage: the search's arguments and config are recorded in
STORAGE/NAME/job_args.json before any trial starts and restored (a value given again must be the recorded
one). The Optuna study (optuna.db), ASHA's rungs (asha_state.pkl) and trials.csv live in the experiment
folder, found where it is now: a copied or moved experiment resumes on its own study. trials.csv is
rewritten as each trial ends, so ray_jobs/ensemble.py works on a running or interrupted search.

Results land in STORAGE/NAME: trials.csv (sorted by model_f2; read by ray_jobs/ensemble.py), one folder per
trial (TensorBoard: tensorboard --logdir STORAGE/NAME), the Train runs with their checkpoints, and optuna.db
(optuna-dashboard sqlite:///STORAGE/NAME/optuna.db) for a local storage.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python ray_jobs/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ichmodel.config import Config
from ichmodel.demo_data import ensure_demo_data
from ichmodel.stages import SHARE_POLICIES, SharePlan, grace_epochs, plan_sharing
from ray_jobs.arg_types import non_negative_float, non_negative_int, positive_float, positive_int
from ray_jobs.cli import (
    DEMO_ROOT,
    REPO_ROOT,
    ConfigArgs,
    add_config_arguments,
    build_config,
    init_ray_for_job,
    setup_logging,
    workers_fit,
)
from ray_jobs.job_record import (
    options_from,
    parse_job_args,
    read_job_record,
    resume_job_args,
    write_job_record,
)
from ray_jobs.leases import JOB_ERRORS, add_force_argument, hold_folder, job_failed
from ray_jobs.shared_stages import prepare_shared_stages
from ray_jobs.storage import absolute, is_uri, join, write_bytes
from ray_jobs.worker import build_trainer, finished_run_report
from search_spaces import load_space

logger = logging.getLogger("ray_jobs.tune")
#: Tune, ASHA and Optuna rank trials by the validation F2 of the weights the checkpoint exports (best over
#: all stages), not by the last epoch's F2.
METRIC = "model_f2"
#: Epoch caps of the three stages unless --epochs, --set or --config say otherwise: a first real search on
#: --data (ASHA then stops the weak trials after the first stage), the generated demo, the smoke test.
EPOCHS = {"data": "5,5,10", "demo": "1,1,2", "smoke": "1,1,1"}
#: Trials at once when not even one fits the cluster now (GPU nodes not up yet): each pending trial asks the
#: autoscaler for nodes, and TPE proposes from few finished trials; 4 keeps both in bounds.
PENDING_MAX_CONCURRENT = 4


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Hyperparameter search of the multitask ICH model with Ray Tune + Optuna + ASHA.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(
        parser,
        epochs_help=f"epoch caps of the three stages (default {EPOCHS['data']} with --data, {EPOCHS['demo']} "
        f"on the demo data, {EPOCHS['smoke']} with --smoke-test; --config or --set train.max_epochs "
        "replaces the default)",
    )
    parser.add_argument(
        "--space", default="default", help="search space: a module of search_spaces/ or a .py file"
    )
    parser.add_argument("--num-samples", type=positive_int, default=None, help="trials to run (default 4)")
    parser.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=None,
        help="trials at once (default: as many as the cluster's current CPUs/GPUs hold)",
    )
    parser.add_argument(
        "--workers-per-trial", type=positive_int, default=1, help="DDP workers per trial (default 1)"
    )
    parser.add_argument("--gpus-per-trial", type=non_negative_float, default=0,
                        help="GPUs per worker; > 0 trains on GPU, with 16 series per batch and 3 loader workers "
                        "by default (--set overrides)")  # fmt: skip
    parser.add_argument(
        "--cpus-per-worker", type=positive_float, default=1, help="CPUs per training worker (default 1)"
    )
    parser.add_argument(
        "--storage", default=str(REPO_ROOT / "runs"), help="local folder or s3:// URI (default runs/)"
    )
    parser.add_argument("--name", default="search", help="experiment name (default: search)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name")
    parser.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    parser.add_argument(
        "--grace-epochs", type=positive_int, default=None, help="ASHA: epochs before a trial can be stopped"
    )
    parser.add_argument(
        "--optuna-storage", default=None, help="Optuna RDB URL (default: sqlite in the experiment)"
    )
    parser.add_argument("--max-failures", type=non_negative_int, default=1, help="retries of a failed trial")
    parser.add_argument("--smoke-test", action="store_true", help="2 tiny trials on tiny demo data")
    parser.add_argument(
        "--driver-resource", default=None, help="custom resource a trial driver needs (cluster head)"
    )
    parser.add_argument(
        "--share-stages",
        choices=SHARE_POLICIES,
        default="auto",
        help="train leading stages once for all trials: auto (the pretraining stages, searched values act "
        "from fine-tuning), exact (only stages no searched parameter reads), off (default auto)",
    )
    parser.add_argument(
        "--time-budget", type=positive_float, default=None, help="stop the search after this many seconds"
    )
    parser.add_argument("--fail-at-epoch", type=int, default=None, help=argparse.SUPPRESS)  # test hook
    add_force_argument(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs; a failure with its traceback"
    )
    return parser


@dataclass(frozen=True)
class SearchOptions:
    """One search, typed: every option of :func:`get_args_parser` (the same defaults; a test checks), and
    ``given``: the options a command line set (:func:`ray_jobs.job_record.parse_job_args`), for a resume."""

    data: str | None = None
    config: str | None = None
    set: tuple[str, ...] = ()
    epochs: str | None = None
    space: str = "default"
    num_samples: int | None = None
    max_concurrent: int | None = None
    workers_per_trial: int = 1
    gpus_per_trial: float = 0
    cpus_per_worker: float = 1
    storage: str = str(REPO_ROOT / "runs")
    name: str = "search"
    resume: bool = False
    seed: int = 0
    grace_epochs: int | None = None
    optuna_storage: str | None = None
    max_failures: int = 1
    smoke_test: bool = False
    driver_resource: str | None = None
    share_stages: str = "auto"
    time_budget: float | None = None
    fail_at_epoch: int | None = None
    verbose: bool = False
    given: frozenset[str] | None = None

    def values(self) -> dict:
        """``{option: value}`` as a job records them (:func:`ray_jobs.job_record.write_job_record`)."""
        values = asdict(self)
        values["set"] = list(self.set)
        return values


def base_config(options: SearchOptions) -> Config:
    """The fixed part of every trial's config (the search overrides it): :func:`ray_jobs.cli.build_config`
    with this job's epoch caps (:data:`EPOCHS`) and, without ``--data``, generated demo data."""
    kind = "smoke" if options.smoke_test else "data" if options.data is not None else "demo"
    defaults = {"train.max_epochs": EPOCHS[kind].split(",")}
    if options.data is None:
        defaults.update({"data.shards": str(demo_shards(options.smoke_test)), "data.val_fraction": 0.25})
    return build_config(ConfigArgs.of(options.values()), defaults, gpu=options.gpus_per_trial > 0)


def demo_shards(smoke_test: bool) -> Path:
    """Training shards of the generated demo data (tiny for ``--smoke-test``), made on first use."""
    if smoke_test:
        return ensure_demo_data(REPO_ROOT / "runs" / "smoke_data", patients=8, test_patients=3, size=32)[0]
    return ensure_demo_data(DEMO_ROOT)[0]


def check_space(space_fn, cfg: Config) -> list[str]:
    """Draw one sample from the space with plain Optuna and apply it to the config, to fail before launching.

    Returns the dotted names the sample set: the searched fields (a conditional space may set more in
    other samples)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study().ask()
    try:
        values = space_fn(trial)
    except Exception as exc:
        raise ValueError(f"Search space failed on a sample trial: {exc!r}") from exc
    if not isinstance(values, dict):
        raise ValueError(
            f"Search space must return a dict of dotted config names. Got {type(values).__name__}"
        )
    params = {**trial.params, **values}
    if not params:
        raise ValueError("Search space suggested no parameter")
    cfg.with_overrides(params)  # raises ValueError naming an unknown field or a bad value
    return sorted(params)


def train_trial_fn(
    config: dict,
    base: dict,
    scaling: dict,
    storage: str,
    max_failures: int,
    fail_at_epoch: int | None = None,
    start_from: str | None = None,
    shared_epochs: int = 0,
) -> None:
    """One Tune trial: a staged TorchTrainer whose per-epoch reports reach Tune through the callback.

    ``start_from``: the shared stages' checkpoint (:mod:`ray_jobs.shared_stages`), where the trial's Train
    run starts when it has no checkpoint of its own; ``shared_epochs``: the epochs it holds.

    ``fail_at_epoch`` (tests): every trial raises once after that epoch, with Train's own retries off, so
    the error reaches Tune, whose retry resumes the trial from its Train checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    run_name = f"train-{trial_id}"  # fixed: a retried or restored trial resumes from its Train checkpoint
    done = finished_run_report(f"{storage}/{run_name}")
    if done is not None:  # restored from a state saved before its Train run ended: report the end, once
        tune.report(done)
        return
    overrides = {k: v for k, v in config.items() if "." in k}
    loop_config = {"config": base, "overrides": overrides}
    if start_from:
        loop_config.update(start_from=start_from, shared_epochs=shared_epochs)
    if fail_at_epoch is not None:
        loop_config.update(fail_at_epoch=fail_at_epoch, fail_marker=f"{storage}/.failed-once-{trial_id}")
        max_failures = 0
    # The trial returns only once Tune took every report of its Train run (which polls its workers every
    # 0.5 s, ray_jobs.cli.TRAIN_POLL_INTERVAL, and so ends ~1 s after its last report): see
    # wait_until_tune_took_the_reports.
    trainer = build_trainer(
        loop_config,
        name=run_name,
        storage_path=storage,
        max_failures=max_failures,
        callbacks=[TuneReportCallback()],
        **scaling,
    )
    result = trainer.fit()
    wait_until_tune_took_the_reports()
    if result.error:
        raise result.error


def wait_until_tune_took_the_reports(timeout_s: float = 120.0, settle_s: float = 1.0) -> None:
    """Block the trial function until Tune's main thread has taken the Train run's last report.

    Ray 2.60's function trainable deadlocks otherwise: ``TuneReportCallback`` hands each report to the trial's
    main thread through a one-slot queue, and a function that returns puts its own closing report into the
    main thread's one-slot result queue; when that comes first, the main thread blocks forever putting the
    run's last report there (seen: a trial RUNNING for ever with 0 CPUs, its Train run long finished, in a
    test pass on 2 busy cores). Both queues empty for ``settle_s`` means the main thread has passed it on.
    Returns at once outside a Tune trial; gives up after ``timeout_s``.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    reports = getattr(session, "_inter_actor_queue", None)
    results = getattr(session, "result_queue", None)
    if reports is None or results is None:
        return
    deadline, empty_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if reports.empty() and results.empty():
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since >= settle_s:
                return
        else:
            empty_since = None
        time.sleep(0.05)
    logger.warning("Tune had not taken the trial's last report after %.0f s; returning anyway", timeout_s)


def trial_scaling(options: SearchOptions) -> dict:
    """The ``ScalingConfig`` arguments of every Train run of the search (trials and shared stages)."""
    return {
        "num_workers": options.workers_per_trial,
        "use_gpu": options.gpus_per_trial > 0,
        "resources_per_worker": {
            "CPU": options.cpus_per_worker,
            **({"GPU": options.gpus_per_trial} if options.gpus_per_trial else {}),
        },
    }


def make_tune_config(options: SearchOptions, cfg: Config, space_fn, grace: int, max_concurrent: int | None):
    """A new search's ``TuneConfig``: seeded TPE (constant liar unless one trial runs at a time, so trials
    proposed together are not all alike), ASHA with ``grace`` epochs before its first rung (``--grace-epochs``
    replaces it), the concurrency cap and ``--time-budget``."""
    import optuna
    from ray import tune

    from ray_jobs.experiment import ExperimentASHA, ExperimentOptunaSearch

    # The study is a file of the experiment (found from where it is at each start) unless --optuna-storage
    # names one; on a storage URI without --optuna-storage it is in memory, pickled with the searcher's state.
    study_url = options.optuna_storage or (None if is_uri(options.storage) else "experiment")
    concurrent = max_concurrent is None or max_concurrent > 1
    searcher = ExperimentOptunaSearch(
        study_url=study_url,
        space=space_fn,
        metric=METRIC,
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=options.seed, constant_liar=concurrent),
        study_name=options.name,
    )
    total_epochs = sum(cfg.train.max_epochs)
    # stop_last_trials=False: a trial that reaches max_t ends when its function returns (its Train run wound
    # down), not by Tune killing it at its last report while the run still shuts its workers down: a controller
    # killed then retries its workers and can die holding a new placement group (seen: a CPU left reserved).
    scheduler = ExperimentASHA(
        time_attr="global_epoch",
        max_t=max(total_epochs, 1),
        grace_period=max(options.grace_epochs or grace, 1),
        stop_last_trials=False,
    )
    return tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        metric=METRIC,
        mode="max",
        num_samples=options.num_samples or (2 if options.smoke_test else 4),
        max_concurrent_trials=max_concurrent,
        time_budget_s=options.time_budget,
    )


def build_tuner(
    options: SearchOptions,
    cfg: Config,
    storage: str,
    space_fn,
    max_concurrent: int | None = None,
    grace: int = 1,
    shared: dict | None = None,
):
    """A new ``Tuner`` for STORAGE/NAME, or with ``--resume`` the one restored from there; either way its
    study, ASHA and trials table attached to where the experiment is now (:mod:`ray_jobs.experiment`).

    ``shared``: the record of :func:`ray_jobs.shared_stages.prepare_shared_stages`; trials start from its
    ``checkpoint``. A resume of a search interrupted before Tune saved anything starts its Tuner afresh.
    """
    from ray import tune

    from ray_jobs.experiment import TrialsTableCallback, attach_experiment

    experiment = join(storage, options.name)
    # The trainable is built from the recorded config on resume (Tuner.restore keeps only its name).
    trainable = tune.with_parameters(
        train_trial_fn,
        base=cfg.to_dict(),
        scaling=trial_scaling(options),
        storage=join(experiment, "train_runs"),
        max_failures=options.max_failures,
        fail_at_epoch=options.fail_at_epoch,
        start_from=(shared or {}).get("checkpoint"),
        shared_epochs=(shared or {}).get("epochs", 0),
    )
    # A trial's driver only waits on its TorchTrainer: give it no CPU so the workers get them all.
    driver = {"memory": 100 * 1024**2}
    if options.driver_resource:
        driver[options.driver_resource] = 0.01
    trainable = tune.with_resources(trainable, driver)
    if options.resume and tune.Tuner.can_restore(experiment):
        logger.info("resuming experiment %s: finished trials are kept, unfinished ones continue", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
        attach_experiment(tuner, experiment)
        return tuner
    if options.resume:
        logger.info("experiment %s was stopped before its first trial: starting its trials now", experiment)
    tuner = tune.Tuner(
        trainable,
        tune_config=make_tune_config(options, cfg, space_fn, grace, max_concurrent),
        run_config=tune.RunConfig(
            name=options.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            callbacks=[TrialsTableCallback()],
            verbose=2
            if options.verbose
            else 1,  # 1: the trial status table; 2: every epoch's full result too
        ),
    )
    attach_experiment(tuner, experiment)
    return tuner


def default_max_concurrent(total: dict, options: SearchOptions) -> tuple[int, bool]:
    """``(cap, fits_now)``: the trials whose Train workers fit the cluster's resources at once, or, when not
    even one fits yet (GPU nodes still to come), :data:`PENDING_MAX_CONCURRENT` and False.

    Trial drivers hold no CPU, so without a cap Tune would start every trial and the surplus Train
    runs would wait for workers (and time out), each asking the autoscaler for more nodes.
    """
    need = {"CPU": options.workers_per_trial * options.cpus_per_worker}
    if options.gpus_per_trial:
        need["GPU"] = options.workers_per_trial * options.gpus_per_trial
    fits = min(int(total.get(key, 0) // amount) for key, amount in need.items() if amount > 0)
    return (fits, True) if fits else (PENDING_MAX_CONCURRENT, False)


def main(args: argparse.Namespace) -> int:
    """Run (or with ``--resume`` continue) the search; ``args`` from :func:`parse_args` (or a plain
    ``parse_args``, where every value other than a default counts as given on resume)."""
    setup_logging(args.verbose)
    try:
        with hold_folder(join(absolute(args.storage), args.name), "tune.py", args.force):  # one writer
            return run_search(options_from(SearchOptions, vars(args), set=tuple(args.set)))
    except JOB_ERRORS as exc:
        return job_failed(exc, args.verbose)


def run_search(options: SearchOptions) -> int:
    """Run (or with ``options.resume`` continue) the search STORAGE/NAME and write its trials table; the
    exit code (2: refused before any trial, naming why; 1: no trial finished without error)."""
    import pandas as pd

    storage = absolute(options.storage)
    experiment = join(storage, options.name)
    try:
        if options.resume:  # the experiment's own arguments and config; a conflicting value is an error
            values, recorded = resume_job_args(options.values(), get_args_parser(), experiment, "tune")
            cfg = Config.from_dict(recorded)
            # An experiment recorded before stages were shared goes on without them.
            if "share_stages" not in read_job_record(experiment)["args"]:
                values["share_stages"] = "off"
            options = options_from(SearchOptions, values, set=tuple(values["set"]), given=options.given)
        else:
            cfg = base_config(options)
        space_fn = load_space(options.space)
        searched = check_space(space_fn, cfg)
        share = plan_sharing(searched, cfg.train.max_epochs, options.share_stages)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    os.environ.setdefault(
        "TUNE_DISABLE_STRICT_METRIC_CHECKING", "1"
    )  # metrics arrive through Train's callback
    ray = init_ray_for_job(options.storage, options.data and cfg.data.shards)
    if ray is None:
        return 2
    if not workers_fit(
        ray, trial_scaling(options), "--workers-per-trial, --cpus-per-worker or --gpus-per-trial"
    ):
        return 2
    max_concurrent = options.max_concurrent
    if max_concurrent is None:
        max_concurrent, fits_now = default_max_concurrent(ray.cluster_resources(), options)
        if not fits_now:  # workers_fit warned: a cluster whose autoscaler may add nodes
            logger.info("up to %d trials at once once they fit (--max-concurrent sets it)", max_concurrent)
        else:
            logger.info("up to %d trials at once (what the cluster holds now; --max-concurrent sets it)",
                        max_concurrent)  # fmt: skip
    if not options.resume:  # before Tune writes anything: what --resume restores
        write_job_record(experiment, "tune", options.values(), cfg.to_dict())
    log_sharing(share)
    shared = prepare_shared_stages(
        experiment, cfg, share, scaling=trial_scaling(options), max_failures=options.max_failures
    )
    grace = grace_epochs(searched, cfg.train.max_epochs, share)
    logger.info("ASHA: no trial is stopped before global epoch %d (%s)", options.grace_epochs or grace,
                "--grace-epochs" if options.grace_epochs else "one epoch after every searched parameter acts")  # fmt: skip
    try:
        tuner = build_tuner(options, cfg, storage, space_fn, max_concurrent, grace, shared)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    from ichmodel.trials import TRIALS_FILE, trials_table

    results = tuner.fit()
    table = trials_table(results, storage)
    out = write_bytes(join(experiment, TRIALS_FILE), table.to_csv(index=False).encode())
    with pd.option_context("display.max_columns", 20, "display.width", 200):
        print(table.drop(columns=["checkpoint"]).to_string(index=False))
    print(f"\ntrials table: {out}")
    if table.empty or (table["status"] == "ERROR").all():
        logger.error("no trial finished without error")
        return 1
    return 0


def log_sharing(share: SharePlan) -> None:
    """Say which stages every trial shares, and loudly which searched parameters act later than alone."""
    if share.stages == 0:
        logger.info("shared stages: none (%s); every trial trains all stages", share.reason)
        return
    logger.info("shared stages: 1..%d trained once for all trials (--share-stages %s: %s)",
                share.stages, share.policy, share.reason)  # fmt: skip
    if share.deferred:
        logger.warning(
            "searched %s take the base config's values in the shared stages 1..%d and each trial's own values "
            "only from stage %d on (--share-stages exact or off: every value from where it acts)",
            ", ".join(share.deferred),
            share.stages,
            share.stages + 1,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with which options it gave (:func:`ray_jobs.job_record.parse_job_args`)."""
    return parse_job_args(get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
