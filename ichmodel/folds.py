"""K-fold cross-validation over series, and assembly of out-of-fold (OOF) predictions.

Folds are split by *series* (the unit the model reads), and by *patient* where the data names one: the
DICOM readers keep each series' ``PatientID`` (RSNA's, a DICOM folder's), preprocessing writes it into the
manifest, and :func:`shard_groups` turns it into the ``groups`` map (series → patient) with which
:func:`make_folds` keeps every series of one patient in the same fold, and :func:`inner_split` on one side
(a DLCV series is one patient's folder already, so those stay split by series). Folds are stratified by whether a series has a positive slice, so
each fold holds about the same number of positive series, and a seed reproduces them.

OOF assembly (:func:`assemble_oof`): fold ``i``'s model, trained on every fold but ``i``, predicts fold
``i``'s series; the K tables together predict every labelled series exactly once, by a model that never
trained on it. Thresholds, member choice and calibration are then fitted on those honest predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ichmodel.dataset import series_positive
from ichmodel.shards import load_manifest, series_index, series_patients

logger = logging.getLogger(__name__)


def make_folds(
    series_ids: Sequence[str],
    k: int,
    seed: int = 0,
    positive: Mapping[str, bool] | None = None,
    groups: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """Split ``series_ids`` into ``k`` disjoint validation parts (each sorted), the same for the same seed.

    Args:
        series_ids: every series to split (unique).
        k: number of folds, at least 2 and at most the number of groups.
        seed: shuffles the groups before they are dealt out.
        positive: ``{series_id: has a positive slice}``; positive groups are dealt out first, each to the fold
            with the fewest positive groups so far, then negative ones the same way (ties: fewest series,
            then lowest fold index). Default: no stratification.
        groups: ``{series_id: group}`` (e.g. patient id); a group's series share a fold. Default: each
            series is its own group.

    Returns:
        ``k`` lists of series ids; every series is in exactly one.

    Raises:
        ValueError: for ``k < 2``, duplicate series ids, fewer groups than folds, or a series missing from
            ``groups``.
    """
    ids = list(series_ids)
    if k < 2:
        raise ValueError(f"k (number of folds) must be >= 2. Got {k}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"series_ids holds duplicates: {sorted({s for s in ids if ids.count(s) > 1})[:5]}")
    if groups is not None:
        missing = [s for s in ids if s not in groups]
        if missing:
            raise ValueError(f"groups has no entry for {len(missing)} series (e.g. {missing[:3]})")
    group_of = {s: str(groups[s]) if groups is not None else s for s in ids}
    members: dict[str, list[str]] = {}
    for s in ids:
        members.setdefault(group_of[s], []).append(s)
    if len(members) < k:
        raise ValueError(f"Cannot make {k} folds from {len(members)} groups (series or patients)")
    is_pos = {
        g: any(bool(positive.get(s, False)) for s in m) if positive else False for g, m in members.items()
    }
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    pos_count = [0] * k
    for stratum in (True, False):
        names = sorted(g for g in members if is_pos[g] == stratum)
        for j in rng.permutation(len(names)):
            group = names[j]
            target = min(range(k), key=lambda f: (pos_count[f], len(folds[f]), f))
            folds[target].extend(members[group])
            pos_count[target] += 1
        pos_count = [0] * k  # the negative stratum is balanced on its own count
    return [sorted(f) for f in folds]


def shard_folds(
    shard_dir: str | Path, k: int, seed: int = 0, groups: Mapping[str, str] | None = None
) -> list[list[str]]:
    """:func:`make_folds` over every series of a shard folder, stratified by positive series when labelled,
    a patient's series in one fold (``groups``, default :func:`shard_groups`)."""
    return _shard_folds(shard_dir, k, seed, groups)[0]


def shard_groups(manifest: dict) -> dict[str, str] | None:
    """``{series_id: group}`` from the patient ids the manifest holds (``patient:<id>``; a series without
    one is its own group, ``series:<id>``), or ``None`` when no series names a patient."""
    patients = series_patients(manifest)
    if not patients:
        return None
    return {s: f"patient:{patients[s]}" if s in patients else f"series:{s}" for s in series_index(manifest)}


def shard_fold_runs(
    shard_dir: str | Path, k: int, seed: int, val_fraction: float
) -> tuple[list[list[str]], list[tuple[list[str], list[str]]], int | None]:
    """``(folds, inner, patients)``: :func:`shard_folds`; for fold ``i`` the :func:`inner_split` ``(fit_ids,
    select_ids)`` of its training series (seed ``seed + i``), a patient's series on one side; and how many
    patients the series belong to (``None`` when the shards name none). Labels are read once for both."""
    folds, positive, groups = _shard_folds(shard_dir, k, seed)
    inner = [inner_split(fold_split(folds, i)[0], val_fraction, seed + i, positive, groups) for i in range(k)]
    return folds, inner, None if groups is None else len(set(groups.values()))


def _shard_folds(
    shard_dir: str | Path, k: int, seed: int, groups: Mapping[str, str] | None = None
) -> tuple[list[list[str]], dict[str, bool] | None, Mapping[str, str] | None]:
    """The folds of a shard folder, the positive map they were stratified by (None when unlabelled) and the
    groups that kept series together (None: each series alone)."""
    manifest = load_manifest(shard_dir)
    ids = list(series_index(manifest))
    positive = series_positive(shard_dir) if manifest.get("has_labels") else None
    groups = shard_groups(manifest) if groups is None else groups
    folds = make_folds(ids, k, seed, positive, groups)
    by = "series" if groups is None else f"{len(set(groups.values()))} patients' series"
    logger.info("%d folds of %s (by %s): %s series", k, shard_dir, by, [len(f) for f in folds])
    return folds, positive, groups


def fold_split(folds: Sequence[Sequence[str]], i: int) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)`` of fold ``i``: its own series are held out, the other folds train.

    Raises:
        IndexError: when ``i`` is not a fold index.
    """
    if not 0 <= i < len(folds):
        raise IndexError(f"fold index {i} outside 0..{len(folds) - 1}")
    train = sorted(s for j, f in enumerate(folds) if j != i for s in f)
    return train, sorted(folds[i])


def inner_split(
    train_ids: Sequence[str],
    val_fraction: float,
    seed: int,
    positive: Mapping[str, bool] | None = None,
    groups: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """``(fit_ids, select_ids)``: a validation part of a fold's training series, stratified like the folds,
    a group's (patient's) series on one side.

    A fold's Train run picks its epoch and drives its learning-rate plateau on ``select_ids``, so its
    held-out fold is used for nothing but the out-of-fold prediction. About ``val_fraction`` of the series
    (at least one; :func:`make_folds` with ``round(1 / val_fraction)`` parts, the first one).

    Raises:
        ValueError: when ``val_fraction`` is not in (0, 1) or there are fewer than 2 series.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1). Got {val_fraction}")
    units = len(train_ids) if groups is None else len({groups[s] for s in train_ids})
    parts = min(units, max(2, round(1.0 / val_fraction)))
    if parts < 2:
        raise ValueError(f"An inner validation split needs at least 2 series (or patients). Got {units}")
    select = make_folds(train_ids, parts, seed, positive, groups)[0]
    return sorted(set(train_ids) - set(select)), select


def check_folds(folds: Sequence[Sequence[str]]) -> None:
    """Raise ``ValueError`` naming a series that is in two folds (or twice in one)."""
    seen: dict[str, int] = {}
    for i, fold in enumerate(folds):
        for s in fold:
            if s in seen:
                raise ValueError(f"Series {s!r} is held out by folds {seen[s]} and {i}")
            seen[s] = i


def assemble_oof(frames: Sequence[pd.DataFrame], folds: Sequence[Sequence[str]]) -> pd.DataFrame:
    """Out-of-fold prediction table: fold ``i``'s model's predictions of fold ``i``'s series, all folds.

    Args:
        frames: one prediction table (:func:`ichmodel.predict.predict_dataset`) per fold, each of exactly the
            series of that fold.
        folds: the folds' held-out series (:func:`make_folds`).

    Returns:
        One table over every series of every fold, sorted by ``series_id, position``, with a ``fold`` column.

    Raises:
        ValueError: when the counts differ, folds overlap, or a table covers other series than its fold.
    """
    if len(frames) != len(folds):
        raise ValueError(f"Need one prediction table per fold: {len(frames)} tables for {len(folds)} folds")
    check_folds(folds)
    parts = []
    for i, (frame, fold) in enumerate(zip(frames, folds, strict=True)):
        got, want = set(frame["series_id"].astype(str)), set(fold)
        if got != want:
            raise ValueError(
                f"Prediction table of fold {i} covers other series than the fold: {len(got - want)} extra "
                f"(e.g. {sorted(got - want)[:3]}), {len(want - got)} missing (e.g. {sorted(want - got)[:3]})"
            )
        parts.append(frame.assign(fold=np.int64(i)))
    oof = pd.concat(parts, ignore_index=True)
    return oof.sort_values(["series_id", "position"], kind="stable").reset_index(drop=True)
