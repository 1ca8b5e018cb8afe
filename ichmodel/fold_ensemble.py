"""The cross-validated (fold) ensemble: member choice, thresholds and calibration from out-of-fold rows.

``ray_jobs/folds.py`` trains each chosen configuration on K folds (Ray) and collects :class:`FoldRuns`: per
configuration its out-of-fold (OOF) table and mean test table, and each fold model's predictions on the
reference series. From there everything is here: :func:`choose_fold_ensemble` picks members (top-k or greedy)
and thresholds on OOF micro-F2, with each fold's rows aligned to the ensemble's scale
(:class:`ichmodel.calibration.FoldAlignment`) and :func:`bootstrap_f2` intervals over series;
:func:`calibrate_oof` fits the RSNA probability calibration; :func:`summarize` writes the ensemble's tables
and ``fold_ensemble.json``; :func:`write_fold_outputs` the submission files, ``ensemble.json``, the report and the viewer;
:func:`summary_lines` the figures a user reads first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ichmodel import calibration as C
from ichmodel import metrics as M
from ichmodel import submission as S
from ichmodel.calibration import FoldAlignment
from ichmodel.constants import CLASSES
from ichmodel.ensemble import (
    EnsembleSpec,
    average_predictions,
    bag_probs,
    cross_fitted_f2,
    greedy_members,
    labelled_arrays,
    top_k_members,
    tuned_f2,
    write_outputs,
)
from ichmodel.io import atomic_write_text
from ichmodel.prediction_table import PROB_COLUMNS, prediction_arrays
from ichmodel.report import make_report
from ichmodel.scores import fold_scores, format_scores, result_line
from ichmodel.shards import load_manifest
from ichmodel.viewer import write_viewer


def _series_counts(labels: np.ndarray, pred: np.ndarray, series: np.ndarray) -> np.ndarray:
    """``[S, 3]`` pooled tp, fp, fn of each series (rows of ``np.unique(series)``)."""
    _, inverse = np.unique(series, return_inverse=True)
    t, p = labels.astype(bool), pred.astype(bool)
    per_row = np.stack([(t & p).sum(1), (~t & p).sum(1), (t & ~p).sum(1)], axis=1).astype(np.float64)
    out = np.zeros((inverse.max() + 1, 3))
    np.add.at(out, inverse, per_row)
    return out


def _f2_of_counts(counts: np.ndarray) -> np.ndarray:
    """F2 from pooled ``[..., 3]`` tp, fp, fn; 0 where there is no true and no predicted positive."""
    tp, fp, fn = np.moveaxis(np.asarray(counts, dtype=np.float64), -1, 0)
    denom = 5.0 * tp + 4.0 * fn + fp
    return np.divide(5.0 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def bootstrap_f2(
    labels: np.ndarray,
    preds: dict[str, np.ndarray],
    series: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Bootstrap intervals over *series* of the micro-F2 of fixed 0/1 decisions, and of their differences.

    Args:
        labels: ``[N, 5]``; preds: ``{name: [N, 5] 0/1}`` (e.g. single best and ensemble at their thresholds);
        series: ``[N]`` series id of each row (series are resampled with replacement, all their slices kept).

    Returns:
        ``{name: {"f2", "low", "high"}}`` and ``{"<b> - <a>": {...}}`` for the first name ``a`` against each
        other ``b``; ``low``/``high`` are the ``level`` percentile interval.
    """
    series = np.asarray(series)
    counts = {k: _series_counts(labels, v, series) for k, v in preds.items()}  # [S, 3] each
    n_series = len(next(iter(counts.values())))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_series, np.full(n_series, 1.0 / n_series), size=n_boot)  # [n_boot, S]
    boot = {k: _f2_of_counts(weights @ c) for k, c in counts.items()}  # [n_boot] each
    full = {k: float(_f2_of_counts(c.sum(0))) for k, c in counts.items()}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for name, values in boot.items():
        low, high = np.percentile(values, q).tolist()
        out[name] = {"f2": full[name], "low": low, "high": high}
    first, *others = list(preds)
    for name in others:
        diff = boot[name] - boot[first]
        low, high = np.percentile(diff, q).tolist()
        out[f"{name} - {first}"] = {"f2": full[name] - full[first], "low": low, "high": high}
    return out


@dataclass
class FoldEnsemble:
    """The member choice of a cross-validated ensemble, from out-of-fold (OOF) predictions only.

    ``members``: trial ids; ``bag``: the chosen members with repeats (weight = count / length); ``method``:
    ``"top_k"`` (every member once) or ``"greedy"`` (:func:`greedy_members`), whichever has the higher
    cross-fitted OOF micro-F2. F2 figures are ``{"tuned": at thresholds tuned on all OOF rows,
    "cross_fitted": thresholds tuned on the other folds}``. ``bootstrap``: :func:`bootstrap_f2` of the single
    best member against the ensemble, each at its tuned thresholds; ``per_class`` / ``single_per_class``: the
    ensemble's / single best's per-class F2 on the same rows at those thresholds. ``alignment``: the bag's
    :class:`FoldAlignment` as a dict when the OOF rows were aligned (the thresholds then hold for the mean of
    the fold models; the single best's figures are then those of its rows aligned to its own fold models'
    mean), else ``None``.
    """

    members: list[str]
    single_best: str
    bag: list[str]
    method: str
    thresholds: list[float]
    single_f2: dict[str, float]
    ensemble_f2: dict[str, float]
    top_k_f2: dict[str, float]
    greedy_f2: dict[str, float]
    per_class: dict[str, float]
    bootstrap: dict[str, dict[str, float]]
    alignment: dict | None = None
    single_per_class: dict[str, float] = field(default_factory=dict)


def choose_fold_ensemble(
    oof: dict[str, pd.DataFrame],
    n_boot: int = 1000,
    seed: int = 0,
    reference: dict[str, dict[int, np.ndarray]] | None = None,
) -> tuple[FoldEnsemble, np.ndarray]:
    """Choose members and thresholds of an ensemble from each member's OOF table (same rows, ``fold`` column).

    With ``reference`` (``{member: {fold: [R, 5] probabilities of that fold's model on the same reference
    slices}}``) every bag's OOF rows are aligned to the scale of its fold models' mean (:class:`FoldAlignment`)
    before members, thresholds and scores are taken from them; without it the raw OOF rows are used.

    Returns:
        ``(choice, the chosen bag's OOF probabilities [N, 5])``, rows sorted by ``series_id, position``.

    Raises:
        ValueError: for no members, unlabelled tables, tables over other rows than the first, or a
            ``reference`` that lacks a member or a fold.
    """
    if not oof:
        raise ValueError("choose_fold_ensemble needs at least one member. Got 0")
    names = list(oof)
    frames = [
        oof[n].sort_values(["series_id", "position"], kind="stable").reset_index(drop=True) for n in names
    ]
    average_predictions(frames)  # checks that every table covers the same slices with the same labels
    probs = [labelled_arrays(f)[0] for f in frames]
    labels = labelled_arrays(frames[0])[1]
    fold, series = frames[0]["fold"].to_numpy(), frames[0]["series_id"].to_numpy()
    if reference is not None:
        missing = [n for n in names if set(reference.get(n, {})) != set(np.unique(fold).tolist())]
        if missing:
            raise ValueError(f"reference predictions lack members or folds: {missing}")

    def alignment_of(bag: Sequence[int]) -> FoldAlignment | None:
        if reference is None:
            return None
        folds = reference[names[0]]
        return FoldAlignment.fit({k: np.mean([reference[names[i]][k] for i in bag], axis=0) for k in folds})

    def combine(bag: Sequence[int]) -> np.ndarray:
        alignment = alignment_of(bag)
        raw = bag_probs(probs, bag)
        return raw if alignment is None else alignment.apply(raw, fold)

    def figures(p: np.ndarray) -> dict[str, float]:
        return {"tuned": tuned_f2(labels, p)[0], "cross_fitted": cross_fitted_f2(labels, p, fold)}

    best = top_k_members(labels, probs, 1, combine)[0]
    greedy = greedy_members(labels, probs, combine=combine)
    every = list(range(len(probs)))
    top_k_f2, greedy_f2 = figures(combine(every)), figures(combine(greedy))
    use_greedy = greedy_f2["cross_fitted"] > top_k_f2["cross_fitted"]
    bag = greedy if use_greedy else every
    ensemble, single = combine(bag), combine([best])
    thresholds = tuned_f2(labels, ensemble)[1]
    decisions = {
        "single": M.binarize(single, tuned_f2(labels, single)[1]),
        "ensemble": M.binarize(ensemble, thresholds),
    }
    alignment = alignment_of(bag)
    choice = FoldEnsemble(
        members=names,
        single_best=names[best],
        bag=[names[i] for i in bag],
        method="greedy" if use_greedy else "top_k",
        thresholds=thresholds.tolist(),
        single_f2=figures(single),
        ensemble_f2=greedy_f2 if use_greedy else top_k_f2,
        top_k_f2=top_k_f2,
        greedy_f2=greedy_f2,
        per_class=dict(zip(CLASSES, map(float, M.per_class_f2(labels, decisions["ensemble"])), strict=True)),
        bootstrap=bootstrap_f2(labels, decisions, series, n_boot=n_boot, seed=seed),
        alignment=None if alignment is None else asdict(alignment),
        single_per_class=dict(
            zip(CLASSES, map(float, M.per_class_f2(labels, decisions["single"])), strict=True)
        ),
    )
    return choice, ensemble


# ------------------------------------------------------------------------------------ the fold job's results


@dataclass
class FoldRuns:
    """What :func:`run_folds` returns: per trial its OOF table and mean test table; one record per run;
    per trial and fold the fold model's probabilities ``[R, 5]`` on the reference series (empty: none)."""

    oof: dict[str, pd.DataFrame] = field(default_factory=dict)
    test: dict[str, pd.DataFrame] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    reference: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    reference_name: str | None = None


def write_results(result: FoldRuns, out: Path) -> None:
    """``runs.csv``, ``oof_<trial>.parquet`` and ``test_<trial>.parquet`` into ``out``."""
    table = pd.DataFrame(
        [{k: r[k] for k in ("name", "trial_id", "fold", "retrained", "checkpoint")} for r in result.runs]
    )
    table.to_csv(out / "runs.csv", index=False)
    for trial_id in result.oof:
        result.oof[trial_id].to_parquet(out / f"oof_{trial_id}.parquet", index=False)
        result.test[trial_id].to_parquet(out / f"test_{trial_id}.parquet", index=False)


def calibrate_oof(oof: pd.DataFrame, test: pd.DataFrame, out: Path) -> tuple[dict, pd.DataFrame | None]:
    """Fit per-class calibration on the ensemble's OOF probabilities; ``(summary, calibrated test or None)``.

    The method (platt or isotonic) with the lower *cross-fitted* OOF weighted log loss is fitted on every OOF
    row and applied to the test probabilities; none when neither lowers the loss.
    """
    probs, labels = prediction_arrays(oof)
    losses = C.calibration_summary(labels, probs, oof["fold"].to_numpy(), ("platt", "isotonic"))
    method = min(("platt", "isotonic"), key=losses.__getitem__)
    summary = {"oof_log_loss": losses, "method": None, "after": "cross-fitted over the folds"}
    if losses[method] >= losses["before"]:
        return summary, None
    calibrator = C.fit_calibrator(labels, probs, method)
    summary.update(method=method, calibrator=calibrator.to_dict())
    calibrated = test.copy()
    calibrated[list(PROB_COLUMNS)] = calibrator.apply(prediction_arrays(test)[0]).astype("float32")
    calibrated.to_parquet(out / "test_calibrated.parquet", index=False)
    return summary, calibrated


def summarize(result: FoldRuns, out: Path, n_boot: int = 1000) -> dict:
    """Member choice, OOF thresholds, bootstrap and calibration of the fold ensemble; writes
    ``oof_ensemble.parquet`` (the bag's OOF probabilities, aligned to the ensemble's scale when there is a
    reference), ``test_ensemble.parquet`` and ``fold_ensemble.json``; returns the summary."""
    choice, probs = choose_fold_ensemble(result.oof, n_boot=n_boot, reference=result.reference or None)
    oof = average_predictions([result.oof[t] for t in choice.bag])
    oof[list(PROB_COLUMNS)] = probs.astype(np.float32)  # same row order: both sorted by series, position
    oof["fold"] = (
        result.oof[choice.bag[0]].sort_values(["series_id", "position"], kind="stable")["fold"].to_numpy()
    )
    if choice.alignment is not None:
        choice.alignment["reference"] = result.reference_name
    test = average_predictions([result.test[t] for t in choice.bag])
    oof.to_parquet(out / "oof_ensemble.parquet", index=False)
    test.to_parquet(out / "test_ensemble.parquet", index=False)
    calibration, _ = calibrate_oof(oof, test, out)
    summary = {**asdict(choice), "calibration": calibration}
    atomic_write_text(out / "fold_ensemble.json", json.dumps(summary, indent=1))
    return summary


def summary_lines(summary: dict) -> list[str]:
    """The figures a user reads first (the fold job prints them): single best vs ensemble OOF micro-F2, each
    labelled with its rows and thresholds (:func:`ichmodel.scores.fold_scores`, the list the report's table is
    rendered from), members, alignment, calibration, and the ``RESULT`` line for scripts (same list)."""
    scores = fold_scores(summary)
    lines = format_scores(scores)
    lines.append(
        f"members: {summary['method']} bag {summary['bag']} (top-k {summary['top_k_f2']['cross_fitted']:.4f}, "
        f"greedy {summary['greedy_f2']['cross_fitted']:.4f} cross-fitted)"
    )
    alignment = summary.get("alignment")
    if alignment:
        lines.append(
            f"OOF rows aligned to the ensemble's scale on {alignment['reference_slices']} reference slices "
            f"({alignment['reference']}; unlabelled use) before thresholds were tuned"
        )
    else:
        lines.append("OOF rows not aligned (--reference none): thresholds tuned on the raw OOF probabilities")
    losses = summary["calibration"]["oof_log_loss"]
    lines.append(
        "OOF RSNA weighted log loss: "
        + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
        + f" (after: cross-fitted; applied: {summary['calibration']['method']})"
    )
    lines.append(result_line(scores))
    return lines


def write_fold_outputs(
    result: FoldRuns,
    summary: dict,
    out: Path,
    tta: Sequence[str],
    folds: int,
    optuna_db: str | Path | None = None,
) -> list[Path]:
    """Submission files (:func:`ichmodel.ensemble.write_outputs`' files, with ``val_*`` = the OOF predictions of every
    labelled series), the RSNA file from calibrated probabilities when a calibration was kept,
    ``ensemble.json`` (every fold model of the bag), ``report/`` (the figures of :func:`fold_scores`, the same
    list :func:`summary_lines` prints; the search's figures from ``optuna_db``, a local file or storage URI)
    and ``viewer/`` (the ensemble's OOF rows at its thresholds, thumbnails from the training shards)."""
    oof, test = pd.read_parquet(out / "oof_ensemble.parquet"), pd.read_parquet(out / "test_ensemble.parquet")
    thresholds = np.asarray(summary["thresholds"])
    shards, test_shards = result.runs[0]["shards"], result.runs[0]["test_shards"]
    series = sorted(oof["series_id"].unique())
    written = write_outputs(out, oof.drop(columns=["fold"]), test, thresholds, shards, series, test_shards)
    manifest = load_manifest(shards)
    if summary["calibration"]["method"] and manifest["format"] == "rsna":
        calibrated = pd.read_parquet(out / "test_calibrated.parquet")
        expected = S.expected_slices(test_shards)
        written.append(
            S.write_submission(calibrated, "rsna", out / "submission_rsna.csv", expected, thresholds)
        )
    checkpoints = [r["checkpoint"] for t in summary["bag"] for r in result.runs if r["trial_id"] == t]
    spec = EnsembleSpec(
        models=checkpoints,
        thresholds=thresholds.tolist(),
        size=int(manifest["size"]),
        windows=manifest["windows"],
        format=manifest["format"],
        tta=list(tta) or False,
        val_f2=summary["ensemble_f2"]["cross_fitted"],
        single_f2=[summary["single_f2"]["cross_fitted"]],
        trial_ids=summary["bag"],
    )
    written.append(spec.save(out))
    probs, labels = prediction_arrays(oof)
    losses = [[k, v] for k, v in summary["calibration"]["oof_log_loss"].items()]
    tables = [
        ("OOF RSNA weighted log loss (after: cross-fitted calibration)", ["calibration", "loss"], losses)
    ]
    report = make_report(
        out / "report",
        fold_scores(summary),
        labels,
        probs,
        thresholds,
        optuna_db=optuna_db,
        score_heading="Out-of-fold F2",
        tables=tables,
        title=f"Fold ensemble ({folds} folds)",
    )
    rows = "aligned OOF rows" if summary.get("alignment") else "raw OOF rows"
    viewer = write_viewer(out, oof, thresholds, shards,
                          title=f"Fold ensemble ({folds} folds): {rows} at the ensemble's thresholds")  # fmt: skip
    return [*written, report, viewer]
