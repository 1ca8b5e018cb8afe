"""``ichmodel.submission``: the ids of each kind, the one checked writer, and the check itself."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import fbeta_score

from ichmodel import submission as S
from ichmodel.constants import CLASSES
from ichmodel.dataset import SeriesDataset
from ichmodel.ensemble import score_predictions
from ichmodel.splits import split_series
from tests.test_ensemble import table


def test_writers_produce_the_documented_formats(tmp_path):
    probs = [[0.9, 0.1, 0.2, 0.6, 0.05], [0.3, 0.7, 0.1, 0.1, 0.8]]
    labels = [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]]
    frame = table(["e00b013d9_14.jpg", "e00b013d9_2.jpg"], probs, labels, series=["ID_e00b013d9"] * 2)
    ids = frame["slice_id"].tolist()
    th = [0.5, 0.5, 0.5, 0.5, 0.5]

    lb = pd.read_csv(S.write_submission(frame, "leaderboard", tmp_path / "lb.csv", ids, th))
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
        score_predictions(frame, th)["micro_f2"]
    )

    ps = tmp_path / "ps.csv"
    S.write_submission(frame, "per_slice", ps, frame, th)  # a table with slice_id works as `expected` too
    assert ps.read_text().splitlines() == [
        "dirname,ID,ich,ivh,sah,sdh,edh",
        "ID_e00b013d9,e00b013d9_14.jpg,1,0,0,1,0",
        "ID_e00b013d9,e00b013d9_2.jpg,0,1,0,0,1",
    ]

    rsna = table(["ID_63eb1e259", "ID_2669954a7"], probs)
    kaggle = pd.read_csv(S.write_submission(rsna, "rsna", tmp_path / "rsna.csv", rsna["slice_id"].tolist()))
    assert list(kaggle.columns) == ["ID", "Label"] and len(kaggle) == 12
    got = dict(zip(kaggle["ID"], kaggle["Label"], strict=True))
    assert got["ID_63eb1e259_subdural"] == pytest.approx(0.6)
    assert got["ID_63eb1e259_intraparenchymal"] == pytest.approx(0.9)
    assert got["ID_2669954a7_epidural"] == pytest.approx(0.8)
    assert got["ID_2669954a7_any"] == pytest.approx(0.8) and got["ID_63eb1e259_any"] == pytest.approx(0.9)
    assert kaggle["ID"].tolist()[:6] == [f"ID_63eb1e259_{s}" for s in S.RSNA_ORDER]
    # The written ids are the ones the kind says the file must hold, in the same order.
    assert kaggle["ID"].tolist() == S.expected_ids(rsna["slice_id"], "rsna")
    assert lb["ID"].tolist() == S.expected_ids(ids, "leaderboard")

    back = pq.read_table(S.write_probabilities(frame, tmp_path / "p.parquet")).to_pandas()
    pd.testing.assert_frame_equal(back, frame)
    assert _leftovers(tmp_path) == ["lb.csv", "p.parquet", "ps.csv", "rsna.csv"]


def test_a_0_1_kind_needs_five_thresholds_and_kinds_are_known(tmp_path):
    frame = table(["a_0.jpg"], [[0.9] * 5])
    with pytest.raises(ValueError, match="needs thresholds. Got None"):
        S.write_submission(frame, "leaderboard", tmp_path / "sub.csv", ["a_0.jpg"])
    with pytest.raises(ValueError, match=r"thresholds must hold 5 values. Got shape \(4,\)"):
        S.write_submission(frame, "per_slice", tmp_path / "sub.csv", ["a_0.jpg"], [0.5] * 4)
    with pytest.raises(ValueError, match="Unknown submission kind 'kaggle'"):
        S.write_submission(frame, "kaggle", tmp_path / "sub.csv", ["a_0.jpg"], [0.5] * 5)
    assert _leftovers(tmp_path) == []


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_missing_slice_is_caught_and_leaves_no_file(tmp_path):
    frame = table(["a_0.jpg", "a_1.jpg"], [[0.9] * 5, [0.1] * 5])
    expected = ["a_0.jpg", "a_1.jpg", "a_2.jpg"]
    with pytest.raises(S.SubmissionError, match=r"^sub.csv: 5 expected id\(s\) missing, e.g. \['a_2_edh'"):
        S.write_submission(frame, "leaderboard", tmp_path / "sub.csv", expected, [0.5] * 5)
    with pytest.raises(S.SubmissionError, match=r"1 expected id\(s\) missing, e.g. \['a_2.jpg'\]"):
        S.write_submission(frame, "per_slice", tmp_path / "ps.csv", expected, [0.5] * 5)
    with pytest.raises(S.SubmissionError, match=r"6 expected id\(s\) missing, e.g. \['a_2.jpg_any'"):
        S.write_submission(frame, "rsna", tmp_path / "rsna.csv", expected)
    assert _leftovers(tmp_path) == []


def test_a_duplicate_slice_is_caught_and_an_older_good_file_survives(tmp_path):
    good = table(["a_0.jpg", "a_1.jpg"], [[0.9] * 5, [0.1] * 5])
    S.write_submission(good, "leaderboard", tmp_path / "sub.csv", ["a_0.jpg", "a_1.jpg"], [0.5] * 5)
    before = (tmp_path / "sub.csv").read_bytes()
    doubled = table(["a_0.jpg", "a_1.jpg", "a_1.jpg"], [[0.9] * 5, [0.1] * 5, [0.1] * 5])
    with pytest.raises(S.SubmissionError, match=r"5 duplicate id\(s\), e.g. \['a_1_ich'"):
        S.write_submission(doubled, "leaderboard", tmp_path / "sub.csv", ["a_0.jpg", "a_1.jpg"], [0.5] * 5)
    assert (tmp_path / "sub.csv").read_bytes() == before
    assert _leftovers(tmp_path) == ["sub.csv"]


def test_validate_submission_catches_header_values_and_extra_ids(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("Id,Prediction\na_0_ich,1\n")
    with pytest.raises(
        S.SubmissionError, match=r"header is \['Id', 'Prediction'\], expected \['ID', 'prediction'\]"
    ):
        S.validate_submission(path, "leaderboard", ["a_0_ich"])
    path.write_text("dirname,ID,ivh,ich,sah,sdh,edh\nd,a_0.jpg,0,0,0,0,0\n")  # columns out of order
    with pytest.raises(S.SubmissionError, match="header is"):
        S.validate_submission(path, "per_slice", ["a_0.jpg"])
    path.write_text("dirname,ID,ich,ivh,sah,sdh,edh\n ,a_0.jpg,0,0,0,0,0\n")
    with pytest.raises(S.SubmissionError, match=r"1 empty dirname cell\(s\)"):
        S.validate_submission(path, "per_slice", ["a_0.jpg"])
    path.write_text("ID,prediction\na_0_ich,2\na_0_ivh,0.5\nz_9_ich,1\n")
    with pytest.raises(S.SubmissionError) as info:
        S.validate_submission(path, "leaderboard", ["a_0_ich", "a_0_ivh"])
    assert "not 0/1" in str(info.value) and "unexpected id(s), e.g. ['z_9_ich']" in str(info.value)
    path.write_text("ID,Label\nID_a_any,1.5\nID_a_subdural,\n")
    with pytest.raises(S.SubmissionError, match=r"2 value\(s\) not probabilities in \[0, 1\]"):
        S.validate_submission(path, "rsna", ["ID_a_any", "ID_a_subdural"])
    path.write_text("ID,Label\nID_a_any,1\nID_a_subdural,0.25\n")
    assert S.validate_submission(path, "rsna", ["ID_a_any", "ID_a_subdural"]) == 2
    assert issubclass(S.SubmissionError, ValueError)


def test_expected_slices_read_from_the_shards(demo_shards):
    expected = S.expected_slices(demo_shards[1])
    dataset = SeriesDataset(demo_shards[1])
    assert len(expected) == dataset.manifest["num_slices"]
    assert set(expected["slice_id"]) == {s for i in range(len(dataset)) for s in dataset[i]["slice_ids"]}
    assert S.slice_stem("e00b013d9_14.jpg") == "e00b013d9_14" and S.slice_stem("ID_0a1b2c") == "ID_0a1b2c"

    # Of some series only: exactly the slices a dataset of those series yields.
    _, val_ids = split_series(demo_shards[0], 0.25, 0)
    val = S.expected_slices(demo_shards[0], val_ids)
    subset = SeriesDataset(demo_shards[0], val_ids)
    assert set(val["series_id"]) == set(val_ids)
    assert sorted(val["slice_id"]) == sorted(s for i in range(len(subset)) for s in subset[i]["slice_ids"])
    assert list(val.columns) == ["series_id", "position", "slice_id"] and val.index.is_monotonic_increasing


def test_kinds_table_and_constants_agree():
    assert set(S.SUBMISSION_KINDS) == {"per_slice", "leaderboard", "rsna"}
    assert S.SUBMISSION_KINDS["per_slice"].header == ("dirname", "ID", *CLASSES)
    assert [k for k, spec in S.SUBMISSION_KINDS.items() if spec.binary] == ["per_slice", "leaderboard"]
