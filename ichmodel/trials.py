"""``trials.csv``: the table a search writes (one row per trial, best first) and the ensemble jobs read.

Written in one place (:func:`trials_table`, from Tune's results, by ``ray_jobs/tune.py`` and its trials-table
callback) and read in one place (:func:`read_trials`; :func:`select_trials` keeps the K best usable rows).
Trial ids and checkpoint file names from a table name local files (the ensemble's download cache), so they
are checked by :func:`check_file_name`: the table may come from storage that is not trusted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ichmodel.io import is_uri, join

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

TRIALS_FILE = "trials.csv"
#: The file in each checkpoint folder a Train run reports (beside its config.json).
CHECKPOINT_FILE = "checkpoint.pt"
#: The ``trials.csv`` column trials are ranked by: validation micro-F2 of the exported checkpoint.
F2_COLUMN = "model_f2"
#: Its name in tables written before it was renamed.
LEGACY_F2_COLUMN = "best_f2"
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_file_name(name: object, what: str) -> str:
    """``name`` if it can name one file inside a folder: letters, digits, ``_ . -``, not ``.`` or ``..``.

    Raises:
        ValueError: naming ``what`` (e.g. ``"trial_id in runs/x/trials.csv"``) and the bad name.
    """
    import pandas as pd

    text = "" if pd.isna(name) else str(name)
    if not _FILE_NAME.fullmatch(text) or text in (".", ".."):
        raise ValueError(
            f"Invalid {what}: {text!r} cannot name a file (allowed: letters, digits, '_', '.', '-'; "
            "not '.' or '..')"
        )
    return text


def read_trials(trials_csv: str | Path) -> pd.DataFrame:
    """A tune job's ``trials.csv``, best first by :data:`F2_COLUMN` (missing values last).

    A table with the older :data:`LEGACY_F2_COLUMN` instead is read as if it had the new name (logged).
    Trial ids name files (the ensemble's download cache), so each is checked by :func:`check_file_name`.

    Raises:
        FileNotFoundError: when ``trials_csv`` does not exist.
        ValueError: when the table lacks ``trial_id``/``model_f2``/``checkpoint`` or holds a bad trial id.
    """
    import pandas as pd

    trials_csv = Path(trials_csv)
    if not trials_csv.is_file():
        raise FileNotFoundError(f"No trials table at {trials_csv}; run ray_jobs/tune.py first")
    table = pd.read_csv(trials_csv, dtype={"trial_id": str, "checkpoint": str, "status": str})
    if F2_COLUMN not in table.columns and LEGACY_F2_COLUMN in table.columns:
        logger.info(
            "%s names its F2 column %r (older tune job); reading it as %r",
            trials_csv,
            LEGACY_F2_COLUMN,
            F2_COLUMN,
        )
        table = table.rename(columns={LEGACY_F2_COLUMN: F2_COLUMN})
    missing = [c for c in ("trial_id", F2_COLUMN, "checkpoint") if c not in table.columns]
    if missing:
        raise ValueError(f"{trials_csv} lacks columns {missing}; has {list(table.columns)}")
    for trial_id in table["trial_id"]:
        check_file_name(trial_id, f"trial_id in {trials_csv}")
    table = table.sort_values(F2_COLUMN, ascending=False, na_position="last", kind="stable")
    return table.reset_index(drop=True)


def is_failed(row: pd.Series) -> bool:
    """Whether a ``trials.csv`` row's ``status`` is ``ERROR`` (a table without ``status``: never)."""
    return str(row.get("status", "OK")).strip().upper() == "ERROR"


def select_trials(trials_csv: str | Path, top_k: int) -> pd.DataFrame:
    """The ``top_k`` best usable trials of a tune job's ``trials.csv`` (:func:`read_trials`), best first.

    Rows whose ``status`` is ``ERROR`` or whose ``checkpoint`` file does not exist are skipped (and logged).
    A relative checkpoint path is taken relative to the folder of ``trials_csv``; the returned
    ``checkpoint`` column holds absolute paths.

    Returns:
        The chosen rows (all columns of the table), at most ``top_k``, index reset.

    Raises:
        ValueError: when ``top_k < 1``, the table is not a valid trials table, or no usable trial is left
            (the message says why each was skipped).
        FileNotFoundError: when ``trials_csv`` does not exist.
    """
    import pandas as pd

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1. Got {top_k}")
    trials_csv = Path(trials_csv)
    table = read_trials(trials_csv)
    reasons: list[str] = []
    keep: list[int] = []
    for i, row in table.iterrows():
        checkpoint = "" if pd.isna(row["checkpoint"]) else str(row["checkpoint"]).strip()
        path = Path(checkpoint) if checkpoint else None
        if path is not None and not path.is_absolute():
            path = (trials_csv.parent / path).resolve()
        if is_failed(row):
            reasons.append(f"{row['trial_id']}: status ERROR")
        elif path is None:
            reasons.append(f"{row['trial_id']}: no checkpoint")
        elif not path.is_file():
            reasons.append(f"{row['trial_id']}: checkpoint {path} does not exist")
        else:
            table.at[i, "checkpoint"] = str(path)
            keep.append(i)
    for reason in reasons:
        logger.warning("skipping trial %s", reason)
    if not keep:
        raise ValueError(
            f"No usable trial in {trials_csv} ({len(table)} rows): " + "; ".join(reasons or ["empty"])
        )
    chosen = table.loc[keep].head(top_k).reset_index(drop=True)
    if len(chosen) < top_k:
        logger.warning("asked for %d trials, only %d usable in %s", top_k, len(chosen), trials_csv)
    return chosen


def trials_table(results: Iterable, storage: str = "") -> pd.DataFrame:
    """One row per trial, best ``model_f2`` first: id, F2s, epochs, checkpoint, status and its parameters.

    ``results``: Tune's results (or anything with ``metrics``, ``config``, ``path`` and ``error``).

    ``model_f2`` is the validation F2 of the weights the trial's checkpoint exports (its stage's best epoch);
    ``last_val_f2`` and ``last_val_loss`` are those of the last epoch it ran. ``shared_from`` names the shared
    stages' checkpoint the trial started from ("" for none) and ``shared_epochs`` how many of its ``epochs``
    were trained there, once for the whole search.

    With a URI ``storage`` (``s3://...``) the checkpoint column holds full URIs (Ray reports them without
    the scheme), which ray_jobs/ensemble.py downloads.
    """
    import pandas as pd

    scheme = storage.split("://", 1)[0] + "://" if is_uri(storage) else ""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        checkpoint = metrics.get("checkpoint_path")
        if checkpoint and scheme and not is_uri(checkpoint):
            checkpoint = scheme + checkpoint + ("?" + storage.split("?", 1)[1] if "?" in storage else "")
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(result.path).name,
                "model_f2": metrics.get("model_f2", float("nan")),  # of the weights the checkpoint exports
                "last_val_f2": metrics.get("val_f2", float("nan")),
                "last_val_loss": metrics.get("val_loss", float("nan")),
                "epochs": metrics.get("global_epoch", 0),
                "finished": bool(metrics.get("finished", False)),
                "checkpoint": join(str(checkpoint), CHECKPOINT_FILE) if checkpoint else "",
                "status": "ERROR" if result.error else "OK",
                "node_id": metrics.get("node_id", ""),
                "shared_from": metrics.get("shared_from", ""),  # the shared stages' checkpoint it continued
                "shared_epochs": metrics.get("shared_epochs", 0),  # of ``epochs``, those trained there once
                **{k: v for k, v in config.items() if "." in k},
            }
        )
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("model_f2", ascending=False, na_position="last").reset_index(drop=True)
    return table
