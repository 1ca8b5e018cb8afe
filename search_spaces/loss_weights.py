"""Only the fine-tuning loss weights α, β, γ, μ, ν; everything else stays at the config's defaults."""

from __future__ import annotations

from typing import Any


def space(trial: Any) -> dict[str, Any]:
    return {
        "loss.alpha": trial.suggest_float("loss.alpha", 0.25, 4.0, log=True),
        "loss.beta": trial.suggest_float("loss.beta", 0.0, 2.0),
        "loss.gamma": trial.suggest_float("loss.gamma", 0.0, 2.0),
        "loss.mu": trial.suggest_float("loss.mu", 0.0, 2.0),
        "loss.nu": trial.suggest_float("loss.nu", 0.0, 2.0),
    }
