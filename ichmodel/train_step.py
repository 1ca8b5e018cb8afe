"""One training step and one epoch of steps: the optimizer, the loss of a batch, skipped non-finite steps.

:func:`train_one_epoch` runs :func:`step_loss` (augmentation, masking / diversity transfer, the model, the
loss parts) and :func:`optimizer_step` for every batch of a loader, with a :class:`StepContext` holding what
every step of one stage needs. A step reads nothing back from the device: a non-finite loss skips its step
through the fused AdamW's ``found_inf`` input (:func:`make_optimizer`), and :class:`EpochCounters` add the
loss parts and skipped steps up on the device until they are read every ``train.log_every`` steps.
:func:`add_warmup` raises the learning rate linearly over a stage's first steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ichmodel.augment import augment_series, normalize, reverse_series, to_float
from ichmodel.config import Config
from ichmodel.dataset import prepare_images
from ichmodel.predict import autocast, unwrap
from ichmodel.stages import Stage, TrainState
from ichmodel.strategies import TransferPoolImages, make_transfer_batch, plan_strategies, transfer_labels

logger = logging.getLogger(__name__)


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
    #: the pool's pair features ``[P, 2, D]`` where the stage trains on cached features (a frozen backbone)
    pool_features: torch.Tensor | None = None


def make_optimizer(net: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the parameters that train (not a frozen backbone's), with the fused kernel, whose
    ``found_inf`` input skips a step on the device (no host read)."""
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)


def freeze_backbone(net: nn.Module, frozen: bool) -> None:
    """Stop (or restart) the backbone's training: its weights take no gradient while ``frozen``.

    Its BatchNorm statistics stay too: :func:`train_one_epoch` keeps a frozen backbone in eval mode.
    """
    for param in unwrap(net).backbone.parameters():
        param.requires_grad_(not frozen)


def backbone_frozen(net: nn.Module) -> bool:
    return not any(p.requires_grad for p in unwrap(net).backbone.parameters())


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
    if ctx.pool_features is not None:
        return ctx.pool_features
    pool_images = normalize(to_float(ctx.pool.images.to(ctx.device)))
    return pool_images.contiguous() if ctx.cfg.train.channels_last else pool_images


def slice_step_loss(ctx: StepContext, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The slice stage's loss (``ichmodel.slice_batches``): a batch of single slices ``[n, C, H, W]``, each
    augmented with its own draw, through the backbone and the shared classifier; BCE on its labels."""
    images = to_float(batch["images"].to(ctx.device, non_blocking=True))  # [n, C, H, W]
    images = normalize(augment_series(images[:, None], ctx.cfg.augment, ctx.generator)[:, 0])
    with autocast(ctx.device, ctx.cfg.train.amp_bf16):
        logits = ctx.model(images, batch["lengths"])["ac_logits"]  # [n, 5]
    loss = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].to(ctx.device))
    return {"loss": loss, "ac": loss.detach()}


def step_loss(
    ctx: StepContext, batch: dict[str, Any], pool_images: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Augment, plan masking / diversity transfer, run the model and return the loss parts of one batch
    (a slice stage's batch of single slices: :func:`slice_step_loss`)."""
    if ctx.stage.slices:
        return slice_step_loss(ctx, batch)
    cfg, device = ctx.cfg, ctx.device
    if "features" in batch:  # a frozen backbone's cached g (ichmodel.feature_cache): nothing to augment
        images = batch["features"].to(device, non_blocking=True)
    else:
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
    if backbone_frozen(ctx.model):  # its BatchNorm statistics stay as they were
        unwrap(ctx.model).backbone.eval()
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
