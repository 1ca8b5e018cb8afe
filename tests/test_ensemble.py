"""``ichmodel.ensemble``: trial selection, averaging, thresholds, scores and ``ensemble.json``."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import fbeta_score

from ichmodel import ensemble as E
from ichmodel.checkpoint import load_model
from ichmodel.constants import CLASSES
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
    pd.DataFrame(rows, columns=["trial_id", "model_f2", "checkpoint", "status"]).to_csv(
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

    pd.DataFrame(rows[:2], columns=["trial_id", "model_f2", "checkpoint", "status"]).to_csv(
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


def test_select_trials_reads_a_table_with_the_older_best_f2_column(tmp_path, caplog):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(b"x")
    rows = [("a", 0.5, "a/checkpoint.pt", "OK"), ("b", 0.7, "b/checkpoint.pt", "OK")]
    pd.DataFrame(rows, columns=["trial_id", "best_f2", "checkpoint", "status"]).to_csv(
        tmp_path / "trials.csv", index=False
    )
    with caplog.at_level("INFO", logger="ichmodel.ensemble"):
        chosen = E.select_trials(tmp_path / "trials.csv", 2)
    assert chosen["trial_id"].tolist() == ["b", "a"] and chosen["model_f2"].tolist() == [0.7, 0.5]
    assert "names its F2 column 'best_f2'" in caplog.text
    pd.DataFrame(rows, columns=["trial_id", "f2", "checkpoint", "status"]).to_csv(
        tmp_path / "trials.csv", index=False
    )
    with pytest.raises(ValueError, match=r"lacks columns \['model_f2'\]"):
        E.select_trials(tmp_path / "trials.csv", 2)


@pytest.mark.parametrize("bad", ["../../evil", "..", ".", "a/b", "", "x y"])
def test_a_trial_id_that_cannot_name_a_file_is_refused(tmp_path, bad):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    rows = [("ok-1.a_b", 0.5, "checkpoint.pt"), (bad, 0.9, "checkpoint.pt")]
    pd.DataFrame(rows, columns=["trial_id", "model_f2", "checkpoint"]).to_csv(
        tmp_path / "trials.csv", index=False
    )
    message = f"Invalid trial_id in {tmp_path / 'trials.csv'}: {bad!r} cannot name a file"
    with pytest.raises(ValueError, match=re.escape(message)):
        E.select_trials(tmp_path / "trials.csv", 2)
    assert E.check_file_name("train_3f2a.1-b", "trial_id") == "train_3f2a.1-b"


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
