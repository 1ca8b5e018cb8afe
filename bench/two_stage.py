"""The two-stage baseline of the RSNA 2019 winners (SeuTao's, darraghdog's), for the ablation (issue 27).

Stage 1: a per-slice ResNet18 (``ichmodel.model.Backbone`` + a linear head) trained with BCE on *shuffled
slice batches* (slices of many series mixed in every batch, so BatchNorm and each step see many series).
Stage 2: the backbone is frozen; its per-slice features are computed once (eval mode, no augmentation) and
a bi-GRU + linear head is trained on them with BCE: a few seconds for 30 epochs.

Both stages keep the epoch with the best validation micro-F2 (thresholds tuned on validation). The caller
scores on its held-out part. Library parts reused: Backbone, augment_series / normalize, metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ichmodel import metrics as M
from ichmodel.augment import augment_series, normalize, to_float
from ichmodel.config import Config
from ichmodel.constants import CLASSES
from ichmodel.dataset import SeriesDataset
from ichmodel.model import Backbone


@dataclass
class Series:
    """All slices of a dataset in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` ``[N, 5]`` (0/1),
    and ``bounds``: series ``i`` is rows ``bounds[i]:bounds[i + 1]``."""

    images: torch.Tensor
    labels: torch.Tensor
    bounds: np.ndarray

    @classmethod
    def load(cls, dataset: SeriesDataset) -> Series:
        items = [dataset[i] for i in range(len(dataset))]
        lengths = [item["images"].shape[0] for item in items]
        return cls(
            torch.cat([item["images"] for item in items]),
            (torch.cat([item["labels"] for item in items]) > 0.5).float(),
            np.concatenate([[0], np.cumsum(lengths)]),
        )

    def __len__(self) -> int:
        return len(self.bounds) - 1


def class_auc(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Per-class ROC AUC ``{class: auc}``; NaN for a class with no positive or no negative."""
    out = {}
    for c, name in enumerate(CLASSES):
        y = labels[:, c]
        out[name] = float(roc_auc_score(y, probs[:, c])) if 0 < y.sum() < len(y) else float("nan")
    return out


def tuned_f2(labels: np.ndarray, probs: np.ndarray) -> float:
    return M.f2_score(labels, probs >= M.search_thresholds(labels, probs, min_positives=0))


class SliceCNN(nn.Module):
    """ResNet18 trunk + linear head: ``[N, C, H, W] → [N, 5]`` logits."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.backbone = Backbone(cfg.model)
        self.head = nn.Linear(cfg.model.feature_dim, cfg.model.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def slice_outputs(model: SliceCNN, series: Series, batch: int = 128) -> tuple[np.ndarray, torch.Tensor]:
    """Probabilities ``[N, 5]`` and backbone features ``[N, D]`` of every slice (eval mode)."""
    model.eval()
    probs, feats = [], []
    for i in range(0, len(series.images), batch):
        g = model.backbone(normalize(to_float(series.images[i : i + batch])))  # [n, D]
        feats.append(g)
        probs.append(torch.sigmoid(model.head(g)))
    return torch.cat(probs).numpy(), torch.cat(feats)


def fit_slice_cnn(
    cfg: Config,
    train: Series,
    val: Series,
    epochs: int,
    batch_slices: int = 32,
    shuffle_slices: bool = True,
    on_epoch: Callable[[int, SliceCNN], None] | None = None,
) -> SliceCNN:
    """Stage 1: BCE on batches of ``batch_slices`` slices, AdamW at ``cfg.train.lr``; the best validation epoch.

    ``shuffle_slices=False`` keeps each batch's slices from consecutive series (the batch composition of a
    series batch, for the BatchNorm comparison); the order of the series is still shuffled.
    """
    torch.manual_seed(cfg.train.seed)
    model = SliceCNN(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        if shuffle_slices:
            order = rng.permutation(len(train.images))
        else:
            series_order = rng.permutation(len(train))
            order = np.concatenate([np.arange(train.bounds[s], train.bounds[s + 1]) for s in series_order])
        for i in range(0, len(order), batch_slices):
            idx = torch.from_numpy(order[i : i + batch_slices])
            images = to_float(train.images[idx])[:, None]  # [n, 1, C, H, W]: one draw per slice
            images = normalize(augment_series(images, cfg.augment, generator))[:, 0]  # [n, C, H, W]
            loss = F.binary_cross_entropy_with_logits(model(images), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
        f2 = tuned_f2(val.labels.numpy(), slice_outputs(model, val)[0])
        if f2 > best:
            best, best_state = f2, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model


class SequenceHead(nn.Module):
    """bi-GRU + linear over frozen slice features: ``[B, T, D] → [B, T, 5]`` logits."""

    def __init__(self, feature_dim: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(feature_dim, hidden, batch_first=True, bidirectional=True)
        self.cls = nn.Linear(2 * hidden, num_classes)

    def forward(self, g: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.dropout(g), lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=g.size(1))
        return self.cls(h)  # [B, T, 5]


def _padded(feats: torch.Tensor, series: Series, ids: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Features ``[B, T, D]``, labels ``[B, T, 5]``, lengths ``[B]`` and valid ``[B, T]`` of series ``ids``."""
    lengths = torch.tensor([series.bounds[i + 1] - series.bounds[i] for i in ids])
    B, T, D = len(ids), int(lengths.max()), feats.size(1)
    g, y = feats.new_zeros(B, T, D), torch.zeros(B, T, len(CLASSES))
    for b, i in enumerate(ids):
        lo, hi = series.bounds[i], series.bounds[i + 1]
        g[b, : hi - lo], y[b, : hi - lo] = feats[lo:hi], series.labels[lo:hi]
    return g, y, lengths, torch.arange(T)[None, :] < lengths[:, None]


@torch.no_grad()
def sequence_probs(head: SequenceHead, feats: torch.Tensor, series: Series) -> np.ndarray:
    """Probabilities ``[N, 5]`` in slice order for every slice of ``series``."""
    head.eval()
    g, _, lengths, valid = _padded(feats, series, np.arange(len(series)))
    return torch.sigmoid(head(g, lengths))[valid].numpy()


def fit_sequence_head(
    cfg: Config,
    train: tuple[torch.Tensor, Series],
    val: tuple[torch.Tensor, Series],
    epochs: int = 30,
    batch_series: int = 4,
    lr: float = 1e-3,
) -> SequenceHead:
    """Stage 2: bi-GRU + linear on frozen features, BCE, AdamW; keeps the best validation micro-F2 epoch."""
    torch.manual_seed(cfg.train.seed)
    feats, series = train
    head = SequenceHead(feats.size(1), cfg.model.rnn_hidden, cfg.model.num_classes, cfg.model.dropout)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    rng = np.random.default_rng(cfg.train.seed + 1)
    best, best_state = -1.0, None
    for _ in range(epochs):
        head.train()
        order = rng.permutation(len(series))
        for i in range(0, len(order), batch_series):
            g, y, lengths, valid = _padded(feats, series, order[i : i + batch_series])
            loss = F.binary_cross_entropy_with_logits(head(g, lengths)[valid], y[valid])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        f2 = tuned_f2(val[1].labels.numpy(), sequence_probs(head, *val))
        if f2 > best:
            best, best_state = f2, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    return head


def fit_two_stage(
    cfg: Config,
    sets: tuple[SeriesDataset, SeriesDataset, SeriesDataset],
    backbone_epochs: int,
    head_epochs: int = 30,
    batch_slices: int = 32,
    on_epoch: Callable[[int, SliceCNN], None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Both stages; returns ``{"slice_cnn": {...}, "two_stage": {...}}`` with validation and test
    ``val_probs``, ``val_labels``, ``test_probs``, ``test_labels`` (``[N, 5]`` each)."""
    train, val, test = (Series.load(s) for s in sets)
    cnn = fit_slice_cnn(cfg, train, val, backbone_epochs, batch_slices, on_epoch=on_epoch)
    outputs = {name: slice_outputs(cnn, s) for name, s in (("train", train), ("val", val), ("test", test))}
    head = fit_sequence_head(cfg, (outputs["train"][1], train), (outputs["val"][1], val), head_epochs)
    labels = {"val_labels": val.labels.numpy(), "test_labels": test.labels.numpy()}
    return {
        "slice_cnn": {"val_probs": outputs["val"][0], "test_probs": outputs["test"][0], **labels},
        "two_stage": {
            "val_probs": sequence_probs(head, outputs["val"][1], val),
            "test_probs": sequence_probs(head, outputs["test"][1], test),
            **labels,
        },
    }
