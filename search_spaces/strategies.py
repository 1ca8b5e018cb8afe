"""Only the training strategies: masking fraction p1, diversity-transfer fraction p2 and ε."""

from __future__ import annotations

from typing import Any


def space(trial: Any) -> dict[str, Any]:
    return {
        "strategy.p1": trial.suggest_float("strategy.p1", 0.0, 0.4),
        "strategy.p2": trial.suggest_float("strategy.p2", 0.0, 0.4),
        "strategy.epsilon": trial.suggest_float("strategy.epsilon", 0.0, 1.0),
    }
