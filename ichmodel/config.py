"""Typed, frozen configuration: every default of the model, its losses and its training lives here.

YAML files, command lines and search spaces only *override* these values, by dotted name
(``"loss.alpha"``, ``"strategy.p1"``, ``"train.lr"``). The resolved config is saved as a plain dict
beside every checkpoint (:meth:`Config.to_dict`) and rebuilt with :meth:`Config.from_dict`.

Where the paper and the authors' code disagree, the choice is stated on the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ichmodel.constants import NUM_CLASSES


@dataclass(frozen=True)
class ModelConfig:
    """Backbone → bi-GRU → heads (paper section 1)."""

    #: Path to a local torchvision ResNet18 ``state_dict`` (e.g. ImageNet weights); ``None`` = random init.
    pretrained_weights: str | None = None
    in_channels: int = 3
    feature_dim: int = 512  # g_i, ResNet18's pooled feature size
    rnn_hidden: int = 256  # per direction; h_i has 2 × rnn_hidden
    dropout: float = 0.5  # on g before the GRU, as in the authors' code
    num_classes: int = NUM_CLASSES
    cpc_steps: int = 8  # T in the paper
    #: Diversity-transfer pair features f(z2) − f(z1) carry gradient into the backbone (True, our reading of
    #: the paper, which does not say). False runs the pair images in a separate pass without autograd: about
    #: a third of their cost, and the backbone then learns from the batch's own slices only.
    transfer_grad: bool = True

    def __post_init__(self) -> None:
        _check_positive(self, "in_channels", "feature_dim", "rnn_hidden", "num_classes", "cpc_steps")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1). Got {self.dropout}")


@dataclass(frozen=True)
class LossConfig:
    """Weights of L = αL1 + βL2 + γL3 + μL4 + νL5 for the fine-tuning stage, and ASL's parameters.

    The two pretraining stages use α = β = 1 and γ = μ = ν = 0 (paper section 3.3), whatever is set here.

    ASL: the paper's text says γ+ = 4, γ− = 1; the authors' code ran the ASL defaults γ+ = 1, γ− = 4 with
    probability clip 0.05, which also follows the ASL paper's rule γ− > γ+ (easy negatives are the ones to
    down-weight). We default to the code's values; the search space covers both.
    """

    alpha: float = 1.0  # MC: ASL on h
    beta: float = 1.0  # AC: ASL on g through the same classifier
    gamma: float = 1.0  # LP: number of labels, cross-entropy
    mu: float = 1.0  # DC: distance to label embeddings
    nu: float = 1.0  # CPC: InfoNCE
    gamma_pos: float = 1.0
    gamma_neg: float = 4.0
    clip: float = 0.05

    def __post_init__(self) -> None:
        _check_non_negative(self, "alpha", "beta", "gamma", "mu", "nu", "gamma_pos", "gamma_neg", "clip")
        if self.clip >= 1.0:
            raise ValueError(f"loss.clip must be < 1. Got {self.clip}")

    def weights(self) -> dict[str, float]:
        """Task weights keyed by the loss-part names ``mc, ac, lp, dc, cpc``."""
        return {"mc": self.alpha, "ac": self.beta, "lp": self.gamma, "dc": self.mu, "cpc": self.nu}


@dataclass(frozen=True)
class StrategyConfig:
    """Masking (section 2.7) and diversity transfer (section 2.8)."""

    p1: float = 0.15  # fraction of slices whose g is zeroed before the GRU
    p2: float = 0.15  # fraction of slices that receive a transferred label difference
    epsilon: float = 0.5  # per-sequence probability of training on the generated sequence
    #: Diversity-transfer pairs whose images are kept in memory (sampled once from the full pool).
    pool_size: int = 512

    def __post_init__(self) -> None:
        for name in ("p1", "p2", "epsilon"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"strategy.{name} must be in [0, 1]. Got {value}")
        _check_non_negative(self, "pool_size")


@dataclass(frozen=True)
class AugmentConfig:
    """Image augmentation, the same draw for every slice of a series (section 3.1)."""

    flip_prob: float = 0.5
    rotate_degrees: float = 15.0
    brightness: float = 0.1  # additive, fraction of the range
    contrast: float = 0.1  # multiplicative, ±fraction
    crop_scale_min: float = 0.85  # multiscale crop: side kept, as a fraction, then resized back
    enabled: bool = True


@dataclass(frozen=True)
class DataConfig:
    """Where the preprocessed shards are and how they are split and batched."""

    shards: str = ""  # folder written by ``ray_jobs/preprocess.py`` (holds manifest.json)
    val_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 4  # series per batch (paper section 3.2)
    max_slices: int = 0  # crop longer series to a random window of this many slices in training; 0 = all
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1). Got {self.val_fraction}")
        _check_positive(self, "batch_size")
        _check_non_negative(self, "max_slices", "num_workers")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the three-stage plan (section 3.3)."""

    lr: float = 1e-3
    weight_decay: float = 1e-2
    lr_factor: float = 0.5  # halve the learning rate ...
    lr_patience: int = 3  # ... when validation loss has not improved for this many epochs
    min_lr: float = 1e-6  # a stage ends when the learning rate falls below this
    #: Epoch cap of each stage (pretrain, pretrain + strategies, fine-tune); the paper has none.
    max_epochs: tuple[int, int, int] = (30, 30, 30)
    max_nonfinite_steps: int = 20  # consecutive non-finite losses that end the run
    seed: int = 0
    amp_bf16: bool = True  # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True
    threshold: float = 0.5  # decision threshold for F2 reported during training

    def __post_init__(self) -> None:
        _check_positive(self, "lr", "lr_patience", "min_lr", "max_nonfinite_steps")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"train.lr_factor must be in (0, 1). Got {self.lr_factor}")
        if len(self.max_epochs) != 3 or any(int(e) < 0 for e in self.max_epochs):
            raise ValueError(f"train.max_epochs needs three non-negative epoch caps. Got {self.max_epochs}")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of one training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild from :meth:`to_dict` output; unknown sections or fields raise ``ValueError``."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(values) - set(sections)
        if unknown:
            raise ValueError(f"Unknown config sections {sorted(unknown)}; known: {sorted(sections)}")
        built = {}
        for f in dataclasses.fields(cls):
            section_cls = type(getattr(cls(), f.name))
            built[f.name] = _build_section(section_cls, values.get(f.name, {}), f.name)
        return cls(**built)

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """Return a copy with dotted-name overrides applied, e.g. ``{"loss.alpha": 0.5}``."""
        tree = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in tree or not name:
                raise ValueError(f"Override {key!r} must be 'section.field' with section in {sorted(tree)}")
            if name not in tree[section]:
                raise ValueError(
                    f"Unknown field {name!r} in section {section!r}; known: {sorted(tree[section])}"
                )
            tree[section][name] = value
        return Config.from_dict(tree)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a JSON or YAML file holding a (possibly partial) config tree."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        return cls.from_dict(values)


def _build_section(section_cls: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(
            f"Unknown fields {sorted(unknown)} in config section {name!r}; known: {sorted(known)}"
        )
    kwargs = {}
    for key, value in values.items():
        default = getattr(section_cls(), key)
        if isinstance(default, tuple) and value is not None:
            value = tuple(value)
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int) and not isinstance(default, bool) and value is not None:
            value = int(value)
        elif isinstance(default, float) and value is not None:
            value = float(value)
        kwargs[key] = value
    return section_cls(**kwargs)


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be > 0. Got {value}")


def _check_non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value >= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 0. Got {value}")
