"""Which series train and which validate: the split by series, K folds, a fold's inner split, the holdout.

Every split here is by *series* (the unit the model reads), stratified by whether a series has a positive
slice (:func:`series_positive`), so each part holds about the same share of positive series, and a seed
reproduces it:

- :func:`split_series`: one run's ``(train_ids, val_ids)`` of a shard folder (``data.val_fraction``);
- :func:`make_folds` / :func:`shard_folds`: K disjoint validation folds, by *patient* where the data names
  one: the DICOM readers keep each series' ``PatientID`` (RSNA's, a DICOM folder's), preprocessing writes it
  into the manifest, and :func:`shard_groups` turns it into the ``groups`` map (series → patient) with which
  :func:`make_folds` keeps every series of one patient in the same fold, and :func:`inner_split` on one side
  (a DLCV series is one patient's folder already, so those stay split by series);
- :func:`fold_split` / :func:`inner_split`: fold ``i``'s training and held-out series, and the part of its
  training series that picks its epoch (:func:`shard_fold_runs` gives all of them for a shard folder);
- :func:`split_holdout`: the ensemble's selection and held-out series of a labelled prediction table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ichmodel.constants import CLASSES, NUM_CLASSES
from ichmodel.shards import load_manifest, read_shard_table, series_index, series_patients

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


def series_positive(shard_dir: str | Path) -> dict[str, bool]:
    """``{series_id: True if any slice of it has any label}`` (False for unlabelled data)."""
    manifest = load_manifest(shard_dir)
    positive: dict[str, bool] = {}
    for shard in manifest["shards"]:
        table = read_shard_table(shard_dir, shard["file"], ["series_id", "labels"])
        ids = table.column("series_id").to_numpy(zero_copy_only=False)
        labels = table.column("labels").combine_chunks().flatten().to_numpy().reshape(-1, NUM_CLASSES)
        any_label = labels.max(axis=1) > 0
        for sid in np.unique(ids):
            positive[str(sid)] = bool(any_label[ids == sid].any())
    return positive


def split_series(shard_dir: str | Path, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split the series of a shard folder into ``(train_ids, val_ids)``; no series is on both sides.

    Stratified by whether a series has any positive slice, so both sides see positives; the same seed
    gives the same split. Each side gets at least one series.

    Raises:
        ValueError: when ``val_fraction`` is not in (0, 1) or there are fewer than 2 series.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1). Got {val_fraction}")
    manifest = load_manifest(shard_dir)
    ids = list(series_index(manifest))
    if len(ids) < 2:
        raise ValueError(f"Need at least 2 series to split. Got {len(ids)} in {shard_dir}")
    positive = series_positive(shard_dir) if manifest.get("has_labels") else dict.fromkeys(ids, False)
    rng = np.random.default_rng(seed)
    val: list[str] = []
    groups = [sorted(s for s in ids if positive[s]), sorted(s for s in ids if not positive[s])]
    for group in groups:
        shuffled = [group[i] for i in rng.permutation(len(group))]
        val.extend(shuffled[: int(round(val_fraction * len(group)))])
    if not val:
        val = [ids[int(rng.integers(len(ids)))]]
    if len(val) == len(ids):
        val = val[:-1]
    val_set = set(val)
    train = [s for s in ids if s not in val_set]
    logger.info("Split %s: %d train / %d val series", shard_dir, len(train), len(val))
    return train, sorted(val)


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


def split_holdout(val: pd.DataFrame, fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(selection series, held-out series)`` of a labelled validation table, split by series: about
    ``fraction`` of them held out (at least one, never all), stratified by positive series (any label) so that
    both parts keep one where there are two, drawn with ``seed``.

    Raises:
        ValueError: for fewer than 2 series.
    """
    labels = [f"label_{c}" for c in CLASSES]
    positive = val.groupby("series_id")[labels].max().to_numpy().any(axis=1)
    ids = np.asarray(sorted(val["series_id"].unique()))
    if len(ids) < 2:
        raise ValueError(f"--holdout needs at least 2 validation series to split. Got {len(ids)}")
    n_hold = min(len(ids) - 1, max(1, int(fraction * len(ids) + 0.5)))
    pos, neg = ids[positive], ids[~positive]
    n_pos = int(n_hold * len(pos) / len(ids) + 0.5)
    if len(pos) >= 2:
        n_pos = min(max(n_pos, 1), len(pos) - 1)
    n_pos = max(n_pos, n_hold - len(neg))  # enough negatives left to fill the rest
    rng = np.random.default_rng(seed)
    held = rng.permutation(pos)[:n_pos].tolist() + rng.permutation(neg)[: n_hold - n_pos].tolist()
    return sorted(set(ids) - set(held)), sorted(held)
