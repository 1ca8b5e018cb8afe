"""On-device image preparation: uint8 → float, per-series augmentation, normalisation.

Every slice of a series gets the *same* random transform (flip, rotation, multiscale crop, brightness,
contrast), so the sequence stays anatomically consistent; different series get different draws
(paper section 3.1 applies varying augmentations per image; we keep them per series because the bi-GRU
reads neighbouring slices together, which is what the authors' data loader did per patient).

:func:`reverse_series` optionally reverses a series' slice order, images and labels together
(``AugmentConfig.reverse_prob``, off by default): only a model trained so may be given reversed series at
test time (``ichmodel.predict``'s ``"reverse"`` TTA checks it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ichmodel.config import AugmentConfig

#: ImageNet statistics, so optional ImageNet weights see the input they were trained on.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` → float32 in [0, 1] on the same device."""
    if images.dtype != torch.uint8:
        raise ValueError(f"Expected uint8 images. Got {images.dtype}")
    return images.float().div_(255.0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Channel-wise ImageNet normalisation of ``[..., C, H, W]`` floats in [0, 1]."""
    C = images.shape[-3]
    mean = torch.tensor(MEAN[:C] if C <= 3 else [0.5] * C, device=images.device).view(C, 1, 1)
    std = torch.tensor(STD[:C] if C <= 3 else [0.25] * C, device=images.device).view(C, 1, 1)
    return (images - mean) / std


def augment_series(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Apply one random transform per series to float images ``[B, T, C, H, W]`` in [0, 1].

    The draws come from ``generator`` (a CPU generator) so a seed reproduces them on any device.
    Returns a tensor of the same shape, clamped to [0, 1].
    """
    if images.ndim != 5:
        raise ValueError(f"Expected images [B, T, C, H, W]. Got shape {tuple(images.shape)}")
    if not cfg.enabled:
        return images
    B, T, C, H, W = images.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(B, generator=generator) * (high - low) + low

    flip = torch.rand(B, generator=generator) < cfg.flip_prob
    angle = uniform(-cfg.rotate_degrees, cfg.rotate_degrees) * (math.pi / 180.0)
    scale = uniform(cfg.crop_scale_min, 1.0)  # fraction of the side kept
    shift_x = (1.0 - scale) * uniform(-1.0, 1.0)  # crop centre stays inside the image
    shift_y = (1.0 - scale) * uniform(-1.0, 1.0)
    brightness = uniform(-cfg.brightness, cfg.brightness)
    contrast = uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)

    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    sign = torch.where(flip, -1.0, 1.0)
    theta = torch.stack(
        [torch.stack([cos * sign, -sin, shift_x], dim=1), torch.stack([sin * sign, cos, shift_y], dim=1)],
        dim=1,
    ).to(images.device, images.dtype)  # [B, 2, 3]
    theta = theta.repeat_interleave(T, dim=0)  # [B*T, 2, 3], one draw per series

    flat = images.reshape(B * T, C, H, W)
    grid = F.affine_grid(theta, [B * T, C, H, W], align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.view(B, T, C, H, W)
    contrast = contrast.to(images.device, images.dtype).view(B, 1, 1, 1, 1)
    brightness = brightness.to(images.device, images.dtype).view(B, 1, 1, 1, 1)
    mean = out.mean(dim=(2, 3, 4), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    return out.clamp_(0.0, 1.0)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the valid part of every sequence of a padded batch; padding stays where it is.

    Args:
        x: ``[B, T, ...]``.
        lengths: ``[B]`` valid lengths, each in ``[0, T]``.

    Returns:
        ``[B, T, ...]`` with ``out[b, t] = x[b, lengths[b] - 1 - t]`` for ``t < lengths[b]``, else ``x[b, t]``.
        Applying it twice gives ``x`` back.

    Raises:
        ValueError: when ``lengths`` is not ``[B]`` or a length is outside ``[0, T]``.
    """
    B, T = x.shape[:2]  # batch, slices
    lengths = lengths.to(device=x.device, dtype=torch.long)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B]={B}. Got shape {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > T).any()):
        raise ValueError(f"lengths must be in [0, {T}]. Got {lengths.tolist()}")
    t = torch.arange(T, device=x.device)[None, :]  # [1, T]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # [B, T]
    index = index.view(B, T, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, index)


def reverse_series(
    images: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse the slice order of each series with probability ``cfg.reverse_prob`` (images and labels).

    Args:
        images: ``[B, T, C, H, W]``, padded.
        labels: ``[B, T, 5]``, padded like ``images``.
        lengths: ``[B]`` valid slices per series; padding stays at the end.
        cfg: the augmentation config; nothing is drawn (the generator is untouched) when augmentation is
            off or ``reverse_prob`` is 0, so runs without reversal keep their random stream.
        generator: a CPU generator; one draw per series.

    Returns:
        ``(images, labels)``, the chosen series reversed along ``T``.
    """
    if not cfg.enabled or cfg.reverse_prob <= 0.0:
        return images, labels
    B = images.shape[0]
    chosen = torch.rand(B, generator=generator) < cfg.reverse_prob  # [B] on the host
    if not bool(chosen.any()):
        return images, labels
    lengths = lengths.to(torch.long)
    reversed_lengths = torch.where(chosen, lengths, torch.zeros_like(lengths))  # length 0: left as is
    return reverse_padded(images, reversed_lengths), reverse_padded(
        labels, reversed_lengths.to(labels.device)
    )
