"""Training engine without Ray: epochs, the three-stage plan, checkpoints and resume.

The stage plan follows the paper's section 3.3:

1. pretraining, α = β = 1, γ = μ = ν = 0, no masking or diversity transfer;
2. pretraining, same weights, masking + diversity transfer;
3. fine-tuning with the configured weights (``cfg.loss``; the paper uses all ones), masking + DT.

Each stage starts a fresh AdamW, halves the learning rate when the validation loss has not improved for
``lr_patience`` epochs (``ReduceLROnPlateau``), and ends when the learning rate falls below ``min_lr`` or
at the stage's epoch cap; the next stage starts from the best (lowest validation loss) weights of the last.

Distributed data parallel is used when ``torch.distributed`` is initialised (as Ray Train does): every rank
trains on its own slice of the series, and validation predictions are gathered so that every rank takes the
same learning-rate and stage decisions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from ichmodel import metrics as M
from ichmodel.augment import augment_series, normalize, to_float
from ichmodel.config import Config
from ichmodel.dataset import SeriesDataset, collate_series
from ichmodel.losses import build_loss
from ichmodel.model import ICHModel, build_model
from ichmodel.shards import series_index
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
    """Where a run stands; everything here goes into the checkpoint."""

    stage: int = 0
    epoch: int = 0  # epochs finished in the current stage
    global_epoch: int = 0  # epochs finished over all stages
    stage_started: bool = False  # optimizer/scheduler of the current stage exist
    best_val_loss: float = math.inf  # within the current stage
    best_f2: float = -1.0  # validation F2 of best_model
    best_thresholds: list[float] = field(default_factory=lambda: [0.5] * 5)
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


# ----------------------------------------------------------------------------------------------- data


def series_labels(dataset: SeriesDataset) -> list[np.ndarray]:
    """Label matrices ``[T, 5]`` of every series of ``dataset`` without decoding any image."""
    index = series_index(dataset.manifest)
    files: dict[str, pq.ParquetFile] = {}
    out: list[np.ndarray] = []
    for series_id in dataset.series_ids:
        file, row_group, _ = index[series_id]
        if file not in files:
            files[file] = pq.ParquetFile(Path(dataset.shard_dir) / file)
        table = files[file].read_row_group(row_group, columns=["labels"])
        labels = table.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        out.append(labels.reshape(-1, 5).astype(np.int8))
    return out


def build_pool_images(dataset: SeriesDataset, pool_size: int, seed: int) -> TransferPoolImages | None:
    """Sample up to ``pool_size`` diversity-transfer pairs from ``dataset`` and load their images.

    Pairs follow the paper's conditions (adjacent slices, the second has exactly one more label).
    Keeping a bounded sample in memory makes a DT step cost one backbone pass over ``2 × pairs`` extra
    images instead of reading series from disk inside the training step. Returns ``None`` when the
    training labels hold no such pair.
    """
    pool = build_transfer_pool(series_labels(dataset))
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


def epoch_batches(
    num_items: int, batch_size: int, seed: int, rank: int, world: int, shuffle: bool
) -> list[list[int]]:
    """Index batches for one rank; every rank gets the same number of batches (DDP needs that)."""
    order = np.random.default_rng(seed).permutation(num_items) if shuffle else np.arange(num_items)
    per_rank = math.ceil(num_items / world)
    order = np.resize(order, per_rank * world)  # repeats the first items to even out the ranks
    mine = order[rank::world].tolist()
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def make_loader(
    dataset: SeriesDataset, batches: list[list[int]], num_workers: int
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_series,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,  # keep a GPU fed across slow shard reads
    )


def prepare_images(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """uint8 ``[B, T, C, H, W]`` on the host → float in [0, 1] on ``device``."""
    return to_float(batch["images"].to(device, non_blocking=True))


# --------------------------------------------------------------------------------------------- epochs


def _unwrap(model: nn.Module) -> ICHModel:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # type: ignore[return-value]


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        flag = flag.to(loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    cfg: Config,
    stage: Stage,
    pool: TransferPoolImages | None,
    generator: torch.Generator,
    state: TrainState,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss parts, slices/s and skipped (non-finite) steps.

    Raises:
        FloatingPointError: after ``cfg.train.max_nonfinite_steps`` consecutive non-finite losses.
    """
    model.train()
    totals: dict[str, float] = {}
    steps = skipped = consecutive = slices = 0
    use_amp = device.type == "cuda" and cfg.train.amp_bf16
    pool_images = None
    if stage.strategies and pool is not None:
        pool_images = normalize(to_float(pool.images.to(device)))  # [P, 2, C, H, W]
        if cfg.train.channels_last:
            pool_images = pool_images.contiguous()
    start = time.perf_counter()
    num_batches = len(loader)
    for step, batch in enumerate(loader):
        images = prepare_images(batch, device)
        images = normalize(augment_series(images, cfg.augment, generator))
        lengths = batch["lengths"].to(device)
        labels = batch["labels"].to(device)
        valid = batch["valid"].to(device)
        transfer = mask = None
        if stage.strategies:
            plan = plan_strategies(
                batch["lengths"],
                cfg.strategy.p1,
                cfg.strategy.p2,
                cfg.strategy.epsilon,
                len(pool) if pool is not None else 0,
                generator,
            )
            mask = plan.mask.to(device)
            if pool_images is not None:
                transfer = make_transfer_batch(plan, pool_images, pool.classes.to(device))
                transfer.slot = transfer.slot.to(device)
                labels = transfer_labels(labels, transfer.slot, transfer.pair_classes)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model(images, lengths, transfer=transfer, mask=mask)
        outputs = {
            k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()
        }
        parts = loss_fn(outputs, labels, valid)
        loss = parts["loss"]
        if not _all_finite(loss):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            consecutive += 1
            state.nonfinite_steps += 1
            logger.warning(
                "non-finite loss at stage %s step %d: step skipped (%d in a row)",
                stage.name,
                step,
                consecutive,
            )
            if consecutive >= cfg.train.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{consecutive} consecutive non-finite losses in stage {stage.name!r} "
                    f"(last parts: { {k: float(v.detach()) for k, v in parts.items()} }); lower train.lr or check the data"
                )
            continue
        consecutive = 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        slices += int(batch["lengths"].sum())
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach())
        if progress is not None:
            progress(step + 1, num_batches, float(loss.detach()))
    elapsed = time.perf_counter() - start
    result = {f"train_{k}": v / max(steps, 1) for k, v in totals.items()}
    result.update(train_steps=steps, train_skipped=skipped, train_slices_per_s=slices / max(elapsed, 1e-9))
    return result


@torch.no_grad()
def predict_batches(
    model: nn.Module, loader: Iterator[dict[str, Any]], device: torch.device, amp_bf16: bool = True
) -> Iterator[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Yield ``(batch, outputs)`` for each batch with the model in eval mode (no augmentation)."""
    net = _unwrap(model)
    net.eval()
    use_amp = device.type == "cuda" and amp_bf16
    for batch in loader:
        images = normalize(prepare_images(batch, device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = net(images, batch["lengths"].to(device))
        yield (
            batch,
            {k: v.float() for k, v in outputs.items() if torch.is_tensor(v) and v.is_floating_point()},
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Validation loss parts, micro-F2 at ``threshold`` and at thresholds tuned on these predictions.

    Under DDP each rank evaluates its own series and the results are gathered, so every rank returns the
    same numbers. ``probs`` / ``labels`` (``[N, 5]`` numpy, valid slices only) are in the result too.
    """
    sums: dict[str, float] = {}
    weight = 0.0
    probs, labels = [], []
    for batch, outputs in predict_batches(model, loader, device):
        lab = batch["labels"].to(device)
        valid = batch["valid"].to(device)
        parts = loss_fn(outputs, lab, valid)
        n = float(valid.sum())
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        weight += n
        keep = valid.cpu()
        probs.append(torch.sigmoid(outputs["mc_logits"]).cpu()[keep].numpy())
        labels.append(batch["labels"][keep].numpy())
    local = (sums, weight, probs, labels)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    total_weight = sum(g[1] for g in gathered)
    keys = gathered[0][0].keys()
    result: dict[str, Any] = {
        f"val_{k}": sum(g[0].get(k, 0.0) for g in gathered) / max(total_weight, 1.0) for k in keys
    }
    y_prob = np.concatenate([p for g in gathered for p in g[2]]) if total_weight else np.zeros((0, 5))
    y_true = np.concatenate([p for g in gathered for p in g[3]]) if total_weight else np.zeros((0, 5))
    y_true = (y_true > 0.5).astype(np.int8)
    thresholds = M.search_thresholds(y_true, y_prob)
    result["val_f2_at_threshold"] = M.f2_score(y_true, y_prob >= threshold)
    result["val_f2"] = M.f2_score(y_true, y_prob >= np.asarray(thresholds))
    for name, value in zip(
        ("ich", "ivh", "sah", "sdh", "edh"),
        M.per_class_f2(y_true, y_prob >= np.asarray(thresholds)),
        strict=True,
    ):
        result[f"val_f2_{name}"] = float(value)
    result["thresholds"] = [float(t) for t in thresholds]
    result["probs"], result["labels"] = y_prob, y_true
    return result


# --------------------------------------------------------------------------------------------- stages


def checkpoint_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: TrainState,
    best_model: dict[str, torch.Tensor] | None,
    cfg: Config,
) -> dict[str, Any]:
    """A plain dict that ``torch.load(weights_only=True)`` can read back."""
    st = asdict(state)
    return {
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "best_model": best_model,
        "config": cfg.to_dict(),
        "stage": state.stage,
        "epoch": state.epoch,
        "global_epoch": state.global_epoch,
        "best_val_loss": state.best_val_loss,
        "best_f2": state.best_f2,
        "thresholds": list(state.best_thresholds),
        "state": st,
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[ICHModel, Config, dict[str, Any]]:
    """Rebuild a model for inference from a checkpoint's best weights (falls back to its last weights)."""
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["best_model"] or ckpt["model"])
    model.to(device).eval()
    return model, cfg, ckpt


def fit(
    cfg: Config,
    train_set: SeriesDataset,
    val_set: SeriesDataset,
    device: torch.device,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[ICHModel, TrainState]:
    """Run (or continue) the three stages; returns the final model (best weights of the last stage).

    ``on_epoch_end(metrics, make_checkpoint)`` is called after every epoch on every rank; calling
    ``make_checkpoint()`` builds the checkpoint dict (the caller decides where, and on which rank, to
    write it). ``resume`` is such a checkpoint dict: training continues at its stage and epoch.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(cfg.train.seed)
    net = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    state = TrainState()
    best_model: dict[str, torch.Tensor] | None = None
    if resume is not None:
        net.load_state_dict(resume["model"])
        state = TrainState(**resume["state"])
        best_model = resume["best_model"]
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
    model: nn.Module = net
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    pool = None
    plan = stage_plan(cfg)
    if any(s.strategies and s.max_epochs > 0 for s in plan[state.stage :]) and not state.finished:
        pool = build_pool_images(train_set, cfg.strategy.pool_size, cfg.train.seed)
    val_batches = epoch_batches(len(val_set), cfg.data.batch_size, 0, rank, world, shuffle=False)
    optimizer = scheduler = None
    while not state.finished and state.stage < len(plan):
        stage = plan[state.stage]
        if stage.max_epochs == 0:
            _next_stage(state, plan)
            continue
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.train.lr_factor, patience=cfg.train.lr_patience
        )
        if state.stage_started and resume is not None and resume.get("optimizer"):
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
        else:
            if best_model is not None:  # next stage starts from the best weights of the last
                net.load_state_dict(best_model)
            state.stage_started = True
            state.best_val_loss = math.inf
        resume = None
        loss_fn = build_loss(cfg.loss, weights_override=stage.weights)
        logger.info(
            "stage %d/%d %s: weights %s, strategies %s",
            stage.index + 1,
            len(plan),
            stage.name,
            stage.weights,
            stage.strategies,
        )
        while True:
            seed = cfg.train.seed * 1_000_003 + state.global_epoch
            generator = torch.Generator().manual_seed(seed * 31 + rank)
            batches = epoch_batches(len(train_set), cfg.data.batch_size, seed, rank, world, shuffle=True)
            train_set.set_epoch(state.global_epoch)
            started = time.perf_counter()
            train_metrics = train_one_epoch(
                model,
                loss_fn,
                make_loader(train_set, batches, cfg.data.num_workers),
                optimizer,
                device,
                cfg,
                stage,
                pool,
                generator,
                state,
                progress,
            )
            val = evaluate(
                model,
                loss_fn,
                make_loader(val_set, val_batches, cfg.data.num_workers),
                device,
                cfg.train.threshold,
            )
            scheduler.step(val["val_loss"])
            state.epoch += 1
            state.global_epoch += 1
            if val["val_loss"] < state.best_val_loss:
                state.best_val_loss = float(val["val_loss"])
                best_model = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                state.best_f2 = float(val["val_f2"])
                state.best_thresholds = val["thresholds"]
            lr = optimizer.param_groups[0]["lr"]
            stage_done = lr < cfg.train.min_lr or state.epoch >= stage.max_epochs
            metrics = {k: v for k, v in val.items() if k not in ("probs", "labels", "thresholds")}
            metrics.update(train_metrics)
            metrics.update(
                stage=stage.index,
                stage_epoch=state.epoch,
                global_epoch=state.global_epoch,
                lr=lr,
                epoch_s=time.perf_counter() - started,
                nonfinite_steps=state.nonfinite_steps,
                model_f2=state.best_f2,  # validation F2 of the weights this checkpoint exports
            )
            if stage_done:
                _next_stage(state, plan)
            if state.finished:
                metrics["final_f2"] = state.best_f2
            metrics["finished"] = state.finished
            state.history.append({k: float(v) for k, v in metrics.items()})
            logger.info(
                "stage %s epoch %d (global %d): train loss %.4f, val loss %.4f, val F2 %.4f, lr %.2e, %.1f slices/s",
                stage.name,
                state.epoch if not stage_done else stage.max_epochs,
                state.global_epoch,
                train_metrics.get("train_loss", float("nan")),
                val["val_loss"],
                val["val_f2"],
                lr,
                train_metrics["train_slices_per_s"],
            )
            if on_epoch_end is not None:
                on_epoch_end(
                    metrics, partial(checkpoint_dict, model, optimizer, scheduler, state, best_model, cfg)
                )
            if stage_done:
                break
    if best_model is not None:
        net.load_state_dict(best_model)
    return net, state


def _next_stage(state: TrainState, plan: list[Stage]) -> None:
    state.stage += 1
    state.epoch = 0
    state.stage_started = False
    if state.stage >= len(plan):
        state.finished = True
