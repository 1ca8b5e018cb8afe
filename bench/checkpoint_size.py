"""Checkpoint sizes of the paper's model (ResNet18 + bi-GRU, the default ModelConfig) with AdamW state (issue 26).

    python bench/checkpoint_size.py

Builds the model (``pretrained_weights=None``: nothing is downloaded), takes one AdamW step so the optimizer
holds its two moments, and saves the checkpoint as the format before issue 26 did (the best weights as a
second copy, optimizer state in every file) and as it does now: the best weights shared with the last when
they are equal, the optimizer state only in the newest file (:func:`ichmodel.checkpoint_recovery.prune_checkpoint`
for the older one), only the best weights for a trial that stopped. Prints a table and a line
``RESULT {json}`` (MB = 10^6 bytes), with the storage a 32-trial search keeps (two checkpoints per trial).
"""

from __future__ import annotations

from pathlib import Path

if __spec__ is None:  # run as a script (python bench/x.py): this checkout's root first on the import path
    import _paths  # noqa: F401

import dataclasses
import json
import tempfile

import torch

from ichmodel.checkpoint import checkpoint_dict, save_checkpoint
from ichmodel.checkpoint_recovery import prune_checkpoint
from ichmodel.config import Config
from ichmodel.model import build_model
from ichmodel.stages import TrainState

TRIALS = 32


def main() -> None:
    cfg = Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_weights=None))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(1, 4, 3, 64, 64)
    sum(v.float().sum() for v in model(images, torch.tensor([4])).values() if torch.is_tensor(v)).backward()
    optimizer.step()  # AdamW's exp_avg and exp_avg_sq now exist for every parameter
    last = {k: v.detach().clone() for k, v in model.state_dict().items()}
    other = {
        k: v + 1 if v.is_floating_point() else v for k, v in last.items()
    }  # best weights of an earlier epoch
    state = TrainState(stage=2, epoch=3, global_epoch=9)

    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:

        def size(name: str, ckpt: dict) -> Path:
            path = save_checkpoint(ckpt, Path(folder) / f"{name}.pt")
            sizes[name] = path.stat().st_size / 1e6
            return path

        new = checkpoint_dict(model, cfg, state, optimizer=optimizer, best_model=last)
        old = {**new, "best_model": {k: v.clone() for k, v in last.items()}}  # before: always a second copy
        size("before", old)
        size("newest_best_is_last", new)
        size("newest_best_earlier", checkpoint_dict(model, cfg, state, optimizer=optimizer, best_model=other))
        older = size("older_best_is_last", new)
        prune_checkpoint(older)
        sizes["older_best_is_last"] = older.stat().st_size / 1e6
        earlier = size(
            "older_best_earlier", checkpoint_dict(model, cfg, state, optimizer=optimizer, best_model=other)
        )
        prune_checkpoint(earlier)
        sizes["older_best_earlier"] = earlier.stat().st_size / 1e6
        stopped = size("stopped_trial", new)
        prune_checkpoint(stopped, best_only=True)
        sizes["stopped_trial"] = stopped.stat().st_size / 1e6

    per_trial_before = 2 * sizes["before"]
    per_trial_after = (sizes["newest_best_is_last"] + sizes["older_best_is_last"],
                       sizes["newest_best_earlier"] + sizes["older_best_earlier"])  # fmt: skip
    result = {
        "mb": {k: round(v, 1) for k, v in sizes.items()},
        "search_32_trials_gb": {
            "before": round(TRIALS * per_trial_before / 1e3, 1),
            "after_running_or_finished": [round(TRIALS * x / 1e3, 1) for x in per_trial_after],
            "after_all_stopped_by_asha_but_one": round(
                ((TRIALS - 1) * sizes["stopped_trial"] + per_trial_after[1]) / 1e3, 1
            ),
        },
    }
    print("| checkpoint | MB |\n| --- | --- |")
    for name, mb in sizes.items():
        print(f"| {name} | {mb:.1f} |")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
