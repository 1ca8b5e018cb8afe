"""The three training stages: their plan, the rules that hand one stage over to the next, which config fields
act in which stage, and so what a search may train once for all its trials.

The stage plan follows the paper's section 3.3 (:func:`stage_plan`):

1. pretraining, α = β = 1, γ = μ = ν = 0 (:data:`PRETRAIN_WEIGHTS`), no masking or diversity transfer;
2. pretraining, same weights, masking + diversity transfer;
3. fine-tuning with the configured weights (``cfg.loss``; the paper uses all ones), masking + DT.

With ``train.recipe = "two_stage"`` stage 1 is the *slice stage* instead (:attr:`Stage.slices`): the backbone
and the shared classifier learn single slices (AC alone, BCE, shuffled slice batches; :data:`SLICE_WEIGHTS`),
and stages 2-3 keep that backbone frozen (:attr:`Stage.frozen_backbone`): they train the bi-GRU and the heads.

A stage ends when the learning rate fell below ``min_lr`` or at its epoch cap (:func:`stage_done`); then
:func:`next_stage` moves the :class:`TrainState` on. A stage that adds a task's head to weights an earlier
stage trained (:func:`adds_heads`: stage 3) warms its learning rate up (:func:`warmup_epochs`); a stage whose
loss leaves a head out (:func:`every_head_trains`) needs DDP's unused-parameter search.

Not every stage reads every field: :data:`FIELD_STAGES` says which, as data, one row per field: the first
stage (0-based) whose training the field changes, and whether a run may take another value of it from a
later stage on (a shared stage is trained at the base config's value, the trial's value acts after it). A
field without a row counts as acting from the first stage and not deferrable (the safe reading;
``tests/test_shared_stages.py`` checks the rows against the engine).

:func:`plan_sharing` turns the searched fields and a policy into a :class:`SharePlan` (the leading stages
trained once for the whole search), :func:`grace_epochs` gives ASHA's grace period (the first epoch at which
every searched field has acted), :func:`shared_config` and :func:`shared_key` the shared run's config and its
stable name.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from ichmodel.config import Config

#: Stage indices of :func:`stage_plan`: 0 pretraining, 1 pretraining + strategies, 2 fine-tuning.
PRETRAIN, STRATEGIES, FINETUNE = 0, 1, 2
STAGE_NAMES = ("pretrain", "pretrain+strategies", "finetune")
NUM_STAGES = len(STAGE_NAMES)
#: The loss weights of both pretraining stages: α = β = 1, γ = μ = ν = 0.
PRETRAIN_WEIGHTS = {"mc": 1.0, "ac": 1.0, "lp": 0.0, "dc": 0.0, "cpc": 0.0}
#: The slice stage's task (``train.recipe = "two_stage"``): AC alone, the shared classifier on g.
SLICE_WEIGHTS = {"mc": 0.0, "ac": 1.0, "lp": 0.0, "dc": 0.0, "cpc": 0.0}


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    weights: dict[str, float]
    strategies: bool
    max_epochs: int
    #: trains on shuffled batches of single slices (backbone + classifier, BCE): ``ichmodel.slice_batches``
    slices: bool = False
    #: the backbone's weights (and its BatchNorm statistics) stay as the earlier stages left them
    frozen_backbone: bool = False


def stage_plan(cfg: Config) -> list[Stage]:
    """The three stages of ``cfg.train.recipe`` with the epoch caps of ``cfg.train.max_epochs``."""
    caps = cfg.train.max_epochs
    two_stage = cfg.train.recipe == "two_stage"
    first = ("slices", SLICE_WEIGHTS) if two_stage else (STAGE_NAMES[PRETRAIN], PRETRAIN_WEIGHTS)
    return [
        Stage(PRETRAIN, first[0], dict(first[1]), False, int(caps[PRETRAIN]), slices=two_stage),
        Stage(STRATEGIES, STAGE_NAMES[STRATEGIES], dict(PRETRAIN_WEIGHTS), True, int(caps[STRATEGIES]),
              frozen_backbone=two_stage),
        Stage(FINETUNE, STAGE_NAMES[FINETUNE], cfg.loss.weights(), True, int(caps[FINETUNE]),
              frozen_backbone=two_stage),
    ]  # fmt: skip


@dataclass
class TrainState:
    """Where a run stands; every field is a top-level key of the checkpoint (``ichmodel.checkpoint``)."""

    stage: int = 0
    epoch: int = 0  # epochs finished in the current stage
    global_epoch: int = 0  # epochs finished over all stages
    stage_started: bool = False  # optimizer/scheduler of the current stage exist
    #: selection score of best_model (train.select_metric, higher is better: −loss or F2); over the whole
    #: run, except with "loss", where it is reset at each stage's start
    best_score: float = -math.inf
    best_f2: float = -1.0  # validation F2 of best_model
    thresholds: list[float] = field(default_factory=lambda: [0.5] * 5)  # tuned with best_model
    nonfinite_steps: int = 0  # skipped steps over the whole run
    finished: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def adds_heads(plan: list[Stage], state: TrainState) -> bool:
    """Whether the current stage hands trained weights to a task no earlier stage trained (its head is new).

    Stage 2 keeps stage 1's tasks (it adds masking and diversity transfer, no head); stage 3 adds LP, DC and
    CPC. A run whose first trained stage is this one hands nothing over.
    """
    earlier = [s for s in plan[: state.stage] if s.max_epochs > 0]
    if not earlier:
        return False
    trained = {task for s in earlier for task, weight in s.weights.items() if weight > 0}
    return any(weight > 0 and task not in trained for task, weight in plan[state.stage].weights.items())


def warmup_epochs(cfg: Config, plan: list[Stage], state: TrainState) -> int:
    """The current stage's learning-rate warm-up: ``train.warmup_epochs`` where it :func:`adds_heads`, else 0."""
    return cfg.train.warmup_epochs if adds_heads(plan, state) else 0


def every_head_trains(stage: Stage, cfg: Config) -> bool:
    """Whether the stage's loss reaches every parameter: all five tasks with a weight above 0.

    Stages 1-2 leave the LP, DC and CPC heads out of the graph; a zero weight does the same in stage 3.
    """
    from ichmodel.losses import build_loss  # torch: only where a loss is built

    terms = build_loss(cfg.loss, weights_override=stage.weights).term_weights
    return all(terms.get(task, 0.0) > 0 for task in PRETRAIN_WEIGHTS)


def check_prediction_trained(cfg: Config) -> None:
    """Refuse a ``model.prediction`` that reads a head no stage trains: it would add noise.

    "mc+ac" needs MC and AC, "mc" needs MC, "ac" needs AC among the tasks of the stages with epochs.

    Raises:
        ValueError: naming the fields to change.
    """
    trained = [s for s in stage_plan(cfg) if s.max_epochs > 0]
    if not trained:
        return
    tasks = {task for s in trained for task, weight in s.weights.items() if weight > 0}
    if cfg.model.prediction == "mc+ac" and "ac" not in tasks:
        raise ValueError(
            'model.prediction "mc+ac" averages in the AC head, which no stage trains here (loss.beta = 0 '
            "and no pretraining epochs): set model.prediction=mc"
        )
    if cfg.model.prediction in ("mc", "mc+ac") and "mc" not in tasks:
        raise ValueError(
            f'model.prediction "{cfg.model.prediction}" reads the MC head, which no stage trains here (only '
            "the slice stage of train.recipe=two_stage has epochs): set model.prediction=ac or give stages "
            "2-3 epochs"
        )


def stage_done(cfg: Config, stage: Stage, state: TrainState, lr: float) -> bool:
    """A stage ends when the learning rate fell below ``min_lr`` or at its epoch cap."""
    return lr < cfg.train.min_lr or state.epoch >= stage.max_epochs


def next_stage(state: TrainState, plan: list[Stage]) -> None:
    """Move ``state`` to the start of the next stage; past the last one the run is finished."""
    state.stage += 1
    state.epoch = 0
    state.stage_started = False
    if state.stage >= len(plan):
        state.finished = True


# ------------------------------------------------------------------------------- fields and sharing

#: dotted field → (first stage that reads it, deferrable). "Deferrable": a run may start from weights trained
#: with another value of it (not the model's shapes or initialisation, the data split or the selection score).
FIELD_STAGES: dict[str, tuple[int, bool]] = {
    # shapes, initial weights: fixed for a run's whole life
    "model.pretrained_weights": (PRETRAIN, False),
    "model.in_channels": (PRETRAIN, False),
    "model.feature_dim": (PRETRAIN, False),
    "model.rnn_hidden": (PRETRAIN, False),
    "model.num_classes": (PRETRAIN, False),
    "model.cpc_steps": (PRETRAIN, False),  # the CPC predictors exist (untrained) from the start
    "model.dropout": (PRETRAIN, True),
    "model.transfer_grad": (STRATEGIES, True),  # only diversity transfer's pair images
    # the pretraining stages run PRETRAIN_WEIGHTS whatever loss.* says
    "loss.alpha": (FINETUNE, True),
    "loss.beta": (FINETUNE, True),
    "loss.gamma": (FINETUNE, True),
    "loss.mu": (FINETUNE, True),
    "loss.nu": (FINETUNE, True),
    "loss.aux_scale": (FINETUNE, True),  # scales LP, DC, CPC: 0 before fine-tuning
    "loss.cpc_score": (FINETUNE, True),
    "loss.cpc_temperature": (FINETUNE, True),
    "loss.lp_class_weights": (FINETUNE, True),
    "loss.gamma_pos": (PRETRAIN, True),  # ASL of MC and AC, every stage
    "loss.gamma_neg": (PRETRAIN, True),
    "loss.clip": (PRETRAIN, True),
    "loss.soft_f2": (PRETRAIN, True),
    "strategy.p1": (STRATEGIES, True),
    "strategy.p2": (STRATEGIES, True),
    "strategy.epsilon": (STRATEGIES, True),
    "strategy.pool_size": (STRATEGIES, True),
    "augment.flip_prob": (PRETRAIN, True),
    "augment.rotate_degrees": (PRETRAIN, True),
    "augment.brightness": (PRETRAIN, True),
    "augment.contrast": (PRETRAIN, True),
    "augment.crop_scale_min": (PRETRAIN, True),
    "augment.reverse_prob": (PRETRAIN, True),
    "augment.enabled": (PRETRAIN, True),
    "data.shards": (PRETRAIN, False),  # the data and its split: never changed under a run
    "data.val_fraction": (PRETRAIN, False),
    "data.split_seed": (PRETRAIN, False),
    "data.batch_size": (PRETRAIN, True),
    "data.max_slices": (PRETRAIN, True),
    "data.num_workers": (PRETRAIN, True),
    "train.lr": (PRETRAIN, True),
    "train.weight_decay": (PRETRAIN, True),
    "train.lr_factor": (PRETRAIN, True),
    "train.lr_patience": (PRETRAIN, True),
    "train.min_lr": (PRETRAIN, True),
    "train.max_epochs": (PRETRAIN, False),  # cap j acts in stage j; the shared run keeps the shared caps
    "train.max_nonfinite_steps": (PRETRAIN, True),
    "train.log_every": (PRETRAIN, True),
    "train.seed": (PRETRAIN, False),  # initial weights
    "train.amp_bf16": (PRETRAIN, True),
    "train.channels_last": (PRETRAIN, True),
    "train.threshold": (PRETRAIN, True),
    "train.select_metric": (PRETRAIN, False),  # the best score carried over from the shared stages
    # warm-up only where a stage adds heads (adds_heads): stage 3 of "paper", stage 2 of "two_stage" (the GRU)
    "train.warmup_epochs": (STRATEGIES, True),
    "train.init_cls_bias": (PRETRAIN, False),  # initial weights
    "train.recipe": (PRETRAIN, False),  # what every stage trains
    "train.slice_batch": (PRETRAIN, True),
}
SHARE_POLICIES = ("auto", "exact", "off")


def field_stage(name: str) -> tuple[int, bool]:
    """``(first stage that reads name, deferrable)``; a field without a row: ``(0, False)``."""
    return FIELD_STAGES.get(name, (PRETRAIN, False))


@dataclass(frozen=True)
class SharePlan:
    """``stages`` leading stages are trained once for every trial (0: none). ``deferred``: searched fields
    read by those stages, trained there at the base config's value; each trial's value acts from stage
    ``stages`` on."""

    policy: str
    stages: int
    deferred: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict:
        return {**asdict(self), "deferred": list(self.deferred)}  # as JSON holds it


def plan_sharing(searched: Iterable[str], max_epochs: tuple[int, ...], policy: str = "auto") -> SharePlan:
    """Which leading stages a search trains once, from its searched fields and the stage caps.

    ``"exact"`` shares the stages before the first one that reads a searched field: every trial trains exactly
    what it would alone. ``"auto"`` shares every stage before fine-tuning (the paper's two pretraining stages)
    when every searched field they read is deferrable, else falls back to ``"exact"``; those fields' trial
    values act from fine-tuning on. ``"off"`` shares nothing. Stages with no epochs are never shared.

    Raises:
        ValueError: for a policy other than :data:`SHARE_POLICIES`.
    """
    if policy not in SHARE_POLICIES:
        raise ValueError(f"share policy must be one of {list(SHARE_POLICIES)}. Got {policy!r}")
    searched = sorted(set(searched))
    if policy == "off":
        return SharePlan(policy, 0, (), "--share-stages off")
    stages = min([field_stage(n)[0] for n in searched] + [FINETUNE])
    reason = f"no searched field acts before stage {stages + 1}"
    fixed = [n for n in searched if not field_stage(n)[1] and field_stage(n)[0] < FINETUNE]
    if policy == "auto" and fixed:
        reason += f" ({', '.join(fixed)} cannot change after a shared stage, so nothing is deferred)"
    elif policy == "auto" and stages < FINETUNE:
        stages = FINETUNE
        reason = (
            "the pretraining stages are trained once at the base config; searched values act from fine-tuning"
        )
    if stages > 0 and sum(max_epochs[:stages]) == 0:
        return SharePlan(policy, 0, (), f"nothing to share: stages 1..{stages} have no epochs")
    deferred = tuple(n for n in searched if field_stage(n)[0] < stages)
    return SharePlan(policy, stages, deferred, reason)


def grace_epochs(searched: Iterable[str], max_epochs: tuple[int, ...], share: SharePlan) -> int:
    """ASHA's grace period: one epoch into the stage in which the last searched field begins to act (a
    deferred field acts from the first unshared stage), counted in global epochs at the stage caps; at most
    the run's total epochs, at least 1. Before it, a trial differs from the others by chance only."""
    acting = [max(field_stage(n)[0], share.stages if n in share.deferred else 0) for n in searched]
    stage = max(acting, default=PRETRAIN)
    total = sum(max_epochs)
    return max(1, min(total, sum(max_epochs[:stage]) + 1))


def shared_config(base: Config, share: SharePlan) -> Config:
    """The config of the run that trains the shared stages: ``base`` with the later stages' caps at 0."""
    caps = tuple(base.train.max_epochs)
    return base.with_overrides(
        {"train.max_epochs": [*caps[: share.stages], *[0] * (NUM_STAGES - share.stages)]}
    )


def shared_key(cfg: Config, stages: int) -> str:
    """A stable name for the run of ``cfg``'s first ``stages`` stages: ``stages<k>-<hash>`` over the fields
    those stages read (with only their caps), so a config that differs only where they do not read maps to the
    same run."""
    tree = cfg.to_dict()
    read = {}
    for section, values in sorted(tree.items()):
        for name, value in sorted(values.items()):
            dotted = f"{section}.{name}"
            if field_stage(dotted)[0] < stages:
                read[dotted] = list(value)[:stages] if dotted == "train.max_epochs" else value
    digest = hashlib.sha256(json.dumps(read, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"stages{stages}-{digest}"
