"""Which fields act in which stage (``ichmodel/stages.py``, checked against the engine), what a search
shares, ASHA's grace period, the search's Tune config, and the shared stages trained once
(``ray_jobs/shared_stages.py``). The shared stages of a real search: ``tests/test_tune_job.py``'s smoke test."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ichmodel import stages as SP
from ichmodel.config import Config
from ichmodel.dataset import SeriesDataset
from ichmodel.engine import fit
from ichmodel.splits import split_series
from ichmodel.stages import PRETRAIN_WEIGHTS, stage_plan

CPU = torch.device("cpu")
#: Another valid value of every field that the table says acts only from stage 2 or 3.
LATER_VALUES = {
    "model.transfer_grad": False,
    "loss.alpha": 0.5,
    "loss.beta": 0.3,
    "loss.gamma": 0.7,
    "loss.mu": 0.2,
    "loss.nu": 0.4,
    "loss.aux_scale": 0.9,
    "loss.cpc_score": "dot",
    "loss.cpc_temperature": 0.5,
    "loss.lp_class_weights": "none",
    "strategy.p1": 0.3,
    "strategy.p2": 0.35,
    "strategy.epsilon": 0.9,
    "strategy.pool_size": 7,
    "train.warmup_epochs": 2,
}
DEFAULT_DEFERRED = ("loss.gamma_neg", "loss.gamma_pos", "loss.soft_f2", "strategy.epsilon", "strategy.p1",
                    "strategy.p2", "train.warmup_epochs")  # fmt: skip


def _searched(space: str) -> list[str]:
    from ray_jobs.tune import check_space
    from search_spaces import load_space

    return check_space(load_space(space), Config())


def test_every_row_names_a_config_field_and_agrees_with_the_engines_stage_plan():
    fields = {f"{s}.{n}" for s, section in Config().to_dict().items() for n in section}
    assert set(SP.FIELD_STAGES) <= fields, set(SP.FIELD_STAGES) - fields
    assert SP.field_stage("model.no_such_field") == (SP.PRETRAIN, False)  # unlisted: the safe reading
    for recipe, first in (("paper", PRETRAIN_WEIGHTS), ("two_stage", SP.SLICE_WEIGHTS)):
        plan = stage_plan(
            Config().with_overrides({"loss.alpha": 3.0, "loss.nu": 0.0, "train.recipe": recipe})
        )
        # The first two stages run fixed weights: every weight's row says it acts from fine-tuning.
        assert plan[SP.PRETRAIN].weights == first and plan[SP.STRATEGIES].weights == PRETRAIN_WEIGHTS
        assert [s.strategies for s in plan] == [False, True, True]  # strategy.* rows: from stage 2
    assert {SP.field_stage(f"loss.{w}")[0] for w in ("alpha", "beta", "gamma", "mu", "nu")} == {SP.FINETUNE}
    assert {n for n, (stage, _) in SP.FIELD_STAGES.items() if stage > SP.PRETRAIN} == set(LATER_VALUES)


@pytest.mark.parametrize("recipe", ["paper", "two_stage"])
def test_fields_the_table_puts_in_later_stages_do_not_change_the_earlier_ones(demo_shards, recipe):
    """The engine, run: stage 1 trained with every later-stage field changed gives the same weights, and so do
    stages 1-2 with every fine-tuning field changed, in either recipe (two_stage's runs predict with the AC
    head, the one its slice stage trains, so a run of the slice stage alone is valid)."""
    shards = demo_shards[0]
    train_ids, val_ids = split_series(shards, 0.25, 0)
    train_set, val_set = SeriesDataset(shards, train_ids), SeriesDataset(shards, val_ids)
    base = Config().with_overrides(
        {
            "data.shards": str(shards),
            "data.val_fraction": 0.25,
            "data.max_slices": 6,
            "train.max_epochs": [1, 1, 0],
            "train.recipe": recipe,
            "model.prediction": "ac" if recipe == "two_stage" else "mc+ac",
        }
    )

    def weights_after_each_epoch(cfg: Config) -> list[dict]:
        saved = []

        def keep(metrics, make):  # copies: the checkpoint holds the live weights, which train on
            saved.append({k: v.clone() for k, v in make()["model"].items()})

        fit(cfg, train_set, val_set, CPU, on_epoch_end=keep)
        return saved

    reference = weights_after_each_epoch(base)
    later = {n: v for n, v in LATER_VALUES.items() if SP.field_stage(n)[0] >= SP.STRATEGIES}
    (stage1,) = weights_after_each_epoch(base.with_overrides({**later, "train.max_epochs": [1, 0, 0]}))
    finetune = {n: v for n, v in LATER_VALUES.items() if SP.field_stage(n)[0] == SP.FINETUNE}
    stages12 = weights_after_each_epoch(base.with_overrides(finetune))
    assert len(reference) == len(stages12) == 2
    for key, value in reference[0].items():
        assert torch.equal(stage1[key], value), key
    for key, value in reference[1].items():
        assert torch.equal(stages12[1][key], value), key


def test_what_the_built_in_spaces_share():
    caps = (2, 2, 4)
    default = _searched("default")
    auto = SP.plan_sharing(default, caps, "auto")
    assert (auto.stages, auto.deferred) == (2, DEFAULT_DEFERRED)  # pretraining once, these act from stage 3
    assert SP.plan_sharing(default, caps, "exact").stages == 0  # γ± act from stage 1
    assert SP.plan_sharing(default, caps, "off").stages == 0
    for policy in ("auto", "exact"):  # loss weights act only in fine-tuning: stages 1-2 shared exactly
        share = SP.plan_sharing(_searched("loss_weights"), caps, policy)
        assert (share.stages, share.deferred) == (2, ())
    strategies = _searched("strategies")
    assert SP.plan_sharing(strategies, caps, "exact").stages == 1
    assert SP.plan_sharing(strategies, caps, "auto").deferred == (
        "strategy.epsilon",
        "strategy.p1",
        "strategy.p2",
    )
    # Searching the recipe: what stage 1 trains differs between trials, so nothing is shared.
    recipes = _searched("recipes")
    assert set(recipes) == {*default, "train.recipe"}
    share = SP.plan_sharing(recipes, caps, "auto")
    assert (share.stages, share.deferred) == (0, ()) and "train.recipe" in share.reason
    # A searched field that cannot change under a run (the model's shape) falls back to exact sharing.
    fixed = SP.plan_sharing(["model.feature_dim", "loss.alpha"], caps, "auto")
    assert (fixed.stages, fixed.deferred) == (0, ()) and "model.feature_dim" in fixed.reason
    assert SP.plan_sharing(["loss.alpha"], (0, 0, 4), "auto").stages == 0  # nothing to train once
    with pytest.raises(ValueError, match="share policy must be one of"):
        SP.plan_sharing(["loss.alpha"], caps, "always")


def test_asha_grace_ends_one_epoch_after_every_searched_parameter_acts():
    caps = (2, 2, 4)
    default = _searched("default")
    for policy in ("auto", "off"):  # α, β, γ, μ, ν act from fine-tuning (global epoch 5) either way
        assert SP.grace_epochs(default, caps, SP.plan_sharing(default, caps, policy)) == 5
    strategies = _searched("strategies")
    assert SP.grace_epochs(strategies, caps, SP.plan_sharing(strategies, caps, "exact")) == 3
    assert SP.grace_epochs(strategies, caps, SP.plan_sharing(strategies, caps, "auto")) == 5  # deferred
    assert SP.grace_epochs(["loss.gamma_neg"], caps, SP.plan_sharing(["loss.gamma_neg"], caps, "off")) == 1
    assert SP.grace_epochs(["loss.alpha"], (1, 1, 0), SP.plan_sharing([], (1, 1, 0), "off")) == 2  # ≤ total


def test_asha_stops_no_trial_before_the_grace_epoch():
    from ray.tune.schedulers import TrialScheduler

    from ray_jobs.experiment import ExperimentASHA

    asha = ExperimentASHA(time_attr="global_epoch", max_t=8, grace_period=5, metric="model_f2", mode="max")
    trials = [SimpleNamespace(trial_id=t) for t in "abcd"]
    for trial in trials:
        asha.on_trial_add(None, trial)
    decisions = {}
    for epoch in range(3, 6):  # trials start after the shared stages (global epoch 3)
        for trial, f2 in zip(trials, (0.9, 0.1, 0.05, 0.01), strict=True):
            decisions[trial.trial_id, epoch] = asha.on_trial_result(
                None, trial, {"global_epoch": epoch, "model_f2": f2}
            )
    assert all(d == TrialScheduler.CONTINUE for (_, epoch), d in decisions.items() if epoch < 5)
    assert decisions["a", 5] == TrialScheduler.CONTINUE and decisions["d", 5] == TrialScheduler.STOP


def test_shared_key_depends_only_on_what_the_shared_stages_read():
    base = Config().with_overrides({"train.max_epochs": [2, 2, 4]})
    share = SP.plan_sharing(["loss.alpha"], base.train.max_epochs, "exact")
    shared = SP.shared_config(base, share)
    assert shared.train.max_epochs == (2, 2, 0)
    key = SP.shared_key(shared, 2)
    assert key.startswith("stages2-")
    assert SP.shared_key(shared.with_overrides({"loss.alpha": 3.0, "train.max_epochs": [2, 2, 9]}), 2) == key
    assert SP.shared_key(shared.with_overrides({"train.lr": 0.01}), 2) != key
    assert SP.shared_key(shared.with_overrides({"strategy.p1": 0.3}), 2) != key  # read in stage 2
    assert SP.shared_key(shared.with_overrides({"strategy.p1": 0.3}), 1) == SP.shared_key(shared, 1)


def _tune_args(*argv: str):
    from ray_jobs import tune
    from ray_jobs.job_record import options_from

    args = tune.parse_args(["--data", "/tmp/shards", "--storage", "/tmp/runs", *argv])
    return options_from(tune.SearchOptions, vars(args), set=tuple(args.set))


@pytest.mark.parametrize(("max_concurrent", "liar"), [(None, True), (3, True), (1, False)])
def test_tune_config_has_constant_liar_when_concurrent_the_grace_and_the_time_budget(max_concurrent, liar):
    from ray_jobs import tune

    args = _tune_args("--time-budget", "90")
    tune_config = tune.make_tune_config(args, Config(), lambda t: {}, 5, max_concurrent)
    assert tune_config.time_budget_s == 90 and tune_config.max_concurrent_trials == max_concurrent
    assert tune_config.search_alg._sampler._constant_liar is liar
    assert tune_config.scheduler._brackets[0]._rungs[-1][0] == 5  # the first rung: the grace epoch
    assert tune.make_tune_config(_tune_args(), Config(), lambda t: {}, 5, 1).time_budget_s is None
    grace_given = tune.make_tune_config(_tune_args("--grace-epochs", "2"), Config(), lambda t: {}, 5, 1)
    assert grace_given.scheduler._brackets[0]._rungs[-1][0] == 2


def test_shared_stages_found_trained_are_not_trained_again_and_the_decision_is_recorded(
    tmp_path, monkeypatch
):
    from ray_jobs import shared_stages

    base = Config().with_overrides({"train.max_epochs": [1, 2, 3]})
    share = SP.plan_sharing(["loss.alpha"], base.train.max_epochs, "auto")
    key, checkpoint = shared_stages.shared_checkpoint(str(tmp_path), base, share)
    assert checkpoint == str(tmp_path / "shared" / f"{key}.pt")
    (tmp_path / "shared").mkdir()
    torch.save({"stage": 2, "stage_started": False, "finished": False, "global_epoch": 3}, checkpoint)

    def no_training(*args, **kwargs):
        raise AssertionError("the shared stages were trained again")

    monkeypatch.setattr(shared_stages, "build_trainer", no_training)
    record = shared_stages.prepare_shared_stages(str(tmp_path), base, share, scaling={}, max_failures=0)
    assert (record["checkpoint"], record["epochs"]) == (checkpoint, 3)
    assert json.loads((tmp_path / "shared_stages.json").read_text())["plan"] == share.to_dict()
    # A checkpoint that does not end the shared stages is refused, naming it.
    torch.save({"stage": 1, "stage_started": True, "finished": False, "global_epoch": 2}, checkpoint)
    with pytest.raises(RuntimeError, match="should stand at the start of stage 3"):
        shared_stages.prepare_shared_stages(str(tmp_path), base, share, scaling={}, max_failures=0)
    # --epochs 1,0,3: after stage 1 the run stands at stage 2, which has no epoch: that ends them too.
    no_stage2 = base.with_overrides({"train.max_epochs": [1, 0, 3]})
    share2 = SP.plan_sharing(["loss.alpha"], no_stage2.train.max_epochs, "auto")
    _, checkpoint2 = shared_stages.shared_checkpoint(str(tmp_path), no_stage2, share2)
    torch.save({"stage": 1, "stage_started": False, "finished": False, "global_epoch": 1}, checkpoint2)
    record = shared_stages.prepare_shared_stages(str(tmp_path), no_stage2, share2, scaling={}, max_failures=0)
    assert record["epochs"] == 1
    off = SP.plan_sharing(["loss.alpha"], base.train.max_epochs, "off")
    assert shared_stages.prepare_shared_stages(str(tmp_path), base, off, scaling={}, max_failures=0) == {
        "plan": off.to_dict()
    }


def test_a_missing_start_checkpoint_is_named(tmp_path):
    from ray_jobs.worker import load_start_checkpoint

    with pytest.raises(FileNotFoundError, match=f"No checkpoint to start from at {tmp_path}/none.pt"):
        load_start_checkpoint(str(tmp_path / "none.pt"))
