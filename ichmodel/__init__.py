"""Intracranial hemorrhage detection on head CT: a multitask ResNet18 + bi-GRU sequence model.

The library has no Ray dependency; the Ray jobs live in ``ray_jobs/``. Data flows one way:
readers → preprocess (Parquet shards) → dataset → model → losses → engine → predictions → ensemble.
"""

from __future__ import annotations

from ichmodel.checkpoint import load_checkpoint, load_model
from ichmodel.config import (
    AugmentConfig,
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    StrategyConfig,
    TrainConfig,
)
from ichmodel.constants import CLASSES, NUM_CLASSES
from ichmodel.dataset import SeriesDataset, collate_series, split_series
from ichmodel.engine import evaluate, fit, stage_plan, train_one_epoch
from ichmodel.ensemble import (
    EnsembleSpec,
    average_predictions,
    choose_thresholds,
    score_predictions,
)
from ichmodel.losses import MultitaskLoss, asymmetric_loss, build_loss, info_nce_loss
from ichmodel.metrics import f2_score, per_class_f2, rsna_weighted_log_loss, search_thresholds
from ichmodel.model import ICHModel, build_model
from ichmodel.predict import predict_dataset, series_probs, summarize_series
from ichmodel.strategies import (
    PoolPair,
    StrategyPlan,
    TransferBatch,
    build_transfer_pool,
    make_transfer_batch,
    plan_strategies,
    transfer_labels,
)
from ichmodel.submission import SubmissionError, validate_submission, write_submission
from ichmodel.trials import select_trials

__all__ = [
    "CLASSES",
    "NUM_CLASSES",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "EnsembleSpec",
    "ICHModel",
    "LossConfig",
    "ModelConfig",
    "MultitaskLoss",
    "PoolPair",
    "SeriesDataset",
    "StrategyConfig",
    "StrategyPlan",
    "SubmissionError",
    "TrainConfig",
    "TransferBatch",
    "asymmetric_loss",
    "average_predictions",
    "build_loss",
    "build_model",
    "build_transfer_pool",
    "choose_thresholds",
    "collate_series",
    "evaluate",
    "f2_score",
    "fit",
    "info_nce_loss",
    "load_checkpoint",
    "load_model",
    "make_transfer_batch",
    "per_class_f2",
    "plan_strategies",
    "predict_dataset",
    "rsna_weighted_log_loss",
    "score_predictions",
    "search_thresholds",
    "select_trials",
    "series_probs",
    "split_series",
    "stage_plan",
    "summarize_series",
    "train_one_epoch",
    "transfer_labels",
    "validate_submission",
    "write_submission",
]
