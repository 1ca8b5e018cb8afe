"""``ichmodel.checkpoint``: one plain dict per file, state stored once, models load without their ImageNet file."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision

from ichmodel.checkpoint import WEIGHT_KEYS, checkpoint_dict, load_checkpoint, load_model, save_checkpoint
from ichmodel.config import Config
from ichmodel.engine import state_from_checkpoint
from ichmodel.model import build_model
from ichmodel.stages import TrainState


def _cfg(**model) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def test_round_trip_is_weights_only_loadable_and_holds_the_state_once(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = TrainState(stage=1, epoch=2, global_epoch=5, best_f2=0.25, thresholds=[0.1, 0.2, 0.3, 0.4, 0.5])
    state.history.append({"global_epoch": 5.0, "val_loss": 0.5})
    ckpt = checkpoint_dict(model, cfg, state, optimizer=optimizer, best_model=model.state_dict())
    path = save_checkpoint(ckpt, tmp_path / "c.pt")
    assert path == tmp_path / "c.pt" and [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp left

    loaded = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert set(loaded) == set(WEIGHT_KEYS) | {f.name for f in dataclasses.fields(TrainState)}
    assert "state" not in loaded  # every field once, at the top level
    assert load_checkpoint(path).keys() == loaded.keys()
    assert loaded["config"] == cfg.to_dict() and loaded["scheduler"] is None
    assert (loaded["stage"], loaded["epoch"], loaded["thresholds"]) == (1, 2, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert state_from_checkpoint(loaded) == state
    rebuilt, rebuilt_cfg, _ = load_model(path)
    assert rebuilt_cfg == cfg and not rebuilt.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


def test_load_model_prefers_the_best_weights(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    last, best = build_model(cfg.model), build_model(cfg.model)
    path = save_checkpoint(
        checkpoint_dict(last, cfg, TrainState(), best_model=best.state_dict()), tmp_path / "c.pt"
    )
    rebuilt, _, _ = load_model(path)
    for key, value in best.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)
    with pytest.raises(ValueError, match="clash"):
        checkpoint_dict(last, cfg, {"model": 1})


def test_load_model_needs_no_pretrained_weights_file(tmp_path):
    """A checkpoint holds every weight: the ImageNet file its config names may be gone (FileNotFoundError before)."""
    imagenet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), imagenet)
    cfg = _cfg(pretrained_weights=str(imagenet))
    torch.manual_seed(1)
    model = build_model(cfg.model)
    path = save_checkpoint(checkpoint_dict(model, cfg, TrainState(finished=True)), tmp_path / "c.pt")
    imagenet.unlink()

    rebuilt, saved_cfg, _ = load_model(path)
    assert saved_cfg.model.pretrained_weights == str(imagenet)  # the saved config is returned unchanged
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


def test_a_checkpoint_from_before_model_prediction_keeps_predicting_with_mc(tmp_path):
    """Its thresholds were tuned on MC probabilities: it must not switch to today's default, "mc+ac"."""
    cfg = _cfg(feature_dim=32, rnn_hidden=16, cpc_steps=2)
    ckpt = checkpoint_dict(build_model(cfg.model), cfg, TrainState())
    del ckpt["config"]["model"]["prediction"]
    _, old_cfg, _ = load_model(save_checkpoint(ckpt, tmp_path / "old.pt"))
    assert old_cfg.model.prediction == "mc" and cfg.model.prediction == "mc+ac"
    _, new_cfg, _ = load_model(save_checkpoint(checkpoint_dict(build_model(cfg.model), cfg, TrainState()),
                                                tmp_path / "new.pt"))  # fmt: skip
    assert new_cfg == cfg
