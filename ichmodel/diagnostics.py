"""Training diagnostics: how hard each task pulls on the shared backbone.

:func:`gradient_shares` answers "which loss term steers the backbone?" for one batch: the norm of
``d(w_k · L_k) / dθ`` over the backbone's last block ``θ`` (``layer4``) for each enabled task ``k``, and each
norm's share of their sum. The engine logs it at the start of each stage; ``bench`` and tests use it to check
that the loss terms are on a common scale (MC should lead, see :mod:`ichmodel.losses`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ichmodel.augment import normalize, to_float
from ichmodel.losses import MultitaskLoss

logger = logging.getLogger(__name__)


def gradient_shares(
    model: nn.Module,
    loss_fn: MultitaskLoss,
    batch: Mapping[str, Any],
    params: Iterable[nn.Parameter] | None = None,
    transfer: Any = None,
    mask: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Each enabled task's share of the backbone's gradient norm on one batch.

    Args:
        model: an :class:`ichmodel.model.ICHModel` (a DDP wrapper is unwrapped).
        loss_fn: the stage's :class:`MultitaskLoss`; its :attr:`~MultitaskLoss.term_weights` name the tasks.
        batch: ``images`` ``[B, T, C, H, W]`` (uint8 as collated, or float already normalised),
            ``lengths [B]``, ``labels [B, T, 5]``, ``valid [B, T]``, all on the model's device.
        params: the parameters to measure on; ``None`` = ``model.backbone.layer4``.
        transfer, mask: diversity-transfer pairs and the masking plan, passed to the model as in training.

    Returns:
        ``{"share": {task: norm / Σ norms}, "norm": {task: ‖d(w_k L_k)/dθ‖}, "loss": {task: L_k}}`` over the
        tasks with a non-zero weight (and ``"f2"`` when the soft-F2 term is on); shares sum to 1 (all 0 when
        every norm is 0).

    The forward pass runs once in training mode (dropout and BatchNorm batch statistics, as in a training
    step); gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is touched, and BatchNorm's
    running statistics and the module's mode are restored afterwards.
    """
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    params = list(net.backbone.layer4.parameters() if params is None else params)
    images = batch["images"]
    if not images.is_floating_point():
        images = normalize(to_float(images))
    buffers = {name: b.detach().clone() for name, b in net.named_buffers()}
    was_training = net.training
    net.train()
    try:
        with torch.enable_grad():
            outputs = net(images, batch["lengths"], transfer=transfer, mask=mask)
            outputs = {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}
            parts = loss_fn(outputs, batch["labels"], batch["valid"])
            weights = loss_fn.term_weights
            norms: dict[str, float] = {}
            for i, (task, weight) in enumerate(weights.items()):
                grads = torch.autograd.grad(
                    weight * parts[task], params, retain_graph=i < len(weights) - 1, allow_unused=True
                )
                squares = [g.float().pow(2).sum() for g in grads if g is not None]
                norms[task] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    finally:
        net.train(was_training)
        with torch.no_grad():
            for name, b in net.named_buffers():
                b.copy_(buffers[name])
    total = sum(norms.values())
    shares = {task: (n / total if total > 0 else 0.0) for task, n in norms.items()}
    return {"share": shares, "norm": norms, "loss": {task: float(parts[task].detach()) for task in norms}}


def format_shares(result: Mapping[str, Mapping[str, float]]) -> str:
    """One log line: ``mc 41% (1.52), ac 35% (1.30), ...`` (share and gradient norm per task)."""
    return ", ".join(
        f"{task} {100 * share:.0f}% ({result['norm'][task]:.3g})" for task, share in result["share"].items()
    )
