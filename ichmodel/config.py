"""Typed, frozen configuration: every default of the model, its losses and its training lives here.

YAML files, command lines and search spaces only *override* these values, by dotted name
(``"loss.alpha"``, ``"strategy.p1"``, ``"train.lr"``). The resolved config is saved as a plain dict
beside every checkpoint (:meth:`Config.to_dict`) and rebuilt with :meth:`Config.from_dict`.

Each section coerces a value to its field's type (``"0.5"`` → 0.5, ``[5, 5, 10]`` → ``(5, 5, 10)``,
``"false"`` → False) and rejects what does not convert exactly (``2.5`` for an integer, ``"flase"`` for a
flag); every error names the field by its dotted name: ``train.lr must be > 0. Got -1.0``.

Where the paper and the authors' code disagree, the choice is stated on the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ichmodel.constants import NUM_CLASSES
from ichmodel.io import atomic_write_text

#: ``model.prediction`` values: the slice probabilities a model gives (``ichmodel.model.slice_probs``).
PREDICTIONS = ("mc", "mc+ac", "ac")

#: ``train.recipe`` values: how the three stages train (``ichmodel.stages.stage_plan``).
RECIPES = ("paper", "two_stage")

#: ``train.select_metric`` values: validation metrics that pick the best epoch.
SELECT_METRICS = ("mc_loss", "f2", "loss")

#: The words a flag accepts (case-insensitive), besides True/False and the integers 1/0.
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class _Section:
    """Base of the config sections: coerce every field to the type of its default, then :meth:`validate`.

    A section's dotted prefix is its class name without ``Config``, lower-cased (``TrainConfig`` → ``train``),
    the name of its field in :class:`Config`.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            value = _coerce(self.dotted(f.name), getattr(self, f.name), default)
            object.__setattr__(self, f.name, value)  # frozen: the dataclass way to set in __post_init__
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value is out of its range."""

    @classmethod
    def dotted(cls, name: str) -> str:
        return f"{cls.__name__.removesuffix('Config').lower()}.{name}"


@dataclass(frozen=True)
class ModelConfig(_Section):
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
    #: What the model predicts for a slice (validation, thresholds, predictions, submissions): "mc", the
    #: paper's sigmoid(MC logits), or "mc+ac", the mean of the MC and AC probabilities (the sequence head
    #: and the per-slice head that training also fits: an ensemble of two views inside one model). Default
    #: "mc+ac": held-out micro-F2 of the default recipe (bench/ablation.py, epochs 1,1,2, seeds 0-2) 0.550 vs
    #: 0.451 with "mc" on 96 series at 128 px (variants default and default_mc); on the same trained models
    #: 0.526 vs 0.514 on 128 series at 64 px, 0.481 vs 0.430 over six runs on 64 series. A run that never
    #: trains AC (β = 0 and no pretraining stage) must use "mc"; "ac" (the per-slice head alone) is for a
    #: run whose only trained stage is the slice stage of ``train.recipe = "two_stage"``.
    prediction: str = "mc+ac"

    def validate(self) -> None:
        _check_positive(self, "in_channels", "feature_dim", "rnn_hidden", "num_classes", "cpc_steps")
        _check_range(self, "dropout", 0, 1, high_open=True)
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"{self.dotted('prediction')} must be one of {list(PREDICTIONS)}. Got {self.prediction!r}"
            )


@dataclass(frozen=True)
class LossConfig(_Section):
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
    #: Common factor on LP, DC and CPC: L = αL1 + βL2 + s·(γL3 + μL4 + νL5). At random init their backbone
    #: gradients per unit weight are 1.1-4× MC's (ichmodel.diagnostics); 0.25 keeps MC the leading term.
    aux_scale: float = 0.25
    #: CPC scores: "cosine" (cosine similarity / cpc_temperature) or "dot" (raw dot products of unnormalised
    #: features, the earlier scoring, whose gradient was 33-42× MC's).
    cpc_score: str = "cosine"
    cpc_temperature: float = 0.1
    #: LP's label-count classes 0..5: "none", "balanced" (inverse frequency in the batch, as the authors
    #: weighted LP's classes) or six comma-separated weights, e.g. "1,2,4,8,8,8".
    lp_class_weights: str = "balanced"
    #: Weight of the authors' extra term 1 − soft F2 of sigmoid(mc_logits) (not in the paper); 0 = off.
    soft_f2: float = 0.0

    def validate(self) -> None:
        _check_non_negative(self, "alpha", "beta", "gamma", "mu", "nu", "gamma_pos", "gamma_neg")
        _check_range(self, "clip", 0, 1, high_open=True)
        _check_non_negative(self, "aux_scale", "soft_f2")
        _check_positive(self, "cpc_temperature")
        if self.cpc_score not in ("cosine", "dot"):
            raise ValueError(f"loss.cpc_score must be 'cosine' or 'dot'. Got {self.cpc_score!r}")
        if self.lp_class_weights not in ("none", "balanced"):
            try:
                weights = [float(w) for w in self.lp_class_weights.split(",")]
            except ValueError:
                weights = []
            if len(weights) != NUM_CLASSES + 1 or not all(0 <= w < float("inf") for w in weights):
                raise ValueError(
                    "loss.lp_class_weights must be 'none', 'balanced' or "
                    f"{NUM_CLASSES + 1} comma-separated weights >= 0. Got {self.lp_class_weights!r}"
                )

    def weights(self) -> dict[str, float]:
        """Task weights keyed by the loss-part names ``mc, ac, lp, dc, cpc``."""
        return {"mc": self.alpha, "ac": self.beta, "lp": self.gamma, "dc": self.mu, "cpc": self.nu}


@dataclass(frozen=True)
class StrategyConfig(_Section):
    """Masking (section 2.7) and diversity transfer (section 2.8)."""

    p1: float = 0.15  # fraction of slices whose g is zeroed before the GRU
    p2: float = 0.15  # fraction of slices that receive a transferred label difference
    epsilon: float = 0.5  # per-sequence probability of training on the generated sequence
    #: Diversity-transfer pairs whose images are kept in memory (sampled once from the full pool).
    pool_size: int = 512

    def validate(self) -> None:
        for name in ("p1", "p2", "epsilon"):
            _check_range(self, name, 0, 1)
        _check_non_negative(self, "pool_size")


@dataclass(frozen=True)
class AugmentConfig(_Section):
    """Image augmentation, the same draw for every slice of a series (section 3.1)."""

    flip_prob: float = 0.5
    rotate_degrees: float = 15.0  # angle drawn from [-rotate_degrees, rotate_degrees]
    brightness: float = 0.1  # additive, fraction of the range
    contrast: float = 0.1  # multiplicative, factor drawn from [1 - contrast, 1 + contrast]
    crop_scale_min: float = 0.85  # multiscale crop: side kept, drawn from [crop_scale_min, 1], resized back
    reverse_prob: float = 0.0  # reverse a series' slice order (images and labels); enables reversal TTA
    enabled: bool = True

    def validate(self) -> None:
        _check_range(self, "flip_prob", 0, 1)
        _check_range(self, "rotate_degrees", 0, 180)
        _check_range(self, "brightness", 0, 1)
        _check_range(self, "contrast", 0, 1)  # a factor range that stays ordered and non-negative
        _check_range(self, "crop_scale_min", 0, 1, low_open=True)  # [crop_scale_min, 1] is an ordered range
        _check_range(self, "reverse_prob", 0, 1)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the preprocessed shards are and how they are split and batched."""

    shards: str = ""  # folder written by ``ray_jobs/preprocess.py`` (holds manifest.json)
    val_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 4  # series per batch (paper section 3.2)
    max_slices: int = 0  # crop longer series to a random window of this many slices in training; 0 = all
    num_workers: int = 0  # DataLoader worker processes
    #: Node-local folder for the shard files of a shard folder in object storage (each downloaded whole
    #: once per node, ``ichmodel.shard_cache``); "" = ``<the node's temp dir>/ichmodel-shard-cache``.
    cache_dir: str = ""
    cache_max_gib: float = 100.0  # the least recently used shard files are deleted above this
    #: Shard files per shuffle window of a shard folder in object storage (``ichmodel.batches``): each epoch
    #: shuffles the series within windows of this many files, so the first epoch trains on one window
    #: while the next downloads (the shard cache downloads 4 files at once); 0 = all series at once. A local
    #: folder is always shuffled all at once.
    shuffle_window: int = 4

    def validate(self) -> None:
        _check_range(self, "val_fraction", 0, 1, low_open=True, high_open=True)
        _check_positive(self, "batch_size", "cache_max_gib")
        _check_non_negative(self, "max_slices", "num_workers", "shuffle_window")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimisation and the three-stage plan (section 3.3)."""

    lr: float = 1e-3
    weight_decay: float = 1e-2
    lr_factor: float = 0.5  # halve the learning rate ...
    lr_patience: int = 3  # ... when validation loss has not improved for this many epochs
    min_lr: float = 1e-6  # a stage ends when the learning rate falls below this
    #: Epoch cap of each stage (pretrain, pretrain + strategies, fine-tune); the paper has none.
    max_epochs: tuple[int, int, int] = (30, 30, 30)
    max_nonfinite_steps: int = 20  # consecutive non-finite losses that end the run
    #: Training steps between reads of the device-side loss sums and skip counters (each read waits for the
    #: GPU): progress, non-finite warnings and the stop after ``max_nonfinite_steps`` come that often.
    log_every: int = 50
    seed: int = 0
    amp_bf16: bool = True  # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True
    threshold: float = 0.5  # decision threshold for F2 reported during training
    #: Validation metric that picks the exported weights and drives ReduceLROnPlateau: "mc_loss" (MC's ASL,
    #: lower is better), "f2" (micro-F2 at tuned thresholds) or "loss" (the stage's weighted total). MC loss
    #: and F2 mean the same in every stage, so one best checkpoint is kept across all stages (a stage that
    #: does not beat the earlier best keeps its weights); the total loss changes meaning between stages, so
    #: with "loss" the best is compared within a stage and the last stage's best is exported.
    #: Default "f2": bench/ablation.py (64 series at 64 px, 1+1+2 epochs) gave the default recipe held-out
    #: micro-F2 0.538 / 0.478 (seeds 0 / 1) selected by F2 against 0.480 / 0.422 by MC loss.
    select_metric: str = "f2"
    #: Linear learning-rate warm-up over the first ``warmup_epochs`` epochs (per step) of a stage that adds
    #: tasks to trained weights (stage 3: the LP, DC and CPC heads start random and meet a fresh AdamW;
    #: stage 2 adds no head and starts at the full rate); 0 = none. Default 1: the same bench
    #: (seed 0, selection by MC loss) gave 0.480 held-out micro-F2 with it against 0.454 without.
    warmup_epochs: int = 1
    #: Start ``cls``'s bias at the log-odds of each class's training prevalence (not 0 = probability 0.5).
    #: Off: measured with bench/ablation.py (64 series at 64 px, 1+1+2 epochs, seed 0, mc_only) it gave
    #: held-out micro-F2 0.489 against 0.560 without; ASL's negative focusing already discounts the easy
    #: negatives that a prior bias would silence.
    init_cls_bias: bool = False
    #: "paper": all three stages train the whole model end to end on batches of series (section 3.3).
    #: "two_stage": stage 1 trains the backbone and the shared classifier alone, per slice, on shuffled
    #: batches of ``slice_batch`` slices with BCE (the per-slice CNN of the RSNA 2019 winners); stages 2-3
    #: then train the bi-GRU and the heads (the paper's tasks, masking, diversity transfer) on the frozen
    #: backbone's features, computed once without augmentation (``ichmodel.feature_cache``), so their
    #: epochs cost the GRU and the heads only (``ichmodel.stages.stage_plan``).
    #: Default "two_stage": bench/ablation.py (96 series at 64 px, 4 backbone epochs, seeds 0-2) gave held-out
    #: micro-F2 0.590 / 0.662 / 0.500 on the generator's default / easy / hard settings against 0.532 /
    #: 0.627 / 0.403 for "paper" (README, "Held-out ablation").
    recipe: str = "two_stage"
    slice_batch: int = 32  # slices per step in the slice stage of the "two_stage" recipe

    def validate(self) -> None:
        _check_positive(
            self, "lr", "lr_patience", "min_lr", "max_nonfinite_steps", "log_every", "slice_batch"
        )
        if self.recipe not in RECIPES:
            raise ValueError(f"{self.dotted('recipe')} must be one of {list(RECIPES)}. Got {self.recipe!r}")
        _check_non_negative(self, "weight_decay", "warmup_epochs")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(
                f"{self.dotted('select_metric')} must be one of {list(SELECT_METRICS)}. Got {self.select_metric!r}"
            )
        _check_range(self, "lr_factor", 0, 1, low_open=True, high_open=True)
        _check_range(self, "threshold", 0, 1)
        if len(self.max_epochs) != 3 or any(e < 0 for e in self.max_epochs):
            raise ValueError(
                f"{self.dotted('max_epochs')} needs three non-negative epoch caps. Got {self.max_epochs}"
            )


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
        """Rebuild from :meth:`to_dict` output (or part of it); unknown sections or fields raise ``ValueError``."""
        sections = {f.name: type(getattr(cls(), f.name)) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(sections))
        if unknown:
            raise ValueError(f"Unknown config section {', '.join(unknown)}; known: {sorted(sections)}")
        return cls(**{name: _build_section(section_cls, values.get(name, {}), name)
                      for name, section_cls in sections.items()})  # fmt: skip

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """Return a copy with dotted-name overrides applied, e.g. ``{"loss.alpha": 0.5}``."""
        tree = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if not section or not name:
                raise ValueError(f"An override is named 'section.field' (e.g. loss.alpha). Got {key!r}")
            tree.setdefault(section, {})[name] = value
        return Config.from_dict(tree)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a JSON or YAML file holding a (possibly partial) config tree."""
        return cls().with_overrides(load_overrides(path))


def load_overrides(path: str | Path) -> dict[str, Any]:
    """The dotted-name overrides that a JSON or YAML config tree holds: ``loss: {nu: 0.5}`` → ``{"loss.nu": 0.5}``.

    Raises:
        ValueError: when the file does not hold a mapping of sections, each a mapping of fields.
    """
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        tree = yaml.safe_load(text) or {}
    else:
        tree = json.loads(text)
    if not isinstance(tree, dict):
        raise ValueError(f"{path} must hold a mapping of config sections. Got {type(tree).__name__}")
    overrides = {}
    for section, fields in tree.items():
        if not isinstance(fields, dict):
            raise ValueError(
                f"Config section {section!r} in {path} must be a mapping of fields. Got {fields!r}"
            )
        overrides.update({f"{section}.{name}": value for name, value in fields.items()})
    return overrides


def _build_section(section_cls: type[_Section], values: dict[str, Any], name: str) -> _Section:
    if not isinstance(values, dict):
        raise ValueError(f"Config section {name!r} must be a mapping of fields. Got {values!r}")
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(f"{name}.{field_name}" for field_name in unknown)
        raise ValueError(f"Unknown config field {names}; known in {name}: {sorted(known)}")
    return section_cls(**values)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the field's ``default``, converted only where nothing is lost.

    Raises:
        ValueError: naming the field (``name``, dotted) and the value that does not convert.
    """
    if default is None:  # an optional path
        return None if value is None else _coerce(name, value, "")
    if isinstance(default, bool):
        word = str(value).strip().lower() if isinstance(value, str | int) else None
        if word in BOOL_WORDS:  # True/False themselves are 1/0 here
            return BOOL_WORDS[word]
        raise ValueError(f"{name} must be a boolean (true/false, 1/0, yes/no). Got {value!r}")
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name} must be a list. Got {value!r}")
        return tuple(_coerce(name, v, default[0]) for v in value)
    if isinstance(default, str):
        if not isinstance(value, str | os.PathLike):
            raise ValueError(f"{name} must be a string. Got {value!r}")
        return str(value)
    return _coerce_number(name, value, type(default))


def _coerce_number(name: str, value: Any, kind: type) -> int | float:
    """``value`` as an ``int`` (integral values only: 3, 3.0, "3") or a ``float`` (any real, "1e-3")."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: the error below names the field
            value = float(value) if kind is float else int(value.strip())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if kind is float:
            return float(value)
        if float(value).is_integer():
            return int(value)
    what = "a number" if kind is float else "an integer"
    raise ValueError(f"{name} must be {what}. Got {value!r}")


def _check_positive(section: _Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value > 0:
            raise ValueError(f"{section.dotted(name)} must be > 0. Got {value}")


def _check_non_negative(section: _Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value >= 0:
            raise ValueError(f"{section.dotted(name)} must be >= 0. Got {value}")


def _check_range(
    section: _Section, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """``low <= value <= high``, with ``<`` on a side marked open; the message writes the interval."""
    value = getattr(section, name)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{section.dotted(name)} must be in {interval}. Got {value}")
