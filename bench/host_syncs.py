"""Count device → host syncs per training step of the fine-tuning stage, on any machine (no GPU needed).

    python bench/host_syncs.py            # 20 steps, 32 px, all five tasks, masking + DT at ε = 0.5

Runs the engine's own epoch loop (:func:`ichmodel.train_step.train_one_epoch`) over generated series with
every task on, masking (p1) and diversity transfer (p2, ε = 0.5) under :class:`bench.syncs.SyncCounter`,
which counts what would stall a GPU's launch queue: ``.item()``/``float()``/``bool()`` of device values,
``nonzero``/``masked_select``/``unique`` on device data, copies to the host. Host-side work (the loader's
batch, the strategy plan, lengths) is free, as on a GPU. Prints the syncs per step and which ops, and the
last line ``RESULT {json}`` with ``syncs_per_step``. The epoch's one read of its accumulated loss parts at
the end counts too (spread over the steps).
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.syncs import SyncCounter
from ichmodel import synth
from ichmodel.batches import train_batches
from ichmodel.config import Config
from ichmodel.dataset import SeriesDataset, make_loader
from ichmodel.engine import (
    StepContext,
    TrainState,
    build_pool_images,
    make_optimizer,
    stage_plan,
    train_one_epoch,
)
from ichmodel.losses import build_loss
from ichmodel.model import build_model
from ichmodel.preprocess import PreprocessOptions, preprocess
from ichmodel.readers import read_dlcv


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps counted")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="series per batch")
    parser.add_argument("--epsilon", type=float, default=0.5, help="probability a series gets the strategies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trace", default=None, help="print where the first sync whose op name has this runs"
    )
    parser.add_argument("--workdir", default=None, help="where the generated data goes (default: a temp dir)")
    return parser


def make_data(root: Path, series: int, size: int, seed: int) -> Path:
    """Generated DLCV series preprocessed to shards under ``root``; returns the shard folder."""
    synth.write_dlcv_dataset(root / "raw", series, (5, 8), size, seed, 0)
    shards = root / "shards"
    preprocess(
        read_dlcv(root / "raw" / "train", root / "raw" / "train.csv"), shards, PreprocessOptions(size=size)
    )
    return shards


def finetune_context(cfg: Config, dataset: SeriesDataset, generator: torch.Generator) -> StepContext:
    """The fine-tuning stage's step context on the CPU, as the engine builds it."""
    stage = stage_plan(cfg)[2]
    model = build_model(cfg.model)
    return StepContext(
        model=model,
        loss_fn=build_loss(cfg.loss, weights_override=stage.weights),
        optimizer=make_optimizer(model, cfg),
        device=torch.device("cpu"),
        cfg=cfg,
        stage=stage,
        pool=build_pool_images(dataset, cfg.strategy.pool_size, cfg.train.seed),
        generator=generator,
        state=TrainState(),
    )


def count_syncs(
    ctx: StepContext, dataset: SeriesDataset, steps: int, batch: int, seed: int, trace: str | None = None
) -> SyncCounter:
    """Run ``steps`` training steps of ``ctx`` under a :class:`SyncCounter` (parameters marked as device)."""
    batches = list(train_batches(len(dataset), batch, seed, 0))
    while len(batches) < steps:
        batches += list(train_batches(len(dataset), batch, seed, len(batches)))
    counter = SyncCounter(trace)
    counter.mark(*ctx.model.parameters(), *ctx.model.buffers())
    with counter:
        metrics = train_one_epoch(ctx, make_loader(dataset, batches[:steps], 0))
    if metrics["train_steps"] + metrics["train_skipped"] != steps:
        raise RuntimeError(f"expected {steps} steps, ran {metrics}")
    return counter


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        shards = make_data(root, 8, args.size, args.seed)
        cfg = Config().with_overrides(
            {"data.shards": str(shards), "data.batch_size": args.batch, "strategy.epsilon": args.epsilon}
        )
        dataset = SeriesDataset(shards)
        ctx = finetune_context(cfg, dataset, torch.Generator().manual_seed(args.seed))
        if ctx.pool is None:
            raise RuntimeError("the generated data gave no diversity-transfer pair; try another --seed")
        counter = count_syncs(ctx, dataset, args.steps, args.batch, args.seed, args.trace)
    per_step = counter.total / args.steps
    print(f"{counter.total} device -> host syncs in {args.steps} steps: {per_step:.2f} per step")
    for op, n in counter.by_op.most_common():
        print(f"  {n:5d}  {op}")
    result = {"syncs_per_step": per_step, "steps": args.steps, "by_op": dict(counter.by_op)}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
