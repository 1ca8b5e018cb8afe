"""The training engine without Ray: stage plan, learning-rate schedule, stage hand-over, resume, NaN steps."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from ichmodel import predict
from ichmodel.config import Config
from ichmodel.dataset import SeriesDataset, eval_batches, make_loader, split_series
from ichmodel.engine import (
    PRETRAIN_WEIGHTS,
    StepContext,
    TrainState,
    evaluate,
    fit,
    stage_plan,
    train_one_epoch,
)
from ichmodel.losses import build_loss
from ichmodel.model import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(demo_shards):
    shards = demo_shards[0]
    train_ids, val_ids = split_series(shards, 0.25, 0)
    cfg = Config().with_overrides(
        {"data.shards": str(shards), "data.val_fraction": 0.25, "train.max_epochs": [1, 1, 1]}
    )
    return cfg, SeriesDataset(shards, train_ids), SeriesDataset(shards, val_ids)


def test_stage_plan_follows_the_paper():
    cfg = Config().with_overrides({"loss.nu": 0.25, "train.max_epochs": [3, 4, 5]})
    plan = stage_plan(cfg)
    assert [s.strategies for s in plan] == [False, True, True]
    assert plan[0].weights == plan[1].weights == {"mc": 1.0, "ac": 1.0, "lp": 0.0, "dc": 0.0, "cpc": 0.0}
    assert plan[2].weights == {"mc": 1.0, "ac": 1.0, "lp": 1.0, "dc": 1.0, "cpc": 0.25}
    assert [s.max_epochs for s in plan] == [3, 4, 5]


def test_fit_runs_three_stages_and_resumes_from_a_checkpoint_at_the_same_place(data):
    cfg, train_set, val_set = data
    saved = []

    def keep(metrics, make_checkpoint):
        saved.append((metrics, make_checkpoint()))

    model, state = fit(cfg, train_set, val_set, CPU, on_epoch_end=keep)
    assert state.finished and state.global_epoch == 3
    assert [m["stage"] for m, _ in saved] == [0, 1, 2]
    assert saved[-1][0]["final_f2"] == pytest.approx(state.best_f2)
    assert 0.0 <= state.best_f2 <= 1.0

    # Resume after the first epoch: the remaining two stages run, numbering continues.
    after_first = saved[0][1]
    assert (after_first["stage"], after_first["epoch"]) == (1, 0)  # stage 0 finished at its cap
    resumed_epochs = []
    _, resumed = fit(
        cfg,
        train_set,
        val_set,
        CPU,
        resume=after_first,
        on_epoch_end=lambda m, _: resumed_epochs.append((m["stage"], m["global_epoch"])),
    )
    assert resumed_epochs == [(1, 2), (2, 3)]
    assert resumed.finished and len(resumed.history) == 3

    # A finished checkpoint resumes to nothing and returns the exported (best) weights.
    nothing = []
    final_model, final_state = fit(
        cfg, train_set, val_set, CPU, resume=saved[-1][1], on_epoch_end=lambda *a: nothing.append(a)
    )
    assert nothing == [] and final_state.finished
    for key, value in saved[-1][1]["best_model"].items():
        torch.testing.assert_close(final_model.state_dict()[key], value)


def test_learning_rate_halves_on_plateau_and_the_stage_ends_below_min_lr(data, demo_shards, caplog):
    cfg, train_set, _ = data
    # Validation on unlabelled series: the supervised losses are 0 every epoch, so after the first epoch
    # nothing improves; with patience 1 the third epoch halves lr to 0.75e-6 < min_lr, which ends the stage.
    unlabelled = SeriesDataset(demo_shards[1])
    cfg = cfg.with_overrides(
        {"train.lr": 1.5e-6, "train.min_lr": 1e-6, "train.lr_patience": 1, "train.max_epochs": [20, 0, 0]}
    )
    seen = []
    with caplog.at_level(logging.INFO, logger="ichmodel.engine"):
        _, state = fit(
            cfg, train_set, unlabelled, CPU, on_epoch_end=lambda m, _: seen.append((m["val_loss"], m["lr"]))
        )
    assert state.finished
    assert [loss for loss, _ in seen] == [0.0, 0.0, 0.0]
    assert [lr for _, lr in seen] == pytest.approx([1.5e-6, 1.5e-6, 0.75e-6])
    # The stage ended early, at its third epoch: the log says so, not the cap of 20.
    logged = [
        int(m.group(1)) for r in caplog.records if (m := re.match(r"stage pretrain epoch (\d+) ", r.message))
    ]
    assert logged == [1, 2, 3]


def test_next_stage_starts_from_the_best_weights_of_the_last(data):
    cfg, train_set, val_set = data
    cfg = cfg.with_overrides({"train.max_epochs": [2, 1, 0]})
    checkpoints = []
    fit(cfg, train_set, val_set, CPU, on_epoch_end=lambda m, make: checkpoints.append((m, make())))
    stage0 = [c for m, c in checkpoints if m["stage"] == 0]
    best_of_stage0 = stage0[-1]["best_model"]
    # The stage-1 run began from stage 0's best weights: resume at stage 1 start and compare.
    start_of_stage1 = stage0[-1]
    assert (start_of_stage1["stage"], start_of_stage1["epoch"]) == (1, 0)
    model = build_model(cfg.model)
    model.load_state_dict(start_of_stage1["best_model"])
    for key, value in best_of_stage0.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    best_losses = [m["val_loss"] for m, _ in checkpoints if m["stage"] == 0]
    assert start_of_stage1["best_val_loss"] == pytest.approx(min(best_losses))


def test_non_finite_losses_are_skipped_counted_and_end_the_run_when_too_many(data):
    cfg, train_set, val_set = data
    stage = stage_plan(cfg)[0]
    model = build_model(cfg.model)
    with torch.no_grad():
        model.cls.weight.fill_(float("nan"))  # every loss becomes NaN
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = eval_batches(len(train_set), 2)
    loss_fn = build_loss(cfg.loss, PRETRAIN_WEIGHTS)
    ctx = StepContext(
        model, loss_fn, optimizer, CPU, cfg, stage, None, torch.Generator().manual_seed(0), TrainState()
    )
    result = train_one_epoch(ctx, make_loader(train_set, batches, 0))
    assert result["train_skipped"] == len(batches) and result["train_steps"] == 0
    assert ctx.state.nonfinite_steps == len(batches)
    for key, value in model.named_parameters():  # no optimizer step happened (BN buffers may move)
        torch.testing.assert_close(value.detach(), before[key], equal_nan=True)

    strict = StepContext(
        model, loss_fn, optimizer, CPU, cfg.with_overrides({"train.max_nonfinite_steps": 2}), stage, None,
        torch.Generator().manual_seed(0), TrainState(),
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite losses"):
        train_one_epoch(strict, make_loader(train_set, batches, 0))


def test_evaluate_reports_f2_with_tuned_thresholds_at_least_as_good_as_fixed(data):
    cfg, _, val_set = data
    model = build_model(cfg.model)
    batches = eval_batches(len(val_set), 2)
    result = evaluate(model, build_loss(cfg.loss), make_loader(val_set, batches, 0), CPU)
    assert (
        result["probs"].shape
        == result["labels"].shape
        == (sum(val_set.num_slices(i) for i in range(len(val_set))), 5)
    )
    assert result["val_f2"] >= result["val_f2_at_threshold"]
    assert math.isfinite(result["val_loss"])


def test_validation_autocasts_only_when_train_amp_bf16_is_set(data, monkeypatch):
    """``evaluate`` used to run bf16 on CUDA whatever ``train.amp_bf16`` said; the engine now passes it on."""
    cfg, train_set, val_set = data
    asked = []
    real = predict.autocast

    def recording(device, amp_bf16):
        asked.append(amp_bf16)
        return real(device, amp_bf16)

    monkeypatch.setattr(predict, "autocast", recording)  # the evaluation forward's autocast decision
    for amp in (False, True):
        asked.clear()
        one_epoch = cfg.with_overrides({"train.amp_bf16": amp, "train.max_epochs": [1, 0, 0]})
        fit(one_epoch, train_set, val_set, CPU)
        assert asked and set(asked) == {amp}
