"""``ichmodel.report``: the PNG figures and ``index.html``, with and without an Optuna study."""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import optuna
import pytest

from ichmodel.constants import CLASSES
from ichmodel.metrics import search_thresholds
from ichmodel.report import ModelScore, make_report, plot_optuna_study
from tests.conftest import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def validation():
    rng = np.random.default_rng(1)
    y_true = (rng.random((80, 5)) < 0.25).astype(np.int8)
    probs = np.clip(0.5 * y_true + 0.5 * rng.random((80, 5)), 0, 1)
    scores = [
        ModelScore("trial a", 0.61, dict(zip(CLASSES, [0.7, 0.5, 0.4, 0.6, 0.2], strict=True))),
        ModelScore("trial b", 0.58, dict(zip(CLASSES, [0.6, 0.6, 0.3, 0.5, 0.1], strict=True))),
        ModelScore("ensemble of 2", 0.6543, dict(zip(CLASSES, [0.72, 0.6, 0.41, 0.66, 0.25], strict=True))),
    ]
    return y_true, probs, search_thresholds(y_true, probs), scores


def _study(path, n_trials: int) -> None:
    study = optuna.create_study(
        study_name="search",
        storage=f"sqlite:///{path}",
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.optimize(
        lambda t: t.suggest_float("loss.alpha", 0, 2) * 0.3 - t.suggest_float("strategy.p1", 0, 1) ** 2,
        n_trials=n_trials,
    )


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and mpimg.imread(path).shape[0] > 100


def test_report_without_optuna_has_the_table_and_three_figures(validation, tmp_path):
    y_true, probs, thresholds, scores = validation
    index = make_report(
        tmp_path / "report", scores, y_true, probs, thresholds, optuna_db=tmp_path / "missing.db"
    )
    page = index.read_text()
    for name in ("model_f2.png", "per_class_f2.png", "threshold_curves.png"):
        assert _is_png(tmp_path / "report" / name)
        assert f'src="{name}"' in page
    assert "0.6543" in page and "trial b" in page and f"{thresholds[0]:.2f}" in page
    assert "no optuna.db" in page
    assert not (tmp_path / "report" / "optuna_history.png").exists()


def test_report_shows_extra_tables_under_their_headings(validation, tmp_path):
    y_true, probs, thresholds, scores = validation
    tables = [("Calibration <OOF>", ["method", "log loss"], [["before", 0.49123], ["platt", 0.31]])]
    page = make_report(
        tmp_path / "r", scores, y_true, probs, thresholds, score_heading="Out-of-fold F2", tables=tables
    ).read_text()
    assert "<h2>Out-of-fold F2</h2>" in page and "Validation F2" not in page
    assert "<h2>Calibration &lt;OOF&gt;</h2>" in page
    assert "<th>log loss</th>" in page and "<td>0.4912</td>" in page and "<td>platt</td>" in page


def test_report_with_an_optuna_study_shows_history_and_importance(validation, tmp_path):
    y_true, probs, thresholds, scores = validation
    _study(tmp_path / "optuna.db", 6)
    index = make_report(
        tmp_path / "report", scores, y_true, probs, thresholds, optuna_db=tmp_path / "optuna.db"
    )
    page = index.read_text()
    for name in ("optuna_history.png", "param_importance.png"):
        assert _is_png(tmp_path / "report" / name) and f'src="{name}"' in page


def test_importance_is_skipped_with_one_completed_trial(tmp_path):
    _study(tmp_path / "optuna.db", 1)
    written, notes = plot_optuna_study(tmp_path / "optuna.db", tmp_path)
    assert [p.name for p in written] == ["optuna_history.png"]
    assert any("at least 2 completed trials" in n for n in notes)
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'empty.db'}")
    assert plot_optuna_study(tmp_path / "empty.db", tmp_path / "e") == (
        [],
        ["study 'empty' has no completed trial"],
    )


def test_make_report_rejects_mismatched_arrays(validation, tmp_path):
    y_true, probs, thresholds, scores = validation
    with pytest.raises(ValueError, match=r"must both be \[N, 5\]. Got \(80, 5\) and \(80, 4\)"):
        make_report(tmp_path, scores, y_true, probs[:, :4], thresholds)
    with pytest.raises(ValueError, match="at least one score"):
        make_report(tmp_path, [], y_true, probs, thresholds)


def test_importing_and_using_the_report_leaves_the_matplotlib_backend_alone(tmp_path):
    """A library import must not switch the caller's backend (it once ran ``matplotlib.use("Agg")``)."""
    code = f"""
import sys, matplotlib
matplotlib.use("svg")  # the caller's choice, not Agg
import numpy as np
from ichmodel.report import ModelScore, make_report
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
y = np.eye(5, dtype=np.int8)
make_report({str(tmp_path)!r}, [ModelScore("m", 1.0)], y, y * 0.9, [0.5] * 5)
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _is_png(tmp_path / "threshold_curves.png")
