"""Training engine without Ray: run state and resume, the stages of one run, and the run.

:func:`fit` runs (or continues) the three stages of :func:`ichmodel.stages.stage_plan`. Each stage starts a
fresh AdamW (warmed up linearly over its first ``train.warmup_epochs`` epochs in a stage that adds tasks to
trained weights, stage 3, whose new heads start random: :func:`ichmodel.stages.warmup_epochs`), halves the
learning rate when the selection metric (``train.select_metric``: validation MC loss, micro-F2 or total
loss) has not improved for ``lr_patience`` epochs (``ReduceLROnPlateau``), and ends when the learning rate
falls below ``min_lr`` or at the stage's epoch cap (:func:`ichmodel.stages.stage_done`). One best checkpoint
is kept over the whole run: a stage that does not beat the earlier stages' best keeps the earlier weights,
and every stage starts from the best weights so far. (With "loss", whose meaning changes between stages, the
best is compared within a stage only.) At each stage's start every enabled task's share of the backbone's
gradient is logged and put in that epoch's metrics.

Distributed data parallel is used when ``torch.distributed`` is initialised (as Ray Train does): every rank
trains on its own slice of the series (:mod:`ichmodel.batches`, padded so ranks take equal steps), validates
its own unpadded slice of the validation series, and the validation predictions are gathered so that every
rank takes the same learning-rate and stage decisions.

Layout: :func:`fit` → :func:`run_stage` (optimizer, epochs until the stage ends) → :func:`run_epoch` (train
on this epoch's batches, validate) → :func:`ichmodel.train_step.train_one_epoch` (steps) and
:func:`ichmodel.validation.evaluate`. Selection of the best weights (:func:`keep_if_best`) is one function;
the stage rules live in ``ichmodel.stages``, the diversity-transfer pool in ``ichmodel.strategies``,
batches in ``ichmodel.batches``, the evaluation forward in ``ichmodel.predict``, checkpoints in
``ichmodel.checkpoint``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ichmodel.augment import normalize
from ichmodel.batches import EpochBatches, eval_batches
from ichmodel.checkpoint import checkpoint_dict
from ichmodel.config import Config
from ichmodel.dataset import (
    SeriesDataset,
    class_prevalence,
    make_loader,
    prepare_images,
    series_labels,
    training_batches,
)
from ichmodel.diagnostics import format_shares, gradient_shares
from ichmodel.feature_cache import CachedBatches, FeatureCache, cache_pool, cache_series
from ichmodel.losses import build_loss
from ichmodel.model import ICHModel, build_model, init_class_bias
from ichmodel.rng_state import capture_rng_state, restore_rng_state
from ichmodel.slice_batches import SliceBatches
from ichmodel.stages import (
    Stage,
    TrainState,
    check_prediction_trained,
    every_head_trains,
    next_stage,
    stage_done,
    stage_plan,
    warmup_epochs,
)
from ichmodel.strategies import TransferPoolImages, build_pool_images
from ichmodel.train_step import StepContext, add_warmup, freeze_backbone, make_optimizer, train_one_epoch
from ichmodel.validation import epoch_metrics, evaluate, selection_score, warn_scarce_classes

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the stages of one :func:`fit` call share."""

    cfg: Config
    net: ICHModel  # the bare model (whose weights are saved)
    model: nn.Module  # ``net``, DDP-wrapped under DDP
    device: torch.device
    train_set: SeriesDataset
    val_set: SeriesDataset
    rank: int
    world: int
    pool: TransferPoolImages | None
    state: TrainState
    best_model: dict[str, torch.Tensor] | None
    prevalence: np.ndarray | None = None  # training share of each class: thresholds where validation has none
    batches: EpochBatches | None = None  # this rank's training batches, set to each epoch in turn
    train_loader: DataLoader | None = None  # built once per run: persistent workers when data.num_workers > 0
    val_loader: DataLoader | None = None
    features: FeatureCache | None = None  # the frozen backbone's features, once a stage trains on them


def state_from_checkpoint(ckpt: dict[str, Any]) -> TrainState:
    """The training state stored at the top level of a checkpoint (``ichmodel.checkpoint``).

    A field the checkpoint lacks (one written before the field existed) takes its default.
    """
    defaults = TrainState()
    return TrainState(**{f.name: ckpt.get(f.name, getattr(defaults, f.name)) for f in fields(TrainState)})


def resume_state(net: nn.Module, resume: dict[str, Any] | None) -> tuple[TrainState, dict | None]:
    """Load a checkpoint's weights into ``net``; returns its ``(state, best_model)`` (fresh ones without)."""
    if resume is None:
        return TrainState(), None
    net.load_state_dict(resume["model"])
    state = state_from_checkpoint(resume)
    if state.finished:
        logger.info(
            "this run already finished all stages (global epoch %d): nothing to train", state.global_epoch
        )
    else:
        logger.info(
            "resuming at stage %d epoch %d (global epoch %d)",
            state.stage + 1,
            state.epoch,
            state.global_epoch,
        )
    return state, resume["best_model"]


def epoch_batches(run: RunContext) -> EpochBatches:
    """This rank's training batches (one for the run) set to the epoch: its order and the series' crops."""
    if run.batches is None:
        run.batches = rank_batches(run, run.rank)
    run.batches.set_epoch(run.state.global_epoch)
    return run.batches


def rank_batches(run: RunContext, rank: int) -> EpochBatches:
    """Training batches of ``rank`` (:func:`ichmodel.dataset.training_batches`, ``data.shuffle_window``)."""
    data, seed = run.cfg.data, run.cfg.train.seed
    return training_batches(run.train_set, data.batch_size, seed, rank, run.world, window=data.shuffle_window)


def feature_cache(run: RunContext) -> FeatureCache:
    """The frozen backbone's features of the training and this rank's validation series and the transfer
    pool, computed once, leaving the random state as it was (a resumed run computes them again)."""
    if run.features is None:
        with torch.random.fork_rng(devices=[]):
            run.features = _compute_features(run)
    return run.features


def _compute_features(run: RunContext) -> FeatureCache:
    cfg, started = run.cfg, time.perf_counter()
    batch, workers, amp = cfg.data.batch_size, cfg.data.num_workers, cfg.train.amp_bf16
    train = cache_series(
        run.net, run.train_set, eval_batches(len(run.train_set), batch), run.device, amp, workers
    )
    val_batches = eval_batches(len(run.val_set), batch, run.rank, run.world)
    val = cache_series(run.net, run.val_set, val_batches, run.device, amp, workers)
    features = FeatureCache(train, val, cache_pool(run.net, run.pool, run.device))
    logger.info(
        "frozen backbone: features of %d training and %d validation series cached in %.1f s",
        len(train.features),
        len(val.features),
        time.perf_counter() - started,
    )
    return features


def rank_slice_counts(run: RunContext) -> list[int]:
    """The slices each rank's training batches hold this epoch (after ``data.max_slices`` crops)."""
    cap, counts = run.cfg.data.max_slices or 10**9, []
    for rank in range(run.world):
        batches = rank_batches(run, rank)
        batches.set_epoch(run.state.global_epoch)
        counts.append(sum(min(run.train_set.num_slices(i), cap) for b in batches for i, _ in b))
    return counts


def steps_per_epoch(run: RunContext) -> int:
    """Optimizer steps of one epoch on this rank (every rank takes the same number, in every epoch)."""
    return len(epoch_batches(run))


def start_stage(
    run: RunContext, plan: list[Stage], resume: dict[str, Any] | None
) -> tuple[torch.optim.Optimizer, Any, int]:
    """A fresh AdamW + ``ReduceLROnPlateau`` for the current stage, or theirs from ``resume`` mid-stage.

    A stage that starts afresh begins from the best weights so far (with ``select_metric`` "loss", or after
    a slice stage, it also forgets the best score: see below). Returns the optimizer, the
    scheduler (mode "max" on :func:`selection_score`) and the stage's warm-up epochs (0 unless the stage adds
    a task's head to weights an earlier stage trained: :func:`ichmodel.stages.adds_heads`).
    """
    cfg, state = run.cfg, run.state
    optimizer = make_optimizer(run.net, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.train.lr_factor, patience=cfg.train.lr_patience
    )
    warmup = warmup_epochs(cfg, plan, state)
    if state.stage_started and resume is not None:
        if resume.get("scheduler"):
            scheduler.load_state_dict(resume["scheduler"])
        if resume.get("optimizer"):
            optimizer.load_state_dict(resume["optimizer"])
        else:  # a pruned checkpoint (the fallback when the newest is unreadable): fresh moments, saved lr
            saved = (resume.get("scheduler") or {}).get("_last_lr") or [cfg.train.lr]
            for group, lr in zip(optimizer.param_groups, saved, strict=False):
                group["lr"] = float(lr)
            logger.warning("the checkpoint holds no optimizer state: a fresh AdamW at lr %.2e", saved[0])
    else:
        if run.best_model is not None:  # the next stage starts from the best weights so far
            run.net.load_state_dict(run.best_model)
        state.stage_started = True
        # Forget the best score where the earlier best cannot be the export: totals of different stages do
        # not compare ("loss"), and a slice stage's weights carry an untrained sequence model (its score
        # is its AC head's alone), so the first stage after it exports its own best epoch.
        earlier = [s for s in plan[: state.stage] if s.max_epochs > 0]
        first_after_slices = bool(earlier) and all(s.slices for s in earlier)
        if cfg.train.select_metric == "loss" or first_after_slices:
            state.best_score = -math.inf
    if state.epoch < warmup:
        per_epoch = steps_per_epoch(run)
        add_warmup(optimizer, cfg.train.lr, warmup * per_epoch, state.epoch * per_epoch)
    return optimizer, scheduler, warmup


def keep_if_best(run: RunContext, val: dict[str, Any]) -> bool:
    """Keep the weights, F2 and thresholds when this epoch beats the best selection score; True if kept."""
    state = run.state
    score = selection_score(run.cfg.train.select_metric, val)
    if score > state.best_score:
        state.best_score = score
        run.best_model = {k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()}
        state.best_f2 = float(val["val_f2"])
        state.thresholds = val["thresholds"]
        return True
    return False


def stage_grad_shares(run: RunContext, loss_fn: nn.Module) -> dict[str, float]:
    """Each enabled task's share of ``layer4``'s gradient norm on this stage's first training batch.

    Logged and returned as ``{"grad_share_<task>": share}`` (:func:`ichmodel.diagnostics.gradient_shares`,
    without augmentation or strategies; under DDP each rank measures its own first batch).
    """
    batch = next(iter(make_loader(run.train_set, [next(iter(epoch_batches(run)))], 0)))
    on_device = {
        "images": normalize(prepare_images(batch, run.device)),
        "lengths": batch["lengths"],
        "labels": batch["labels"].to(run.device),
        "valid": batch["valid"].to(run.device),
    }
    result = gradient_shares(run.net, loss_fn, on_device)
    logger.info("gradient shares on layer4 at the stage's start: %s", format_shares(result))
    return {f"grad_share_{task}": share for task, share in result["share"].items()}


def _log_epoch(stage: Stage, metrics: dict[str, Any]) -> None:
    logger.info(
        "stage %s epoch %d (global %d): train loss %.4f, val loss %.4f (MC %.4f), val F2 %.4f, "
        "model F2 %.4f, lr %.2e, %.1f slices/s",
        stage.name,
        metrics["stage_epoch"],
        metrics["global_epoch"],
        metrics.get("train_loss", float("nan")),
        metrics["val_loss"],
        metrics.get("val_mc", float("nan")),
        metrics["val_f2"],
        metrics["model_f2"],
        metrics["lr"],
        metrics["train_slices_per_s"],
    )


def run_epoch(
    run: RunContext,
    ctx: StepContext,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train one epoch on this rank's batches, then validate on the unpadded validation split."""
    cfg, state = run.cfg, run.state
    seed = cfg.train.seed * 1_000_003 + state.global_epoch
    ctx.generator = torch.Generator().manual_seed(seed * 31 + run.rank)  # augmentation and strategies
    if run.world > 1:  # each rank's own stream (dropout), the same after a resume (only rank 0's is saved)
        torch.manual_seed(seed * 31 + run.rank + 7)
    batches = epoch_batches(run)
    if run.train_loader is None:  # one loader (and one set of workers) for every epoch of the run
        workers_seed = torch.Generator().manual_seed(cfg.train.seed * 31 + run.rank)  # same after a resume
        run.train_loader = make_loader(run.train_set, batches, cfg.data.num_workers, workers_seed)
    loader, val_loader = run.train_loader, run.val_loader
    if ctx.stage.frozen_backbone:  # the cached features of the frozen backbone, in this epoch's batches
        cache = feature_cache(run)
        loader = CachedBatches(cache.train, [[i for i, _ in b] for b in batches])
        val_loader = CachedBatches(
            cache.val, eval_batches(len(run.val_set), cfg.data.batch_size, run.rank, run.world)
        )
    if ctx.stage.slices:  # the slice stage: shuffled batches of single slices from the series batches
        counts = rank_slice_counts(run)
        steps = (
            max(1, min(counts) // cfg.train.slice_batch) if run.world > 1 else None
        )  # equal steps on every rank
        loader = SliceBatches(
            loader, cfg.train.slice_batch, ctx.generator, counts[run.rank], max_batches=steps
        )
    train = train_one_epoch(ctx, loader, progress)
    if val_loader is None:
        val_batches = eval_batches(len(run.val_set), cfg.data.batch_size, run.rank, run.world)
        run.val_loader = val_loader = make_loader(run.val_set, val_batches, cfg.data.num_workers)
    val = evaluate(
        run.model,
        ctx.loss_fn,
        val_loader,
        run.device,
        cfg.train.threshold,
        cfg.train.amp_bf16,
        run.prevalence,
        prediction="ac" if ctx.stage.slices else None,  # the sequence heads have not trained yet
    )
    return {"train": train, "val": val}


def run_stage(
    run: RunContext,
    plan: list[Stage],
    resume: dict[str, Any] | None,
    on_epoch_end: Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None] | None,
    progress: Callable[[int, int, float], None] | None,
) -> None:
    """Epochs of the current stage until it ends; then the state points at the next stage."""
    cfg, state = run.cfg, run.state
    stage = plan[state.stage]
    fresh = not state.stage_started
    optimizer, scheduler, warmup = start_stage(run, plan, resume)
    loss_fn = build_loss(cfg.loss, weights_override=stage.weights)
    ctx = StepContext(
        run.model, loss_fn, optimizer, run.device, cfg, stage, run.pool, torch.Generator(), state
    )
    if stage.frozen_backbone:  # after start_stage: the cache holds the weights this stage starts from
        ctx.pool_features = feature_cache(run).pool
    logger.info(
        "stage %d/%d %s: weights %s, strategies %s, lr warm-up %d epoch(s)",
        stage.index + 1,
        len(plan),
        stage.name,
        stage.weights,
        stage.strategies,
        warmup,
    )
    measure = fresh and not (stage.slices or stage.frozen_backbone)  # both: the full model's loss only
    shares = stage_grad_shares(run, loss_fn) if measure else {}
    done = False
    while not done:
        started = time.perf_counter()
        result = run_epoch(run, ctx, progress)
        state.epoch += 1
        state.global_epoch += 1
        if state.epoch > warmup:  # the plateau counts from the end of the warm-up
            scheduler.step(selection_score(cfg.train.select_metric, result["val"]))
        keep_if_best(run, result["val"])
        lr = optimizer.param_groups[0]["lr"]
        done = stage_done(cfg, stage, state, lr)
        seconds = time.perf_counter() - started
        metrics = epoch_metrics(result["val"], result["train"], stage, state, lr, seconds)
        metrics.update(shares)
        shares = {}
        if done:
            next_stage(state, plan)
        # The run ends here also when every stage left has no epoch (--epochs 1,0,0): report it as finished.
        ends = state.finished or not any(s.max_epochs > 0 for s in plan[state.stage :])
        if ends:
            metrics["final_f2"] = state.best_f2
        metrics["finished"] = ends
        state.history.append({k: float(v) for k, v in metrics.items()})
        _log_epoch(stage, metrics)
        if on_epoch_end is not None:
            make = partial(
                checkpoint_dict,
                run.model,
                cfg,
                state,
                optimizer=optimizer,
                scheduler=scheduler,
                best_model=run.best_model,
                rng=capture_rng_state(),
            )
            on_epoch_end(metrics, make)


def fit(
    cfg: Config,
    train_set: SeriesDataset,
    val_set: SeriesDataset,
    device: torch.device,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[ICHModel, TrainState]:
    """Run (or continue) the three stages; returns the model with the exported (best) weights.

    ``on_epoch_end(metrics, make_checkpoint)`` is called after every epoch on every rank; calling
    ``make_checkpoint()`` builds the checkpoint dict (the caller decides where, and on which rank, to
    write it). ``resume`` is such a checkpoint dict: training continues at its stage and epoch.
    """
    check_prediction_trained(cfg)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(cfg.train.seed)
    net = build_model(cfg.model).to(device)
    train_labels = series_labels(train_set)  # read once: prevalence and the transfer pool both need them
    prevalence = class_prevalence(train_set, train_labels)
    if prevalence is not None and cfg.train.init_cls_bias and resume is None:
        init_class_bias(net, prevalence)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    state, best_model = resume_state(net, resume)
    plan = stage_plan(cfg)
    pool = None
    if not state.finished and any(s.strategies and s.max_epochs > 0 for s in plan[state.stage :]):
        pool = build_pool_images(train_set, cfg.strategy.pool_size, cfg.train.seed, train_labels)
    run = RunContext(
        cfg, net, net, device, train_set, val_set, rank, world, pool, state, best_model, prevalence
    )
    if not state.finished and rank == 0:
        warn_scarce_classes(val_set)
    if resume is not None and resume.get("rng") is not None:  # the draws go on as they would have
        restore_rng_state(resume["rng"])
    while not state.finished and state.stage < len(plan):
        if plan[state.stage].max_epochs == 0:
            next_stage(state, plan)
            continue
        freeze_backbone(net, plan[state.stage].frozen_backbone)  # before DDP, which skips frozen weights
        if distributed:
            run.model = wrap_ddp(net, device, plan[state.stage], cfg)
        run_stage(run, plan, resume, on_epoch_end, progress)
        resume = None  # only the first stage run continues the checkpoint's optimizer
    freeze_backbone(net, False)
    if run.best_model is not None:
        net.load_state_dict(run.best_model)
    return net, state


def wrap_ddp(net: ICHModel, device: torch.device, stage: Stage, cfg: Config) -> nn.Module:
    """``net`` in DDP for one stage; ``find_unused_parameters`` (an extra graph walk each step) only where
    the stage leaves a head out of the loss."""
    find_unused = not every_head_trains(stage, cfg)
    logger.info("stage %s: DDP find_unused_parameters=%s", stage.name, find_unused)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
