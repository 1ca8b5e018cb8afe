"""The default space plus the training recipe (``train.recipe``: "paper" or "two_stage", ichmodel/stages.py).

The recipe decides what stage 1 trains, so no stage can be shared between trials of different recipes:
with this space the search shares nothing (``tune.py`` says so in its log) and every trial trains all its
stages. Use it to check the default recipe on your own data; the default space is cheaper per trial.
"""

from __future__ import annotations

from typing import Any

from ichmodel.config import RECIPES
from search_spaces import default


def space(trial: Any) -> dict[str, Any]:
    return {**default.space(trial), "train.recipe": trial.suggest_categorical("train.recipe", list(RECIPES))}
