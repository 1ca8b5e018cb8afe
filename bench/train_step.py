"""Time one training step with every task and strategy against a step of the main task alone.

    python bench/train_step.py --size 64 --slices 16 --batch 4 --device cpu

Both steps are forward + backward + AdamW on one fixed batch of the full-size model (ResNet18, bi-GRU 2×256):

* ``full``: all five losses (α..ν = 1) with masking and diversity transfer on every series (ε = 1 by default,
  the worst case), the strategy plan drawn inside the timed step as in training;
* ``paper``: as ``full`` at the paper's ε = 0.5 (``--paper-epsilon``; the training default), where about half
  the series get the strategies, so about half the pair images;
* ``no_dt``: as ``full`` with p2 = 0 (no transferred pairs), to separate the cost of the pair images;
* ``full_ng``: as ``full`` with ``model.transfer_grad = False`` (the pair images in a pass without autograd);
* ``mc``: the main task only (β..ν = 0), no strategies.

The steps are timed alternately (so background load hits all alike) and the medians are compared. The FLOPs
of each step are counted with ``torch.utils.flop_counter.FlopCounterMode`` and set against a 2048² fp32
matmul measured in the same run. Diversity transfer adds two backbone images per transferred slice
(``2·round(m·p2)`` per generated series), which the ``images`` column shows (for the random ``paper`` plan:
the images of its last timed step). The last line is ``RESULT {json}`` for ``bench/run_all.py``.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401


import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ichmodel.config import ModelConfig
from ichmodel.losses import MultitaskLoss
from ichmodel.model import build_model
from ichmodel.strategies import make_transfer_batch, plan_strategies, transfer_labels


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--slices", type=int, default=16, help="slices per series")
    parser.add_argument("--batch", type=int, default=4, help="series per batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--epsilon", type=float, default=1.0, help="probability a series gets the strategies")
    parser.add_argument(
        "--paper-epsilon", type=float, default=0.5, help="ε of the ``paper`` step (paper: 0.5)"
    )
    parser.add_argument("--p1", type=float, default=0.15)
    parser.add_argument("--p2", type=float, default=0.15)
    parser.add_argument("--pool", type=int, default=64, help="diversity-transfer pairs held in memory")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the fp32 reference matrix product")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_matmul(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Median GFLOP/s of an ``n × n`` fp32 matmul."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def main(args: argparse.Namespace) -> dict[str, float]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    B, T, S = args.batch, args.slices, args.size
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    model = build_model(ModelConfig()).to(device=device, memory_format=memory_format)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model_ng = build_model(ModelConfig(transfer_grad=False)).to(device=device, memory_format=memory_format)
    model_ng.load_state_dict(model.state_dict())
    model_ng.train()
    optimizer_ng = torch.optim.AdamW(model_ng.parameters(), lr=1e-3)
    full_loss = MultitaskLoss(dict.fromkeys(("mc", "ac", "lp", "dc", "cpc"), 1.0))
    mc_loss = MultitaskLoss({"mc": 1.0})

    images = torch.randn(B, T, 3, S, S, device=device)
    labels = (torch.rand(B, T, 5, device=device) < 0.2).float()
    lengths = torch.full((B,), T, dtype=torch.long)
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    pool_images = torch.randn(args.pool, 2, 3, S, S, device=device)
    pool_classes = torch.randint(5, (args.pool,))  # host: the plan and the label transfer are drawn there
    generator = torch.Generator().manual_seed(args.seed)
    matmul_before = time_matmul(device, args.matmul)
    backbone_images: dict[str, int] = {}

    def strategies_step(name: str, p2: float, epsilon: float, net=model, opt=optimizer) -> None:
        plan = plan_strategies(lengths, args.p1, p2, epsilon, args.pool, generator)
        transfer = make_transfer_batch(plan, pool_images, pool_classes)
        step_labels = transfer_labels(labels, transfer.slot, transfer.pair_classes)
        out = net(images, lengths, transfer=transfer, mask=plan.mask.to(device))
        backbone_images[name] = B * T + 2 * transfer.num_pairs
        opt.zero_grad(set_to_none=True)
        full_loss(out, step_labels, valid)["loss"].backward()
        opt.step()

    def mc_step() -> None:
        out = model(images, lengths)
        backbone_images["mc"] = B * T
        optimizer.zero_grad(set_to_none=True)
        mc_loss(out, labels, valid)["loss"].backward()
        optimizer.step()

    steps: dict[str, Callable[[], None]] = {
        "full": lambda: strategies_step("full", args.p2, args.epsilon),
        "paper": lambda: strategies_step("paper", args.p2, args.paper_epsilon),
        "no_dt": lambda: strategies_step("no_dt", 0.0, args.epsilon),  # all tasks and masking, no pairs
        "full_ng": lambda: strategies_step("full_ng", args.p2, args.epsilon, model_ng, optimizer_ng),
        "mc": mc_step,
    }
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():  # alternate, so load changes hit both
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)

    flops: dict[str, float] = {}
    for name, step in steps.items():
        counts = []
        for _ in range(3 if name == "paper" else 1):  # the paper plan's pair count is random: average
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            counts.append(counter.get_total_flops())
        flops[name] = statistics.mean(counts)
    matmul = max(
        matmul_before, time_matmul(device, args.matmul)
    )  # the better of two runs: the machine is shared

    results: dict[str, float] = {"matmul_gflops": matmul}
    print(
        f"device {device}, {torch.get_num_threads()} threads, batch {B} × {T} slices × {S}² px, "
        f"channels_last={args.channels_last}, ε={args.epsilon} (paper step ε={args.paper_epsilon}), "
        f"p1={args.p1}, p2={args.p2}"
    )
    print(
        f"{'step':<8}{'median ms':>11}{'min ms':>9}{'images':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'of matmul':>11}"
    )
    for name in steps:
        med = statistics.median(times[name])
        rate = flops[name] / med / 1e9
        results[f"{name}_ms"] = med * 1e3
        results[f"{name}_gflops"] = rate
        print(
            f"{name:<8}{med * 1e3:>11.1f}{min(times[name]) * 1e3:>9.1f}{backbone_images[name]:>8d}"
            f"{flops[name] / 1e9:>8.2f}{rate:>9.1f}{rate / matmul:>10.0%}"
        )
    results["ratio"] = results["full_ms"] / results["mc_ms"]
    results["image_ratio"] = backbone_images["full"] / backbone_images["mc"]
    results["flop_ratio"] = flops["full"] / flops["mc"]
    results["paper_ratio"] = results["paper_ms"] / results["mc_ms"]
    results["paper_flop_ratio"] = flops["paper"] / flops["mc"]
    results["paper_of_matmul"] = results["paper_gflops"] / matmul
    results["mc_of_matmul"] = results["mc_gflops"] / matmul
    print(f"matmul 2048² fp32: {matmul:.1f} GFLOP/s")
    print(
        f"full / mc at ε={args.epsilon}: time {results['ratio']:.3f}× (goal ≤ 1.15×), FLOPs {results['flop_ratio']:.3f}×, "
        f"backbone images {results['image_ratio']:.3f}×"
    )
    print(
        f"full / mc at the paper's ε={args.paper_epsilon}: time {results['paper_ratio']:.3f}× (goal ≤ 1.15×), "
        f"FLOPs {results['paper_flop_ratio']:.3f}×"
    )
    results["no_dt_ratio"] = results["no_dt_ms"] / results["mc_ms"]
    results["full_ng_ratio"] = results["full_ng_ms"] / results["mc_ms"]
    print(
        f"full with model.transfer_grad=False / mc at ε={args.epsilon}: time {results['full_ng_ratio']:.3f}× "
        "(pair images without autograd)"
    )
    print(
        f"no_dt / mc: time {results['no_dt_ratio']:.3f}×, FLOPs {flops['no_dt'] / flops['mc']:.3f}× "
        "(the cost of the four extra tasks and masking; the rest of full's is the pair images)"
    )
    print(
        f"train step rate / matmul (channels_last={args.channels_last}): paper step {results['paper_of_matmul']:.0%}, "
        f"mc step {results['mc_of_matmul']:.0%} (goal ≥ 45%)"
    )
    results["channels_last"] = float(args.channels_last)
    results["size"] = float(S)
    print("RESULT " + json.dumps(results))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
