"""The multitask sequence model: ResNet18 backbone → bi-GRU → heads (paper sections 1-2).

One forward pass produces every output the five tasks need (see ``docs/architecture.md``):

* **MC** (multilabel classification) ``mc_logits = cls(h)``,
* **AC** (auxiliary classification) ``ac_logits = cls(g)``, the *same* linear layer on backbone features,
* **LP** (number of labels) ``lp_logits = cls2(h)``, six classes (0..5 labels),
* **DC** (distance-based classification) ``dc_logits`` from the distance between a projection of g and
  learned label embeddings,
* **CPC** (contrastive predictive coding) ``cpc_context`` (forward-direction GRU state), ``cpc_targets`` (g)
  and ``cpc_predictions`` (``W_k(c_t)`` for k = 1..T).

Masking (section 2.7) and diversity transfer (section 2.8) are applied inside the forward pass from a
:class:`ichmodel.strategies.TransferBatch` and a bool mask planned by :mod:`ichmodel.strategies`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ichmodel.config import ModelConfig
from ichmodel.constants import NUM_COUNT_CLASSES
from ichmodel.resnet import resnet18

if TYPE_CHECKING:
    from ichmodel.strategies import TransferBatch

logger = logging.getLogger(__name__)

#: Pooled feature size of ResNet18.
RESNET18_DIM = 512


def _adapt_conv1(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Return ``conv`` rebuilt for ``in_channels`` inputs, keeping what its 3-channel weights know.

    As timm's ``adapt_input_conv``: one channel takes the sum of the RGB filters; other counts repeat the
    filters cyclically and rescale by ``3 / in_channels`` so the activations keep their scale.
    """
    weight = conv.weight.detach()  # [C_out, 3, k, k]
    c_out, c_in, _, _ = weight.size()  # out channels, in channels, kernel
    if in_channels == 1:
        new_weight = weight.sum(dim=1, keepdim=True)
    else:
        repeats = math.ceil(in_channels / c_in)
        new_weight = weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (c_in / in_channels)
    new_conv = nn.Conv2d(
        in_channels, c_out, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=False
    )
    with torch.no_grad():
        new_conv.weight.copy_(new_weight)
    return new_conv


class Backbone(nn.Module):
    """ResNet18 trunk (no ``fc``): ``[N, C, H, W] → [N, feature_dim]``.

    ``feature_dim`` other than 512 adds a linear projection after pooling (only useful for tiny test models).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        resnet = resnet18()
        if cfg.pretrained_weights is not None:
            state = torch.load(cfg.pretrained_weights, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(
                    f"model.pretrained_weights must hold a ResNet18 state_dict. Got {type(state).__name__}"
                )
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = resnet.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"{cfg.pretrained_weights} is not a torchvision ResNet18 state_dict: "
                    f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
                )
            logger.info("Loaded backbone weights from %s", cfg.pretrained_weights)
        if cfg.in_channels != 3:
            resnet.conv1 = _adapt_conv1(resnet.conv1, cfg.in_channels)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.proj = (
            nn.Identity() if cfg.feature_dim == RESNET18_DIM else nn.Linear(RESNET18_DIM, cfg.feature_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N, 512, H/32, W/32]
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # [N, 512]
        return self.proj(x)  # [N, feature_dim]


class DistanceHead(nn.Module):
    """Distance-based classification (DC, section 2.4).

    ``logit_j = s · (b − ‖normalize(proj(g)) − normalize(e_j)‖²)`` with label embeddings ``e`` ``[5, D]``,
    a learnable scale ``s = exp(log_scale) > 0`` and bias ``b``. The paper writes ``ŷ = −softmax(d)``, which is
    not a probability (it is negative); the authors' code used ``−‖l2norm(·) − l2norm(e_j)‖²`` as the logit.
    We use ``sigmoid(logit)``: a probability in (0, 1) that rises as the distance falls, trained with ASL
    like the other multilabel tasks. The scale is kept positive (log-parametrised) so that ordering holds;
    scale and bias start at 5 and 2, so features orthogonal to an embedding (d² = 2) start at p = 0.5.
    """

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, feature_dim)
        self.embeddings = nn.Parameter(torch.randn(num_classes, feature_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(5.0)))
        self.bias = nn.Parameter(torch.tensor(2.0))

    def squared_distances(self, g: torch.Tensor) -> torch.Tensor:
        """``[..., D] → [..., L]`` squared distances between unit vectors (in [0, 4])."""
        z = F.normalize(self.proj(g), dim=-1)  # [..., D]
        e = F.normalize(self.embeddings, dim=-1)  # [L, D]
        # ‖z − e‖² = 2 − 2 z·e for unit vectors; clamp guards rounding below 0.
        return (2.0 - 2.0 * z @ e.t()).clamp_min(0.0)  # [..., L]

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * (self.bias - self.squared_distances(g))


class ICHModel(nn.Module):
    """Backbone → dropout → bi-GRU → heads, with masking and diversity transfer applied to g.

    Order inside the forward pass: ``g = res(x)`` → diversity transfer (``g += f(z2) − f(z1)`` at the planned
    slices) → AC and DC read this g → masking zeroes the planned slices → dropout (``cfg.dropout``, on the GRU
    input only, as the authors' ``ResNet18 → dropout → GRU``) → bi-GRU → MC, LP and CPC. CPC's context is the
    forward direction of the GRU: its state at t has seen only g_1..g_t, which equals the paper's feeding just
    the prefix into the RNN, so one GRU pass serves every t.

    Build it with :func:`build_model`. See :meth:`forward` for inputs and outputs.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if 2 * cfg.rnn_hidden != cfg.feature_dim:
            raise ValueError(
                "The classifier is shared by h (2 × rnn_hidden) and g (feature_dim), so they must match. "
                f"Got rnn_hidden={cfg.rnn_hidden}, feature_dim={cfg.feature_dim}"
            )
        self.cfg = cfg
        D = cfg.feature_dim
        self.backbone = Backbone(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.rnn = nn.GRU(D, cfg.rnn_hidden, batch_first=True, bidirectional=True)
        self.cls = nn.Linear(D, cfg.num_classes)  # MC on h, AC on g
        self.cls2 = nn.Linear(D, cfg.num_classes + 1)  # LP: 0..num_classes labels
        self.dc = DistanceHead(D, cfg.num_classes)
        self.cpc_predictors = nn.ModuleList(nn.Linear(cfg.rnn_hidden, D) for _ in range(cfg.cpc_steps))

    def forward(
        self,
        images: torch.Tensor,
        lengths: torch.Tensor,
        transfer: TransferBatch | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run every task's head on a padded batch of series.

        Args:
            images: float ``[B, T, C, H, W]``, already normalised; positions ``t ≥ lengths[b]`` are padding
                and never reach the backbone.
            lengths: ``[B]`` number of valid slices per series (each ≥ 1).
            transfer: diversity-transfer pairs (``pair_images [U, 2, C, H, W]``, prepared like ``images``) and
                ``slot [B, T]`` (−1 = none, else a pair index): ``g += f(z2) − f(z1)`` at those slices.
            mask: bool ``[B, T]``; True slices have g zeroed before the GRU (masking, section 2.7).

        Returns:
            dict with ``g [B, T, D]`` (after diversity transfer, before masking: the input of AC and DC),
            ``h [B, T, D]``, ``mc_logits``/``ac_logits``/``dc_logits [B, T, 5]``, ``lp_logits [B, T, 6]``,
            ``cpc_context [B, T, rnn_hidden]`` (forward GRU direction), ``cpc_targets [B, T, D]`` (= g) and
            ``cpc_predictions [B, T, K, D]`` (``W_k(c_t)``, k = 1..K). g and h are zero at padding.

        Raises:
            ValueError: on a bad shape, or lengths outside ``[1, T]``.

        ``images`` of single slices ``[N, C, H, W]`` (the slice stage of ``train.recipe = "two_stage"``) run the
        backbone and the shared classifier only: ``{"ac_logits": [N, 5]}`` (``lengths`` is not read).
        ``images`` of backbone features ``[B, T, D]`` (``ichmodel.feature_cache``: a frozen backbone's g, zero
        at padding) skip the backbone; ``transfer.pair_images`` are then the pairs' features ``[U, 2, D]``.

        The backbone runs once over the valid slices and the 2U pair images together, so BatchNorm sees
        them as one batch (with ``cfg.transfer_grad`` off, the pairs get a second pass without autograd).
        With ``images`` in channels-last layout (per slice) or a model moved to
        ``memory_format=torch.channels_last``, the backbone input is made channels-last.
        """
        if images.dim() == 4:  # single slices: through the model's own forward, so DDP syncs the gradients
            x = (
                images.contiguous(memory_format=torch.channels_last)
                if self._wants_channels_last(images)
                else images
            )
            return {"ac_logits": self.cls(self.backbone(x))}
        if images.dim() == 3:  # cached backbone features g (ichmodel.feature_cache), zero at padding
            g, pair_feats = images, None
            B, T, _ = g.size()
            lengths = _host_lengths(lengths, B, T)
            valid = (torch.arange(T)[None, :] < lengths[:, None]).to(g.device, non_blocking=True)
            if transfer is not None and transfer.pair_images.numel() > 0:
                pair_feats = transfer.pair_images.reshape(-1, g.size(2)).to(g.dtype)  # [2U, D]
        elif images.dim() == 5:
            g, pair_feats, valid, lengths = self._image_features(images, lengths, transfer)
            B, T = g.shape[:2]
        else:
            raise ValueError(
                "images must be [B, T, C, H, W], single slices [N, C, H, W] or features [B, T, D]. "
                f"Got shape {tuple(images.shape)}"
            )
        if pair_feats is not None:
            g = _add_pair_differences(g, pair_feats, transfer.slot, valid)  # type: ignore[union-attr]
        g_rnn = g
        if mask is not None:
            mask = mask.to(device=g.device, dtype=torch.bool)
            if mask.shape != (B, T):
                raise ValueError(f"mask must be [B, T]=[{B}, {T}]. Got {tuple(mask.shape)}")
            g_rnn = g_rnn * (~mask).unsqueeze(-1).to(g.dtype)
        h = self._sequence(self.dropout(g_rnn), lengths)  # [B, T, 2 * rnn_hidden], 0 at padding
        context = h[..., : self.cfg.rnn_hidden]  # [B, T, rnn_hidden] forward direction: saw g_1..g_t only
        return {
            "g": g,
            "h": h,
            "mc_logits": self.cls(h),
            "ac_logits": self.cls(g),
            "lp_logits": self.cls2(h),
            "dc_logits": self.dc(g),
            "cpc_context": context,
            "cpc_targets": g,
            "cpc_predictions": predict_future(context, self.cpc_predictors),
        }

    def _image_features(
        self, images: torch.Tensor, lengths: torch.Tensor, transfer: TransferBatch | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """g ``[B, T, D]`` (zero at padding) of a padded image batch, the pair images' features ``[2U, D]``
        (or None), the valid mask ``[B, T]`` on g's device and the checked host lengths."""
        B, T, C, H, W = images.size()  # batch, slices, channels, height, width
        lengths = _host_lengths(lengths, B, T)
        valid_host = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
        flat_index = valid_host.reshape(-1).nonzero().squeeze(1)  # [N] indices into B*T, on the host
        valid = valid_host.to(images.device, non_blocking=True)
        flat_index = flat_index.to(images.device, non_blocking=True)
        x = images.reshape(B * T, C, H, W).index_select(0, flat_index)  # [N, C, H, W]
        N = x.size(0)
        feats = self._features(x, images, transfer)  # [N + 2U, D]
        D = feats.size(1)
        g = feats.new_zeros(B * T, D).index_copy(0, flat_index, feats[:N]).view(B, T, D)  # [B, T, D]
        return g, (feats[N:] if feats.size(0) > N else None), valid, lengths

    def _features(
        self, x: torch.Tensor, images: torch.Tensor, transfer: TransferBatch | None
    ) -> torch.Tensor:
        """Backbone features of the valid slices ``x`` ``[N, C, H, W]``, then of the 2U pair images: ``[N + 2U, D]``.

        With ``cfg.transfer_grad`` the pairs share the slices' pass (one BatchNorm batch); without it they get
        their own pass under ``no_grad``.
        """
        pair_x = None
        if transfer is not None and transfer.pair_images.numel() > 0:
            pairs = transfer.pair_images
            U, C, H, W = pairs.size(0), *x.shape[1:]
            if pairs.shape[1:] != (2, C, H, W):
                raise ValueError(
                    f"transfer.pair_images must be [U, 2, {C}, {H}, {W}]. Got {tuple(pairs.shape)}"
                )
            pair_x = pairs.reshape(U * 2, C, H, W).to(dtype=x.dtype)  # [2U, C, H, W]
            if self.cfg.transfer_grad:
                x, pair_x = torch.cat([x, pair_x], dim=0), None  # [N + 2U, C, H, W]: one backbone pass
        channels_last = self._wants_channels_last(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(x)  # [N (+ 2U), D]
        if pair_x is not None:  # transfer_grad off: the pairs' own pass, no autograd graph kept
            pair_x = pair_x.contiguous(memory_format=torch.channels_last) if channels_last else pair_x
            with torch.no_grad():
                pair_feats = self.backbone(pair_x)  # [2U, D]
            feats = torch.cat([feats, pair_feats], dim=0)  # [N + 2U, D]
        return feats

    def _sequence(self, g_rnn: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The bi-GRU over ``g_rnn`` ``[B, T, D]`` with host ``lengths`` ``[B]``: ``h`` ``[B, T, 2 · rnn_hidden]``.

        The series are sorted by length on the host and packed as sorted: with ``enforce_sorted=False`` torch
        sorts on the host too but then reads the device-side inverse permutation back (a sync) to unpack.
        """
        B, T = g_rnn.shape[:2]
        order = torch.argsort(lengths, descending=True, stable=True)  # [B] host
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(B)
        to_device = {"device": g_rnn.device, "non_blocking": True}
        sorted_g = g_rnn.index_select(0, order.to(**to_device))
        packed = pack_padded_sequence(sorted_g, lengths[order], batch_first=True, enforce_sorted=True)
        h, _ = self.rnn(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=T)
        return h.index_select(0, inverse.to(**to_device))

    def _wants_channels_last(self, images: torch.Tensor) -> bool:
        if self.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last) and not (
            self.backbone.conv1.weight.is_contiguous()
        ):
            return True
        channels = images.dim() - 3  # [B, T, C, H, W] or [N, C, H, W]
        return images.dim() in (4, 5) and images.stride(channels) == 1 and images.size(channels) > 1


def _host_lengths(lengths: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """``lengths`` as a checked int64 host tensor ``[B]`` with values in ``[1, T]``.

    They are read on the host (checks, the packed GRU's sort, the slice index): callers pass them as the CPU
    tensor the loader gives, and the forward pass then reads nothing back from the device.

    Raises:
        ValueError: on a bad shape or a length outside ``[1, T]``.
    """
    lengths = lengths.to(dtype=torch.long)
    if lengths.device.type != "cpu":
        lengths = lengths.cpu()  # one device → host sync; callers keep lengths on the host to avoid it
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B]={B}. Got shape {tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"lengths must be in [1, {T}]. Got {lengths.tolist()}")
    return lengths


def _add_pair_differences(
    g: torch.Tensor, pair_feats: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Diversity transfer: ``g + f(z2) − f(z1)`` at the slices whose ``slot`` ``[B, T]`` names a pair.

    ``pair_feats`` ``[2U, D]`` holds f(z1), f(z2) of each pair in turn; slots on padding are ignored.
    """
    B, T, D = g.shape
    U = pair_feats.size(0) // 2
    pairs = pair_feats.view(U, 2, D)  # [U, 2, D]: f(z1), f(z2)
    info = pairs[:, 1] - pairs[:, 0]  # [U, D]
    slot = slot.to(device=g.device, dtype=torch.long, non_blocking=True)  # [B, T]
    if slot.shape != (B, T):
        raise ValueError(f"transfer.slot must be [B, T]=[{B}, {T}]. Got {tuple(slot.shape)}")
    use = (slot >= 0) & valid  # [B, T]
    return g + info[slot.clamp(0, U - 1)] * use.unsqueeze(-1).to(g.dtype)


def slice_probs(outputs: dict[str, torch.Tensor], prediction: str) -> torch.Tensor:
    """The slice probabilities ``[B, T, 5]`` of a forward's ``outputs`` as ``prediction`` (``model.prediction``)
    says: ``sigmoid(mc_logits)``, with ``"mc+ac"`` its mean with ``sigmoid(ac_logits)``, with ``"ac"`` the
    latter alone."""
    if prediction == "ac":
        return torch.sigmoid(outputs["ac_logits"])
    probs = torch.sigmoid(outputs["mc_logits"])
    if prediction == "mc+ac":
        probs = (probs + torch.sigmoid(outputs["ac_logits"])) / 2
    return probs


def predict_future(context: torch.Tensor, predictors: nn.ModuleList | list[nn.Linear]) -> torch.Tensor:
    """Apply the K linear CPC predictors in one batched product: ``[B, T, Dc] → [B, T, K, D]``.

    Entry ``[b, t, k - 1]`` is ``W_k(c_{b, t})``, the prediction of ``g_{b, t + k}``.
    """
    weight = torch.stack([p.weight for p in predictors])  # [K, D, Dc]
    bias = torch.stack([p.bias for p in predictors])  # [K, D]
    return torch.einsum("btc,kdc->btkd", context, weight.to(context.dtype)) + bias.to(context.dtype)


def init_class_bias(net: ICHModel, prevalence: np.ndarray) -> None:
    """Set ``cls``'s bias to the log-odds of ``prevalence`` (``train.init_cls_bias``).

    With a zero bias every class starts at probability 0.5, and ASL spends the first epochs pushing the
    many negatives down before any class is told apart (see ``TrainConfig.init_cls_bias``).
    """
    p = np.clip(np.asarray(prevalence, dtype=np.float64), 1e-3, 1 - 1e-3)
    with torch.no_grad():
        net.cls.bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=net.cls.bias.dtype))


def build_model(cfg: ModelConfig) -> ICHModel:
    """Build :class:`ICHModel` from its config (random init unless ``cfg.pretrained_weights`` is set)."""
    model = ICHModel(cfg)
    logger.debug(
        "Built ICHModel: %.2fM parameters, %d LP classes",
        sum(p.numel() for p in model.parameters()) / 1e6,
        NUM_COUNT_CLASSES,
    )
    return model
