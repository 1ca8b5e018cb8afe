"""The labelled figures of a model or an ensemble: which rows each was scored on, where its thresholds came from.

**One report, one truth.** Every model figure is a :class:`ModelScore` that names its :class:`Estimate`: which
rows it was scored on (validation rows, held-out rows, OOF rows aligned to the ensemble's scale, raw OOF rows)
and where its thresholds come from (tuned on those same rows, or cross-fitted: each fold's rows at thresholds
tuned on the other folds). The report page's table (:func:`ichmodel.report.make_report`, one
``<tr data-key=... data-value=...>`` per figure), the terminal lines (:func:`format_scores`) and the ``RESULT``
line (:func:`result_line`) are all rendered from the same list, so they cannot disagree. :func:`fold_scores`
builds that list from a fold ensemble's summary; :func:`parse_result_line` reads the figures back from a log
(:func:`ichmodel.report.report_figures` from a page).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: The role of a difference of two figures (ensemble - single best): in the tables, not in the bar charts.
GAIN_ROLE = "ensemble_minus_single"


@dataclass(frozen=True)
class Estimate:
    """Which rows a figure was scored on and where its thresholds came from.

    ``key``: the figure's suffix on the ``RESULT`` line (``<role>_<key>``, e.g. ``ensemble_oof_f2``);
    ``rows`` and ``thresholds``: plain words the page and the terminal print; ``short``: a few words for
    figure legends.
    """

    key: str
    rows: str
    thresholds: str
    short: str

    @property
    def label(self) -> str:
        return f"{self.rows}; thresholds {self.thresholds}"


#: Validation rows of a search, thresholds tuned on them (ray_jobs/ensemble.py without folds).
VALIDATION = Estimate("val_f2", "validation rows", "tuned on these rows", "validation")


def holdout_estimate(fraction: float) -> Estimate:
    """Held-out validation rows (``ray_jobs/ensemble.py --holdout FRACTION``): members and thresholds chosen
    on the other validation series."""
    return Estimate(
        "holdout_f2",
        f"held-out rows ({fraction:g} of the validation series)",
        "tuned on the other validation series",
        "held-out",
    )


OOF_ROWS_ALIGNED = "OOF rows, aligned to the ensemble's scale"  # each fold's, on the reference series
OOF_ROWS_RAW = "raw OOF rows (not aligned)"


def oof_estimates(aligned: bool) -> tuple[Estimate, Estimate]:
    """``(tuned, cross-fitted)`` estimates on out-of-fold rows (aligned or raw) for a fold ensemble's figures:
    thresholds tuned on every OOF row (slightly optimistic), or each fold's rows at thresholds tuned on the
    other folds (what the RESULT key ``*_cross_fitted`` has always meant)."""
    rows = OOF_ROWS_ALIGNED if aligned else OOF_ROWS_RAW
    return (
        Estimate("oof_f2", rows, "tuned on these rows", "OOF, tuned"),
        Estimate(
            "oof_f2_cross_fitted",
            rows,
            "cross-fitted (each fold's rows at thresholds tuned on the other folds)",
            "OOF, cross-fitted",
        ),
    )


@dataclass
class ModelScore:
    """One micro-F2 figure of one model (or of the ensemble) under one :class:`Estimate`, with per-class F2
    ``[5]`` and a 95 % interval where known.

    ``role``: ``"single"``, ``"ensemble"``, … (with the estimate's key it names the figure on the RESULT line:
    ``<role>_<estimate.key>``; empty: the figure is not on that line).
    """

    name: str
    micro_f2: float
    per_class: dict[str, float] = field(default_factory=dict)
    thresholds: list[float] = field(default_factory=list)
    estimate: Estimate = VALIDATION
    interval: tuple[float, float] | None = None
    role: str = ""

    @property
    def key(self) -> str:
        """The figure's name on the RESULT line and in the page (``data-key``); empty without a role."""
        return f"{self.role}_{self.estimate.key}" if self.role else ""

    @property
    def label(self) -> str:
        return f"{self.name} ({self.estimate.short})"


def fold_scores(summary: Mapping, single_per_class: Mapping[str, float] | None = None) -> list[ModelScore]:
    """The labelled figures of a fold ensemble, from its summary (``asdict(ichmodel.ensemble.FoldEnsemble)``,
    as ``fold_ensemble.json`` holds it): single best and ensemble, each tuned on the OOF rows (with its 95 %
    bootstrap interval over series) and cross-fitted, and the ensemble's gain over the single best.

    Every figure is on the rows the member choice used: aligned when ``summary["alignment"]`` is set, raw
    otherwise. ``single_per_class``: the single best's per-class F2 on those same rows at its tuned
    thresholds (default ``summary["single_per_class"]`` where present; else the single best shows no
    per-class figures rather than ones from other rows).

    Raises:
        KeyError: naming a summary field that is missing.
    """
    tuned, cross = oof_estimates(bool(summary.get("alignment")))
    boot = summary["bootstrap"]
    single_name, ensemble_name = f"single best ({summary['single_best']})", f"ensemble ({summary['method']})"
    single_per_class = dict(single_per_class or summary.get("single_per_class") or {})

    def interval(key: str) -> tuple[float, float]:
        return (float(boot[key]["low"]), float(boot[key]["high"]))

    gain = boot["ensemble - single"]
    return [
        ModelScore(
            single_name,
            summary["single_f2"]["tuned"],
            single_per_class,
            [],
            tuned,
            interval("single"),
            "single",
        ),
        ModelScore(
            ensemble_name,
            summary["ensemble_f2"]["tuned"],
            dict(summary["per_class"]),
            list(summary["thresholds"]),
            tuned,
            interval("ensemble"),
            "ensemble",
        ),
        ModelScore(single_name, summary["single_f2"]["cross_fitted"], estimate=cross, role="single"),
        ModelScore(ensemble_name, summary["ensemble_f2"]["cross_fitted"], estimate=cross, role="ensemble"),
        ModelScore(
            "ensemble - single best",
            float(gain["f2"]),
            estimate=tuned,
            interval=interval("ensemble - single"),
            role=GAIN_ROLE,
        ),
    ]


def format_scores(scores: Sequence[ModelScore]) -> list[str]:
    """Terminal lines of ``scores``, grouped by estimate: a heading naming the rows and thresholds, then one
    line per figure (micro-F2 with 4 decimals, as on the page, and its interval where known)."""
    lines: list[str] = []
    for estimate in dict.fromkeys(s.estimate for s in scores):
        lines.append(f"micro-F2 on {estimate.label}:")
        for s in (s for s in scores if s.estimate == estimate):
            span = f"  95% interval (series) {s.interval[0]:.4f} .. {s.interval[1]:.4f}" if s.interval else ""
            sign = "+" if s.role == GAIN_ROLE else ""
            lines.append(f"  {s.name:<32}{s.micro_f2:{sign}.4f}{span}")
    return lines


def result_line(scores: Sequence[ModelScore]) -> str:
    """``RESULT key=value ...`` (6 decimals) of every figure with a role, in ``scores`` order.

    Raises:
        ValueError: when two figures share a key (one of them would hide the other).
    """
    keyed = [s for s in scores if s.key]
    keys = [s.key for s in keyed]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Two figures share a RESULT key: {keys}")
    return "RESULT " + " ".join(f"{s.key}={s.micro_f2:.6f}" for s in keyed)


def parse_result_line(text: str) -> dict[str, float]:
    """The figures of the last ``RESULT key=value ...`` line of ``text`` (a job's printed output).

    Raises:
        ValueError: when ``text`` has no such line.
    """
    lines = [line for line in text.splitlines() if line.startswith("RESULT ") and "=" in line]
    if not lines:
        raise ValueError("No 'RESULT key=value' line in the output")
    return {k: float(v) for k, v in (pair.split("=", 1) for pair in lines[-1].split()[1:])}
