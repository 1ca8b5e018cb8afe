"""Optuna define-by-run search spaces for ``ray_jobs/tune.py``.

A space is a module with a function ``space(trial) -> dict`` that only calls ``trial.suggest_*`` with
dotted config names (``"loss.alpha"``, ``"strategy.p1"``, see ``ichmodel/config.py``) and returns the
suggested values. Pick one with ``--space NAME`` (a module here) or ``--space path/to/file.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

SpaceFn = Callable[[Any], dict[str, Any]]


def load_space(name_or_path: str) -> SpaceFn:
    """The ``space`` function of a module in this package or of a Python file.

    Raises:
        ValueError: the file or module does not exist, fails to import, or has no callable ``space``.
    """
    path = Path(name_or_path)
    if name_or_path.endswith(".py") or path.exists():
        if not path.is_file():
            raise ValueError(f"Search space file {name_or_path!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"user_space_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a user's file: report whatever broke it
            raise ValueError(f"Search space file {name_or_path!r} failed to import: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(f"search_spaces.{name_or_path}")
        except ModuleNotFoundError as exc:
            known = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))
            raise ValueError(
                f"No search space {name_or_path!r}; built-in spaces: {known}, or pass a .py file"
            ) from exc
    fn = getattr(module, "space", None)
    if not callable(fn):
        raise ValueError(f"Search space {name_or_path!r} must define a function space(trial) -> dict")
    return fn
