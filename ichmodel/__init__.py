"""Intracranial hemorrhage detection on head CT: a multitask ResNet18 + bi-GRU sequence model.

The library has no Ray dependency; the Ray jobs live in ``ray_jobs/``. Data flows one way:
readers → preprocess (Parquet shards) → dataset → model → losses → engine → predictions → ensemble.

The public names below are imported lazily (PEP 562): ``import ichmodel.config`` or ``from ichmodel import
Config`` loads no torch; ``from ichmodel import fit`` loads the engine then.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name → the module that defines it
_HOMES = {
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "AugmentConfig": "config",
    "Config": "config",
    "DataConfig": "config",
    "LossConfig": "config",
    "ModelConfig": "config",
    "StrategyConfig": "config",
    "TrainConfig": "config",
    "CLASSES": "constants",
    "NUM_CLASSES": "constants",
    "SeriesDataset": "dataset",
    "collate_series": "dataset",
    "fit": "engine",
    "EnsembleSpec": "ensemble",
    "average_predictions": "ensemble",
    "choose_thresholds": "ensemble",
    "score_predictions": "ensemble",
    "select_trials": "trials",
    "MultitaskLoss": "losses",
    "asymmetric_loss": "losses",
    "build_loss": "losses",
    "info_nce_loss": "losses",
    "f2_score": "metrics",
    "per_class_f2": "metrics",
    "rsna_weighted_log_loss": "metrics",
    "search_thresholds": "metrics",
    "ICHModel": "model",
    "build_model": "model",
    "predict_dataset": "predict",
    "series_probs": "predict",
    "summarize_series": "prediction_table",
    "split_series": "splits",
    "stage_plan": "stages",
    "PoolPair": "strategies",
    "StrategyPlan": "strategies",
    "TransferBatch": "strategies",
    "build_transfer_pool": "strategies",
    "make_transfer_batch": "strategies",
    "plan_strategies": "strategies",
    "transfer_labels": "strategies",
    "SubmissionError": "submission",
    "validate_submission": "submission",
    "write_submission": "submission",
    "train_one_epoch": "train_step",
    "evaluate": "validation",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    module = _HOMES.get(name)
    if module is None:
        raise AttributeError(f"module 'ichmodel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ichmodel.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
