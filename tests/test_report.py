"""``ichmodel.report``: the PNG figures and ``index.html``, with and without an Optuna study (a file, a URI,
an RDB URL), and one report, one truth: every model figure names its rows and thresholds, and the page, the
terminal lines and the RESULT line are rendered from the same figures."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict

import matplotlib.image as mpimg
import numpy as np
import optuna
import pandas as pd
import pytest

from ichmodel import ensemble as E
from ichmodel import fold_ensemble as FE
from ichmodel import metrics as M
from ichmodel.calibration import FoldAlignment
from ichmodel.constants import CLASSES
from ichmodel.metrics import search_thresholds
from ichmodel.report import make_report, plot_optuna_study, report_figures
from ichmodel.scores import (
    OOF_ROWS_ALIGNED,
    OOF_ROWS_RAW,
    ModelScore,
    fold_scores,
    format_scores,
    holdout_estimate,
    parse_result_line,
    result_line,
)
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
    assert f"no Optuna study at {tmp_path / 'missing.db'}: the search figures are left out" in page
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
from ichmodel.report import make_report
from ichmodel.scores import ModelScore
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


def test_the_study_is_found_from_a_file_uri_and_an_rdb_url_and_a_missing_one_is_named(tmp_path):
    _study(tmp_path / "optuna.db", 3)
    for location in ((tmp_path / "optuna.db").as_uri(), f"sqlite:///{tmp_path / 'optuna.db'}"):
        written, notes = plot_optuna_study(location, tmp_path / "out")
        assert [p.name for p in written] == ["optuna_history.png", "param_importance.png"], notes
    assert plot_optuna_study(f"file://{tmp_path}/none.db", tmp_path) == (
        [],
        [f"no Optuna study at file://{tmp_path}/none.db: the search figures are left out"],
    )


def test_without_a_study_location_the_page_says_so(validation, tmp_path):
    y_true, probs, thresholds, scores = validation
    page = make_report(tmp_path, scores, y_true, probs, thresholds).read_text()
    assert "no Optuna study location given" in page


# ------------------------------------------------------------------------- one report, one truth


def _scaled(probs: np.ndarray, scale: float, shift: float) -> np.ndarray:
    z = np.log(probs) - np.log1p(-probs)
    return 1 / (1 + np.exp(-(z * scale + shift)))


@pytest.fixture(scope="module")
def fold_run():
    """OOF tables of two members over 3 folds whose fold models have other scales (as briefly trained fold
    models do), each fold model's predictions on 300 reference slices, and the fold ensemble chosen on them:
    ``(oof tables, reference, aligned choice, aligned probabilities, raw choice)``."""
    rng = np.random.default_rng(0)
    series = np.repeat([f"s{i:03d}" for i in range(90)], 10)
    labels = (rng.random((len(series), 5)) < 0.12).astype(np.int8)
    signal = np.where(labels == 1, 1.0, -1.0)
    fold = np.unique(series, return_inverse=True)[1] % 3
    ref_base = 1 / (1 + np.exp(-rng.normal(-1.5, 1.2, (300, 5))))
    moves = {0: (0.4, -2.0), 1: (2.5, 1.5), 2: (1.0, 0.0)}
    oof, reference = {}, {}
    for m, noise in enumerate((1.0, 1.3)):
        probs = 1 / (1 + np.exp(-(signal + rng.normal(0, noise, labels.shape))))
        for k, (scale, shift) in moves.items():
            probs[fold == k] = _scaled(probs[fold == k], scale, shift)
        frame = pd.DataFrame({"series_id": series, "position": np.arange(len(series)) % 10})
        frame["slice_id"] = [f"{s}_{p}" for s, p in zip(series, frame["position"], strict=True)]
        for c, name in enumerate(CLASSES):
            frame[name] = probs[:, c]
        for c, name in enumerate(CLASSES):
            frame[f"label_{name}"] = labels[:, c]
        frame["fold"] = fold
        oof[f"t{m}"] = frame
        reference[f"t{m}"] = {k: _scaled(ref_base, scale, shift) for k, (scale, shift) in moves.items()}
    aligned, probs = FE.choose_fold_ensemble(oof, n_boot=200, reference=reference)
    raw, _ = FE.choose_fold_ensemble(oof, n_boot=200)
    return oof, reference, aligned, probs, raw


def _cells(page: str, key: str) -> list[str]:
    """The cells of the page's figure row ``data-key=key``."""
    row = page.split(f'data-key="{key}"', 1)[1].split("</tr>", 1)[0]
    return [c.split("</td>", 1)[0] for c in row.split("<td>")[1:]]


def test_page_terminal_and_result_line_give_the_same_figures_with_their_rows_and_thresholds(
    fold_run, tmp_path
):
    oof, reference, choice, probs, _ = fold_run
    summary = asdict(choice)
    scores = fold_scores(summary)
    labels = oof["t0"][[f"label_{c}" for c in CLASSES]].to_numpy()
    page = make_report(
        tmp_path, scores, labels, probs, summary["thresholds"], score_heading="Out-of-fold F2"
    ).read_text()
    printed = "\n".join(["fold runs: 6", *format_scores(scores), result_line(scores)])
    on_page, in_result = report_figures(page), parse_result_line(printed)
    assert set(on_page) == set(in_result) == {
        "single_oof_f2", "single_oof_f2_cross_fitted", "ensemble_oof_f2", "ensemble_oof_f2_cross_fitted",
        "ensemble_minus_single_oof_f2",
    }  # fmt: skip
    for key, value in on_page.items():
        assert in_result[key] == pytest.approx(value, abs=5e-7)
    # the same rows and thresholds as the member choice and its bootstrap (the old page re-scored the single
    # best on its raw OOF rows at thresholds tuned there: the 0.4562 against 0.4949 of issue 25)
    assert on_page["single_oof_f2"] == pytest.approx(summary["bootstrap"]["single"]["f2"], abs=1e-12)
    assert on_page["ensemble_oof_f2"] == pytest.approx(summary["bootstrap"]["ensemble"]["f2"], abs=1e-12)
    best = oof[summary["single_best"]]
    raw_single = E.score_predictions(best, E.choose_thresholds(best))["micro_f2"]
    assert abs(raw_single - on_page["single_oof_f2"]) > 0.01  # two estimates: only the labelled one is shown
    for key in on_page:
        cells = _cells(page, key)
        assert cells[1] == OOF_ROWS_ALIGNED.replace("'", "&#x27;")
        assert cells[2].startswith("cross-fitted" if key.endswith("cross_fitted") else "tuned on these rows")
        assert f"{in_result[key]:+.4f}"[0 if key.startswith("ensemble_minus") else 1 :] in cells[3]
        assert f"{in_result[key]:+.4f}".lstrip("+") in printed
    assert f"micro-F2 on {OOF_ROWS_ALIGNED}; thresholds tuned on these rows:" in printed
    low, high = summary["bootstrap"]["ensemble"]["low"], summary["bootstrap"]["ensemble"]["high"]
    assert _cells(page, "ensemble_oof_f2")[4] == f"{low:.4f} .. {high:.4f}"
    assert f"{low:.4f} .. {high:.4f}" in printed
    assert (
        "Thresholds of ensemble (" in page and f"(tuned on {OOF_ROWS_ALIGNED}".replace("'", "&#x27;") in page
    )


def test_the_single_best_shows_per_class_figures_only_from_its_own_rows(fold_run, tmp_path):
    oof, reference, choice, probs, raw = fold_run
    summary = asdict(choice)
    no_per_class = {k: v for k, v in summary.items() if k != "single_per_class"}
    single = next(s for s in fold_scores(no_per_class) if s.key == "single_oof_f2")
    assert single.per_class == {}  # a summary without them: figures from other rows are not shown instead
    # what choose_fold_ensemble keeps: the single best's aligned rows at its tuned thresholds (as its micro-F2)
    frame = oof[summary["single_best"]]
    labels = frame[[f"label_{c}" for c in CLASSES]].to_numpy()
    aligned = FoldAlignment.fit(reference[summary["single_best"]]).apply(
        frame[list(CLASSES)].to_numpy(), frame["fold"].to_numpy()
    )
    f2, thresholds = E.tuned_f2(labels, aligned)
    assert f2 == pytest.approx(summary["single_f2"]["tuned"], abs=1e-12)
    per_class = dict(
        zip(CLASSES, M.per_class_f2(labels, M.binarize(aligned, thresholds)).tolist(), strict=True)
    )
    assert summary["single_per_class"] == pytest.approx(per_class, abs=1e-12)
    single = next(s for s in fold_scores(summary) if s.key == "single_oof_f2")
    assert single.per_class == pytest.approx(per_class, abs=1e-12)
    page = make_report(
        tmp_path, fold_scores(no_per_class, per_class), labels, probs, summary["thresholds"]
    ).read_text()
    assert _cells(page, "single_oof_f2")[5:] == [f"{per_class[c]:.4f}" for c in CLASSES]
    # without a reference the rows are raw, and every figure says so
    raw_scores = fold_scores(asdict(raw))
    assert {s.estimate.rows for s in raw_scores} == {OOF_ROWS_RAW}
    assert "micro-F2 on raw OOF rows (not aligned); thresholds cross-fitted" in "\n".join(
        format_scores(raw_scores)
    )


def test_result_line_refuses_two_figures_under_one_key_and_parsing_needs_a_line():
    scores = [ModelScore("a", 0.5, role="single"), ModelScore("b", 0.6, role="single")]
    with pytest.raises(ValueError, match="share a RESULT key"):
        result_line(scores)
    assert (
        result_line([ModelScore("a", 0.5, role="single"), ModelScore("c", 0.7)])
        == "RESULT single_val_f2=0.500000"
    )
    held = ModelScore("ensemble of 2", 0.61, estimate=holdout_estimate(0.3), role="ensemble")
    assert result_line([held]) == "RESULT ensemble_holdout_f2=0.610000"
    assert format_scores([held])[0] == (
        "micro-F2 on held-out rows (0.3 of the validation series); thresholds tuned on the other validation series:"
    )
    assert parse_result_line("x\nRESULT a=0.1 b=0.25\nRESULT a=0.5\n") == {"a": 0.5}
    with pytest.raises(ValueError, match="No 'RESULT key=value' line"):
        parse_result_line("RESULT {json}")
