"""Loss functions of the five tasks (paper sections 2.1-2.6) and their weighted sum.

Pure functions of tensors, plus :class:`MultitaskLoss`, a thin ``nn.Module`` that reads the model's output
dict and returns ``{"loss": total, "mc": ..., "ac": ..., "lp": ..., "dc": ..., "cpc": ...}``.

Every loss is computed in float32 (also under bf16 autocast) and averaged over *valid* slices only, so
padding never changes a value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ichmodel.config import LossConfig

#: Loss-part names, in the paper's order L1..L5 (weights α, β, γ, μ, ν).
TASKS: tuple[str, ...] = ("mc", "ac", "lp", "dc", "cpc")

_EPS = 1e-8


def _masked_mean(per_row: torch.Tensor, weight_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_row [...]`` over rows where ``weight_mask [...]`` is set (0 when none is)."""
    if weight_mask is None:
        return per_row.mean()
    w = weight_mask.to(device=per_row.device, dtype=per_row.dtype).expand_as(per_row)
    # where() keeps NaN/inf from masked rows (e.g. garbage logits at padding) out of the sum.
    return torch.where(w > 0, per_row * w, per_row.new_zeros(())).sum() / w.sum().clamp_min(1.0)


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_pos: float = 1.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    weight_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Asymmetric loss (Ben-Baruch et al. 2020) for multilabel logits.

    With ``p = sigmoid(logits)`` and the shifted probability ``p_m = max(p − clip, 0)`` for negatives::

        loss = −y (1 − p)^γ+ log p − (1 − y) p_m^γ− log(1 − p_m)

    Reduction: summed over classes (the last dim, as the ASL reference code sums), then averaged over the
    rows (slices) where ``weight_mask`` is true; 0 if no row is. ``log p`` is computed as ``logsigmoid``
    (exact, no clamp needed); ``log(1 − p_m)`` as ``logsigmoid(−x)`` when ``clip == 0`` and otherwise as
    ``log(max(1 − p + clip, eps))``. The focusing weights keep their gradient. With γ± = 0 and clip 0 this
    is binary cross-entropy summed over classes.

    Args:
        logits: ``[..., L]``.
        targets: ``[..., L]`` in {0, 1}.
        gamma_pos, gamma_neg: focusing exponents for positives and negatives (≥ 0).
        clip: probability margin for negatives, in [0, 1).
        weight_mask: ``[...]`` bool/float, the rows to average over; ``None`` = all.

    Raises:
        ValueError: on mismatched shapes or out-of-range parameters.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape. Got {logits.shape} and {targets.shape}"
        )
    if gamma_pos < 0 or gamma_neg < 0:
        raise ValueError(f"gamma_pos and gamma_neg must be >= 0. Got {gamma_pos}, {gamma_neg}")
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"clip must be in [0, 1). Got {clip}")
    x = logits.float()
    y = targets.to(x.dtype)
    p = torch.sigmoid(x)
    log_p = F.logsigmoid(x)
    if clip > 0:
        q = (1.0 - p + clip).clamp(max=1.0)  # 1 − p_m
        log_q = torch.log(q.clamp(min=_EPS))
        p_m = 1.0 - q
    else:
        log_q = F.logsigmoid(-x)
        p_m = p
    pos = (1.0 - p).pow(gamma_pos) * log_p if gamma_pos > 0 else log_p
    neg = p_m.pow(gamma_neg) * log_q if gamma_neg > 0 else log_q
    per_class = -(y * pos + (1.0 - y) * neg)  # [..., L]
    return _masked_mean(per_class.sum(-1), weight_mask)


def label_count_loss(
    logits: torch.Tensor, targets: torch.Tensor, weight_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Number-of-labels task (LP, section 2.3): cross-entropy over ``L + 1`` classes.

    Args:
        logits: ``[..., L + 1]``.
        targets: the multilabel targets ``[..., L]`` in {0, 1}; the class is their sum.
        weight_mask: ``[...]``, rows to average over; ``None`` = all.
    """
    if logits.shape[:-1] != targets.shape[:-1] or logits.size(-1) != targets.size(-1) + 1:
        raise ValueError(
            f"logits must be [..., L + 1] for targets [..., L]. Got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    count = targets.clamp(0, 1).sum(-1).round().long()  # [...]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), count.reshape(-1), reduction="none")
    return _masked_mean(ce.view(count.shape), weight_mask)


def distance_loss(
    dc_logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_pos: float = 1.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    weight_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance-based classification (DC, section 2.4): ASL on ``sigmoid(dc_logits)``.

    ``dc_logits = s · (b − d²)`` (see :class:`ichmodel.model.DistanceHead`): the probability rises as the
    distance to a label's embedding falls. The paper's ``−softmax(d)`` is not a probability; we follow the
    authors' code in using the negative distance as the logit.
    """
    return asymmetric_loss(dc_logits, targets, gamma_pos, gamma_neg, clip, weight_mask)


def info_nce_from_predictions(
    predictions: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """InfoNCE (CPC, section 2.5) from predictions already made: the batched core of :func:`info_nce_loss`.

    Args:
        predictions: ``[B, T, K, D]``, entry ``[b, t, k − 1]`` predicts ``g_{b, t + k}``.
        targets: ``[B, T, D]`` backbone features g.
        lengths: ``[B]`` valid slices per series.

    For each offset ``t`` and step ``k`` the score matrix is ``S[b, b'] = pred[b, t, k] · g[b', t + k]``;
    a log-softmax over candidates ``b'`` (the other series of the batch at the same offset are the
    negatives, as in the authors' code) and the diagonal is the positive. Anchors with ``t + k ≥ lengths[b]``
    are excluded; candidates with ``t + k ≥ lengths[b']`` are masked to −inf. Mean over valid anchors, 0 when
    there are none (e.g. every series has one slice). With a single series the loss is 0 (no negatives).
    """
    B, T, K, D = predictions.size()  # batch, slices, steps, feature dim
    if targets.shape != (B, T, D):
        raise ValueError(f"targets must be [B, T, D]=[{B}, {T}, {D}]. Got {tuple(targets.shape)}")
    pred = predictions.float()
    g = F.pad(targets.float(), (0, 0, 0, K))  # [B, T + K, D], zeros beyond T
    shifted = torch.stack([g[:, k + 1 : k + 1 + T] for k in range(K)], dim=0)  # [K, B, T, D]: g_{t+k}
    scores = torch.einsum("btkd,ctkd->ktbc", pred, shifted.permute(1, 2, 0, 3))  # [K, T, B, B']
    lengths = lengths.to(device=pred.device, dtype=torch.long)
    offset = (
        torch.arange(T, device=pred.device)[None, :] + torch.arange(1, K + 1, device=pred.device)[:, None]
    )
    ok = offset[:, :, None] < lengths[None, None, :]  # [K, T, B]: g_{b, t+k} exists
    scores = scores.masked_fill(~ok[:, :, None, :], float("-inf"))  # invalid candidates b'
    # Anchors whose own target is missing have a row of all −inf (or worse); replace to keep grads finite.
    scores = torch.where(ok[:, :, :, None], scores, scores.new_zeros(()))
    log_prob = torch.log_softmax(scores, dim=-1)  # [K, T, B, B']
    positive = torch.diagonal(log_prob, dim1=-2, dim2=-1)  # [K, T, B]
    n = ok.sum()
    return -torch.where(ok, positive, positive.new_zeros(())).sum() / n.clamp_min(1).to(positive.dtype)


def info_nce_loss(
    context: torch.Tensor,
    targets: torch.Tensor,
    predictors: Sequence[nn.Module],
    lengths: torch.Tensor,
    steps: int | None = None,
) -> torch.Tensor:
    """InfoNCE for CPC: predict ``g_{t+k}`` (k = 1..steps) from the causal context ``c_t``.

    Args:
        context: ``[B, T, Dc]`` forward-direction GRU states (``c_t`` has seen ``g_1..g_t`` only).
        targets: ``[B, T, D]`` backbone features g.
        predictors: at least ``steps`` modules ``W_k: Dc → D`` (linear in the model).
        lengths: ``[B]``.
        steps: K, the number of future steps; ``None`` = ``len(predictors)``.

    Scores are dot products ``W_k(c_{b,t}) · g_{b',t+k}``; see :func:`info_nce_from_predictions` for the
    candidates, masking and reduction. Equals ``log(B)`` when every score is equal and all series are long.
    """
    steps = len(predictors) if steps is None else steps
    if not 1 <= steps <= len(predictors):
        raise ValueError(f"steps must be in [1, {len(predictors)}]. Got {steps}")
    predictions = torch.stack([predictors[k](context) for k in range(steps)], dim=2)  # [B, T, K, D]
    return info_nce_from_predictions(predictions, targets, lengths)


class MultitaskLoss(nn.Module):
    """``L = αL1 + βL2 + γL3 + μL4 + νL5`` (section 2.6) over the model's output dict.

    Args:
        weights: task weight by name (``mc, ac, lp, dc, cpc``); missing names weigh 0. A zero weight skips
            that task's computation (its entry is a zero tensor, and its head gets no gradient).
        gamma_pos, gamma_neg, clip: ASL parameters for MC, AC and DC.

    Raises:
        ValueError: for an unknown task name, or a weight that is negative or not finite.

    Call ``(outputs, labels [B, T, 5], valid [B, T]) → {"loss": total, "mc", "ac", "lp", "dc", "cpc"}``.
    ``valid`` must be a prefix mask (padding at the end). The supervised tasks average over valid slices
    whose labels are known (no ``-1``); CPC uses every valid slice and reads ``outputs["cpc_predictions"]``
    and ``outputs["cpc_targets"]``.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        gamma_pos: float = 1.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
    ) -> None:
        super().__init__()
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown loss weights {sorted(unknown)}; known: {list(TASKS)}")
        for name, value in weights.items():
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"Loss weight {name!r} must be finite and >= 0. Got {value}")
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"gamma_pos and gamma_neg must be >= 0. Got {gamma_pos}, {gamma_neg}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must be in [0, 1). Got {clip}")
        self.weights = {name: float(weights.get(name, 0.0)) for name in TASKS}
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.clip = float(clip)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        B, T, L = labels.size()  # batch, slices, classes
        if valid.shape != (B, T):
            raise ValueError(f"valid must be [B, T]=[{B}, {T}]. Got {tuple(valid.shape)}")
        valid = valid.to(device=labels.device, dtype=torch.bool)
        labelled = valid & (labels >= 0).all(-1)  # [B, T]
        targets = labels.clamp(min=0)
        asl = {"gamma_pos": self.gamma_pos, "gamma_neg": self.gamma_neg, "clip": self.clip}
        zero = labels.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        w = self.weights
        parts["mc"] = (
            asymmetric_loss(outputs["mc_logits"], targets, **asl, weight_mask=labelled) if w["mc"] else zero
        )
        parts["ac"] = (
            asymmetric_loss(outputs["ac_logits"], targets, **asl, weight_mask=labelled) if w["ac"] else zero
        )
        parts["lp"] = (
            label_count_loss(outputs["lp_logits"], targets, weight_mask=labelled) if w["lp"] else zero
        )
        parts["dc"] = (
            distance_loss(outputs["dc_logits"], targets, **asl, weight_mask=labelled) if w["dc"] else zero
        )
        if w["cpc"]:
            if "cpc_predictions" not in outputs:
                raise KeyError("CPC needs outputs['cpc_predictions'] [B, T, K, D] (see ichmodel.model)")
            parts["cpc"] = info_nce_from_predictions(
                outputs["cpc_predictions"], outputs["cpc_targets"], valid.sum(1)
            )
        else:
            parts["cpc"] = zero
        total = zero
        for name in TASKS:
            if w[name]:
                total = total + w[name] * parts[name]
        return {"loss": total, **parts}


def build_loss(cfg: LossConfig, weights_override: Mapping[str, float] | None = None) -> MultitaskLoss:
    """Build :class:`MultitaskLoss` from ``cfg``; ``weights_override`` replaces some of ``cfg.weights()``.

    E.g. the pretraining stages use ``build_loss(cfg, {"mc": 1, "ac": 1, "lp": 0, "dc": 0, "cpc": 0})``.
    """
    weights = dict(cfg.weights())
    if weights_override:
        unknown = set(weights_override) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown loss weights {sorted(unknown)}; known: {list(TASKS)}")
        weights.update(weights_override)
    return MultitaskLoss(weights, gamma_pos=cfg.gamma_pos, gamma_neg=cfg.gamma_neg, clip=cfg.clip)
