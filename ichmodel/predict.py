"""Per-slice MC probabilities of one or more models over every series of a shard folder.

The result is a prediction table (its columns: ``ichmodel.prediction_table``), what ``ichmodel.ensemble``
averages, thresholds and writes as submission files.

Models run in eval mode on whole series (batches of ``batch_size`` series, padded), with bf16 autocast only
on CUDA and only when asked. :func:`eval_outputs` is the one evaluation forward: validation in
``ichmodel.validation.evaluate`` and prediction here both go through it. Test-time augmentation (``tta``, see
:func:`resolve_tta`) averages the probabilities of every combination of the chosen views: ``"flip"`` (each
slice mirrored left-right; training flips with ``flip_prob``, and ``tta=True`` means this) and
``"reverse"`` (slice order reversed, outputs reversed back, as the RSNA 2019 winners did with their
bi-directional RNNs). Reversal is refused unless the models' saved augment configs show they were trained
with reversed series (``reverse_prob > 0``): otherwise it shows a model what it never saw. Several models are
averaged by the mean of their probabilities; each batch of images is read and prepared once for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ichmodel.augment import normalize, reverse_padded
from ichmodel.batches import eval_batches
from ichmodel.config import AugmentConfig
from ichmodel.constants import NUM_CLASSES
from ichmodel.dataset import SeriesDataset, make_loader, prepare_images
from ichmodel.model import slice_probs
from ichmodel.prediction_table import prediction_frame

logger = logging.getLogger(__name__)

#: Test-time augmentations: ``"flip"`` mirrors every slice left-right, ``"reverse"`` reverses slice order.
TTA_KINDS: tuple[str, ...] = ("flip", "reverse")
#: What ``tta=True`` means: the augmentation default training covers (``AugmentConfig.flip_prob`` 0.5).
DEFAULT_TTA: tuple[str, ...] = ("flip",)


def autocast(device: torch.device, amp_bf16: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``amp_bf16`` is set and the device is CUDA; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and amp_bf16)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def eval_outputs(
    model: nn.Module, images: torch.Tensor, lengths: torch.Tensor, amp_bf16: bool = False
) -> dict[str, torch.Tensor]:
    """The evaluation forward: the model (unwrapped from DDP) in eval mode, no gradients.

    Args:
        model: an :class:`ichmodel.model.ICHModel`, possibly DDP-wrapped; it is left in eval mode.
        images: float ``[B, T, C, H, W]``, already normalised.
        lengths: ``[B]`` valid slices per series (on the host, as the loader gives them, or on the device).
        amp_bf16: bf16 autocast when ``images`` is on CUDA (see :func:`autocast`).

    Returns:
        The model's floating-point outputs as float32 (``mc_logits`` ``[B, T, 5]``, …).
    """
    net = unwrap(model)
    net.eval()
    with autocast(images.device, amp_bf16):
        outputs = net(images, lengths)
    return {k: v.float() for k, v in outputs.items() if torch.is_tensor(v) and v.is_floating_point()}


def predict_batches(
    model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, amp_bf16: bool = False
) -> Iterator[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Yield ``(batch, outputs)`` of :func:`eval_outputs` for each padded batch of ``loader`` (no augmentation);
    a batch of cached backbone features (``ichmodel.feature_cache``) goes in as its ``features``."""
    for batch in loader:
        if "features" in batch:
            images = batch["features"].to(device, non_blocking=True)  # [B, T, D]
        else:
            images = normalize(prepare_images(batch, device))  # [B, T, C, H, W]
        yield batch, eval_outputs(model, images, batch["lengths"], amp_bf16)


def resolve_tta(
    tta: bool | str | Sequence[str] | None, trained: AugmentConfig | Sequence[AugmentConfig] | None = None
) -> tuple[str, ...]:
    """The test-time augmentations asked for, checked against what the models were trained with.

    Args:
        tta: ``False``/``None``/``()``: none; ``True``: :data:`DEFAULT_TTA` (``("flip",)``); a name or names of
            :data:`TTA_KINDS`.
        trained: the saved ``AugmentConfig`` of each model (``load_model(...)[1].augment``), or None when
            unknown. ``"flip"`` needs flips in training (augmentation on, ``flip_prob > 0``) where known;
            ``"reverse"`` needs ``reverse_prob > 0`` and so needs ``trained``.

    Returns:
        The views in :data:`TTA_KINDS` order, without repeats.

    Raises:
        ValueError: for an unknown name, or a view that some model was not trained with (or, for
            ``"reverse"``, not known to be).
    """
    if tta is None or tta is False:
        return ()
    names = DEFAULT_TTA if tta is True else ((tta,) if isinstance(tta, str) else tuple(tta))
    unknown = [n for n in names if n not in TTA_KINDS]
    if unknown:
        raise ValueError(f"Unknown test-time augmentation {unknown}; choose from {list(TTA_KINDS)}")
    configs = [trained] if isinstance(trained, AugmentConfig) else list(trained or [])
    for i, cfg in enumerate(configs):
        if "flip" in names and not (cfg.enabled and cfg.flip_prob > 0):
            raise ValueError(f"Flip TTA refused: model {i} was trained without flips ({cfg})")
        if "reverse" in names and not (cfg.enabled and cfg.reverse_prob > 0):
            raise ValueError(
                f"Reversal TTA refused: model {i} was trained with augment.reverse_prob="
                f"{cfg.reverse_prob} (enabled={cfg.enabled}), so it never saw a reversed series; train with "
                "--set augment.reverse_prob=0.5 or use tta=('flip',)"
            )
    if "reverse" in names and not configs:
        raise ValueError("Reversal TTA needs the models' saved augment configs (trained=...) to check it")
    return tuple(k for k in TTA_KINDS if k in names)


def series_probs(
    model: nn.Module,
    images: torch.Tensor,
    lengths: torch.Tensor,
    tta: Sequence[str] = (),
    amp_bf16: bool = True,
) -> torch.Tensor:
    """Slice probabilities (:func:`ichmodel.model.slice_probs`) of one model on one normalised, padded batch.

    Args:
        model: an :class:`ichmodel.model.ICHModel` (put in eval mode here).
        images: float ``[B, T, C, H, W]``, already normalised.
        lengths: ``[B]`` valid slices per series.
        tta: views of :data:`TTA_KINDS` (already checked, :func:`resolve_tta`); the probabilities of every
            combination (``2 ** len(tta)`` forwards) are averaged, each mapped back to the original order.
        amp_bf16: bf16 autocast when ``images`` is on CUDA (ignored on CPU).

    Returns:
        float32 ``[B, T, 5]`` on the device of ``images``; values at padding are meaningless.

    Raises:
        ValueError: for a name not in :data:`TTA_KINDS`.
    """
    unknown = [n for n in tta if n not in TTA_KINDS]
    if unknown:
        raise ValueError(f"Unknown test-time augmentation {unknown}; choose from {list(TTA_KINDS)}")
    total = torch.zeros(images.shape[:2] + (NUM_CLASSES,), device=images.device)  # [B, T, 5]
    views = 0
    for flip in (False, True) if "flip" in tta else (False,):
        for reverse in (False, True) if "reverse" in tta else (False,):
            x = images.flip(-1) if flip else images  # mirror along W: slice-level labels do not change
            x = reverse_padded(x, lengths) if reverse else x
            outputs = eval_outputs(model, x, lengths, amp_bf16)
            probs = slice_probs(outputs, unwrap(model).cfg.prediction)  # [B, T, 5]
            total += reverse_padded(probs, lengths) if reverse else probs
            views += 1
    return total / views


@torch.no_grad()
def predict_dataset(
    models: nn.Module | Sequence[nn.Module],
    dataset: SeriesDataset,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    tta: bool | str | Sequence[str] = False,
    amp_bf16: bool = True,
    num_workers: int = 0,
    trained: AugmentConfig | Sequence[AugmentConfig] | None = None,
) -> pd.DataFrame:
    """Predict every slice of every series of ``dataset``, averaging ``models`` (mean of probabilities).

    Args:
        models: one model or several; they are moved to ``device`` and put in eval mode.
        dataset: the series to predict (whole series: its ``max_slices`` must be 0).
        batch_size: series per forward pass.
        device: where the models run.
        tta: test-time augmentation, checked by :func:`resolve_tta` (``True``: flip).
        amp_bf16: bf16 autocast on CUDA.
        num_workers: DataLoader worker processes.
        trained: the models' saved augment configs, for :func:`resolve_tta`'s checks.

    Returns:
        DataFrame with ``N`` rows (one per slice of the dataset): ``series_id`` (str), ``position`` (int),
        ``slice_id`` (str), the five class probabilities (float32 in [0, 1]) and, when the shards have labels,
        ``label_<cls>`` (int8 0/1). Sorted by ``series_id`` then ``position``.

    Raises:
        ValueError: for no models, ``batch_size < 1``, a dataset that crops series (``max_slices > 0``) or a
            TTA the models were not trained for.
    """
    views = resolve_tta(tta, trained)
    model_list = [models] if isinstance(models, nn.Module) else list(models)
    if not model_list:
        raise ValueError("predict_dataset needs at least one model. Got 0")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Got {batch_size}")
    if dataset.max_slices:
        raise ValueError(
            f"Prediction needs whole series; the dataset crops to max_slices={dataset.max_slices}"
        )
    device = torch.device(device)
    for model in model_list:
        model.to(device).eval()
    has_labels = bool(dataset.manifest.get("has_labels"))
    batches = eval_batches(len(dataset), batch_size)
    columns: dict[str, list] = {"series_id": [], "position": [], "slice_id": []}
    probs_out: list[np.ndarray] = []
    labels_out: list[np.ndarray] = []
    for batch in make_loader(dataset, batches, num_workers):
        images = normalize(prepare_images(batch, device))  # [B, T, C, H, W]
        lengths = batch["lengths"]  # [B] on the host, as the model reads it
        total = torch.zeros(images.shape[:2] + (NUM_CLASSES,), device=device)  # [B, T, 5]
        for model in model_list:
            total += series_probs(model, images, lengths, tta=views, amp_bf16=amp_bf16)
        probs = (total / len(model_list)).cpu()
        for b, length in enumerate(batch["lengths"].tolist()):
            columns["series_id"].extend([batch["series_ids"][b]] * length)
            columns["position"].extend(range(length))
            columns["slice_id"].extend(batch["slice_ids"][b])
            probs_out.append(probs[b, :length].numpy())
            labels_out.append(batch["labels"][b, :length].numpy())
    frame = prediction_frame(columns, probs_out, labels_out if has_labels else None)
    frame = frame.sort_values(["series_id", "position"], kind="stable").reset_index(drop=True)
    logger.info(
        "predicted %d slices of %d series with %d model(s)%s",
        len(frame),
        len(dataset),
        len(model_list),
        f" + TTA {'+'.join(views)}" if views else "",
    )
    return frame
