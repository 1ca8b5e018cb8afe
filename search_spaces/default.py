"""Everything the paper leaves to choice: the five loss weights, masking/DT fractions, ASL's γ± and ε.

Ranges:
- α (MC, the main task) is log-uniform in [0.25, 4]; β, γ, μ, ν in [0, 2], where 0 drops that task
  (the authors' ablation: each of AC, LP, DC, CPC added 0.4-1 F2 points on the leaderboard).
- p1, p2 in [0, 0.4] around the paper's 0.15; ε in [0, 1] around its 0.5.
- γ+ in [0, 4] and γ− in [0, 6]: covers both the paper's text (γ+ = 4, γ− = 1) and the ASL defaults the
  authors' code ran (γ+ = 1, γ− = 4).
- the common scale of LP, DC and CPC (``loss.aux_scale``, log-uniform in [0.05, 1]) and the authors' extra
  soft-F2 term (``loss.soft_f2`` in [0, 1], off by default): issue 12's loss balance;
- the learning-rate warm-up at each stage hand-over (``train.warmup_epochs`` 0-2).
"""

from __future__ import annotations

from typing import Any


def space(trial: Any) -> dict[str, Any]:
    return {
        "loss.alpha": trial.suggest_float("loss.alpha", 0.25, 4.0, log=True),
        "loss.beta": trial.suggest_float("loss.beta", 0.0, 2.0),
        "loss.gamma": trial.suggest_float("loss.gamma", 0.0, 2.0),
        "loss.mu": trial.suggest_float("loss.mu", 0.0, 2.0),
        "loss.nu": trial.suggest_float("loss.nu", 0.0, 2.0),
        "strategy.p1": trial.suggest_float("strategy.p1", 0.0, 0.4),
        "strategy.p2": trial.suggest_float("strategy.p2", 0.0, 0.4),
        "strategy.epsilon": trial.suggest_float("strategy.epsilon", 0.0, 1.0),
        "loss.gamma_pos": trial.suggest_float("loss.gamma_pos", 0.0, 4.0),
        "loss.gamma_neg": trial.suggest_float("loss.gamma_neg", 0.0, 6.0),
        "loss.aux_scale": trial.suggest_float("loss.aux_scale", 0.05, 1.0, log=True),
        "loss.soft_f2": trial.suggest_float("loss.soft_f2", 0.0, 1.0),
        "train.warmup_epochs": trial.suggest_int("train.warmup_epochs", 0, 2),
    }
