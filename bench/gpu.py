"""One prepared GPU run: bf16 + channels-last training throughput, loader wait, achieved TFLOP/s, DDP scaling.

    python bench/gpu.py --size 256 512           # on a lent H100: about 4-6 minutes, writes $OUT/gpu_bench.json
    python bench/gpu.py --tiny                   # CPU smoke run of the whole script (32 px, 2 steps)

Goal printed against: ≥ 6,000 slices/s at 256 px on one H100 with < 5 % of the step time blocked on the loader.

What runs, per ``--size``:

1. Shards: synthetic DLCV-layout series (24-40 slices, as the course data) made by ``ichmodel.synth`` and
   written by ``ichmodel.preprocess`` (LZ4 Parquet, one row group per series), the same path as
   ``ichmodel.demo_data.ensure_demo_data`` with realistic series lengths.
2. ``engine``: the engine's own training code, ``ichmodel.train_step.train_one_epoch`` in the fine-tuning stage
   (all five tasks, masking and diversity transfer at ε = 0.5, bf16 autocast, channels-last), fed by
   ``SeriesDataset`` + ``dataset.make_loader`` (pinned memory) with each ``--num-workers``; the loader is
   wrapped in ``bench/loader.py``'s ``TimedLoader``, which records the time blocked in ``next(loader)``.
   Throughput and wait are taken after the first ``--warmup`` batches of the epoch (worker start-up, cuDNN
   plans); the whole-epoch wait is reported too.
3. ``bare``: the same step (augmentation, strategy plan, forward, five losses, backward, AdamW) on one batch
   already on the device, without the loader and without the engine's per-step host reads of the loss parts:
   the ceiling the engine could reach with a perfect loader.
4. FLOPs of a bare step via ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products;
   the cuDNN GRU is not counted, about 2 % of the work), hence achieved TFLOP/s of both paths, set against
   a bf16 ``--matmul``³ matrix product measured in the same run.

Then, when ``torch.cuda.device_count() > 1`` (or ``--ddp-world`` forces it), the engine path again under
``DistributedDataParallel`` on every GPU (``torch.multiprocessing.spawn``, NCCL; gloo on the CPU), as
``engine.fit`` wraps the model, and the scaling line: summed slices/s over ``world ×`` the one-GPU figure.

What limits it (to read the figures with):

* Arithmetic: ResNet18 costs about 2.4 GFLOP per 256² slice forward, ~7 GFLOP per training step; 6,000 slices/s
  is ~45 TFLOP/s (plus ~8 % more backbone images for diversity transfer at ε = 0.5), under a tenth of the
  ~800 TFLOP/s bf16 matmul ceiling. ResNet18's early layers (64 channels at 128² and 64²) are memory-bound
  (BatchNorm, ReLU, pooling): expect a few to 15 % of the matmul rate, not more. ``--compile`` (the backbone
  under ``torch.compile``) fuses BatchNorm/ReLU and is the main lever there.
* Host: the step reads device values back several times (the model checks ``lengths`` and builds the
  packed GRU input on the host, ``transfer_labels`` calls ``nonzero``, the engine reads the loss and each of
  its six parts with ``float()``), so the CPU cannot queue the next step while the GPU runs: every launch
  gap shows. Larger batches (``--batch``, series per step) amortise it; the paper's 4 series (~130 slices)
  per step is too small a step for an H100. ``engine`` vs ``bare`` measures this cost plus the loader's.
* Loader: 6,000 slices/s at 256 px is 1.2 GB/s of uint8 pixels through LZ4 decoding, a transpose copy per
  series, the padded collate copy and the pin-memory copy, ~0.2-0.4 GB/s per worker process: it needs
  4-8 DataLoader workers (16 cores here). Decoding stays on the host; the uint8 → float, augmentation and
  normalisation already run on the device. The host → device copy (1.2 GB/s) is far below PCIe bandwidth.
"""

from __future__ import annotations

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from bench.loader import Rig, build_rig, draw_batches
from ichmodel.augment import augment_series, normalize, to_float
from ichmodel.dataset import make_loader
from ichmodel.strategies import make_transfer_batch, plan_strategies, transfer_labels

GOAL_SLICES_PER_S = 6000.0  # at 256 px on one H100
GOAL_WAIT = 0.05


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, nargs="+", default=[256, 512], help="image sides to measure")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each epoch")
    parser.add_argument(
        "--batch", type=int, default=0, help="series per step (0: 16 at 256 px, scaled by 1/area)"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        nargs="+",
        default=None,
        help="loader workers (default: 0 and min(8, cores - 2))",
    )
    parser.add_argument("--epsilon", type=float, default=0.5, help="strategy.epsilon (paper: 0.5)")
    parser.add_argument(
        "--patients",
        type=int,
        default=0,
        help="generated series per size (0: 24 at 256 px, fewer when larger)",
    )
    parser.add_argument("--matmul", type=int, default=8192, help="side of the bf16 reference matrix product")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="run the backbone under torch.compile")
    parser.add_argument(
        "--ddp-world", type=int, default=0, help="DDP processes (0: every GPU when there are > 1)"
    )
    parser.add_argument(
        "--workdir", default=None, help="where to generate shards (default: a temporary folder)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke mode: 32 px, 2 steps, small everything"
    )
    return parser


def apply_tiny(args: argparse.Namespace) -> None:
    args.size, args.steps, args.warmup, args.batch, args.patients = [32], 2, 1, 2, 4
    args.matmul, args.num_workers = 512, [0, 1]
    if args.device == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"


def sync_fn(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------- data


def make_shards(root: Path, size: int, patients: int, slices: tuple[int, int]) -> Path:
    """Generate ``patients`` labelled DLCV-layout series and preprocess them into ``root/shards``."""
    from ichmodel import synth
    from ichmodel.preprocess import PreprocessOptions, preprocess
    from ichmodel.readers import read_dlcv

    raw, shards = root / "Blood_data", root / "shards"
    if not (shards / "manifest.json").is_file():
        synth.write_dlcv_dataset(raw, patients, slices, size, seed=0)
        preprocess(read_dlcv(raw / "train", raw / "train.csv"), shards, PreprocessOptions(size=size))
        shutil.rmtree(raw, ignore_errors=True)
    return shards


# --------------------------------------------------------------------------------------------- timing


def matmul_tflops(device: torch.device, n: int, repeats: int = 10) -> float:
    """Median TFLOP/s of an ``n``³ matrix product (bf16 on CUDA, fp32 on the CPU), random operands."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def bare_step(rig: Rig, batch: dict[str, Any], generator: torch.Generator) -> None:
    """``train_one_epoch``'s step body on a batch already on the device, minus its host reads of the loss."""
    cfg, device = rig.cfg, rig.device
    images = normalize(augment_series(to_float(batch["images"]), cfg.augment, generator))
    labels = batch["labels"]
    transfer = mask = None
    if rig.stage.strategies:
        plan = plan_strategies(
            batch["lengths_cpu"],
            cfg.strategy.p1,
            cfg.strategy.p2,
            cfg.strategy.epsilon,
            len(rig.pool) if rig.pool is not None else 0,
            generator,
        )
        mask = plan.mask.to(device)
        if rig.pool is not None:
            transfer = make_transfer_batch(plan, batch["pool_images"], batch["pool_classes"])
            labels = transfer_labels(labels, transfer.slot, transfer.pair_classes)
    with torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.amp_bf16
    ):
        outputs = rig.model(images, batch["lengths_cpu"], transfer=transfer, mask=mask)
    outputs = {k: v.float() for k, v in outputs.items() if torch.is_tensor(v) and v.is_floating_point()}
    loss = rig.loss_fn(outputs, labels, batch["valid"])["loss"]
    rig.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    rig.optimizer.step()


def device_batch(rig: Rig, batches: list[list[int]]) -> dict[str, Any]:
    """The first batch of ``batches``, read through the real loader and moved to the device."""
    batch = next(iter(make_loader(rig.dataset, batches[:1], 0)))
    out = {k: batch[k].to(rig.device) for k in ("images", "labels", "lengths", "valid")}
    out["lengths_cpu"] = batch["lengths"]
    if rig.pool is not None:
        out["pool_images"] = normalize(to_float(rig.pool.images.to(rig.device)))
        out["pool_classes"] = rig.pool.classes  # host, like the plan
    return out


def time_bare(rig: Rig, batch: dict[str, Any], steps: int, warmup: int) -> tuple[float, float]:
    """``(slices/s, FLOPs per slice)`` of :func:`bare_step` repeated on one batch."""
    generator = torch.Generator().manual_seed(1)
    sync = sync_fn(rig.device) or (lambda: None)
    for _ in range(warmup):
        bare_step(rig, batch, generator)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        bare_step(rig, batch, generator)
    sync()
    seconds = time.perf_counter() - start
    slices = int(batch["lengths_cpu"].sum())
    counter = FlopCounterMode(display=False)
    flops = []
    for _ in range(3):  # the number of transferred pair images varies from step to step
        with counter:
            bare_step(rig, batch, generator)
        flops.append(counter.get_total_flops())
    return slices * steps / seconds, statistics.mean(flops) / slices


def time_engine(rig: Rig, num_workers: int, steps: int, warmup: int, seed: int) -> dict[str, float]:
    """One engine epoch of ``warmup + steps`` batches; wait and slices/s after the warm-up batches."""
    batches = draw_batches(len(rig.dataset), rig.cfg.data.batch_size, warmup + steps, seed)
    timed, metrics = rig.run_epoch(batches, num_workers, seed, sync=sync_fn(rig.device))
    steady, whole = timed.summary(warmup), timed.summary(0)
    return {
        "slices_per_s": steady["slices_per_s"],
        "wait_fraction": steady["wait_fraction"],
        "epoch_wait_fraction": whole["wait_fraction"],
        "first_batch_s": timed.waits[0],
        "skipped_steps": metrics["train_skipped"],
    }


# --------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(
    rank: int, world: int, port: int, shards: str, overrides: dict, args: argparse.Namespace, out: str
) -> None:
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        rig = build_rig(Path(shards), device, overrides)
        rig.model = torch.nn.parallel.DistributedDataParallel(  # as engine.fit wraps it
            rig.model, device_ids=[rank] if cuda else None, find_unused_parameters=True
        )
        result = time_engine(rig, args.ddp_workers, args.steps, args.warmup, seed=1000 + rank)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ddp(world: int, shards: Path, overrides: dict, args: argparse.Namespace) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(
            _ddp_worker,
            args=(world, _free_port(), str(shards), overrides, args, out),
            nprocs=world,
            join=True,
        )
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


# --------------------------------------------------------------------------------------------- main


def measure_size(
    size: int, root: Path, device: torch.device, args: argparse.Namespace, matmul: float
) -> dict[str, Any]:
    start = time.perf_counter()
    slices = (6, 10) if args.tiny else (24, 40)
    patients = args.patients or max(8, round(24 * (256 / size) ** 2))
    shards = make_shards(root / f"px{size}", size, patients, slices)
    made_s = time.perf_counter() - start
    batch = args.batch or max(4, round(16 * (256 / size) ** 2))
    overrides = {"data.batch_size": batch, "strategy.epsilon": args.epsilon}
    rig = build_rig(shards, device, overrides)
    if args.compile:
        rig.model.backbone.compile(dynamic=True)
    out: dict[str, Any] = {"size": size, "batch_series": batch, "shards_s": made_s}
    rig.run_epoch(draw_batches(len(rig.dataset), batch, args.warmup, seed=7), 0, seed=7, sync=sync_fn(device))
    out["workers"] = {}
    for n in args.num_workers:
        try:
            out["workers"][str(n)] = time_engine(rig, n, args.steps, args.warmup, seed=n)
        except (
            Exception
        ) as e:  # one failing worker count (e.g. too little shared memory) must not end the run
            out.setdefault("errors", []).append(f"{n} loader workers: {type(e).__name__}: {e}")
            print(f"{size} px, {n} loader workers failed: {e!r}", flush=True)
    if not out["workers"]:
        raise RuntimeError(f"every loader worker count failed: {out['errors']}")
    print(f"{size} px engine: {json.dumps(out['workers'])}", flush=True)
    dev_batch = device_batch(rig, draw_batches(len(rig.dataset), batch, 1, seed=3))
    bare_rate, flops_per_slice = time_bare(rig, dev_batch, args.steps, args.warmup)
    out["slices_per_step"] = int(dev_batch["lengths_cpu"].sum())
    out["bare_slices_per_s"] = bare_rate
    out["gflop_per_slice"] = flops_per_slice / 1e9
    out["bare_tflops"] = bare_rate * flops_per_slice / 1e12
    best = max(out["workers"], key=lambda n: out["workers"][n]["slices_per_s"])
    out["best_num_workers"] = int(best)
    out["engine_slices_per_s"] = out["workers"][best]["slices_per_s"]
    out["engine_wait_fraction"] = out["workers"][best]["wait_fraction"]
    out["engine_tflops"] = out["engine_slices_per_s"] * flops_per_slice / 1e12
    out["engine_of_matmul"] = out["engine_tflops"] / matmul
    out["engine_of_bare"] = out["engine_slices_per_s"] / bare_rate
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    world = args.ddp_world or (torch.cuda.device_count() if device.type == "cuda" else 0)
    if world > 1:
        args.ddp_workers = int(best)
        del rig
        try:
            ranks = run_ddp(world, shards, overrides, args)
        except Exception as e:
            out.setdefault("errors", []).append(f"DDP × {world}: {type(e).__name__}: {e}")
            print(f"{size} px DDP failed: {e!r}", flush=True)
            return out
        total = sum(r["slices_per_s"] for r in ranks)
        out["ddp"] = {
            "world": world,
            "slices_per_s": total,
            "scaling_efficiency": total / (world * out["engine_slices_per_s"]),
            "max_wait_fraction": max(r["wait_fraction"] for r in ranks),
        }
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.tiny:
        apply_tiny(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device here; use --device cpu or --tiny for a CPU smoke run")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.num_workers is None:
        args.num_workers = sorted({0, max(1, min(8, (os.cpu_count() or 2) - 2))})
    started = time.perf_counter()
    matmul = matmul_tflops(device, args.matmul)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch": torch.__version__,
        "steps": args.steps,
        "epsilon": args.epsilon,
        "compile": args.compile,
        "matmul_tflops": matmul,
        "matmul_side": args.matmul,
        "sizes": {},
    }
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        for size in args.size:
            try:
                report["sizes"][str(size)] = measure_size(size, root, device, args, matmul)
            except Exception as e:  # keep what the other sizes measured (device time is scarce)
                report.setdefault("errors", []).append(f"{size} px: {type(e).__name__}: {e}")
                print(f"{size} px failed: {e!r}", flush=True)
                if args.tiny:
                    raise
            write_report(report)  # partial results survive a timeout
            print(f"{size} px done at {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report["matmul_tflops_end"] = matmul_tflops(device, args.matmul)  # the clock may have moved meanwhile
    report["wall_s"] = time.perf_counter() - started
    at256 = report["sizes"].get("256")
    if at256 is not None:
        report["goal_met"] = bool(
            at256["engine_slices_per_s"] >= GOAL_SLICES_PER_S and at256["engine_wait_fraction"] < GOAL_WAIT
        )
    print_table(report)
    if write_report(report):
        print(f"wrote {Path(os.environ['OUT'], 'gpu_bench.json')}")
    else:
        print(json.dumps(report, indent=1))
    flat = {"matmul_tflops": matmul, "wall_s": report["wall_s"]}
    for size, fig in report["sizes"].items():
        if "engine_slices_per_s" not in fig:
            continue
        for key in (
            "engine_slices_per_s",
            "engine_wait_fraction",
            "bare_slices_per_s",
            "engine_tflops",
            "engine_of_matmul",
        ):
            flat[f"{key}_{size}"] = fig[key]
    print("RESULT " + json.dumps(flat))
    return report


def write_report(report: dict[str, Any]) -> bool:
    """Write ``$OUT/gpu_bench.json`` when ``OUT`` is set; returns whether it did."""
    if not os.environ.get("OUT"):
        return False
    Path(os.environ["OUT"], "gpu_bench.json").write_text(json.dumps(report, indent=1))
    return True


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['device']}, torch {report['torch']}, ε={report['epsilon']}, compile={report['compile']}"
    )
    print(
        f"reference matmul ({report['matmul_side']}³): {report['matmul_tflops']:.3g} TFLOP/s at start, {report['matmul_tflops_end']:.3g} at end"
    )
    print(
        f"{'px':>5}{'batch':>7}{'workers':>8}{'engine sl/s':>13}{'wait':>7}{'epoch wait':>11}{'bare sl/s':>11}{'eng/bare':>9}{'TFLOP/s':>9}{'of matmul':>10}"
    )
    for size, fig in report["sizes"].items():
        for n, value in fig["workers"].items():
            print(
                f"{size:>5}{fig['batch_series']:>7}{n:>8}{value['slices_per_s']:>13.1f}{value['wait_fraction']:>7.1%}"
                f"{value['epoch_wait_fraction']:>11.1%}{fig['bare_slices_per_s']:>11.1f}"
                f"{value['slices_per_s'] / fig['bare_slices_per_s']:>9.2f}"
                f"{value['slices_per_s'] * fig['gflop_per_slice'] / 1e3:>9.2f}"
                f"{value['slices_per_s'] * fig['gflop_per_slice'] / 1e3 / report['matmul_tflops']:>10.1%}"
            )
        if "ddp" in fig:
            d = fig["ddp"]
            print(
                f"{size:>5} DDP × {d['world']}: {d['slices_per_s']:.1f} slices/s, scaling efficiency {d['scaling_efficiency']:.2f}, max wait {d['max_wait_fraction']:.1%}"
            )
    if "goal_met" in report:
        f = report["sizes"]["256"]
        print(
            f"goal at 256 px: ≥ {GOAL_SLICES_PER_S:.0f} slices/s with < {GOAL_WAIT:.0%} loader wait: "
            f"{f['engine_slices_per_s']:.0f} slices/s, wait {f['engine_wait_fraction']:.1%} -> "
            f"{'met' if report['goal_met'] else 'NOT met'}"
        )
    if not all(math.isfinite(v["engine_slices_per_s"]) for v in report["sizes"].values()):
        print("warning: a non-finite figure")
    for error in report.get("errors", []) + [
        e for f in report["sizes"].values() for e in f.get("errors", [])
    ]:
        print(f"error: {error}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
