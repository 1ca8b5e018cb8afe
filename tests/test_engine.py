"""The training engine without Ray: stage plan, learning-rate schedule and warm-up, stage hand-over, selection of
the best weights across stages, gradient shares, thresholds, resume, NaN steps."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ichmodel import engine, predict
from ichmodel.batches import eval_batches
from ichmodel.config import Config
from ichmodel.dataset import SeriesDataset, class_prevalence, make_loader
from ichmodel.engine import fit, state_from_checkpoint
from ichmodel.losses import build_loss
from ichmodel.metrics import fallback_thresholds
from ichmodel.model import build_model
from ichmodel.splits import split_series
from ichmodel.stages import (
    PRETRAIN_WEIGHTS,
    TrainState,
    adds_heads,
    check_prediction_trained,
    every_head_trains,
    stage_plan,
)
from ichmodel.train_step import StepContext, add_warmup, train_one_epoch
from ichmodel.validation import evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(demo_shards):
    """The config of the engine's stage-flow tests: the paper's recipe, where every stage trains the whole
    model on series batches (the two_stage recipe's own flow has its tests below)."""
    shards = demo_shards[0]
    train_ids, val_ids = split_series(shards, 0.25, 0)
    cfg = Config().with_overrides(
        {"data.shards": str(shards), "data.val_fraction": 0.25, "train.max_epochs": [1, 1, 1],
         "train.recipe": "paper"}
    )  # fmt: skip
    return cfg, SeriesDataset(shards, train_ids), SeriesDataset(shards, val_ids)


@pytest.fixture(scope="module")
def two_series(data) -> SeriesDataset:
    """Two of the training series (one step per epoch): for the tests of the stage flow, selection, resume
    and validation, which check neither what a step learns nor how many steps an epoch has."""
    train_set = data[1]
    return SeriesDataset(train_set.shard_dir, train_set.series_ids[:2])


@dataclass
class FourEpochRun:
    """One ``fit`` over stages of 2, 1 and 1 epochs, watched: what two tests check of the same run."""

    cfg: Config
    train_set: SeriesDataset
    lrs: list[tuple[int, float]]  # (stage, lr) after every optimizer step
    history: list[dict]  # the metrics of every epoch
    checkpoints: list[tuple[dict, dict]]  # (metrics, checkpoint fields the tests read) of every epoch
    records: list[logging.LogRecord]  # warnings logged during the run


@pytest.fixture(scope="module")
def four_epoch_run(data) -> FourEpochRun:
    """``fit`` at the defaults (lr 1e-3, one warm-up epoch, select on F2) with caps 2,1,1, run once for the
    module: stage 0 runs two epochs (hand-over and gradient shares at a stage's start only), stage 2 adds
    heads."""
    cfg, train_set, val_set = data
    cfg = cfg.with_overrides({"train.max_epochs": [2, 1, 1], "train.warmup_epochs": 1, "train.lr": 1e-3})
    run = FourEpochRun(cfg, train_set, [], [], [], [])
    real = engine.train_one_epoch

    def recording(ctx, loader, progress=None):
        handle = ctx.optimizer.register_step_post_hook(
            lambda opt, *_: run.lrs.append((ctx.stage.index, opt.param_groups[0]["lr"]))
        )
        try:
            return real(ctx, loader, progress)
        finally:
            handle.remove()

    def keep(metrics, make_checkpoint):
        checkpoint = make_checkpoint()
        run.history.append(metrics)
        run.checkpoints.append(
            (metrics, {k: checkpoint[k] for k in ("stage", "epoch", "best_model", "best_score")})
        )

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            run.records.append(record)

    root, handler = logging.getLogger(), Keep(logging.WARNING)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # as caplog.at_level(logging.WARNING)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "train_one_epoch", recording)
            fit(cfg, train_set, val_set, CPU, on_epoch_end=keep)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return run


def test_stage_plan_follows_the_paper():
    cfg = Config().with_overrides({"loss.nu": 0.25, "train.max_epochs": [3, 4, 5], "train.recipe": "paper"})
    plan = stage_plan(cfg)
    assert [s.strategies for s in plan] == [False, True, True]
    assert plan[0].weights == plan[1].weights == {"mc": 1.0, "ac": 1.0, "lp": 0.0, "dc": 0.0, "cpc": 0.0}
    assert plan[2].weights == {"mc": 1.0, "ac": 1.0, "lp": 1.0, "dc": 1.0, "cpc": 0.25}
    assert [s.max_epochs for s in plan] == [3, 4, 5]
    assert not any(s.slices or s.frozen_backbone for s in plan)


def test_two_stage_plan_trains_slices_first_then_the_paper_stages_on_the_frozen_backbone():
    cfg = Config().with_overrides(
        {"loss.nu": 0.25, "train.max_epochs": [3, 4, 5], "train.recipe": "two_stage"}
    )
    plan = stage_plan(cfg)
    assert [(s.slices, s.frozen_backbone, s.strategies) for s in plan] == [
        (True, False, False),
        (False, True, True),
        (False, True, True),
    ]
    assert plan[0].weights == {"mc": 0.0, "ac": 1.0, "lp": 0.0, "dc": 0.0, "cpc": 0.0}
    assert plan[1].weights == PRETRAIN_WEIGHTS
    assert plan[2].weights == {"mc": 1.0, "ac": 1.0, "lp": 1.0, "dc": 1.0, "cpc": 0.25}
    assert [s.max_epochs for s in plan] == [3, 4, 5]


def test_fit_runs_three_stages_and_resumes_from_a_checkpoint_at_the_same_place(data, two_series):
    cfg, _, val_set = data
    train_set = two_series
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


def test_learning_rate_halves_on_plateau_and_the_stage_ends_below_min_lr(
    data, two_series, demo_shards, caplog
):
    cfg, train_set, _ = data
    train_set = two_series
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


def test_next_stage_starts_from_the_best_weights_of_the_last(four_epoch_run):
    cfg, checkpoints = four_epoch_run.cfg, four_epoch_run.checkpoints
    stage0 = [c for m, c in checkpoints if m["stage"] == 0]
    best_of_stage0 = stage0[-1]["best_model"]
    # The stage-1 run began from stage 0's best weights: resume at stage 1 start and compare.
    start_of_stage1 = stage0[-1]
    assert (start_of_stage1["stage"], start_of_stage1["epoch"]) == (1, 0)
    model = build_model(cfg.model)
    model.load_state_dict(start_of_stage1["best_model"])
    for key, value in best_of_stage0.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    best_f2 = [m["val_f2"] for m, _ in checkpoints if m["stage"] == 0]  # train.select_metric = "f2"
    assert start_of_stage1["best_score"] == pytest.approx(max(best_f2))


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
        model, loss_fn, optimizer, CPU,
        cfg.with_overrides({"train.max_nonfinite_steps": 2, "train.log_every": 1}), stage, None,
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


def test_validation_autocasts_only_when_train_amp_bf16_is_set(data, two_series, monkeypatch):
    """``evaluate`` used to run bf16 on CUDA whatever ``train.amp_bf16`` said; the engine now passes it on."""
    cfg, train_set, val_set = data
    train_set = two_series
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


def scripted_validation(monkeypatch, key: str, values: list[float]) -> None:
    """Make epoch i's validation report ``values[i]`` as ``key`` (the rest is the real evaluation)."""
    real, it = engine.evaluate, iter(values)

    def scripted(*args, **kwargs):
        result = real(*args, **kwargs)
        result[key] = next(it)
        return result

    monkeypatch.setattr(engine, "evaluate", scripted)


def keep_weights(saved: list):
    """An ``on_epoch_end`` that keeps each epoch's metrics, last and best weights (copied: the checkpoint's
    last weights are the live tensors, which the end of ``fit`` overwrites with the best)."""

    def keep(metrics, make_checkpoint):
        ckpt = make_checkpoint()
        last = {k: v.clone() for k, v in ckpt["model"].items()}
        saved.append((metrics, {**ckpt, "model": last}))

    return keep


@pytest.mark.parametrize("metric", ["mc_loss", "f2"])
def test_a_stage_that_does_not_beat_the_earlier_best_keeps_the_earlier_weights(
    data, two_series, monkeypatch, metric
):
    """Before: only the last stage's best was exported, even when an earlier stage's was better."""
    cfg, _, val_set = data
    train_set = two_series
    cfg = cfg.with_overrides({"train.select_metric": metric, "train.max_epochs": [1, 0, 1]})
    key, values = ("val_mc", [0.5, 0.9]) if metric == "mc_loss" else ("val_f2", [0.6, 0.2])
    scripted_validation(monkeypatch, key, values)  # stage 0 is best, stage 2 is worse
    saved = []
    model, state = fit(cfg, train_set, val_set, CPU, on_epoch_end=keep_weights(saved))
    first_best = saved[0][1]["best_model"]
    for _, ckpt in saved[1:]:  # later stages trained (their last weights moved) but kept stage 0's best
        assert not torch.equal(ckpt["model"]["cls.weight"], first_best["cls.weight"])
        for key_, value in first_best.items():
            torch.testing.assert_close(ckpt["best_model"][key_], value)
    for key_, value in first_best.items():  # the exported model is stage 0's
        torch.testing.assert_close(model.state_dict()[key_], value)
    assert [m["model_f2"] for m, _ in saved] == [saved[0][0]["val_f2"]] * 2 == [state.best_f2] * 2


def test_select_metric_loss_compares_within_a_stage_only(data, two_series, monkeypatch):
    """Total losses of different stages do not compare: with "loss" the last stage's best is exported."""
    cfg, _, val_set = data
    train_set = two_series
    cfg = cfg.with_overrides({"train.select_metric": "loss", "train.max_epochs": [1, 0, 1]})
    scripted_validation(monkeypatch, "val_loss", [0.5, 0.9])
    saved = []
    model, _ = fit(cfg, train_set, val_set, CPU, on_epoch_end=keep_weights(saved))
    assert [ckpt["best_score"] for _, ckpt in saved] == pytest.approx([-0.5, -0.9])
    for key, value in saved[-1][1]["model"].items():  # stage 2's only epoch is its best
        torch.testing.assert_close(model.state_dict()[key], value)


def test_warmup_raises_the_lr_linearly_then_leaves_it_alone():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.3)
    seen = []
    optimizer.register_step_post_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    add_warmup(optimizer, lr=0.3, total=3, done=1)  # resumed after one warm-up step
    for _ in range(3):
        optimizer.step()
        if len(seen) == 2:
            optimizer.param_groups[0]["lr"] = 0.1  # e.g. ReduceLROnPlateau: the hook must not undo it
    assert seen == pytest.approx([0.2, 0.3, 0.1])


def test_a_stage_that_adds_heads_warms_up_and_every_stage_logs_its_gradient_shares(four_epoch_run):
    """Stage 2 adds no head (same tasks, plus masking and DT): full learning rate; stage 3 adds LP, DC and
    CPC to trained weights: warmed up."""
    cfg, lrs, history, records = (
        four_epoch_run.cfg,
        four_epoch_run.lrs,
        four_epoch_run.history,
        four_epoch_run.records,
    )
    scarce = [r.getMessage() for r in records if "positive series in validation" in r.getMessage()]
    assert scarce and len(scarce) == len(set(scarce))  # once per class per run, not at every epoch
    assert not [r for r in records if r.name == "ichmodel.metrics"]
    steps = math.ceil(len(four_epoch_run.train_set) / cfg.data.batch_size)
    assert [lr for stage, lr in lrs if stage == 0] == pytest.approx([1e-3] * 2 * steps)  # nothing handed over
    assert [lr for stage, lr in lrs if stage == 1] == pytest.approx([1e-3] * steps)  # no new head
    assert [lr for stage, lr in lrs if stage == 2] == pytest.approx(
        [1e-3 * k / steps for k in range(1, steps + 1)]
    )
    assert history[-1]["lr"] == pytest.approx(1e-3)

    shares = [
        {k[len("grad_share_") :]: v for k, v in m.items() if k.startswith("grad_share_")} for m in history
    ]
    assert set(shares[0]) == {"mc", "ac"} and shares[1] == {}  # at each stage's start only
    assert set(shares[2]) == {"mc", "ac"} and set(shares[3]) == {"mc", "ac", "lp", "dc", "cpc"}
    for first in (shares[0], shares[2], shares[3]):
        assert sum(first.values()) == pytest.approx(1.0, abs=1e-6)
        assert all(0.0 <= v <= 1.0 for v in first.values())


def test_thresholds_fall_back_to_training_prevalence(data):
    cfg, train_set, val_set = data
    prevalence = class_prevalence(train_set)
    assert prevalence.shape == (5,) and np.all((prevalence >= 0) & (prevalence <= 1))
    np.testing.assert_allclose(fallback_thresholds(prevalence), np.clip(prevalence, 0.02, 0.98))
    model = build_model(cfg.model)
    result = evaluate(model, build_loss(cfg.loss), make_loader(val_set, eval_batches(len(val_set), 2), 0), CPU,
                      prevalence=np.full(5, 0.3))  # fmt: skip
    absent = ~(result["labels"] > 0).any(0)
    assert absent.any()  # the demo's validation split lacks some classes
    # Such a class is predicted on about the training share (30 %) of the validation slices, not on all.
    for c in np.flatnonzero(absent):
        share = (result["probs"][:, c] >= result["thresholds"][c]).mean()
        assert 0.15 <= share <= 0.45, (c, share)


def test_cls_bias_starts_at_the_log_odds_of_the_training_prevalence(data):
    cfg, train_set, val_set = data
    with_prior = {"train.max_epochs": [0, 0, 0], "train.init_cls_bias": True}
    model, _ = fit(cfg.with_overrides(with_prior), train_set, val_set, CPU)
    p = np.clip(class_prevalence(train_set), 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(model.cls.bias.detach().numpy(), np.log(p / (1 - p)), rtol=1e-5)
    plain, _ = fit(
        cfg.with_overrides({"train.max_epochs": [0, 0, 0], "train.init_cls_bias": False}),
        train_set,
        val_set,
        CPU,
    )
    assert not np.allclose(plain.cls.bias.detach().numpy(), np.log(p / (1 - p)))


def test_a_checkpoint_from_before_a_state_field_existed_resumes_with_its_default():
    old = {**TrainState(stage=1, best_f2=0.3).__dict__}
    del old["best_score"]
    old["best_val_loss"] = 0.2  # the field best_score replaced
    state = state_from_checkpoint(old)
    assert state.stage == 1 and state.best_f2 == 0.3 and state.best_score == -math.inf


def test_ddp_looks_for_unused_parameters_only_in_stages_that_leave_a_head_out():
    """DDP's find_unused_parameters walks the graph every step: needed in stages 1-2 (LP, DC, CPC heads idle)
    and where a weight of 0 drops a task, not in a fine-tuning stage that trains all five."""
    cfg = Config().with_overrides({"train.max_epochs": [1, 1, 1]})
    assert [every_head_trains(s, cfg) for s in stage_plan(cfg)] == [False, False, True]
    for dropped in ({"loss.nu": 0.0}, {"loss.beta": 0.0}, {"loss.aux_scale": 0.0}):
        cfg_dropped = cfg.with_overrides(dropped)
        assert not every_head_trains(stage_plan(cfg_dropped)[2], cfg_dropped), dropped


def test_only_a_stage_that_adds_a_task_to_trained_weights_adds_heads():
    paper = {"train.recipe": "paper"}
    plan = stage_plan(Config().with_overrides({"train.max_epochs": [1, 1, 1], **paper}))
    assert [adds_heads(plan, TrainState(stage=i)) for i in range(3)] == [False, False, True]
    mc_only = stage_plan(Config().with_overrides({"train.max_epochs": [0, 0, 4], **paper}))
    assert not adds_heads(mc_only, TrainState(stage=2))  # nothing trained before: no hand-over
    # two_stage: the slice stage trains AC alone, so the GRU's MC joins in stage 2 (warmed up there)
    two_stage = stage_plan(
        Config().with_overrides({"train.max_epochs": [1, 1, 1], "train.recipe": "two_stage"})
    )
    assert [adds_heads(two_stage, TrainState(stage=i)) for i in range(3)] == [False, True, True]


def test_mc_plus_ac_prediction_is_refused_when_no_stage_trains_ac(data):
    cfg, train_set, val_set = data
    mc_only = cfg.with_overrides({"train.max_epochs": [0, 0, 1], "loss.beta": 0.0})
    with pytest.raises(ValueError, match="model.prediction=mc"):
        fit(mc_only.with_overrides({"model.prediction": "mc+ac"}), train_set, val_set, CPU)


def test_two_stage_recipe_trains_the_backbone_per_slice_then_only_the_sequence_heads(data, two_series):
    """``train.recipe = "two_stage"``: stage 1 changes the backbone and the classifier but not the GRU, on
    shuffled batches of ``train.slice_batch`` single slices; stages 2-3 train the GRU on the backbone's cached
    features and leave its weights and BatchNorm statistics exactly as stage 1 ended."""
    cfg, train_set, val_set = data
    cfg = cfg.with_overrides(
        {"train.recipe": "two_stage", "train.slice_batch": 8, "train.max_epochs": [1, 1, 1]}
    )
    snapshots, steps, batch_sizes, kinds = [], [], [], []
    real = engine.train_one_epoch

    def watched(ctx, loader, progress=None):
        batch_sizes.append([int(b["lengths"].sum()) for b in loader] if ctx.stage.slices else None)
        kinds.append({key for b in loader for key in ("images", "features") if key in b})
        result = real(ctx, loader, progress)
        steps.append(result["train_steps"])
        snapshots.append({k: v.detach().clone() for k, v in predict.unwrap(ctx.model).state_dict().items()})
        return result

    torch.manual_seed(0)
    start = {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}
    engine.train_one_epoch = watched
    try:
        net, state = fit(cfg, train_set, val_set, CPU)
    finally:
        engine.train_one_epoch = real
    assert state.finished and [h["stage"] for h in state.history] == [0, 1, 2]

    slices = sum(train_set.num_slices(i) for i in range(len(train_set)))
    assert sum(batch_sizes[0]) == slices and max(batch_sizes[0]) == 8  # every slice once, 8 per step
    assert steps[0] == len(batch_sizes[0]) > len(train_set)  # more steps than series batches

    def changed(a, b, prefix):
        return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]

    assert changed(start, snapshots[0], "backbone.") and changed(start, snapshots[0], "cls.")
    assert not changed(start, snapshots[0], "rnn."), "the slice stage must not touch the GRU"
    for later in snapshots[1:]:
        assert not changed(snapshots[0], later, "backbone."), "weights or BatchNorm statistics moved"
    assert changed(snapshots[0], snapshots[1], "rnn.")
    assert kinds == [{"images"}, {"features"}, {"features"}]  # stages 2-3 read the cached features
    # the export has a trained sequence model: the best of stages 2-3, even where stage 1 scored higher
    assert state.best_f2 == max(h["val_f2"] for h in state.history[1:])
    assert all(p.requires_grad for p in net.parameters())  # nothing stays frozen after the run


def test_a_two_stage_run_of_the_slice_stage_alone_must_predict_with_its_own_head(data):
    cfg = data[0].with_overrides({"train.recipe": "two_stage", "train.max_epochs": [1, 0, 0]})
    with pytest.raises(ValueError, match="model.prediction=ac"):
        check_prediction_trained(cfg)
    check_prediction_trained(cfg.with_overrides({"model.prediction": "ac"}))
