"""``ichmodel.ensemble``: trial selection, averaging, thresholds, submission writers and their checks."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import fbeta_score

from ichmodel import ensemble as E
from ichmodel.constants import CLASSES
from ichmodel.dataset import SeriesDataset
from ichmodel.engine import load_model
from ichmodel.metrics import search_thresholds
from ichmodel.predict import LABEL_COLUMNS, predict_dataset
from tests.datagen import small_dataset, write_checkpoint


def table(slice_ids, probs, labels=None, series=None) -> pd.DataFrame:
    """A prediction table by hand: ``probs``/``labels`` ``[N, 5]``."""
    n = len(slice_ids)
    frame = pd.DataFrame({"series_id": series or ["ID_s"] * n, "position": range(n), "slice_id": slice_ids})
    for c, name in enumerate(CLASSES):
        frame[name] = np.asarray(probs, dtype=np.float32)[:, c]
    if labels is not None:
        for c, name in enumerate(LABEL_COLUMNS):
            frame[name] = np.asarray(labels, dtype=np.int8)[:, c]
    return frame


def test_select_trials_skips_errors_and_missing_checkpoints(tmp_path):
    for name in ("a", "b", "c", "err"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(b"x")
    rows = [
        ("gone", 0.99, str(tmp_path / "gone" / "checkpoint.pt"), "OK"),  # best, but its file is missing
        ("err", 0.95, str(tmp_path / "err" / "checkpoint.pt"), "ERROR"),
        ("a", 0.70, str(tmp_path / "a" / "checkpoint.pt"), "OK"),
        ("b", 0.80, "b/checkpoint.pt", "OK"),  # relative to the table's folder
        ("c", 0.60, str(tmp_path / "c" / "checkpoint.pt"), "OK"),
        ("none", 0.90, "", "OK"),
    ]
    pd.DataFrame(rows, columns=["trial_id", "best_f2", "checkpoint", "status"]).to_csv(
        tmp_path / "trials.csv", index=False
    )
    chosen = E.select_trials(tmp_path / "trials.csv", 2)
    assert chosen["trial_id"].tolist() == ["b", "a"]
    assert chosen["checkpoint"].tolist() == [
        str(tmp_path / "b" / "checkpoint.pt"),
        str(tmp_path / "a" / "checkpoint.pt"),
    ]
    assert E.select_trials(tmp_path / "trials.csv", 10)["trial_id"].tolist() == ["b", "a", "c"]
    with pytest.raises(ValueError, match="top_k must be >= 1. Got 0"):
        E.select_trials(tmp_path / "trials.csv", 0)

    pd.DataFrame(rows[:2], columns=["trial_id", "best_f2", "checkpoint", "status"]).to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(
        ValueError, match=r"No usable trial.*gone: checkpoint .* does not exist; err: status ERROR"
    ):
        E.select_trials(tmp_path / "bad.csv", 3)
    with pytest.raises(FileNotFoundError, match="ray_jobs/tune.py"):
        E.select_trials(tmp_path / "nothing.csv", 3)


def test_average_predictions_is_the_mean_aligned_by_slice():
    labels = [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]
    a = table(["x_0.jpg", "x_1.jpg"], [[0.2] * 5, [0.4] * 5], labels)
    b = table(["x_0.jpg", "x_1.jpg"], [[0.6] * 5, [0.0] * 5], labels).iloc[::-1]  # another row order
    mean = E.average_predictions([a, b])
    np.testing.assert_allclose(mean[list(CLASSES)].to_numpy(), [[0.4] * 5, [0.2] * 5], atol=1e-7)
    assert mean[list(LABEL_COLUMNS)].to_numpy().tolist() == labels
    with pytest.raises(ValueError, match="covers other slices"):
        E.average_predictions([a, a.iloc[:1]])
    with pytest.raises(ValueError, match="other labels"):
        E.average_predictions([a, table(["x_0.jpg", "x_1.jpg"], [[0.1] * 5] * 2, [[0] * 5] * 2)])


def test_ensemble_of_identical_checkpoints_equals_the_single_model(demo_shards, tmp_path):
    first = write_checkpoint(tmp_path / "t0" / "checkpoint.pt", demo_shards[0], seed=3)
    copies = [first] + [shutil.copy(first, tmp_path / f"copy{i}.pt") for i in range(2)]
    dataset = small_dataset(demo_shards[0], 1)
    frames = [predict_dataset(load_model(p)[0], dataset) for p in copies]
    single, averaged = frames[0], E.average_predictions(frames)
    np.testing.assert_allclose(
        averaged[list(CLASSES)].to_numpy(), single[list(CLASSES)].to_numpy(), atol=1e-6
    )
    th = E.choose_thresholds(averaged)
    np.testing.assert_array_equal(th, E.choose_thresholds(single))
    assert E.score_predictions(averaged, th)["micro_f2"] == E.score_predictions(single, th)["micro_f2"]


def test_thresholds_and_scores_agree_with_search_thresholds_and_sklearn():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 5)) < 0.3).astype(np.int8)
    probs = np.clip(labels * 0.4 + rng.random((60, 5)) * 0.6, 0, 1)
    frame = table([f"s_{i}.jpg" for i in range(60)], probs, labels)
    th = E.choose_thresholds(frame)
    np.testing.assert_array_equal(th, search_thresholds(labels, frame[list(CLASSES)].to_numpy(np.float64)))
    score = E.score_predictions(frame, th)
    pred = (frame[list(CLASSES)].to_numpy() >= th).astype(int)
    assert score["micro_f2"] == pytest.approx(fbeta_score(labels.ravel(), pred.ravel(), beta=2), abs=1e-12)
    assert score["per_class"]["sdh"] == pytest.approx(
        fbeta_score(labels[:, 3], pred[:, 3], beta=2), abs=1e-12
    )
    with pytest.raises(ValueError, match="labelled prediction table"):
        E.choose_thresholds(frame.drop(columns=list(LABEL_COLUMNS)))


def test_writers_produce_the_documented_formats(tmp_path):
    probs = [[0.9, 0.1, 0.2, 0.6, 0.05], [0.3, 0.7, 0.1, 0.1, 0.8]]
    labels = [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]]
    frame = table(["e00b013d9_14.jpg", "e00b013d9_2.jpg"], probs, labels, series=["ID_e00b013d9"] * 2)
    th = [0.5, 0.5, 0.5, 0.5, 0.5]

    lb = pd.read_csv(E.write_leaderboard_csv(frame, th, tmp_path / "lb.csv"))
    assert list(lb.columns) == ["ID", "prediction"] and len(lb) == 10
    assert lb["ID"].tolist()[:5] == [
        "e00b013d9_14_ich",
        "e00b013d9_14_ivh",
        "e00b013d9_14_sah",
        "e00b013d9_14_sdh",
        "e00b013d9_14_edh",
    ]
    assert lb["prediction"].tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    # The leaderboard file scores as the course did: one F2 over all N × 5 decisions.
    assert fbeta_score(np.ravel(labels), lb["prediction"], beta=2) == pytest.approx(
        E.score_predictions(frame, th)["micro_f2"]
    )

    ps = tmp_path / "ps.csv"
    E.write_per_slice_csv(frame, th, ps)
    assert ps.read_text().splitlines() == [
        "dirname,ID,ich,ivh,sah,sdh,edh",
        "ID_e00b013d9,e00b013d9_14.jpg,1,0,0,1,0",
        "ID_e00b013d9,e00b013d9_2.jpg,0,1,0,0,1",
    ]

    rsna = table(["ID_63eb1e259", "ID_2669954a7"], probs)
    kaggle = pd.read_csv(E.write_rsna_csv(rsna, tmp_path / "rsna.csv"))
    assert list(kaggle.columns) == ["ID", "Label"] and len(kaggle) == 12
    got = dict(zip(kaggle["ID"], kaggle["Label"], strict=True))
    assert got["ID_63eb1e259_subdural"] == pytest.approx(0.6)
    assert got["ID_63eb1e259_intraparenchymal"] == pytest.approx(0.9)
    assert got["ID_2669954a7_epidural"] == pytest.approx(0.8)
    assert got["ID_2669954a7_any"] == pytest.approx(0.8) and got["ID_63eb1e259_any"] == pytest.approx(0.9)
    assert kaggle["ID"].tolist()[:6] == [f"ID_63eb1e259_{s}" for s in E.RSNA_ORDER]

    back = pq.read_table(E.write_probabilities(frame, tmp_path / "p.parquet")).to_pandas()
    pd.testing.assert_frame_equal(back, frame)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_missing_slice_is_caught_and_leaves_no_file(tmp_path):
    frame = table(["a_0.jpg", "a_1.jpg"], [[0.9] * 5, [0.1] * 5])
    expected = ["a_0.jpg", "a_1.jpg", "a_2.jpg"]
    with pytest.raises(E.SubmissionError, match=r"5 expected id\(s\) missing, e.g. \['a_2_edh'"):
        E.write_leaderboard_csv(frame, [0.5] * 5, tmp_path / "sub.csv", expected)
    with pytest.raises(E.SubmissionError, match=r"1 expected id\(s\) missing, e.g. \['a_2.jpg'\]"):
        E.write_per_slice_csv(frame, [0.5] * 5, tmp_path / "ps.csv", expected)
    assert _leftovers(tmp_path) == []


def test_a_duplicate_slice_is_caught_and_an_older_good_file_survives(tmp_path):
    good = table(["a_0.jpg", "a_1.jpg"], [[0.9] * 5, [0.1] * 5])
    E.write_leaderboard_csv(good, [0.5] * 5, tmp_path / "sub.csv")
    before = (tmp_path / "sub.csv").read_bytes()
    doubled = table(["a_0.jpg", "a_1.jpg", "a_1.jpg"], [[0.9] * 5, [0.1] * 5, [0.1] * 5])
    with pytest.raises(E.SubmissionError, match=r"5 duplicate id\(s\), e.g. \['a_1_ich'"):
        E.write_leaderboard_csv(doubled, [0.5] * 5, tmp_path / "sub.csv", ["a_0.jpg", "a_1.jpg"])
    assert (tmp_path / "sub.csv").read_bytes() == before
    assert _leftovers(tmp_path) == ["sub.csv"]


def test_validate_submission_catches_header_values_and_extra_ids(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("Id,Prediction\na_0_ich,1\n")
    with pytest.raises(
        E.SubmissionError, match=r"header is \['Id', 'Prediction'\], expected \['ID', 'prediction'\]"
    ):
        E.validate_submission(path, "leaderboard", ["a_0_ich"])
    path.write_text("dirname,ID,ivh,ich,sah,sdh,edh\nd,a_0.jpg,0,0,0,0,0\n")  # columns out of order
    with pytest.raises(E.SubmissionError, match="header is"):
        E.validate_submission(path, "per_slice", ["a_0.jpg"])
    path.write_text("ID,prediction\na_0_ich,2\na_0_ivh,0.5\nz_9_ich,1\n")
    with pytest.raises(E.SubmissionError) as info:
        E.validate_submission(path, "leaderboard", ["a_0_ich", "a_0_ivh"])
    assert "not 0/1" in str(info.value) and "unexpected id(s), e.g. ['z_9_ich']" in str(info.value)
    path.write_text("ID,Label\nID_a_any,1.5\nID_a_subdural,\n")
    with pytest.raises(E.SubmissionError, match=r"2 value\(s\) not probabilities in \[0, 1\]"):
        E.validate_submission(path, "rsna", ["ID_a_any", "ID_a_subdural"])
    path.write_text("ID,Label\nID_a_any,1\nID_a_subdural,0.25\n")
    assert E.validate_submission(path, "rsna", ["ID_a_any", "ID_a_subdural"]) == 2
    assert issubclass(E.SubmissionError, ValueError)


def test_expected_slices_read_from_the_shards(demo_shards):
    expected = E.expected_slices(demo_shards[1])
    dataset = SeriesDataset(demo_shards[1])
    assert len(expected) == dataset.manifest["num_slices"]
    assert set(expected["slice_id"]) == {s for i in range(len(dataset)) for s in dataset[i]["slice_ids"]}
    assert E.slice_stem("e00b013d9_14.jpg") == "e00b013d9_14" and E.slice_stem("ID_0a1b2c") == "ID_0a1b2c"


def test_ensemble_spec_round_trip(tmp_path):
    spec = E.EnsembleSpec(
        models=["/m/a.pt"],
        thresholds=[0.1, 0.2, 0.3, 0.4, 0.5],
        size=64,
        windows=[[40.0, 80.0]] * 3,
        tta=True,
        val_f2=0.5,
    )
    spec.save(tmp_path)
    assert E.EnsembleSpec.load(tmp_path) == spec
    (tmp_path / "ensemble.json").write_text('{"models": [], "thresholds": [0.5], "size": 64, "windows": []}')
    with pytest.raises(ValueError, match="lists no models"):
        E.EnsembleSpec.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="ray_jobs/ensemble.py"):
        E.EnsembleSpec.load(tmp_path / "missing")
