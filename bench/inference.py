"""Inference path speed: ``predict.predict_batches`` over a shard loader against a bare forward pass.

    python bench/inference.py [--size 64] [--patients 12] [--batch 4] [--rounds 5] [--num-workers 0]

Both run the full-size model (ResNet18 + bi-GRU, channels-last, eval mode, no gradients) over the same
series of demo shards (``ichmodel.demo_data.ensure_demo_data``):

* ``pipeline``: what prediction and the ensemble run, ``predict.predict_batches(model, make_loader(...))``:
  Parquet read + uint8 → float + normalisation + forward + outputs cast to float32, every output consumed;
* ``bare``: ``model(images, lengths)`` on the same batches, read, converted and normalised beforehand.

Rounds alternate the two (background load hits both alike); the figures are medians of per-round slices/s,
and ``ratio = pipeline / bare`` is the share of the model's speed the inference path keeps.
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
from pathlib import Path
from typing import Any

import torch

from ichmodel.augment import normalize
from ichmodel.batches import eval_batches
from ichmodel.config import ModelConfig
from ichmodel.dataset import SeriesDataset, make_loader, prepare_images
from ichmodel.model import build_model
from ichmodel.predict import predict_batches


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="image side of the demo shards")
    parser.add_argument("--patients", type=int, default=12, help="demo series (12-20 slices each)")
    parser.add_argument("--batch", type=int, default=4, help="series per batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the pipeline")
    parser.add_argument(
        "--data-root", default=None, help="demo data folder to reuse (default: a temporary one)"
    )
    parser.add_argument("--device", default="cpu")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    from ichmodel.demo_data import ensure_demo_data

    root = Path(args.data_root) if args.data_root else Path(tempfile.mkdtemp(prefix="bench-inference-"))
    try:
        shards, _ = ensure_demo_data(root, patients=args.patients, test_patients=1, size=args.size)
        device = torch.device(args.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        torch.manual_seed(0)
        model = build_model(ModelConfig()).to(device).to(memory_format=torch.channels_last).eval()
        dataset = SeriesDataset(shards)
        batches = eval_batches(len(dataset), args.batch)
        preloaded = []
        for batch in make_loader(dataset, batches, 0):
            preloaded.append((normalize(prepare_images(batch, device)), batch["lengths"].to(device)))
        num_slices = sum(int(lengths.sum()) for _, lengths in preloaded)

        def pipeline() -> None:
            loader = make_loader(dataset, batches, args.num_workers)
            for _, outputs in predict_batches(model, loader, device, amp_bf16=True):  # as prediction runs
                outputs["mc_logits"].sum().item()  # consume, as a writer of predictions would

        @torch.no_grad()
        def bare() -> None:
            for images, lengths in preloaded:
                model(images, lengths)["mc_logits"].sum().item()

        runs = {"pipeline": pipeline, "bare": bare}
        for fn in runs.values():  # warm-up
            fn()
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                rates[name].append(num_slices / (time.perf_counter() - start))
    finally:
        if args.data_root is None:
            shutil.rmtree(root, ignore_errors=True)

    med = {name: statistics.median(v) for name, v in rates.items()}
    result = {
        "pipeline_slices_per_s": med["pipeline"],
        "bare_slices_per_s": med["bare"],
        "ratio": med["pipeline"] / med["bare"],
        "size": args.size,
        "slices": num_slices,
    }
    print(
        f"device {device}, {torch.get_num_threads()} torch threads, {len(dataset)} series / {num_slices} slices "
        f"of {args.size} px, batch {args.batch}, {args.num_workers} loader workers, medians of {args.rounds} rounds"
    )
    print(f"predict_batches over the shard loader: {med['pipeline']:8.1f} slices/s")
    print(f"bare model(images, lengths):           {med['bare']:8.1f} slices/s")
    print(f"ratio pipeline / bare: {result['ratio']:.3f}")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
