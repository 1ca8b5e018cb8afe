"""K-fold splits by series (or patient) and out-of-fold assembly (:mod:`ichmodel.splits`, :mod:`ichmodel.folds`), and the fold
runner ``ray_jobs/folds.py`` on the session's Ray head through ``ensemble.py --smoke-test`` (killed, then resumed
from its name without retraining a finished fold)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from ichmodel import ensemble as E
from ichmodel import submission as S
from ichmodel.checkpoint import load_checkpoint
from ichmodel.constants import CLASSES
from ichmodel.folds import assemble_oof
from ichmodel.report import report_figures
from ichmodel.scores import parse_result_line
from ichmodel.shards import load_manifest, series_index
from ichmodel.splits import check_folds, fold_split, inner_split, make_folds, shard_fold_runs, shard_folds
from ray_jobs.worker import finished_run_report
from tests.conftest import REPO_ROOT
from tests.datagen import file_tree

IDS = [f"s{i:02d}" for i in range(23)]
POSITIVE = {s: i % 3 == 0 for i, s in enumerate(IDS)}  # 8 positive series


def test_folds_partition_series_and_repeat_for_a_seed():
    folds = make_folds(IDS, 4, seed=3, positive=POSITIVE)
    flat = [s for f in folds for s in f]
    assert sorted(flat) == IDS and len(flat) == len(set(flat))  # no series held out twice
    assert make_folds(IDS, 4, seed=3, positive=POSITIVE) == folds
    assert make_folds(IDS, 4, seed=4, positive=POSITIVE) != folds
    positives = [sum(POSITIVE[s] for s in f) for f in folds]
    assert max(positives) - min(positives) <= 1  # 8 positives over 4 folds: 2 each
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


def test_groups_keep_a_patient_in_one_fold():
    groups = {s: f"p{i // 3}" for i, s in enumerate(IDS)}  # 8 patients, 3 series each (the last 2)
    folds = make_folds(IDS, 3, seed=0, positive=POSITIVE, groups=groups)
    fold_of_patient: dict[str, set[int]] = {}
    for i, fold in enumerate(folds):
        for s in fold:
            fold_of_patient.setdefault(groups[s], set()).add(i)
    assert all(len(v) == 1 for v in fold_of_patient.values()), fold_of_patient
    assert sorted(s for f in folds for s in f) == IDS


def test_inner_split_takes_a_stratified_part_of_the_training_folds_only():
    folds = make_folds(IDS, 3, seed=0, positive=POSITIVE)
    train, held = fold_split(folds, 0)
    fit, select = inner_split(train, 0.25, seed=1, positive=POSITIVE)
    assert sorted(fit + select) == train and not set(fit) & set(select) and not set(select) & set(held)
    assert len(select) == round(len(train) / 4) and any(POSITIVE[s] for s in select)
    assert inner_split(train, 0.25, seed=1, positive=POSITIVE) == (fit, select)
    assert inner_split(["a", "b"], 0.1, seed=0) in ((["a"], ["b"]), (["b"], ["a"]))
    with pytest.raises(ValueError, match="at least 2 series"):
        inner_split(["a"], 0.1, seed=0)


def test_fold_split_holds_its_fold_out():
    folds = make_folds(IDS, 3, seed=0)
    for i in range(3):
        train, val = fold_split(folds, i)
        assert set(val) == set(folds[i]) and not set(train) & set(val)
        assert sorted(train + val) == IDS


@pytest.mark.parametrize(
    ("k", "ids", "message"),
    [(1, IDS, "k"), (3, ["a", "b"], "Cannot make 3 folds"), (2, ["a", "a"], "duplicates")],
)
def test_bad_folds_are_refused(k, ids, message):
    with pytest.raises(ValueError, match=message):
        make_folds(ids, k)


def test_check_folds_names_the_shared_series():
    with pytest.raises(ValueError, match="'b' is held out by folds 0 and 1"):
        check_folds([["a", "b"], ["b", "c"]])


def _frame(series: list[str], value: float) -> pd.DataFrame:
    rows = [(s, p, f"{s}_{p}") for s in series for p in range(2)]
    frame = pd.DataFrame(rows, columns=["series_id", "position", "slice_id"])
    for c in ("ich", "ivh", "sah", "sdh", "edh"):
        frame[c] = np.float32(value)
    return frame


def test_oof_covers_every_series_once_by_its_fold_model():
    folds = make_folds(IDS, 3, seed=1, positive=POSITIVE)
    oof = assemble_oof([_frame(f, i / 10) for i, f in enumerate(folds)], folds)
    per_series = oof.groupby("series_id")["fold"].agg(["nunique", "size"])
    assert sorted(per_series.index) == IDS and (per_series["nunique"] == 1).all()
    assert (per_series["size"] == 2).all()  # each slice once
    for i, fold in enumerate(folds):  # each series predicted by the model that held it out
        rows = oof[oof["series_id"].isin(fold)]
        assert (rows["fold"] == i).all() and np.allclose(rows["ich"], i / 10)


def test_oof_refuses_a_table_of_the_wrong_series():
    folds = [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="fold 1 covers other series"):
        assemble_oof([_frame(["a", "b"], 0.1), _frame(["a"], 0.2)], folds)


def test_shard_folds_cover_the_shards(demo_shards):
    ids = sorted(series_index(load_manifest(demo_shards[0])))
    folds = shard_folds(demo_shards[0], 2, seed=0)
    assert sorted(s for f in folds for s in f) == ids and all(folds)


def test_a_patients_series_share_a_fold_and_an_inner_side_from_the_dicom_files_to_the_folds(tmp_path):
    # RSNA-style files where three patients have two series each (a follow-up scan): the reader keeps the
    # PatientID, preprocessing writes it into the manifest, and the folds and inner splits keep the pairs.
    from ichmodel import readers, shards, synth
    from ichmodel.preprocess import PreprocessOptions, preprocess

    synth.write_rsna_dataset(tmp_path / "raw", 12, (2, 3), 32, seed=0)
    images = tmp_path / "raw" / "stage_2_train"
    by_series: dict[str, list[Path]] = {}
    for path in sorted(images.glob("*.dcm")):
        by_series.setdefault(
            str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID), []
        ).append(path)
    uids = sorted(by_series)
    for first, second in zip(uids[0:6:2], uids[1:6:2], strict=True):
        patient = pydicom.dcmread(by_series[first][0], stop_before_pixels=True).PatientID
        for path in by_series[second]:
            ds = pydicom.dcmread(path)
            ds.PatientID = patient
            ds.save_as(path)
    result = readers.read_rsna(images, tmp_path / "raw" / "stage_2_train.csv")
    preprocess(result, tmp_path / "shards", PreprocessOptions(size=32))
    manifest = load_manifest(tmp_path / "shards")
    patients = shards.series_patients(manifest)
    assert len(patients) == 12 and len(set(patients.values())) == 9
    pairs = [(a, b) for a, b in zip(uids[0:6:2], uids[1:6:2], strict=True)]
    assert all(patients[a] == patients[b] for a, b in pairs)
    for seed in range(4):
        folds, inner, count = shard_fold_runs(tmp_path / "shards", 3, seed, 0.25)
        assert count == 9 and sorted(s for f in folds for s in f) == sorted(patients)
        fold_of = {s: i for i, f in enumerate(folds) for s in f}
        assert all(fold_of[a] == fold_of[b] for a, b in pairs), (seed, folds)  # never in two folds
        for fit, select in inner:
            for a, b in pairs:
                assert not ({a, b} & set(fit) and {a, b} & set(select)), (seed, a, b)


def test_reference_option_names_what_aligns_the_folds(demo_shards, tmp_path):
    from ray_jobs import folds

    train, test = (str(p) for p in demo_shards)

    def choose(value):
        return folds.reference_shards(
            folds.get_args_parser().parse_args([*base, "--reference", value]).reference, test
        )

    base = ["--experiment", "e", "--out", "o"]
    assert folds.reference_shards(folds.get_args_parser().parse_args(base).reference, test) == (
        None,
        test,
    )  # default
    assert choose("test") == (None, test) and choose(test) == (None, test)  # the test predictions serve
    assert choose("none") == choose("NONE") == (None, None)
    assert choose(train) == (train, train)  # other shards: predicted besides the test shards
    with pytest.raises(FileNotFoundError, match="nowhere"):
        choose(str(tmp_path / "nowhere"))


def _finished_fold_runs(runs: Path) -> dict[str, dict]:
    """Run name -> last report of each fold's Train run that Ray has recorded as finished."""
    reports = {p.name: finished_run_report(str(p)) for p in runs.glob("fold-*")}
    return {name: report for name, report in reports.items() if report is not None}


@pytest.mark.ray
def test_smoke_ensemble_killed_after_a_fold_run_resumes_from_its_name_without_retraining(ray_head, tmp_path):
    """``ensemble.py --smoke-test`` (tune's smoke search, then 2 folds of its 2 trials: 4 Train runs),
    ``kill -9`` of its driver once Ray recorded a finished fold run, then ``--name --storage --resume`` only:
    the finished runs are not trained again, the others continue, and a checked submission is written."""
    storage = tmp_path / "runs"
    folder = storage / "smoke-ensemble"
    log = tmp_path / "killed.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen(
            [sys.executable, "ray_jobs/ensemble.py", "--smoke-test", "--storage", str(storage)],
            cwd=REPO_ROOT,
            env=ray_head.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline, finished = time.time() + 900, {}
    while time.time() < deadline and not finished and driver.poll() is None:
        finished = _finished_fold_runs(folder / "runs")
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert finished, (
        "no fold run finished before the deadline, or the driver ended: " + log.read_text()[-5000:]
    )
    trees = {name: file_tree(folder / "runs" / name) for name in finished}
    assert not (folder / "fold_ensemble.json").exists()  # killed before the end

    resumed = ray_head.run([sys.executable, "ray_jobs/ensemble.py", "--name", "smoke-ensemble", "--storage",
                            str(storage), "--resume"], timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    runs = pd.read_csv(folder / "runs.csv").set_index("name")
    trials = pd.read_csv(folder / "search" / "trials.csv", dtype={"trial_id": str})["trial_id"]
    names = {f"fold-{t}-{i}of2" for t in trials for i in range(2)}
    assert set(runs.index) == names and len(names) == 4  # the recorded smoke options: top 2 trials, 2 folds
    assert {p.name for p in (folder / "runs").glob("fold-*")} == names  # no other Train run
    assert not runs.loc[list(finished), "retrained"].any()
    assert runs["retrained"].sum() <= 4 - len(finished)
    for name in finished:  # a finished run's folder is untouched
        assert file_tree(folder / "runs" / name) == trees[name], name
    assert (
        f"{runs['retrained'].sum()} trained now, {4 - runs['retrained'].sum()} finished before"
        in resumed.stdout
    )

    shards = REPO_ROOT / "runs" / "smoke_data" / "shards"
    record = json.loads((folder / "folds.json").read_text())
    folds = record["folds"]
    ids = sorted(series_index(load_manifest(shards / "train")))
    assert sorted(s for f in folds for s in f) == ids  # no series in two folds
    assert (record["split_by"], record["patients"]) == ("series", None)  # DLCV folders: one patient each
    for i, select in enumerate(record["inner_val"]):  # each run picked its epoch inside its training folds
        assert select and set(select) <= set(fold_split(folds, i)[0])
    for trial in trials:
        oof = pd.read_parquet(folder / f"oof_{trial}.parquet")
        per_series = oof.groupby("series_id")["fold"].agg(["nunique", "first"])
        assert sorted(per_series.index) == ids and (per_series["nunique"] == 1).all()  # every series once
        for i, fold in enumerate(folds):
            assert set(per_series.index[per_series["first"] == i]) == set(fold)  # by the model holding it out
    for path in runs["checkpoint"]:  # each fold trained all three stages on the other fold
        assert load_checkpoint(path)["finished"], path
    for name in ("submission.csv", "val_leaderboard.csv", "ensemble.json", "fold_ensemble.json",
                 "report/index.html"):  # fmt: skip
        assert (folder / name).is_file(), name
    assert "OOF RSNA weighted log loss: before" in resumed.stdout
    # one report, one truth: the page's keyed figures are the RESULT line's, each labelled with its rows
    page = (folder / "report" / "index.html").read_text()
    on_page, in_result = report_figures(page), parse_result_line(resumed.stdout)
    assert set(on_page) == set(in_result) and {"ensemble_oof_f2", "single_oof_f2_cross_fitted"} <= set(
        in_result
    )
    for key, value in on_page.items():
        assert in_result[key] == pytest.approx(value, abs=5e-7), key
    assert "micro-F2 on OOF rows, aligned to the ensemble&#x27;s scale" not in page  # escaped once, in cells
    assert "OOF rows, aligned to the ensemble&#x27;s scale" in page
    assert (
        "micro-F2 on OOF rows, aligned to the ensemble's scale; thresholds tuned on these rows:"
        in resumed.stdout
    )
    # the study is found from the experiment (its optuna.db), not left out
    assert (folder / "report" / "optuna_history.png").is_file() and "no Optuna study" not in page
    # the viewer of the OOF rows: one row per labelled training series
    viewer = (folder / "viewer" / "index.html").read_text()
    assert viewer.count('<section class="series"') == len(ids)
    summary = json.loads((folder / "fold_ensemble.json").read_text())
    bag, alignment = summary["bag"], summary["alignment"]
    test_slices = S.expected_slices(str(shards / "test"))
    assert alignment["reference"] == str(shards / "test")  # by default the test series, labels unread
    assert alignment["reference_slices"] == len(test_slices) and sorted(alignment["folds"]) == ["0", "1"]
    assert "OOF rows aligned to the ensemble's scale" in resumed.stdout
    models = json.loads((folder / "ensemble.json").read_text())["models"]
    assert models == [runs.loc[f"fold-{t}-{i}of2", "checkpoint"] for t in bag for i in range(2)]
    test_ids = test_slices["slice_id"]
    submission = pd.read_csv(folder / "submission.csv")
    assert sorted(submission["ID"]) == sorted(
        f"{s.removesuffix('.jpg')}_{c}" for s in test_ids for c in CLASSES
    )


def test_fold_summary_chooses_members_calibrates_and_writes_its_files(tmp_path, capsys):
    from ichmodel.fold_ensemble import FoldRuns, summarize
    from ray_jobs.folds import print_summary
    from tests.test_ensemble import _oof_frames

    oof = _oof_frames([1.5, 1.2, 50.0])
    oof = {t: f.assign(**{c: f[c] ** 3 for c in ("ich", "ivh", "sah", "sdh", "edh")}) for t, f in oof.items()}
    test = {t: f.drop(columns=["fold"]) for t, f in oof.items()}  # any table over the same slices will do
    summary = summarize(FoldRuns(oof=oof, test=test), tmp_path, n_boot=100)
    assert summary["single_best"] == "t1" and "t2" not in summary["bag"]
    losses = summary["calibration"]["oof_log_loss"]
    assert summary["calibration"]["method"] in ("platt", "isotonic")
    assert losses[summary["calibration"]["method"]] < 0.95 * losses["before"]  # p**3: too low
    for name in (
        "oof_ensemble.parquet",
        "test_ensemble.parquet",
        "test_calibrated.parquet",
        "fold_ensemble.json",
    ):
        assert (tmp_path / name).is_file(), name
    oof_ens = pd.read_parquet(tmp_path / "oof_ensemble.parquet")
    assert oof_ens.groupby("series_id")["fold"].nunique().eq(1).all()
    print_summary(summary)
    printed = capsys.readouterr().out
    assert "ensemble_oof_f2" in parse_result_line(printed) and "single best (t1)" in printed
    assert summary["alignment"] is None and "not aligned" in printed

    # with reference predictions the OOF rows are aligned, and the summary says on what
    rng = np.random.default_rng(0)
    reference = {t: {k: rng.uniform(0.01, 0.6 + 0.2 * k, (50, 5)) for k in range(3)} for t in oof}
    runs = FoldRuns(oof=oof, test=test, reference=reference, reference_name="shards/test")
    (tmp_path / "aligned").mkdir()
    summary = summarize(runs, tmp_path / "aligned", n_boot=100)
    assert (
        summary["alignment"]["reference"] == "shards/test" and summary["alignment"]["reference_slices"] == 50
    )
    aligned = pd.read_parquet(tmp_path / "aligned" / "oof_ensemble.parquet")
    raw = E.average_predictions([oof[t] for t in summary["bag"]])
    assert not np.allclose(aligned[list(CLASSES)], raw[list(CLASSES)], atol=1e-3)
    assert aligned["series_id"].equals(raw["series_id"]) and aligned["position"].equals(raw["position"])
    print_summary(summary)
    assert "aligned to the ensemble's scale on 50 reference slices (shards/test" in capsys.readouterr().out


def test_ensemble_job_folds_option_maps_to_the_fold_job():
    from dataclasses import replace

    from ray_jobs import ensemble
    from ray_jobs.job_record import options_from
    from tests.conftest import job_parser

    args = job_parser("ensemble").parse_args(
        [
            "--experiment",
            "runs/s",
            "--top-k",
            "2",
            "--out",
            "o",
            "--folds",
            "3",
            "--tta",
            "--gpus-per-model",
            "1",
        ]
    )
    options = options_from(ensemble.EnsembleOptions, vars(args))
    mapped = ensemble.fold_options(options, options.out)
    assert (mapped.experiment, mapped.top_k, mapped.folds, mapped.out) == ("runs/s", 2, 3, "o")
    assert mapped.tta == ("flip",) and mapped.use_gpu and mapped.test is None
    assert mapped.reference == "test"  # by default the test series align the folds
    assert ensemble.fold_options(replace(options, reference="none"), options.out).reference == "none"


def test_fold_job_refuses_a_storage_uri_for_out(tmp_path, monkeypatch, caplog):
    from ray_jobs import folds

    monkeypatch.chdir(tmp_path)
    args = folds.get_args_parser().parse_args(["--experiment", str(tmp_path), "--out", "s3://bucket/x"])
    assert folds.main(args) == 2
    assert not (tmp_path / "s3:").exists()  # no local folder named after the URI
    assert "must be local folders" in caplog.text
