"""``ray_jobs/ensemble.py`` as a subprocess on the session's Ray head: files, report, and a printed F2 that
an independent scorer (sklearn on the written leaderboard file against the shard labels) reproduces."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import fbeta_score

from ichmodel import submission as S
from ichmodel.checkpoint import load_checkpoint
from ichmodel.constants import CLASSES
from ichmodel.dataset import split_series
from ichmodel.predict import PROB_COLUMNS
from ray_jobs import ensemble as job
from tests.datagen import write_checkpoint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def experiment(demo_shards, tmp_path_factory):
    """A search folder: a trained trial (one epoch), an untrained one and an errored one in trials.csv."""
    root = tmp_path_factory.mktemp("experiment")
    rows = []
    for i, trained in enumerate((True, False)):
        ckpt = write_checkpoint(root / f"train-t{i}" / "checkpoint.pt", demo_shards[0], seed=i, train=trained)
        rows.append(
            {
                "trial_id": f"t{i}",
                "model_f2": load_checkpoint(ckpt)["best_f2"],
                "last_val_loss": 0.1,
                "epochs": 1,
                "checkpoint": str(ckpt),
                "status": "OK",
                "loss.alpha": 1.0,
            }
        )
    rows.append({**rows[0], "trial_id": "broken", "model_f2": 1.0, "status": "ERROR"})
    pd.DataFrame(rows).to_csv(root / "trials.csv", index=False)
    return root


def test_ensemble_job_writes_checked_files_and_an_f2_that_sklearn_reproduces(
    ray_head, demo_shards, experiment, tmp_path
):
    out = tmp_path / "submission"
    proc = ray_head.run(
        [
            sys.executable,
            "ray_jobs/ensemble.py",
            "--experiment",
            str(experiment),
            "--top-k",
            "3",
            "--out",
            str(out),
        ],
        timeout=300,
    )  # no --test: the demo layout's sibling test/ is used
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in (
        "submission.csv",
        "test_per_slice.csv",
        "test_probs.parquet",
        "val_leaderboard.csv",
        "val_per_slice.csv",
        "val_probs.parquet",
        "ensemble.json",
        "report/index.html",
        "report/model_f2.png",
        "report/threshold_curves.png",
        "report/per_class_f2.png",
    ):
        assert (out / name).is_file(), name
    assert "skipping trial broken: status ERROR" in proc.stderr

    # Independent score: the written leaderboard file against the labels read straight from the shards.
    printed = float(re.search(r"ensemble validation micro-F2: ([0-9.]+)", proc.stdout).group(1))
    train_shards = demo_shards[0]
    _, val_ids = split_series(train_shards, 0.25, 0)
    shards = pq.read_table(
        train_shards / "shard-00000.parquet", columns=["series_id", "slice_id", "labels"]
    ).to_pandas()
    shards = shards[shards["series_id"].isin(val_ids)]
    truth = {
        f"{sid.removesuffix('.jpg')}_{c}": int(lab[k])
        for sid, lab in zip(shards["slice_id"], shards["labels"], strict=True)
        for k, c in enumerate(CLASSES)
    }
    board = pd.read_csv(out / "val_leaderboard.csv")
    assert sorted(board["ID"]) == sorted(truth)
    sklearn_f2 = fbeta_score([truth[i] for i in board["ID"]], board["prediction"], beta=2)
    assert printed == pytest.approx(sklearn_f2, abs=1e-6)
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["val_f2"] == pytest.approx(sklearn_f2, abs=1e-12)
    assert (spec["size"], spec["trial_ids"], len(spec["thresholds"])) == (32, ["t0", "t1"], 5)

    # Each single model's score is printed; the trained one scores what its training run reported.
    for trial, f2 in zip(("t0", "t1"), spec["single_f2"], strict=True):
        assert re.search(rf"trial {trial}\s+{f2:.6f}", proc.stdout)
    trained_f2 = load_checkpoint(experiment / "train-t0" / "checkpoint.pt")["best_f2"]
    assert spec["single_f2"][0] == pytest.approx(trained_f2, abs=1e-6)

    # The test submission covers every test slice × class once.
    test_ids = (
        pq.read_table(demo_shards[1] / "shard-00000.parquet", columns=["slice_id"])
        .column("slice_id")
        .to_pylist()
    )
    submission = pd.read_csv(out / "submission.csv")
    assert sorted(submission["ID"]) == sorted(
        f"{s.removesuffix('.jpg')}_{c}" for s in test_ids for c in CLASSES
    )
    assert set(submission["prediction"]) <= {0, 1}
    page = (out / "report" / "index.html").read_text()
    assert f"{printed:.4f}" in page and "trial t1" in page


def test_test_shards_are_required_when_there_is_no_sibling_folder(demo_shards, experiment, tmp_path):
    shards = shutil.copytree(demo_shards[0], tmp_path / "elsewhere" / "train")
    ckpt = write_checkpoint(tmp_path / "c.pt", shards)
    with pytest.raises(ValueError, match="--test is required"):
        job.resolve_data([str(ckpt)], None)
    cfg, test, val_ids = job.resolve_data([str(experiment / "train-t0" / "checkpoint.pt")], None)
    assert test == str(demo_shards[1]) and val_ids == split_series(demo_shards[0], 0.25, 0)[1]
    with pytest.raises(ValueError, match="different shards or splits"):
        job.resolve_data([str(ckpt), str(experiment / "train-t0" / "checkpoint.pt")], None)
    args = job.get_args_parser().parse_args(
        ["--experiment", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    )
    assert job.main(args) == 2  # no trials.csv: a clear error, before any Ray work
    assert "--gpus-per-model" in job.get_args_parser().format_help()


def test_a_search_on_storage_is_fetched_best_first_and_then_ensembled_like_a_local_one(experiment, tmp_path):
    """``--experiment s3://...`` goes through pyarrow.fs; a ``file://`` URI takes the same path here."""
    from ray_jobs.storage import fetch, write_bytes

    remote = tmp_path / "bucket" / "search"
    table = pd.read_csv(experiment / "trials.csv", dtype={"trial_id": str})
    uris = []
    for i, row in table.iterrows():
        target = f"file://{remote}/train-{row['trial_id']}/checkpoint.pt"
        if row["trial_id"] != "t1":  # t1's checkpoint is missing on storage
            write_bytes(target, (experiment / f"train-t{i % 2}" / "checkpoint.pt").read_bytes())
        uris.append(target)
    table["checkpoint"] = uris
    write_bytes(f"file://{remote}/trials.csv", table.to_csv(index=False).encode())
    assert not fetch(f"file://{remote}/optuna.db", tmp_path / "x.db")

    local = job.fetch_experiment(f"file://{remote}/", tmp_path / "cache", top_k=2)
    fetched = pd.read_csv(local / "trials.csv", dtype={"trial_id": str})
    assert list(fetched["trial_id"]) == ["t0", "t1"]  # best first; "broken" (ERROR) not downloaded
    assert (local / "checkpoints" / "t0" / "checkpoint.pt").read_bytes() == (
        experiment / "train-t0" / "checkpoint.pt"
    ).read_bytes()
    assert not (local / "checkpoints" / "t1").exists()
    chosen = job.E.select_trials(local / "trials.csv", top_k=2)  # t1 reported missing, t0 kept
    assert list(chosen["trial_id"]) == ["t0"]
    with pytest.raises(FileNotFoundError, match="No trials table"):
        job.fetch_experiment(f"file://{tmp_path}/nothing", tmp_path / "cache2", top_k=1)


def _predictions(slices: pd.DataFrame) -> pd.DataFrame:
    """A prediction table by hand for these slices (every probability 0.5)."""
    frame = slices.copy()
    for name in PROB_COLUMNS:
        frame[name] = 0.5
    return frame


def test_a_validation_file_missing_a_slice_is_refused(demo_shards, tmp_path):
    """The validation CSVs are checked against the validation series' slices in the shards, not against the
    frame being written (a check of a frame against itself cannot find a missing slice)."""
    train, test = (str(d) for d in demo_shards)
    _, val_ids = split_series(train, 0.25, 0)
    val = _predictions(S.expected_slices(train, val_ids))
    test_frame = _predictions(S.expected_slices(test))
    written = job.write_outputs(tmp_path / "ok", val, test_frame, [0.5] * 5, train, val_ids, test)
    assert sorted(p.name for p in written) == sorted(
        ["val_probs.parquet", "val_per_slice.csv", "val_leaderboard.csv"]
        + ["test_probs.parquet", "test_per_slice.csv", "submission.csv"]
    )
    lost = val["slice_id"].iloc[3]
    with pytest.raises(
        S.SubmissionError, match=rf"^val_per_slice.csv: 1 expected id\(s\) missing, e.g. \['{lost}'\]"
    ):
        job.write_outputs(tmp_path / "bad", val.drop(index=3), test_frame, [0.5] * 5, train, val_ids, test)
    assert not (tmp_path / "bad" / "val_per_slice.csv").exists()


def test_a_trial_id_from_storage_cannot_write_outside_the_cache(experiment, tmp_path):
    """trials.csv on a bucket is not trusted: its trial ids name folders of the download cache."""
    from ray_jobs.storage import write_bytes

    remote = tmp_path / "bucket" / "search"
    checkpoint = f"file://{remote}/train-t0/checkpoint.pt"
    write_bytes(checkpoint, (experiment / "train-t0" / "checkpoint.pt").read_bytes())
    table = pd.DataFrame(
        [{"trial_id": "../../evil", "model_f2": 0.9, "checkpoint": checkpoint, "status": "OK"}]
    )
    write_bytes(f"file://{remote}/trials.csv", table.to_csv(index=False).encode())
    cache = tmp_path / "out" / "experiment"
    with pytest.raises(
        ValueError,
        match=r"Invalid trial_id in .*trials.csv: '\.\./\.\./evil' cannot name a file.*downloaded from file://",
    ):
        job.fetch_experiment(f"file://{remote}", cache, top_k=1)
    assert not (tmp_path / "out" / "evil").exists() and not (cache / "checkpoints").exists()
