"""Frozen config: defaults, dotted overrides, validation, save/load."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ichmodel.config import AugmentConfig, Config, LossConfig, StrategyConfig, TrainConfig


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
        ({"loss.alhpa": 1}, "Unknown config field loss.alhpa; known in loss: ["),
        ({"losses.alpha": 1}, "Unknown config section losses; known: ["),
        ({"lossalpha": 1}, "section.field"),
        ({"loss.mu": -0.5}, "loss.mu must be >= 0. Got -0.5"),
        ({"train.lr": -1}, "train.lr must be > 0. Got -1.0"),
        ({"model.in_channels": 0}, "model.in_channels must be > 0. Got 0"),
        ({"data.batch_size": 0}, "data.batch_size must be > 0. Got 0"),
        ({"strategy.pool_size": -1}, "strategy.pool_size must be >= 0. Got -1"),
        ({"strategy.p1": 1.5}, "strategy.p1 must be in [0, 1]. Got 1.5"),
        ({"loss.clip": 1.0}, "loss.clip must be in [0, 1). Got 1.0"),
        ({"model.dropout": 1.0}, "model.dropout must be in [0, 1). Got 1.0"),
        ({"train.lr_factor": 1.0}, "train.lr_factor must be in (0, 1). Got 1.0"),
        ({"train.max_epochs": [1, 2]}, "train.max_epochs needs three non-negative epoch caps. Got (1, 2)"),
        ({"data.val_fraction": 0.0}, "data.val_fraction must be in (0, 1). Got 0.0"),
    ],
)
def test_bad_values_name_the_dotted_field(overrides, message):
    """Every message names the field as it is overridden (``section.field``), in one form."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Config().with_overrides(overrides)


@pytest.mark.parametrize("word", ["false", "False", "FALSE", "0", "no", "No", 0, False])
def test_a_flag_set_to_a_false_word_is_off(word):
    """``--set train.amp_bf16=false`` reached the config as a string, and ``bool("false")`` is True."""
    assert Config().with_overrides({"train.amp_bf16": word}).train.amp_bf16 is False
    assert Config().with_overrides({"train.amp_bf16": str(word).upper()}).train.amp_bf16 is False


@pytest.mark.parametrize("word", ["true", "True", "1", "yes", "YES", 1, True])
def test_a_flag_set_to_a_true_word_is_on(word):
    assert Config().with_overrides({"augment.enabled": word}).augment.enabled is True


@pytest.mark.parametrize("value", ["fasle", "off", "", 2, 0.0, None, [True]])
def test_a_flag_rejects_anything_but_a_boolean_word(value):
    with pytest.raises(
        ValueError, match=re.escape("train.amp_bf16 must be a boolean") + ".*" + re.escape(repr(value))
    ):
        Config().with_overrides({"train.amp_bf16": value})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.batch_size", 2.5, "data.batch_size must be an integer. Got 2.5"),
        ("data.batch_size", "2.5", "data.batch_size must be an integer. Got '2.5'"),
        ("data.batch_size", True, "data.batch_size must be an integer. Got True"),
        ("train.max_epochs", [5, 5.5, 10], "train.max_epochs must be an integer. Got 5.5"),
        ("train.max_epochs", "5,5,10", "train.max_epochs must be a list. Got '5,5,10'"),
        ("train.lr", "fast", "train.lr must be a number. Got 'fast'"),
        ("train.lr", None, "train.lr must be a number. Got None"),
        ("data.shards", 3, "data.shards must be a string. Got 3"),
    ],
)
def test_a_value_that_does_not_convert_exactly_names_the_field(key, value, message):
    """``2.5`` for an integer field used to become 2 silently."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Config().with_overrides({key: value})


def test_integral_values_of_integer_fields_convert():
    cfg = Config().with_overrides(
        {"data.batch_size": 8.0, "train.seed": "3", "train.max_epochs": ["5", 5.0, 10]}
    )
    assert (cfg.data.batch_size, cfg.train.seed, cfg.train.max_epochs) == (8, 3, (5, 5, 10))
    assert isinstance(cfg.data.batch_size, int) and TrainConfig(lr=1).lr == 1.0


@pytest.mark.parametrize(
    ("field", "value", "interval"),
    [
        ("flip_prob", 1.5, "[0, 1]"),
        ("flip_prob", -0.1, "[0, 1]"),
        ("rotate_degrees", -5.0, "[0, 180]"),
        ("brightness", -0.1, "[0, 1]"),
        ("contrast", 1.5, "[0, 1]"),  # the factor range [1 - c, 1 + c] would reach below 0
        ("crop_scale_min", 0.0, "(0, 1]"),
        ("crop_scale_min", 1.2, "(0, 1]"),  # [crop_scale_min, 1] would be an empty range
    ],
)
def test_augment_config_is_validated(field, value, interval):
    with pytest.raises(ValueError, match=re.escape(f"augment.{field} must be in {interval}. Got {value}")):
        AugmentConfig(**{field: value})
    AugmentConfig(flip_prob=0.0, rotate_degrees=0.0, brightness=0.0, contrast=0.0, crop_scale_min=1.0)


def test_save_and_load_json_and_partial_yaml(tmp_path):
    cfg = Config().with_overrides({"loss.nu": 0.25})
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("loss:\n  nu: 0.5\ntrain:\n  max_epochs: [2, 2, 4]\n")
    partial = Config.load(tmp_path / "c.yaml")
    assert partial.loss.nu == 0.5 and partial.train.max_epochs == (2, 2, 4) and partial.loss.alpha == 1.0
    (tmp_path / "bad.yaml").write_text("model:\n  depth: 50\n")
    with pytest.raises(ValueError, match=re.escape("Unknown config field model.depth; known in model: [")):
        Config.load(tmp_path / "bad.yaml")
    (tmp_path / "flat.yaml").write_text("loss: 0.5\n")
    with pytest.raises(ValueError, match="Config section 'loss' in .* must be a mapping of fields. Got 0.5"):
        Config.load(tmp_path / "flat.yaml")


def test_weights_are_keyed_by_loss_part():
    assert LossConfig(alpha=2, nu=0).weights() == {"mc": 2, "ac": 1.0, "lp": 1.0, "dc": 1.0, "cpc": 0}
    with pytest.raises(ValueError):
        StrategyConfig(epsilon=-0.1)
