"""Training engine without Ray: the three-stage plan, epochs, validation and resume.

The stage plan follows the paper's section 3.3:

1. pretraining, α = β = 1, γ = μ = ν = 0, no masking or diversity transfer;
2. pretraining, same weights, masking + diversity transfer;
3. fine-tuning with the configured weights (``cfg.loss``; the paper uses all ones), masking + DT.

Each stage starts a fresh AdamW (warmed up linearly over its first ``train.warmup_epochs`` epochs in a stage
that adds tasks to trained weights, stage 3, whose new heads start random), halves the learning rate when the
selection metric (``train.select_metric``: validation MC loss, micro-F2 or total loss) has not improved for
``lr_patience`` epochs (``ReduceLROnPlateau``), and ends when the learning rate falls below ``min_lr`` or at
the stage's epoch cap. One best checkpoint is kept over the whole run: a stage that does not beat the earlier
stages' best keeps the earlier weights, and every stage starts from the best weights so far. (With "loss",
whose meaning changes between stages, the best is compared within a stage only.) At each stage's start every
enabled task's share of the backbone's gradient is logged and put in that epoch's metrics.

Distributed data parallel is used when ``torch.distributed`` is initialised (as Ray Train does): every rank
trains on its own slice of the series (``DistributedSampler``, padded so ranks take equal steps), validates
its own unpadded slice of the validation series, and the validation predictions are gathered so that every
rank takes the same learning-rate and stage decisions.

Layout: :func:`fit` → :func:`run_stage` (optimizer, epochs until the stage ends) → :func:`run_epoch` (train
on this epoch's batches, validate) → :func:`train_one_epoch` (steps, :class:`StepContext`). Selection of the
best weights (:func:`keep_if_best`), the end of a stage (:func:`stage_done`) and the per-epoch record
(:func:`epoch_metrics`) are one function each. Batching lives in ``ichmodel.dataset``, the evaluation
forward in ``ichmodel.predict``, checkpoints in ``ichmodel.checkpoint``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ichmodel import metrics as M
from ichmodel import predict
from ichmodel.augment import augment_series, normalize, reverse_series, to_float
from ichmodel.checkpoint import checkpoint_dict
from ichmodel.config import Config
from ichmodel.constants import CLASSES
from ichmodel.dataset import (
    EpochBatches,
    SeriesDataset,
    class_prevalence,
    eval_batches,
    make_loader,
    prepare_images,
    series_labels,
)
from ichmodel.diagnostics import format_shares, gradient_shares
from ichmodel.losses import build_loss
from ichmodel.model import ICHModel, build_model, slice_probs
from ichmodel.predict import autocast
from ichmodel.strategies import build_transfer_pool, make_transfer_batch, plan_strategies, transfer_labels

logger = logging.getLogger(__name__)

PRETRAIN_WEIGHTS = {"mc": 1.0, "ac": 1.0, "lp": 0.0, "dc": 0.0, "cpc": 0.0}
STAGE_NAMES = ("pretrain", "pretrain+strategies", "finetune")


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    weights: dict[str, float]
    strategies: bool
    max_epochs: int


def stage_plan(cfg: Config) -> list[Stage]:
    """The paper's three stages with the epoch caps of ``cfg.train.max_epochs``."""
    caps = cfg.train.max_epochs
    return [
        Stage(0, STAGE_NAMES[0], dict(PRETRAIN_WEIGHTS), False, int(caps[0])),
        Stage(1, STAGE_NAMES[1], dict(PRETRAIN_WEIGHTS), True, int(caps[1])),
        Stage(2, STAGE_NAMES[2], cfg.loss.weights(), True, int(caps[2])),
    ]


@dataclass
class TrainState:
    """Where a run stands; every field is a top-level key of the checkpoint (``ichmodel.checkpoint``)."""

    stage: int = 0
    epoch: int = 0  # epochs finished in the current stage
    global_epoch: int = 0  # epochs finished over all stages
    stage_started: bool = False  # optimizer/scheduler of the current stage exist
    #: selection score of best_model (train.select_metric, higher is better: −loss or F2); over the whole
    #: run, except with "loss", where it is reset at each stage's start
    best_score: float = -math.inf
    best_f2: float = -1.0  # validation F2 of best_model
    thresholds: list[float] = field(default_factory=lambda: [0.5] * 5)  # tuned with best_model
    nonfinite_steps: int = 0  # skipped steps over the whole run
    finished: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TransferPoolImages:
    """Diversity-transfer pairs held in memory: ``images`` uint8 ``[P, 2, C, H, W]``, ``classes`` ``[P]``."""

    images: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        return int(self.classes.numel())


# ------------------------------------------------------------------------------------- transfer pool


def build_pool_images(
    dataset: SeriesDataset, pool_size: int, seed: int, labels: list[np.ndarray] | None = None
) -> TransferPoolImages | None:
    """Sample up to ``pool_size`` diversity-transfer pairs from ``dataset`` and load their images.

    Pairs follow the paper's conditions (adjacent slices, the second has exactly one more label).
    Keeping a bounded sample in memory makes a DT step cost one backbone pass over ``2 × pairs`` extra
    images instead of reading series from disk inside the training step. Returns ``None`` when the
    training labels hold no such pair. ``labels``: the dataset's :func:`series_labels`, if already read.
    """
    pool = build_transfer_pool(series_labels(dataset) if labels is None else labels)
    if not pool or pool_size == 0:
        logger.info("diversity transfer pool is empty: DT will not change any sequence")
        return None
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pool), size=min(pool_size, len(pool)), replace=False)
    by_series: dict[int, list[int]] = {}
    for i in sorted(chosen.tolist()):
        by_series.setdefault(pool[i].series_index, []).append(i)
    images, classes = [], []
    for series, pair_ids in by_series.items():
        series_images = dataset[series]["images"]  # [T, C, H, W] uint8
        for i in pair_ids:
            pos = pool[i].position
            images.append(series_images[pos : pos + 2])
            classes.append(pool[i].added_class)
    logger.info("diversity transfer pool: %d pairs found, %d kept in memory", len(pool), len(images))
    return TransferPoolImages(torch.stack(images), torch.tensor(classes, dtype=torch.long))


# --------------------------------------------------------------------------------------------- epochs


@dataclass
class StepContext:
    """What every training step of one stage needs; ``generator`` is replaced at the start of each epoch."""

    model: nn.Module  # DDP-wrapped under DDP
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    cfg: Config
    stage: Stage
    pool: TransferPoolImages | None
    generator: torch.Generator
    state: TrainState  # its nonfinite_steps counts skipped steps


def make_optimizer(net: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the fused kernel, whose ``found_inf`` input skips a step on the device (no host read)."""
    return torch.optim.AdamW(
        net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True
    )


def _nonfinite_flag(loss: torch.Tensor) -> torch.Tensor:
    """float ``[]`` on the loss's device: 1 when the loss is not finite on any rank (DDP), else 0.

    Stays on the device: the optimizer skips the step through it and the counters add it up, so a step
    never waits to learn whether it was finite.
    """
    flag = (~torch.isfinite(loss.detach())).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def _pool_on_device(ctx: StepContext) -> torch.Tensor | None:
    """Normalised pool images ``[P, 2, C, H, W]`` on the device when the stage uses diversity transfer."""
    if not ctx.stage.strategies or ctx.pool is None:
        return None
    pool_images = normalize(to_float(ctx.pool.images.to(ctx.device)))
    return pool_images.contiguous() if ctx.cfg.train.channels_last else pool_images


def step_loss(
    ctx: StepContext, batch: dict[str, Any], pool_images: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Augment, plan masking / diversity transfer, run the model and return the loss parts of one batch."""
    cfg, device = ctx.cfg, ctx.device
    images = normalize(augment_series(prepare_images(batch, device), cfg.augment, ctx.generator))
    images, labels = reverse_series(
        images, batch["labels"].to(device), batch["lengths"], cfg.augment, ctx.generator
    )
    transfer = mask = None
    if ctx.stage.strategies:
        plan = plan_strategies(
            batch["lengths"],
            cfg.strategy.p1,
            cfg.strategy.p2,
            cfg.strategy.epsilon,
            len(ctx.pool) if ctx.pool is not None else 0,
            ctx.generator,
        )
        mask = plan.mask  # host, like the whole plan: the model copies what it needs to the device
        if pool_images is not None and ctx.pool is not None:
            transfer = make_transfer_batch(plan, pool_images, ctx.pool.classes)
            labels = transfer_labels(labels, transfer.slot, transfer.pair_classes)
    with autocast(device, cfg.train.amp_bf16):
        outputs = ctx.model(images, batch["lengths"], transfer=transfer, mask=mask)
    outputs = {
        k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()
    }
    return ctx.loss_fn(outputs, labels, batch["valid"].to(device))


@dataclass
class EpochCounters:
    """Loss sums and skip counters of one epoch, kept on the device and read every ``log_every`` steps.

    ``sums`` holds, per loss part, the sum over the finite steps; ``skipped`` the non-finite steps;
    ``run`` the current run of consecutive non-finite steps and ``longest`` its maximum since the last read.
    """

    keys: list[str] = field(default_factory=list)
    sums: torch.Tensor | None = None
    skipped: torch.Tensor | None = None
    run: torch.Tensor | None = None
    longest: torch.Tensor | None = None
    read_skipped: int = 0  # ``skipped`` at the last read

    def add(self, parts: dict[str, torch.Tensor], bad: torch.Tensor) -> None:
        if self.sums is None:
            self.keys = list(parts)
            self.sums = torch.zeros(len(self.keys), device=bad.device)
            self.skipped, self.run, self.longest = (torch.zeros((), device=bad.device) for _ in range(3))
        values = torch.stack([parts[k].detach().float() for k in self.keys])
        self.sums += torch.where(bad > 0, torch.zeros_like(values), values)
        self.skipped += bad
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)

    def read(self) -> tuple[dict[str, float], int, int]:
        """One device → host copy: ``(sums by part, skipped steps, longest non-finite run)``; resets the run max."""
        if self.sums is None:
            return {}, 0, 0
        host = torch.cat([self.sums, torch.stack([self.skipped, self.longest])]).tolist()
        self.longest = self.run.clone()
        return dict(zip(self.keys, host[:-2], strict=True)), int(host[-2]), int(host[-1])


def _check_nonfinite(ctx: StepContext, counters: EpochCounters, step: int) -> dict[str, float]:
    """Read the counters; warn about steps skipped since the last read and stop after too many in a row.

    Raises:
        FloatingPointError: when ``cfg.train.max_nonfinite_steps`` consecutive steps were not finite.
    """
    sums, skipped, longest = counters.read()
    new = skipped - counters.read_skipped
    counters.read_skipped = skipped
    if new:
        ctx.state.nonfinite_steps += new
        logger.warning(
            "non-finite loss in %d of the steps up to step %d of stage %s: those steps were skipped",
            new,
            step,
            ctx.stage.name,
        )
    if longest >= ctx.cfg.train.max_nonfinite_steps:
        raise FloatingPointError(
            f"{longest} consecutive non-finite losses in stage {ctx.stage.name!r} up to step {step}; "
            "lower train.lr or check the data"
        )
    return sums


def optimizer_step(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """Step unless ``bad`` (float ``[]``) is 1: on the device for a fused optimizer, else by reading it."""
    if not optimizer.defaults.get("fused"):
        if not bool(bad):  # one device → host read per step: build the optimizer with make_optimizer
            optimizer.step()
        return
    optimizer.found_inf = bad  # the fused step leaves the weights and its own state as they are when 1
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def _report(
    ctx: StepContext,
    counters: EpochCounters,
    step: int,
    num_batches: int,
    progress: Callable[[int, int, float], None] | None,
) -> dict[str, float]:
    """Read the counters (:func:`_check_nonfinite`) and call ``progress`` with the mean loss so far."""
    sums = _check_nonfinite(ctx, counters, step)
    if progress is not None:
        progress(step, num_batches, sums.get("loss", 0.0) / max(step - counters.read_skipped, 1))
    return sums


def train_one_epoch(
    ctx: StepContext,
    loader: Iterable[dict[str, Any]],
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss parts, slices/s and skipped (non-finite) steps.

    A step reads nothing back from the device: a non-finite loss skips its optimizer step through the fused
    AdamW's ``found_inf`` input, and the loss parts and skip counters add up on the device. They are read
    every ``cfg.train.log_every`` steps and at the end: ``progress(step, num_batches, mean loss so far)`` is
    called then, and so are the warning about skipped steps and the stop below.

    Raises:
        FloatingPointError: after ``cfg.train.max_nonfinite_steps`` consecutive non-finite losses (noticed at
            the next read, so up to ``log_every`` steps later).
    """
    ctx.model.train()
    pool_images = _pool_on_device(ctx)
    counters = EpochCounters()
    slices = steps = 0
    start = time.perf_counter()
    num_batches = len(loader)  # type: ignore[arg-type]
    for step, batch in enumerate(loader, start=1):
        parts = step_loss(ctx, batch, pool_images)
        bad = _nonfinite_flag(parts["loss"])
        ctx.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer_step(ctx.optimizer, bad)
        counters.add(parts, bad)
        steps += 1
        slices += int(batch["lengths"].sum())  # host tensor: no sync
        if step % ctx.cfg.train.log_every == 0 and step < num_batches:
            _report(ctx, counters, step, num_batches, progress)
    sums = _report(ctx, counters, steps, num_batches, progress)
    finite = steps - counters.read_skipped
    elapsed = time.perf_counter() - start
    result = {f"train_{k}": v / max(finite, 1) for k, v in sums.items()}
    result.update(
        train_steps=finite,
        train_skipped=counters.read_skipped,
        train_slices_per_s=slices / max(elapsed, 1e-9),
    )
    return result


# ----------------------------------------------------------------------------------------- validation


def _gather(local: Any) -> list[Any]:
    """``local`` of every rank (just ``[local]`` without DDP); ranks may hold different amounts."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return gathered
    return [local]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    threshold: float = 0.5,
    amp_bf16: bool = False,
    prevalence: np.ndarray | None = None,
) -> dict[str, Any]:
    """Validation loss parts, micro-F2 at ``threshold`` and at thresholds tuned on these predictions.

    The forward is :func:`ichmodel.predict.eval_outputs` (bf16 autocast on CUDA only when ``amp_bf16``).
    Under DDP each rank evaluates its own series (:func:`ichmodel.dataset.eval_batches`: no series twice)
    and the results are gathered, so every rank returns the same numbers. ``probs`` / ``labels``
    (``[N, 5]`` numpy, valid slices only) are in the result too. Thresholds are searched with ties broken
    to the middle and, for a class without a positive here, :func:`ichmodel.metrics.fallback_thresholds` of the training
    ``prevalence`` (``[5]``); :func:`fit` warns once about classes with few positive series.
    """
    sums: dict[str, float] = {}
    weight = 0.0
    probs, labels, groups = [], [], []
    for batch, outputs in predict.predict_batches(model, loader, device, amp_bf16):
        valid = batch["valid"].to(device)
        parts = loss_fn(outputs, batch["labels"].to(device), valid)
        n = float(valid.sum())
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        weight += n
        keep = valid.cpu()
        probs.append(slice_probs(outputs, predict.unwrap(model).cfg.prediction).cpu()[keep].numpy())
        labels.append(batch["labels"][keep].numpy())
        groups.extend(sid for sid, n in zip(batch["series_ids"], keep.sum(1).tolist(), strict=True)
                      for _ in range(n))  # fmt: skip
    gathered = _gather((sums, weight, probs, labels, groups))
    total_weight = sum(g[1] for g in gathered)
    keys = {k: None for g in gathered for k in g[0]}  # ordered union: a rank may have had no series
    result: dict[str, Any] = {
        f"val_{k}": sum(g[0].get(k, 0.0) for g in gathered) / max(total_weight, 1.0) for k in keys
    }
    y_prob = np.concatenate([p for g in gathered for p in g[2]]) if total_weight else np.zeros((0, 5))
    y_true = np.concatenate([p for g in gathered for p in g[3]]) if total_weight else np.zeros((0, 5))
    series = np.asarray([s for g in gathered for s in g[4]])
    result.update(_score(y_prob, (y_true > 0.5).astype(np.int8), threshold, prevalence, series))
    return result


def _score(
    y_prob: np.ndarray,
    y_true: np.ndarray,
    threshold: float,
    prevalence: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """F2 at ``threshold`` and at per-class thresholds tuned on these predictions."""
    fallback = None if prevalence is None else M.fallback_thresholds(prevalence, y_prob)
    thresholds = M.search_thresholds(y_true, y_prob, fallback=fallback, min_positives=0, groups=groups)
    tuned = y_prob >= np.asarray(thresholds)
    result: dict[str, Any] = {
        "val_f2_at_threshold": M.f2_score(y_true, y_prob >= threshold),
        "val_f2": M.f2_score(y_true, tuned),
    }
    for name, value in zip(CLASSES, M.per_class_f2(y_true, tuned), strict=True):
        result[f"val_f2_{name}"] = float(value)
    result["thresholds"] = [float(t) for t in thresholds]
    result["probs"], result["labels"] = y_prob, y_true
    return result


# --------------------------------------------------------------------------------------------- stages


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


def init_class_bias(net: ICHModel, prevalence: np.ndarray) -> None:
    """Set ``cls``'s bias to the log-odds of ``prevalence`` (``train.init_cls_bias``).

    With a zero bias every class starts at probability 0.5, and ASL spends the first epochs pushing the
    many negatives down before any class is told apart (see ``TrainConfig.init_cls_bias``).
    """
    p = np.clip(np.asarray(prevalence, dtype=np.float64), 1e-3, 1 - 1e-3)
    with torch.no_grad():
        net.cls.bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=net.cls.bias.dtype))


def warn_scarce_classes(val_set: SeriesDataset, min_positives: int = 3) -> dict[str, int]:
    """Log once per run the classes with fewer than ``min_positives`` positive validation series."""
    labels = series_labels(val_set)
    if not labels:
        return {}
    per_series = np.stack([(lab > 0).any(0) for lab in labels]).astype(np.int8)  # [S, 5]
    scarce = M.scarce_classes(per_series, min_positives)
    for name, count in scarce.items():
        logger.warning(
            "class %s has %d positive series in validation (< %d): its tuned threshold and F2 %s",
            name,
            count,
            min_positives,
            "use the training-prevalence fallback" if count == 0 else "rest on little evidence",
        )
    return scarce


def selection_score(metric: str, val: dict[str, Any]) -> float:
    """The validation score ``train.select_metric`` ranks epochs by, higher is better (−loss or F2)."""
    if metric == "f2":
        return float(val["val_f2"])
    return -float(val["val_mc" if metric == "mc_loss" else "val_loss"])


def epoch_batches(run: RunContext) -> EpochBatches:
    """This rank's training batches (:class:`ichmodel.dataset.EpochBatches`, one for the run) set to the
    current epoch: its order and the series' random crops."""
    cfg, state = run.cfg, run.state
    if run.batches is None:
        run.batches = EpochBatches(
            len(run.train_set), cfg.data.batch_size, cfg.train.seed, run.rank, run.world
        )
    run.batches.set_epoch(state.global_epoch)
    return run.batches


def steps_per_epoch(run: RunContext) -> int:
    """Optimizer steps of one epoch on this rank (every rank takes the same number, in every epoch)."""
    return len(epoch_batches(run))


def add_warmup(optimizer: torch.optim.Optimizer, lr: float, total: int, done: int = 0) -> Any:
    """Raise the learning rate linearly to ``lr`` over the first ``total`` steps (``done`` already taken).

    Step ``k`` (0-based) runs at ``lr · (k + 1) / total``; from step ``total`` on the hook leaves the rate
    to the scheduler. Returns the hook's handle (``.remove()``).
    """
    taken = [done]

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if taken[0] < total:
            for group in opt.param_groups:
                group["lr"] = lr * (taken[0] + 1) / total
        taken[0] += 1

    return optimizer.register_step_pre_hook(hook)


def adds_heads(plan: list[Stage], state: TrainState) -> bool:
    """Whether the current stage hands trained weights to a task no earlier stage trained (its head is new).

    Stage 2 keeps stage 1's tasks (it adds masking and diversity transfer, no head); stage 3 adds LP, DC and
    CPC. A run whose first trained stage is this one hands nothing over.
    """
    earlier = [s for s in plan[: state.stage] if s.max_epochs > 0]
    if not earlier:
        return False
    trained = {task for s in earlier for task, weight in s.weights.items() if weight > 0}
    return any(weight > 0 and task not in trained for task, weight in plan[state.stage].weights.items())


def start_stage(
    run: RunContext, plan: list[Stage], resume: dict[str, Any] | None
) -> tuple[torch.optim.Optimizer, Any, int]:
    """A fresh AdamW + ``ReduceLROnPlateau`` for the current stage, or theirs from ``resume`` mid-stage.

    A stage that starts afresh begins from the best weights so far (with ``select_metric`` "loss" it also
    forgets the best score: totals of different stages do not compare). Returns the optimizer, the
    scheduler (mode "max" on :func:`selection_score`) and the stage's warm-up epochs (0 unless the stage adds
    a task's head to weights an earlier stage trained: :func:`adds_heads`).
    """
    cfg, state = run.cfg, run.state
    optimizer = make_optimizer(run.net, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.train.lr_factor, patience=cfg.train.lr_patience
    )
    warmup = cfg.train.warmup_epochs if adds_heads(plan, state) else 0
    if state.stage_started and resume is not None and resume.get("optimizer"):
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    else:
        if run.best_model is not None:  # the next stage starts from the best weights so far
            run.net.load_state_dict(run.best_model)
        state.stage_started = True
        if cfg.train.select_metric == "loss":
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


def stage_done(cfg: Config, stage: Stage, state: TrainState, lr: float) -> bool:
    """A stage ends when the learning rate fell below ``min_lr`` or at its epoch cap."""
    return lr < cfg.train.min_lr or state.epoch >= stage.max_epochs


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


def epoch_metrics(
    val: dict[str, Any], train: dict[str, float], stage: Stage, state: TrainState, lr: float, seconds: float
) -> dict[str, Any]:
    """The flat per-epoch record handed to ``on_epoch_end`` (and kept in ``state.history``)."""
    metrics = {k: v for k, v in val.items() if k not in ("probs", "labels", "thresholds")}
    metrics.update(train)
    metrics.update(
        stage=stage.index,
        stage_epoch=state.epoch,
        global_epoch=state.global_epoch,
        lr=lr,
        epoch_s=seconds,
        nonfinite_steps=state.nonfinite_steps,
        model_f2=state.best_f2,  # validation F2 of the weights this checkpoint exports
        model_score=state.best_score,  # their selection score (train.select_metric, higher is better)
    )
    return metrics


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
    batches = epoch_batches(run)
    if run.train_loader is None:  # one loader (and one set of workers) for every epoch of the run
        run.train_loader = make_loader(run.train_set, batches, cfg.data.num_workers)
    train = train_one_epoch(ctx, run.train_loader, progress)
    if run.val_loader is None:
        val_batches = eval_batches(len(run.val_set), cfg.data.batch_size, run.rank, run.world)
        run.val_loader = make_loader(run.val_set, val_batches, cfg.data.num_workers)
    val = evaluate(
        run.model,
        ctx.loss_fn,
        run.val_loader,
        run.device,
        cfg.train.threshold,
        cfg.train.amp_bf16,
        run.prevalence,
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
    logger.info(
        "stage %d/%d %s: weights %s, strategies %s, lr warm-up %d epoch(s)",
        stage.index + 1,
        len(plan),
        stage.name,
        stage.weights,
        stage.strategies,
        warmup,
    )
    shares = stage_grad_shares(run, loss_fn) if fresh else {}
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
            _next_stage(state, plan)
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
    while not state.finished and state.stage < len(plan):
        if plan[state.stage].max_epochs == 0:
            _next_stage(state, plan)
            continue
        if distributed:
            run.model = wrap_ddp(net, device, plan[state.stage], cfg)
        run_stage(run, plan, resume, on_epoch_end, progress)
        resume = None  # only the first stage run continues the checkpoint's optimizer
    if run.best_model is not None:
        net.load_state_dict(run.best_model)
    return net, state


def check_prediction_trained(cfg: Config) -> None:
    """Refuse ``model.prediction = "mc+ac"`` when no stage trains AC: its head would add noise.

    Raises:
        ValueError: naming the fields to change.
    """
    trained = [s for s in stage_plan(cfg) if s.max_epochs > 0]
    if cfg.model.prediction == "mc+ac" and trained and not any(s.weights.get("ac", 0.0) > 0 for s in trained):
        raise ValueError(
            'model.prediction "mc+ac" averages in the AC head, which no stage trains here (loss.beta = 0 '
            "and no pretraining epochs): set model.prediction=mc"
        )


def every_head_trains(stage: Stage, cfg: Config) -> bool:
    """Whether the stage's loss reaches every parameter: all five tasks with a weight above 0.

    Stages 1-2 leave the LP, DC and CPC heads out of the graph; a zero weight does the same in stage 3.
    """
    terms = build_loss(cfg.loss, weights_override=stage.weights).term_weights
    return all(terms.get(task, 0.0) > 0 for task in PRETRAIN_WEIGHTS)


def wrap_ddp(net: ICHModel, device: torch.device, stage: Stage, cfg: Config) -> nn.Module:
    """``net`` in DDP for one stage; ``find_unused_parameters`` (an extra graph walk each step) only where
    the stage leaves a head out of the loss."""
    find_unused = not every_head_trains(stage, cfg)
    logger.info("stage %s: DDP find_unused_parameters=%s", stage.name, find_unused)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)


def _next_stage(state: TrainState, plan: list[Stage]) -> None:
    state.stage += 1
    state.epoch = 0
    state.stage_started = False
    if state.stage >= len(plan):
        state.finished = True
