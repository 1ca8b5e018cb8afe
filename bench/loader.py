"""Data-loader wait as a fraction of training-step time, per DataLoader worker count.

    python bench/loader.py [--size 64] [--patients 12] [--steps 6] [--rounds 3] [--num-workers 0 1 2]

Training runs through the engine's own code: ``ichmodel.train_step.train_one_epoch`` in the fine-tuning stage
(all five tasks, masking and diversity transfer at the configured ε), fed by ``SeriesDataset`` +
``dataset.make_loader`` over demo shards made by ``ichmodel.demo_data.ensure_demo_data``. The loader handed to
the engine is wrapped in :class:`TimedLoader`, which records the seconds the training loop is blocked in
``next(loader)`` (worker start-up included: the engine builds a fresh loader every epoch). Printed per
worker count, medians over ``--rounds`` rounds that run the worker counts in turn (so background load hits
them alike):

* ``wait``: blocked time / epoch time, over every step (what an epoch of that length really loses);
* ``steady``: the same without the first batch (worker start-up and the first read);
* ``slices/s``: training throughput of the whole epoch.

On this 2-core machine, worker processes take cores from the training step itself, so more workers are
not free; the figure to read is whether ``wait`` is small at the configured default
(``DataConfig.num_workers``). :mod:`bench.gpu` uses :class:`TimedLoader` and :func:`build_rig` too.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ichmodel.batches import train_batches
from ichmodel.config import Config, DataConfig
from ichmodel.dataset import SeriesDataset, make_loader
from ichmodel.engine import (
    Stage,
    StepContext,
    TrainState,
    TransferPoolImages,
    build_pool_images,
    stage_plan,
    train_one_epoch,
)
from ichmodel.losses import build_loss
from ichmodel.model import build_model


class TimedLoader:
    """Iterate ``loader`` as the engine does, timing how long each ``next()`` blocks the caller.

    ``waits[i]`` is the time spent getting batch ``i`` (for ``i = 0`` this includes ``iter(loader)``,
    where a DataLoader starts its workers); ``marks[i]`` is when batch ``i`` was asked for; ``end`` is when
    the loop asked past the last batch, after ``sync()`` (e.g. ``torch.cuda.synchronize``) so that queued
    device work is inside the span.
    """

    def __init__(self, loader: Iterable[dict[str, Any]], sync: Callable[[], None] | None = None) -> None:
        self.loader = loader
        self.sync = sync
        self.waits: list[float] = []
        self.marks: list[float] = []
        self.slices: list[int] = []
        self.end = 0.0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.waits, self.marks, self.slices = [], [], []
        start = time.perf_counter()
        it = iter(self.loader)
        while True:
            if self.marks:
                start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                if self.sync is not None:
                    self.sync()
                self.end = time.perf_counter()
                return
            self.marks.append(start)
            self.waits.append(time.perf_counter() - start)
            self.slices.append(int(batch["lengths"].sum()))
            yield batch

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Wait fraction, seconds and slices/s over batches ``skip..`` (``skip = 0``: the whole epoch)."""
        if len(self.marks) <= skip:
            raise ValueError(f"Only {len(self.marks)} batches were drawn; cannot skip {skip}")
        span = self.end - self.marks[skip]
        wait = sum(self.waits[skip:])
        return {
            "wait_fraction": wait / span,
            "wait_s": wait,
            "span_s": span,
            "slices_per_s": sum(self.slices[skip:]) / span,
        }


@dataclass
class Rig:
    """Everything ``train_one_epoch`` needs, built as ``engine.fit`` builds it."""

    cfg: Config
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stage: Stage
    pool: TransferPoolImages | None
    dataset: SeriesDataset
    device: torch.device
    state: TrainState

    def run_epoch(
        self, batches: list[list[int]], num_workers: int, seed: int, sync: Callable[[], None] | None = None
    ) -> tuple[TimedLoader, dict[str, float]]:
        """One engine epoch over ``batches`` with a fresh ``make_loader`` of ``num_workers`` workers."""
        timed = TimedLoader(make_loader(self.dataset, batches, num_workers), sync)
        generator = torch.Generator().manual_seed(seed)
        ctx = StepContext(
            self.model,
            self.loss_fn,
            self.optimizer,
            self.device,
            self.cfg,
            self.stage,
            self.pool,
            generator,
            self.state,
        )
        metrics = train_one_epoch(ctx, timed)
        return timed, metrics


def build_rig(
    shards: Path, device: torch.device, overrides: dict[str, Any] | None = None, stage: int = 2
) -> Rig:
    """Model, loss, AdamW and the diversity-transfer pool for ``stage`` (default 2: fine-tuning, all tasks).

    ``overrides`` are dotted config names (``{"strategy.epsilon": 1.0}``); the model is moved to
    ``channels_last`` when ``train.channels_last`` is set, as ``engine.fit`` does.
    """
    cfg = Config().with_overrides({"data.shards": str(shards), **(overrides or {})})
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan = stage_plan(cfg)[stage]
    dataset = SeriesDataset(shards, max_slices=cfg.data.max_slices, seed=cfg.train.seed)
    pool = build_pool_images(dataset, cfg.strategy.pool_size, cfg.train.seed) if plan.strategies else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = build_loss(cfg.loss, weights_override=plan.weights)
    return Rig(cfg, model, loss_fn, optimizer, plan, pool, dataset, device, TrainState())


def draw_batches(num_items: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` shuffled batches as the engine draws them (``train_batches``), over as many epochs as needed."""
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        batches += list(train_batches(num_items, batch_size, seed, epoch))
        epoch += 1
    return batches[:steps]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="image side of the demo shards")
    parser.add_argument("--patients", type=int, default=12, help="demo training series (12-20 slices each)")
    parser.add_argument("--batch", type=int, default=4, help="series per batch (paper: 4)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every worker count once")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilon", type=float, default=0.5, help="strategy.epsilon (paper: 0.5)")
    parser.add_argument(
        "--data-root", default=None, help="demo data folder to reuse (default: a temporary one)"
    )
    parser.add_argument("--device", default="cpu")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    from ichmodel.demo_data import ensure_demo_data

    root = Path(args.data_root) if args.data_root else Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        start = time.perf_counter()
        shards, _ = ensure_demo_data(root, patients=args.patients, test_patients=1, size=args.size)
        print(f"demo shards {shards} ({args.size} px) ready in {time.perf_counter() - start:.1f} s")
        device = torch.device(args.device)
        rig = build_rig(shards, device, {"data.batch_size": args.batch, "strategy.epsilon": args.epsilon})
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        rig.run_epoch(
            draw_batches(len(rig.dataset), args.batch, 2, seed=99), 0, seed=99, sync=sync
        )  # warm-up
        stats: dict[int, dict[str, list[float]]] = {
            n: {"wait": [], "steady": [], "rate": [], "first_s": []} for n in args.num_workers
        }
        for r in range(args.rounds):
            batches = draw_batches(len(rig.dataset), args.batch, args.steps, seed=r)
            for n in args.num_workers:  # in turn, so load changes hit every worker count alike
                timed, _ = rig.run_epoch(batches, n, seed=r, sync=sync)
                whole, steady = timed.summary(0), timed.summary(1)
                stats[n]["wait"].append(whole["wait_fraction"])
                stats[n]["steady"].append(steady["wait_fraction"])
                stats[n]["rate"].append(whole["slices_per_s"])
                stats[n]["first_s"].append(timed.waits[0])
    finally:
        if args.data_root is None:
            shutil.rmtree(root, ignore_errors=True)

    default = DataConfig().num_workers
    print(
        f"device {device}, {torch.get_num_threads()} torch threads, {args.size} px, batch {args.batch} series, "
        f"{args.steps} steps/epoch, ε={args.epsilon}, medians of {args.rounds} rounds"
    )
    print(f"{'workers':>8}{'wait':>8}{'steady':>8}{'first batch s':>15}{'slices/s':>10}")
    result: dict[str, Any] = {"default_num_workers": default, "size": args.size}
    for n in args.num_workers:
        med = {k: statistics.median(v) for k, v in stats[n].items()}
        print(f"{n:>8d}{med['wait']:>8.1%}{med['steady']:>8.1%}{med['first_s']:>15.3f}{med['rate']:>10.1f}")
        result[f"wait_fraction_w{n}"] = med["wait"]
        result[f"steady_wait_fraction_w{n}"] = med["steady"]
        result[f"slices_per_s_w{n}"] = med["rate"]
    best = max(args.num_workers, key=lambda n: statistics.median(stats[n]["rate"]))
    result["fastest_num_workers"] = best
    if default in stats:
        result["wait_fraction_default"] = result[f"wait_fraction_w{default}"]
        print(
            f"chosen default data.num_workers = {default}: wait {result['wait_fraction_default']:.1%} of step time; "
            f"fastest here: {best} worker(s)"
        )
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
