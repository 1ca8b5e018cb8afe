"""Assembly of out-of-fold (OOF) predictions from the K fold models' predictions of their held-out series.

Fold ``i``'s model, trained on every fold but ``i`` (the folds: :func:`ichmodel.splits.make_folds`), predicts
fold ``i``'s series; the K tables together predict every labelled series exactly once, by a model that never
trained on it. Thresholds, member choice and calibration are then fitted on those honest predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ichmodel.splits import check_folds


def assemble_oof(frames: Sequence[pd.DataFrame], folds: Sequence[Sequence[str]]) -> pd.DataFrame:
    """Out-of-fold prediction table: fold ``i``'s model's predictions of fold ``i``'s series, all folds.

    Args:
        frames: one prediction table (:func:`ichmodel.predict.predict_dataset`) per fold, each of exactly the
            series of that fold.
        folds: the folds' held-out series (:func:`ichmodel.splits.make_folds`).

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
