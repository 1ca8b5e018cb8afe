"""A small HTML report of an ensemble: PNG figures (matplotlib) and one ``index.html``.

Figures: validation micro-F2 of each single model against the ensemble, per-class F2 bars, F2 against the
threshold for every class with the chosen thresholds marked, and, when the search's ``optuna.db`` exists,
the F2 of every Optuna trial and the parameter importances (``optuna.importance.get_param_importances``,
only with at least two completed trials). A figure that cannot be made is left out with a note in the page.

Figures are plain :class:`matplotlib.figure.Figure` objects saved to PNG (the Agg renderer): no pyplot state
and no backend switch, so importing or calling this module leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ichmodel import metrics as M
from ichmodel.constants import CLASSES

logger = logging.getLogger(__name__)

REPORT_INDEX = "index.html"


@dataclass
class ModelScore:
    """Validation scores of one model (or of the ensemble): micro-F2 and per-class F2 ``[5]``."""

    name: str
    micro_f2: float
    per_class: dict[str, float] = field(default_factory=dict)
    thresholds: list[float] = field(default_factory=list)


def plot_model_f2(scores: Sequence[ModelScore], path: str | Path) -> Path:
    """Bar chart of validation micro-F2, one bar per model; the last entry (the ensemble) is highlighted."""
    fig, ax = _figure((max(4.0, 1.1 * len(scores) + 2), 3.6))
    names = [s.name for s in scores]
    values = [s.micro_f2 for s in scores]
    colors = ["#8da0cb"] * (len(scores) - 1) + ["#fc8d62"]
    bars = ax.bar(range(len(scores)), values, color=colors)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8
        )
    ax.set_xticks(range(len(scores)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, min(1.0, max(values + [0.1]) * 1.15))
    ax.set_ylabel("validation micro-F2")
    ax.set_title("Single models vs ensemble")
    return _save(fig, path)


def plot_per_class_f2(scores: Sequence[ModelScore], path: str | Path) -> Path:
    """Grouped bars of per-class F2 (classes on the x axis, one bar per model / the ensemble)."""
    fig, ax = _figure((7.0, 3.6))
    width = 0.8 / max(len(scores), 1)
    x = np.arange(len(CLASSES))
    for i, score in enumerate(scores):
        values = [score.per_class.get(c, 0.0) for c in CLASSES]
        ax.bar(x + (i - (len(scores) - 1) / 2) * width, values, width, label=score.name)
    ax.set_xticks(x, CLASSES)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validation F2")
    ax.set_title("Per-class F2 at the chosen thresholds")
    ax.legend(fontsize=7, ncols=min(len(scores), 4), loc="upper right")
    return _save(fig, path)


def plot_threshold_curves(
    y_true: np.ndarray, probs: np.ndarray, thresholds: Sequence[float] | np.ndarray, path: str | Path
) -> Path:
    """F2 against the threshold for each class ``[N, 5]`` (and the micro-F2 with one shared threshold),
    with the chosen per-class thresholds marked by a dot and a dotted line.
    """
    curves = M.threshold_curve(y_true, probs)
    grid = curves["threshold"]
    fig, ax = _figure((7.0, 4.0))
    for c, name in enumerate(CLASSES):
        (line,) = ax.plot(grid, curves[name], label=name)
        t = float(thresholds[c])
        f2_at_t = M.per_class_f2(y_true[:, c : c + 1], (probs[:, c : c + 1] >= t))[0]
        ax.axvline(t, color=line.get_color(), linestyle=":", linewidth=1)
        ax.plot([t], [f2_at_t], "o", color=line.get_color())
    ax.plot(grid, curves["micro"], color="black", linestyle="--", label="micro (one threshold)")
    ax.set_xlabel("threshold")
    ax.set_ylabel("F2")
    ax.set_ylim(0, 1.05)
    ax.set_title("F2 vs threshold (dots: chosen per-class thresholds)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_optuna_study(optuna_db: str | Path, out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Figures of the Optuna study in ``optuna_db`` (SQLite): F2 by trial and, with ≥ 2 completed trials,
    parameter importances.

    Returns:
        ``(written PNG paths, notes about what was skipped and why)``; never raises for a study that is
        empty, has several studies (the first is used) or whose importances cannot be computed.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = Path(out_dir)
    notes: list[str] = []
    written: list[Path] = []
    storage = f"sqlite:///{Path(optuna_db).resolve()}"
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # a locked / foreign database must not sink the report
        return [], [f"could not read {optuna_db}: {exc}"]
    if not names:
        return [], [f"{optuna_db} holds no study"]
    study = optuna.load_study(study_name=names[0], storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not done:
        return [], [f"study {names[0]!r} has no completed trial"]
    fig, ax = _figure((6.0, 3.6))
    numbers = [t.number for t in done]
    values = [float(t.value) for t in done]
    ax.plot(numbers, values, "o", label="trial")
    best = (
        np.maximum.accumulate(values)
        if study.direction == optuna.study.StudyDirection.MAXIMIZE
        else np.minimum.accumulate(values)
    )
    ax.step(numbers, best, where="post", color="#fc8d62", label="best so far")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (validation micro-F2)")
    ax.set_title(f"Optuna study {names[0]!r}: {len(done)} completed of {len(study.trials)}")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "optuna_history.png"))
    if len(done) < 2:
        notes.append("parameter importance needs at least 2 completed trials")
        return written, notes
    try:
        importances = optuna.importance.get_param_importances(study)
    except Exception as exc:  # e.g. a parameter that never varied
        notes.append(f"parameter importance could not be computed: {exc}")
        return written, notes
    if not importances:
        notes.append("parameter importance: no parameters")
        return written, notes
    names_sorted = list(importances)[::-1]
    fig, ax = _figure((6.0, 0.35 * len(names_sorted) + 1.5))
    ax.barh(names_sorted, [importances[n] for n in names_sorted], color="#66c2a5")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("Hyperparameter importance")
    written.append(_save(fig, out_dir / "param_importance.png"))
    return written, notes


def make_report(
    out_dir: str | Path,
    scores: Sequence[ModelScore],
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: Sequence[float] | np.ndarray,
    optuna_db: str | Path | None = None,
    title: str = "Ensemble report",
    score_heading: str = "Validation F2",
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[object]]]] = (),
) -> Path:
    """Write the figures and ``index.html`` into ``out_dir``; returns the path of ``index.html``.

    Args:
        out_dir: report folder (created).
        scores: single models first, the ensemble last.
        y_true: ``[N, 5]`` 0/1 validation labels; ``probs``: ``[N, 5]`` ensemble validation probabilities.
        thresholds: ``[5]`` the ensemble's chosen thresholds.
        optuna_db: the search's SQLite file; skipped (with a note) when ``None`` or missing.
        score_heading: heading of the scores table (e.g. ``"Out-of-fold F2"`` for a fold ensemble).
        tables: extra ``(heading, column names, rows)`` tables after the thresholds (floats as ``.4f``),
            e.g. bootstrap intervals or log loss before and after calibration.

    Raises:
        ValueError: when ``scores`` is empty or ``y_true``/``probs`` are not the same ``[N, 5]`` shape.
    """
    if not scores:
        raise ValueError("make_report needs at least one score. Got 0")
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    if y_true.shape != probs.shape or y_true.ndim != 2 or y_true.shape[1] != len(CLASSES):
        raise ValueError(
            f"y_true and probs must both be [N, {len(CLASSES)}]. Got {y_true.shape} and {probs.shape}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        ("Validation micro-F2", plot_model_f2(scores, out_dir / "model_f2.png")),
        ("Per-class F2", plot_per_class_f2(scores, out_dir / "per_class_f2.png")),
        (
            "Threshold curves (ensemble)",
            plot_threshold_curves(y_true, probs, thresholds, out_dir / "threshold_curves.png"),
        ),
    ]
    notes: list[str] = []
    if optuna_db is not None and Path(optuna_db).is_file():
        paths, notes = plot_optuna_study(optuna_db, out_dir)
        figures += [
            ("Optuna study" if p.stem == "optuna_history" else "Parameter importance", p) for p in paths
        ]
    else:
        notes.append("no optuna.db: the search figures are left out")
    for note in notes:
        logger.info("report: %s", note)
    index = out_dir / REPORT_INDEX
    index.write_text(_html(title, scores, thresholds, figures, notes, score_heading, tables))
    logger.info("report: %s (%d figures)", index, len(figures))
    return index


def _html(
    title: str,
    scores: Sequence[ModelScore],
    thresholds: Sequence[float] | np.ndarray,
    figures: list[tuple[str, Path]],
    notes: list[str],
    score_heading: str = "Validation F2",
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[object]]]] = (),
) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("model", "micro-F2", *CLASSES))
    rows = []
    for s in scores:
        cells = [
            html.escape(s.name),
            f"{s.micro_f2:.4f}",
            *(f"{s.per_class.get(c, float('nan')):.4f}" for c in CLASSES),
        ]
        rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    th_row = "".join(f"<td>{float(t):.2f}</td>" for t in thresholds)
    figs = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, p in figures
    )
    note_list = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    extra = "".join(_html_table(heading, columns, body) for heading, columns, body in tables)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}
img{{max-width:640px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>{html.escape(score_heading)}</h2>
<table><tr>{head}</tr>{"".join(rows)}</table>
<h2>Ensemble thresholds</h2>
<table><tr>{"".join(f"<th>{c}</th>" for c in CLASSES)}</tr><tr>{th_row}</tr></table>
{extra}
<h2>Figures</h2>
{figs}
{f"<h2>Notes</h2><ul>{note_list}</ul>" if notes else ""}
</body></html>
"""


def _html_table(heading: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """One titled HTML table; floats are written with 4 decimals, everything is escaped."""

    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<h2>{html.escape(heading)}</h2>\n<table><tr>{head}</tr>{body}</table>\n"


def _figure(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """A figure with one axes, outside pyplot (nothing global to close or switch)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
