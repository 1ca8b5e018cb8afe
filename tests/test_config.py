"""Frozen config: defaults, dotted overrides, validation, save/load."""

from __future__ import annotations

import dataclasses

import pytest

from ichmodel.config import Config, LossConfig, StrategyConfig


def test_defaults_follow_the_paper_and_the_authors_code():
    cfg = Config()
    assert (cfg.train.lr, cfg.data.batch_size, cfg.model.cpc_steps) == (1e-3, 4, 8)
    assert (cfg.strategy.p1, cfg.strategy.p2, cfg.strategy.epsilon) == (0.15, 0.15, 0.5)
    assert (cfg.loss.gamma_pos, cfg.loss.gamma_neg, cfg.loss.clip) == (1.0, 4.0, 0.05)
    assert (cfg.train.lr_factor, cfg.train.lr_patience, cfg.train.min_lr) == (0.5, 3, 1e-6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_overrides_by_dotted_name_and_round_trip():
    cfg = Config().with_overrides({"loss.alpha": 2, "train.max_epochs": [1, 2, 3], "strategy.p1": "0.3"})
    assert cfg.loss.alpha == 2.0 and isinstance(cfg.loss.alpha, float)
    assert cfg.train.max_epochs == (1, 2, 3) and cfg.strategy.p1 == 0.3
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config().loss.alpha == 1.0  # the original is untouched


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss.alhpa": 1}, "Unknown field 'alhpa'"),
        ({"losses.alpha": 1}, "section.field"),
        ({"loss.mu": -0.5}, "LossConfig.mu must be >= 0. Got -0.5"),
        ({"strategy.p1": 1.5}, "strategy.p1 must be in"),
        ({"train.max_epochs": [1, 2]}, "three non-negative epoch caps"),
        ({"data.val_fraction": 0.0}, "val_fraction"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Config().with_overrides(overrides)


def test_save_and_load_json_and_partial_yaml(tmp_path):
    cfg = Config().with_overrides({"loss.nu": 0.25})
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("loss:\n  nu: 0.5\ntrain:\n  max_epochs: [2, 2, 4]\n")
    partial = Config.load(tmp_path / "c.yaml")
    assert partial.loss.nu == 0.5 and partial.train.max_epochs == (2, 2, 4) and partial.loss.alpha == 1.0
    (tmp_path / "bad.yaml").write_text("model:\n  depth: 50\n")
    with pytest.raises(ValueError, match="Unknown fields \\['depth'\\] in config section 'model'"):
        Config.load(tmp_path / "bad.yaml")


def test_weights_are_keyed_by_loss_part():
    assert LossConfig(alpha=2, nu=0).weights() == {"mc": 2, "ac": 1.0, "lp": 1.0, "dc": 1.0, "cpc": 0}
    with pytest.raises(ValueError):
        StrategyConfig(epsilon=-0.1)
