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

from ichmodel import ensemble as E
from ichmodel import submission as S
from ichmodel.checkpoint import load_checkpoint
from ichmodel.constants import CLASSES
from ichmodel.prediction_table import PROB_COLUMNS
from ichmodel.report import report_figures
from ichmodel.scores import parse_result_line
from ichmodel.splits import split_holdout, split_series
from ichmodel.trials import select_trials
from ray_jobs import ensemble as job
from ray_jobs.cli import record_or_resume
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
    printed = parse_result_line(proc.stdout)["ensemble_val_f2"]
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
        assert re.search(rf"trial {trial}\s+{f2:.4f}", proc.stdout)
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
    on_page, in_result = report_figures(page), parse_result_line(proc.stdout)  # one truth, one label
    assert set(on_page) == set(in_result) == {"single_val_f2", "ensemble_val_f2"}
    assert all(in_result[k] == pytest.approx(v, abs=5e-7) for k, v in on_page.items())
    assert in_result["single_val_f2"] == pytest.approx(max(spec["single_f2"]), abs=5e-7)
    assert "micro-F2 on validation rows; thresholds tuned on these rows:" in proc.stdout
    viewer = (out / "viewer" / "index.html").read_text()  # the validation series, one row each
    assert viewer.count('<section class="series"') == len(val_ids)
    assert "note: this validation score is optimistic" in proc.stdout
    assert "predictions: 2 models predicted now, 0 read from" in proc.stdout

    # Again with --holdout, in the same folder: the kept predictions are reused (no task), members and
    # thresholds come from the other series, and the printed score is sklearn's on the held-out series.
    again = ray_head.run([sys.executable, "ray_jobs/ensemble.py", "--experiment", str(experiment), "--top-k", "3",
                          "--out", str(out), "--holdout", "0.5"], timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert "predictions: 0 models predicted now, 2 read from" in again.stdout
    held_f2 = parse_result_line(again.stdout)["ensemble_holdout_f2"]
    again_page = (out / "report" / "index.html").read_text()
    assert report_figures(again_page) == pytest.approx(parse_result_line(again.stdout), abs=5e-7)
    assert "held-out rows (0.5 of the validation series)" in again_page
    _, held = split_holdout(pd.read_parquet(out / "val_probs.parquet"), 0.5)
    board = pd.read_csv(out / "val_leaderboard.csv")
    held_slices = set(shards.loc[shards["series_id"].isin(held), "slice_id"].str.removesuffix(".jpg"))
    board = board[board["ID"].str.rsplit("_", n=1).str[0].isin(held_slices)]
    assert len(board) == 5 * len(held_slices) > 0
    assert held_f2 == pytest.approx(fbeta_score([truth[i] for i in board["ID"]], board["prediction"], beta=2),
                                    abs=1e-6)  # fmt: skip
    assert json.loads((out / "ensemble.json").read_text())["val_f2"] == pytest.approx(held_f2, abs=1e-6)
    assert "optimistic" not in again.stdout


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
    chosen = select_trials(local / "trials.csv", top_k=2)  # t1 reported missing, t0 kept
    assert list(chosen["trial_id"]) == ["t0"]
    with pytest.raises(FileNotFoundError, match="No trials table"):
        job.fetch_experiment(f"file://{tmp_path}/nothing", tmp_path / "cache2", top_k=1)


def test_holdout_chooses_members_and_thresholds_on_the_rest_and_scores_the_held_out_series():
    from tests.test_ensemble import _oof_frames

    frames = {t: f.drop(columns=["fold"]) for t, f in _oof_frames([1.5, 1.2, 50.0]).items()}  # t2: noise
    vals = list(frames.values())
    select, held = split_holdout(vals[0], 0.3)
    series = sorted(vals[0]["series_id"].unique())
    assert sorted(select + held) == series and not set(select) & set(held)
    assert len(held) == round(0.3 * len(series)) and split_holdout(vals[0], 0.3) == (select, held)
    positive = vals[0].groupby("series_id")[[f"label_{c}" for c in CLASSES]].max().any(axis=1)
    assert positive[select].any() and positive[held].any()  # stratified: both parts keep positive series

    bag, thresholds, scores = E.choose_on_selection(list(frames), vals, select, held, None)
    assert 2 not in bag and [s.name for s in scores][:3] == ["t0", "t1", "t2"]
    mean = E.average_predictions([vals[i] for i in bag])
    on_select, on_held = mean[mean["series_id"].isin(select)], mean[mean["series_id"].isin(held)]
    assert thresholds.tolist() == E.choose_thresholds(on_select).tolist()  # tuned without the held-out
    assert scores[-1].micro_f2 == pytest.approx(E.score_predictions(on_held, thresholds)["micro_f2"])
    with pytest.raises(ValueError, match="at least 2 validation series"):
        split_holdout(vals[0][vals[0]["series_id"] == series[0]], 0.5)


def test_resume_restores_the_recorded_options_and_refuses_a_conflicting_one(tmp_path, caplog):
    """Checked before any Ray work: the recorded arguments, a conflict naming both values, options refused."""
    args = job.parse_args(["--experiment", str(tmp_path / "none"), "--name", "e", "--storage", str(tmp_path),
                           "--holdout", "0.3", "--top-k", "2"])  # fmt: skip
    assert job.main(args) == 2  # no trials.csv; the arguments were recorded first
    assert "No trials table" in caplog.text
    restored = record_or_resume(
        vars(job.parse_args(["--name", "e", "--storage", str(tmp_path), "--resume"])),
        job.get_args_parser(),
        "ensemble",
    )
    assert (restored["experiment"], restored["holdout"], restored["top_k"]) == (
        str(tmp_path / "none"),
        0.3,
        2,
    )
    assert (
        job.main(job.parse_args(["--name", "e", "--storage", str(tmp_path), "--resume", "--top-k", "3"])) == 2
    )
    assert "--top-k 3 given, but the experiment ran with 2" in caplog.text
    refused = [
        "--experiment",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--folds",
        "2",
        "--holdout",
        "0.2",
    ]
    assert job.main(job.parse_args(refused)) == 2 and "is for the ensemble without --folds" in caplog.text
    assert not (tmp_path / "o").exists()  # refused before anything is recorded


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
    written = E.write_outputs(tmp_path / "ok", val, test_frame, [0.5] * 5, train, val_ids, test)
    assert sorted(p.name for p in written) == sorted(
        ["val_probs.parquet", "val_per_slice.csv", "val_leaderboard.csv"]
        + ["test_probs.parquet", "test_per_slice.csv", "submission.csv"]
    )
    lost = val["slice_id"].iloc[3]
    with pytest.raises(
        S.SubmissionError, match=rf"^val_per_slice.csv: 1 expected id\(s\) missing, e.g. \['{lost}'\]"
    ):
        E.write_outputs(tmp_path / "bad", val.drop(index=3), test_frame, [0.5] * 5, train, val_ids, test)
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
