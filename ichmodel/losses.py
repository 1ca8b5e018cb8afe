"""Loss functions of the five tasks (paper sections 2.1-2.6) and their weighted sum.

Pure functions of tensors, plus :class:`MultitaskLoss`, a thin ``nn.Module`` that reads the model's output
dict and returns ``{"loss": total, "mc": ..., "ac": ..., "lp": ..., "dc": ..., "cpc": ...}`` (and ``"f2"``
when the soft-F2 term is on).

Scale (measured with :func:`ichmodel.diagnostics.gradient_shares`, random init, 4 series × 10-20 slices):
the gradient norm on the backbone's ``layer4`` per unit weight is, relative to MC's, AC 2.2-2.7×,
LP 2.1-2.6× (3.0-4.1× with balanced class weights), DC 1.1-1.4×, CPC 1.1-1.6× with cosine scores at
temperature 0.1 but 33-42× with the earlier raw dot products. Hence the defaults: cosine CPC, and
``aux_scale`` = 0.25 on LP, DC and CPC so that none of them pulls harder than MC.

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

#: Cap of a "balanced" LP class weight (see :func:`balanced_count_weights`).
MAX_BALANCED_WEIGHT = 10.0


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


def balanced_count_weights(
    count: torch.Tensor, weight_mask: torch.Tensor | None, num_classes: int
) -> torch.Tensor:
    """Inverse-frequency weights ``[num_classes]`` of the label-count classes among the masked rows.

    ``w_c = n / (K · n_c)`` over the ``K`` classes present (sklearn's "balanced"), capped at
    :data:`MAX_BALANCED_WEIGHT` so that one rare row in a small batch cannot dominate; absent classes get 0.
    """
    rows = count.reshape(-1).clamp(0, num_classes - 1)
    w = torch.ones(rows.shape, device=count.device, dtype=torch.float32)
    if weight_mask is not None:
        w = weight_mask.to(device=count.device, dtype=torch.float32).expand_as(count).reshape(-1)
    # Counted with scatter_add, not bincount or boolean indexing: on a GPU those read the data back.
    n_c = torch.zeros(num_classes, device=count.device).scatter_add_(0, rows, w)
    present = (n_c > 0).sum().clamp_min(1)
    weights = w.sum() / (present * n_c.clamp_min(1.0))
    return torch.where(n_c > 0, weights.clamp(max=MAX_BALANCED_WEIGHT), torch.zeros_like(weights))


def label_count_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight_mask: torch.Tensor | None = None,
    class_weights: torch.Tensor | str | None = None,
) -> torch.Tensor:
    """Number-of-labels task (LP, section 2.3): cross-entropy over ``L + 1`` classes.

    Args:
        logits: ``[..., L + 1]``.
        targets: the multilabel targets ``[..., L]`` in {0, 1}; the class is their sum.
        weight_mask: ``[...]``, rows to average over; ``None`` = all.
        class_weights: ``None`` (plain mean), ``"balanced"`` (:func:`balanced_count_weights` of the rows)
            or a tensor ``[L + 1]``. Weighted, the loss is ``Σ w_y · ce / Σ w_y`` over the rows, as
            ``F.cross_entropy(weight=...)`` reduces.
    """
    if logits.shape[:-1] != targets.shape[:-1] or logits.size(-1) != targets.size(-1) + 1:
        raise ValueError(
            f"logits must be [..., L + 1] for targets [..., L]. Got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    K = logits.size(-1)
    count = targets.clamp(0, 1).sum(-1).round().long()  # [...]
    ce = F.cross_entropy(logits.float().reshape(-1, K), count.reshape(-1), reduction="none").view(count.shape)
    if class_weights is None:
        return _masked_mean(ce, weight_mask)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be None, 'balanced' or a tensor. Got {class_weights!r}")
        class_weights = balanced_count_weights(count, weight_mask, K)
    class_weights = torch.as_tensor(class_weights, dtype=ce.dtype, device=ce.device)
    if class_weights.shape != (K,):
        raise ValueError(f"class_weights must be [{K}]. Got {tuple(class_weights.shape)}")
    row_weight = class_weights[count]  # [...]
    if weight_mask is not None:
        row_weight = row_weight * weight_mask.to(device=ce.device, dtype=ce.dtype).expand_as(ce)
    return torch.where(row_weight > 0, ce * row_weight, ce.new_zeros(())).sum() / row_weight.sum().clamp_min(
        _EPS
    )


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


def soft_f2_loss(
    logits: torch.Tensor, targets: torch.Tensor, weight_mask: torch.Tensor | None = None, beta: float = 2.0
) -> torch.Tensor:
    """``1 − soft F-beta`` (the authors' extra term), micro over the masked rows × classes.

    With ``p = sigmoid(logits)``: ``tp = Σ p·y``, ``fp = Σ p·(1 − y)``, ``fn = Σ (1 − p)·y`` and
    ``F = (1 + β²) tp / ((1 + β²) tp + β² fn + fp)``. 0 when the predictions are exactly the labels;
    1 when nothing is predicted; 0 (no gradient) when no row is selected.

    Args:
        logits, targets: ``[..., L]``.
        weight_mask: ``[...]``, the rows to count; ``None`` = all.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape. Got {logits.shape} and {targets.shape}"
        )
    p = torch.sigmoid(logits.float())
    y = targets.to(p.dtype)
    if weight_mask is not None:
        w = weight_mask.to(device=p.device, dtype=p.dtype).unsqueeze(-1).expand_as(p)
        p = torch.where(w > 0, p * w, p.new_zeros(()))
        y = y * w
    b2 = beta * beta
    tp = (p * y).sum()
    fp = (p * (1.0 - y)).sum()
    fn = ((1.0 - p) * y).sum()
    loss = 1.0 - (1.0 + b2) * tp / ((1.0 + b2) * tp + b2 * fn + fp + _EPS)
    if weight_mask is None:
        return loss
    return torch.where(w.any(), loss, p.sum() * 0.0)  # no row: 0 (decided on the device, no host read)


def info_nce_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    lengths: torch.Tensor,
    temperature: float | None = 0.1,
) -> torch.Tensor:
    """InfoNCE (CPC, section 2.5) from the model's predictions ``W_k(c_t)`` of ``g_{t+k}``.

    Args:
        predictions: ``[B, T, K, D]``, entry ``[b, t, k − 1]`` predicts ``g_{b, t + k}``.
        targets: ``[B, T, D]`` backbone features g.
        lengths: ``[B]`` valid slices per series.
        temperature: scores are cosine similarities over this temperature (> 0); ``None`` scores raw dot
            products (the earlier scoring: with feature norms ~30 its gradient swamped every other task).

    For each offset ``t`` and step ``k`` the score matrix is ``S[b, b'] = sim(pred[b, t, k], g[b', t + k])``;
    a log-softmax over candidates ``b'`` (the other series of the batch at the same offset are the
    negatives, as in the authors' code) and the diagonal is the positive. Anchors with ``t + k ≥ lengths[b]``
    are excluded; candidates with ``t + k ≥ lengths[b']`` are masked to −inf. Mean over valid anchors, 0 when
    there are none (e.g. every series has one slice). With a single series the loss is 0 (no negatives).
    Equals ``log(B)`` when every score is equal and all series are long.
    """
    B, T, K, D = predictions.size()  # batch, slices, steps, feature dim
    if targets.shape != (B, T, D):
        raise ValueError(f"targets must be [B, T, D]=[{B}, {T}, {D}]. Got {tuple(targets.shape)}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 or None. Got {temperature}")
    pred = predictions.float()
    g = targets.float()
    if temperature is not None:
        pred = F.normalize(pred, dim=-1) / temperature
        g = F.normalize(g, dim=-1)
    g = F.pad(g, (0, 0, 0, K))  # [B, T + K, D], zeros beyond T
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


class MultitaskLoss(nn.Module):
    """``L = αL1 + βL2 + s·(γL3 + μL4 + νL5) + φ·(1 − softF2)`` (section 2.6) over the model's output dict.

    Args:
        weights: task weight by name (``mc, ac, lp, dc, cpc``); missing names weigh 0. A zero weight skips
            that task's computation (its entry is a zero tensor, and its head gets no gradient).
        gamma_pos, gamma_neg, clip: ASL parameters for MC, AC and DC.
        aux_scale: ``s``, a common factor on LP, DC and CPC (see ``LossConfig.aux_scale``).
        cpc_temperature: CPC scores are cosine similarities over this; ``None`` = raw dot products.
        lp_class_weights: ``"none"``, ``"balanced"`` or ``L + 1`` weights (or ``"w0,w1,..."``) of LP's
            label-count classes.
        soft_f2: ``φ``, weight of ``1 − soft F2`` of ``sigmoid(mc_logits)`` (part ``"f2"``, present when > 0).

    Raises:
        ValueError: for an unknown task name, or a weight or scale that is negative or not finite.

    Call ``(outputs, labels [B, T, 5], valid [B, T]) → {"loss": total, "mc", "ac", "lp", "dc", "cpc"[, "f2"]}``;
    each part is the unweighted ``L_k``, the total weighs them by :attr:`term_weights`. ``valid`` must be a
    prefix mask (padding at the end). The supervised tasks average over valid slices whose labels are known
    (no ``-1``); CPC uses every valid slice and reads ``outputs["cpc_predictions"]`` and
    ``outputs["cpc_targets"]``.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        gamma_pos: float = 1.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        *,
        aux_scale: float = LossConfig.aux_scale,
        cpc_temperature: float | None = LossConfig.cpc_temperature,
        lp_class_weights: str | Sequence[float] = LossConfig.lp_class_weights,
        soft_f2: float = LossConfig.soft_f2,
    ) -> None:
        super().__init__()
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown loss weights {sorted(unknown)}; known: {list(TASKS)}")
        for name, value in {**weights, "aux_scale": aux_scale, "soft_f2": soft_f2}.items():
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"Loss weight {name!r} must be finite and >= 0. Got {value}")
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"gamma_pos and gamma_neg must be >= 0. Got {gamma_pos}, {gamma_neg}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must be in [0, 1). Got {clip}")
        if cpc_temperature is not None and not cpc_temperature > 0:
            raise ValueError(f"cpc_temperature must be > 0 or None. Got {cpc_temperature}")
        self.weights = {name: float(weights.get(name, 0.0)) for name in TASKS}
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.clip = float(clip)
        self.aux_scale = float(aux_scale)
        self.cpc_temperature = None if cpc_temperature is None else float(cpc_temperature)
        self.lp_class_weights = _lp_weights(lp_class_weights)
        self.soft_f2 = float(soft_f2)

    @property
    def term_weights(self) -> dict[str, float]:
        """The factor of each part in the total (``"f2"`` only when on); zero-weight tasks are left out."""
        scale = {"lp": self.aux_scale, "dc": self.aux_scale, "cpc": self.aux_scale}
        out = {k: w * scale.get(k, 1.0) for k, w in self.weights.items() if w * scale.get(k, 1.0) > 0}
        if self.soft_f2 > 0:
            out["f2"] = self.soft_f2
        return out

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
        w = self.term_weights
        parts = dict.fromkeys(TASKS, labels.new_zeros((), dtype=torch.float32))
        if "mc" in w:
            parts["mc"] = asymmetric_loss(outputs["mc_logits"], targets, **asl, weight_mask=labelled)
        if "ac" in w:
            parts["ac"] = asymmetric_loss(outputs["ac_logits"], targets, **asl, weight_mask=labelled)
        if "lp" in w:
            parts["lp"] = label_count_loss(outputs["lp_logits"], targets, labelled, self.lp_class_weights)
        if "dc" in w:
            parts["dc"] = distance_loss(outputs["dc_logits"], targets, **asl, weight_mask=labelled)
        if "cpc" in w:
            if "cpc_predictions" not in outputs:
                raise KeyError("CPC needs outputs['cpc_predictions'] [B, T, K, D] (see ichmodel.model)")
            parts["cpc"] = info_nce_loss(
                outputs["cpc_predictions"], outputs["cpc_targets"], valid.sum(1), self.cpc_temperature
            )
        if "f2" in w:
            parts["f2"] = soft_f2_loss(outputs["mc_logits"], targets, labelled)
        total = labels.new_zeros((), dtype=torch.float32)
        for name, factor in w.items():
            total = total + factor * parts[name]
        return {"loss": total, **parts}


def _lp_weights(value: str | Sequence[float]) -> torch.Tensor | str | None:
    """``"none"`` → ``None``; ``"balanced"`` stays; weights (a sequence or ``"1,2,..."``) → a float tensor."""
    if value in ("none", "balanced"):
        return None if value == "none" else "balanced"
    try:
        weights = torch.tensor(
            [float(v) for v in (value.split(",") if isinstance(value, str) else value)], dtype=torch.float32
        )
    except ValueError as err:
        raise ValueError(f"lp_class_weights must be 'none', 'balanced' or weights. Got {value!r}") from err
    if not (bool(torch.isfinite(weights).all()) and bool((weights >= 0).all()) and float(weights.sum()) > 0):
        raise ValueError(f"lp_class_weights must be finite, >= 0 and not all 0. Got {list(value)}")
    return weights


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
    return MultitaskLoss(
        weights,
        gamma_pos=cfg.gamma_pos,
        gamma_neg=cfg.gamma_neg,
        clip=cfg.clip,
        aux_scale=cfg.aux_scale,
        cpc_temperature=None if cfg.cpc_score == "dot" else cfg.cpc_temperature,
        lp_class_weights=cfg.lp_class_weights,
        soft_f2=cfg.soft_f2,
    )
