"""A small HTML report of an ensemble: PNG figures (matplotlib) and one ``index.html``.

Figures: validation micro-F2 of each single model against the ensemble, per-class F2 bars, F2 against the
threshold for every class with the chosen thresholds marked, and, when the search's ``optuna.db`` exists,
the F2 of every Optuna trial and the parameter importances (``optuna.importance.get_param_importances``,
only with at least two completed trials). A figure that cannot be made is left out with a note in the page.

The page's first table lists the model figures, each a :class:`ichmodel.scores.ModelScore` labelled with the
rows it was scored on and where its thresholds came from, the same list the jobs print
(:func:`ichmodel.scores.format_scores`, :func:`ichmodel.scores.result_line`); :func:`report_figures` reads the
keyed figures back from a page.

Figures are plain :class:`matplotlib.figure.Figure` objects saved to PNG (the Agg renderer): no pyplot state
and no backend switch, so importing or calling this module leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

import html
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ichmodel import io
from ichmodel import metrics as M
from ichmodel.constants import CLASSES
from ichmodel.scores import GAIN_ROLE, ModelScore

logger = logging.getLogger(__name__)

REPORT_INDEX = "index.html"


def report_figures(page: str) -> dict[str, float]:
    """``{key: value}`` of the keyed figures of a report page (its ``data-key``/``data-value`` rows)."""
    return {k: float(v) for k, v in re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', page)}


def plot_model_f2(scores: Sequence[ModelScore], path: str | Path) -> Path:
    """Bar chart of micro-F2, one bar per figure, coloured by estimate (legend: which rows / thresholds)."""
    fig, ax = _figure((max(4.0, 1.1 * len(scores) + 2), 3.8))
    estimates = list(dict.fromkeys(s.estimate for s in scores))
    palette = ["#fc8d62", "#8da0cb", "#66c2a5", "#e78ac3"]
    values = [s.micro_f2 for s in scores]
    for i, s in enumerate(scores):
        e = estimates.index(s.estimate)
        bar = ax.bar(
            [i],
            [s.micro_f2],
            color=palette[e % len(palette)],
            label=s.estimate.short if all(scores[j].estimate != s.estimate for j in range(i)) else None,
        )[0]
        ax.annotate(f"{s.micro_f2:.3f}", (bar.get_x() + bar.get_width() / 2, s.micro_f2), ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(scores)), [s.name for s in scores], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, min(1.0, max(values + [0.1]) * 1.2))
    ax.set_ylabel("micro-F2")
    ax.set_title("Single models vs ensemble")
    if len(estimates) > 1:
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_per_class_f2(scores: Sequence[ModelScore], path: str | Path) -> Path:
    """Grouped bars of per-class F2 (classes on the x axis, one bar per figure that has per-class values)."""
    fig, ax = _figure((7.0, 3.6))
    width = 0.8 / max(len(scores), 1)
    x = np.arange(len(CLASSES))
    for i, score in enumerate(scores):
        values = [score.per_class.get(c, 0.0) for c in CLASSES]
        ax.bar(x + (i - (len(scores) - 1) / 2) * width, values, width, label=score.label)
    ax.set_xticks(x, CLASSES)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F2")
    ax.set_title("Per-class F2 at the chosen thresholds")
    ax.legend(fontsize=7, ncols=min(len(scores), 2), loc="upper right")
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


#: Schemes of an Optuna RDB storage URL, used as it is (``sqlite:///x.db``, ``postgresql+psycopg2://...``).
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def plot_optuna_study(optuna_db: str | Path, out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Figures of the Optuna study at ``optuna_db``: F2 by trial and, with ≥ 2 completed trials, parameter
    importances.

    Args:
        optuna_db: where the study is: a local SQLite file (``EXPERIMENT/optuna.db``), a storage URI of one
            (``s3://bucket/exp/optuna.db``, ``file:///...``: copied to a temporary file first), or an Optuna
            RDB URL (``sqlite:///...``, ``postgresql://...``).
        out_dir: where the PNGs go.

    Returns:
        ``(written PNG paths, notes about what was skipped and why, naming the location)``; never raises for a
        study that is absent, empty, has several studies (the first is used) or whose importances cannot
        be computed.
    """
    location = str(optuna_db)
    scheme = location.split("://", 1)[0].split("+", 1)[0].lower() if "://" in location else ""
    if scheme in RDB_SCHEMES:
        return _plot_study(location, location, Path(out_dir))
    try:
        found = io.is_file(location)
    except (OSError, ValueError) as exc:  # an unreachable or unknown storage must not sink the report
        return [], [f"could not look for an Optuna study at {location}: {exc}"]
    if not found:
        return [], [f"no Optuna study at {location}: the search figures are left out"]
    if io.is_local(location):
        return _plot_study(f"sqlite:///{io.local_path(location)}", location, Path(out_dir))
    with tempfile.TemporaryDirectory() as tmp:
        io.download(location, Path(tmp) / "optuna.db")
        return _plot_study(f"sqlite:///{Path(tmp) / 'optuna.db'}", location, Path(out_dir))


def _plot_study(storage: str, location: str, out_dir: Path) -> tuple[list[Path], list[str]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    notes: list[str] = []
    written: list[Path] = []
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # a locked / foreign database must not sink the report
        return [], [f"could not read {location}: {exc}"]
    if not names:
        return [], [f"{location} holds no study"]
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
        scores: the model figures, each naming its estimate (rows and thresholds, :class:`ModelScore`): the
            page's first table lists every one, with ``data-key``/``data-value`` for the keyed ones (the same
            figures :func:`result_line` prints). The ensemble is the first figure with role ``"ensemble"``
            (else the last figure).
        y_true: ``[N, 5]`` 0/1 labels; ``probs``: ``[N, 5]`` ensemble probabilities, of the rows the
            ensemble's estimate names (its threshold curves are drawn from them).
        thresholds: ``[5]`` the ensemble's chosen thresholds.
        optuna_db: where the search's Optuna study is (see :func:`plot_optuna_study`: a local file, a storage
            URI or an RDB URL); the job passes the experiment's study. ``None`` or nothing there: the search
            figures are left out, with a note naming the location.
        score_heading: heading of the scores table (e.g. ``"Out-of-fold F2"`` for a fold ensemble).
        tables: extra ``(heading, column names, rows)`` tables after the thresholds (floats as ``.4f``),
            e.g. log loss before and after calibration.

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
    ensemble = next((s for s in scores if s.role == "ensemble"), scores[-1])
    bars = [s for s in scores if s.role != GAIN_ROLE]
    figures = [
        ("micro-F2 of every figure above", plot_model_f2(bars, out_dir / "model_f2.png")),
        (
            "Per-class F2",
            plot_per_class_f2([s for s in bars if s.per_class], out_dir / "per_class_f2.png"),
        ),
        (
            f"Threshold curves of {ensemble.name} on {ensemble.estimate.rows}",
            plot_threshold_curves(y_true, probs, thresholds, out_dir / "threshold_curves.png"),
        ),
    ]
    notes: list[str] = []
    if optuna_db is None:
        notes.append("no Optuna study location given: the search figures are left out")
    else:
        paths, notes = plot_optuna_study(optuna_db, out_dir)
        figures += [
            ("Optuna study" if p.stem == "optuna_history" else "Parameter importance", p) for p in paths
        ]
    for note in notes:
        logger.info("report: %s", note)
    index = out_dir / REPORT_INDEX
    index.write_text(_html(title, scores, ensemble, thresholds, figures, notes, score_heading, tables))
    logger.info("report: %s (%d figures)", index, len(figures))
    return index


def _html(
    title: str,
    scores: Sequence[ModelScore],
    ensemble: ModelScore,
    thresholds: Sequence[float] | np.ndarray,
    figures: list[tuple[str, Path]],
    notes: list[str],
    score_heading: str = "Validation F2",
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[object]]]] = (),
) -> str:
    columns = ("model", "rows", "thresholds", "micro-F2", "95% interval (series)", *CLASSES)
    head = "".join(f"<th>{c}</th>" for c in columns)
    rows = []
    for s in scores:
        sign = "+" if s.role == GAIN_ROLE else ""
        cells = [
            html.escape(s.name),
            html.escape(s.estimate.rows),
            html.escape(s.estimate.thresholds),
            f"{s.micro_f2:{sign}.4f}",
            f"{s.interval[0]:{sign}.4f} .. {s.interval[1]:{sign}.4f}" if s.interval else "",
            *(f"{s.per_class[c]:.4f}" if c in s.per_class else "" for c in CLASSES),
        ]
        key = f' data-key="{html.escape(s.key)}" data-value="{float(s.micro_f2)!r}"' if s.key else ""
        rows.append(f"<tr{key}>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
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
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:nth-child(-n+3){{text-align:left;
max-width:22em}}figure{{display:inline-block;margin:1em}}img{{max-width:640px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>{html.escape(score_heading)}</h2>
<p>Each figure names the rows it was scored on and where its thresholds came from.</p>
<table><tr>{head}</tr>{"".join(rows)}</table>
<h2>Thresholds of {html.escape(ensemble.name)} (tuned on {html.escape(ensemble.estimate.rows)})</h2>
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
