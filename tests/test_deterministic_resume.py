"""Deterministic resumption through the engine, without Ray: a run killed at an epoch boundary and resumed
from its saved checkpoint (RNG states included) ends with the uninterrupted run's weights; one resumed from
a pruned checkpoint (no optimizer state, the fallback's case) goes on at the saved learning rate."""

from __future__ import annotations

import pytest
import torch

from ichmodel.checkpoint import load_checkpoint, save_checkpoint
from ichmodel.checkpoint_recovery import prune_checkpoint
from ichmodel.config import Config
from ichmodel.dataset import SeriesDataset
from ichmodel.engine import fit
from ichmodel.splits import split_series

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow  # five short fits (about a minute on 2 busy cores)


@pytest.fixture(scope="module")
def run(demo_shards, tmp_path_factory):
    """The uninterrupted run (the paper's recipe, stage 3 only, 2 epochs: dropout, augmentation, masking and
    transfer all draw) and the file of its checkpoint after epoch 1, as written to disk."""
    return _uninterrupted(
        demo_shards, tmp_path_factory, {"train.recipe": "paper", "train.max_epochs": [0, 0, 2]}
    )


def _uninterrupted(demo_shards, tmp_path_factory, overrides: dict, kept_epoch: int = 1):
    shards = demo_shards[0]
    train_ids, val_ids = split_series(shards, 0.25, 0)
    cfg = Config().with_overrides({"data.shards": str(shards), "data.val_fraction": 0.25, **overrides})
    sets = SeriesDataset(shards, train_ids), SeriesDataset(shards, val_ids)
    path = tmp_path_factory.mktemp("resume") / "checkpoint.pt"

    def keep_first(metrics, make_checkpoint):
        if metrics["global_epoch"] == kept_epoch:
            save_checkpoint(make_checkpoint(), path)

    model, state = fit(cfg, *sets, CPU, on_epoch_end=keep_first)
    return cfg, sets, path, model.state_dict(), state


def _max_relative_difference(a: dict, b: dict) -> float:
    return max(
        float((a[k].float() - b[k].float()).abs().max() / (a[k].float().abs().max() + 1e-12))
        for k in a
        if a[k].is_floating_point()
    )


def test_a_run_resumed_at_an_epoch_boundary_ends_with_the_uninterrupted_weights(run):
    cfg, sets, path, weights, state = run
    resume = load_checkpoint(path)
    assert resume["global_epoch"] == 1 and set(resume["rng"]) >= {"torch", "numpy", "python"}
    model, resumed = fit(cfg, *sets, CPU, resume=resume)
    assert resumed.global_epoch == state.global_epoch == 2
    # Same machine, same code path: equal up to float noise relative to each tensor's scale.
    assert _max_relative_difference(weights, model.state_dict()) < 1e-5
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in state.history], rel=1e-5
    )

    # Without the RNG states the continuation draws differently (the check above can fail).
    del resume["rng"]
    model, _ = fit(cfg, *sets, CPU, resume=resume)
    assert _max_relative_difference(weights, model.state_dict()) > 1e-4


def test_a_pruned_checkpoint_resumes_with_a_fresh_optimizer_at_the_saved_lr(run, caplog):
    cfg, sets, path, _, _ = run
    pruned = path.with_name("pruned.pt")
    pruned.write_bytes(path.read_bytes())
    prune_checkpoint(pruned)
    resume = load_checkpoint(pruned)
    assert resume["optimizer"] is None and resume["scheduler"] is not None
    model, state = fit(cfg, *sets, CPU, resume=resume)
    assert state.finished and state.global_epoch == 2
    assert "holds no optimizer state: a fresh AdamW" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_two_stage_run_resumed_on_its_frozen_backbone_ends_with_the_uninterrupted_weights(
    demo_shards, tmp_path_factory
):
    """Slice stage (shuffle buffer), then stages 2-3 on the frozen backbone; killed after epoch 2, so the
    resumed run computes the cached features again before stage 3, which the uninterrupted run did not: the
    same weights as the run that went through."""
    cfg, sets, path, weights, state = _uninterrupted(
        demo_shards, tmp_path_factory, {"train.recipe": "two_stage", "train.max_epochs": [1, 1, 1]}, 2
    )
    model, resumed = fit(cfg, *sets, CPU, resume=load_checkpoint(path))
    assert resumed.global_epoch == state.global_epoch == 3
    assert _max_relative_difference(weights, model.state_dict()) < 1e-5
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in state.history], rel=1e-5
    )
