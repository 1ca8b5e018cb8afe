"""``ichmodel.ensemble``: trial selection, averaging, thresholds, scores and ``ensemble.json``."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import fbeta_score

from ichmodel import ensemble as E
from ichmodel import fold_ensemble as FE
from ichmodel import trials as T
from ichmodel.calibration import FoldAlignment
from ichmodel.checkpoint import load_model
from ichmodel.constants import CLASSES
from ichmodel.metrics import search_thresholds
from ichmodel.predict import predict_dataset
from ichmodel.prediction_table import LABEL_COLUMNS
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
    chosen = T.select_trials(tmp_path / "trials.csv", 2)
    assert chosen["trial_id"].tolist() == ["b", "a"]
    assert chosen["checkpoint"].tolist() == [
        str(tmp_path / "b" / "checkpoint.pt"),
        str(tmp_path / "a" / "checkpoint.pt"),
    ]
    assert T.select_trials(tmp_path / "trials.csv", 10)["trial_id"].tolist() == ["b", "a", "c"]
    with pytest.raises(ValueError, match="top_k must be >= 1. Got 0"):
        T.select_trials(tmp_path / "trials.csv", 0)

    pd.DataFrame(rows[:2], columns=["trial_id", "model_f2", "checkpoint", "status"]).to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(
        ValueError, match=r"No usable trial.*gone: checkpoint .* does not exist; err: status ERROR"
    ):
        T.select_trials(tmp_path / "bad.csv", 3)
    with pytest.raises(FileNotFoundError, match="ray_jobs/tune.py"):
        T.select_trials(tmp_path / "nothing.csv", 3)


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
    with caplog.at_level("INFO", logger="ichmodel.trials"):
        chosen = T.select_trials(tmp_path / "trials.csv", 2)
    assert chosen["trial_id"].tolist() == ["b", "a"] and chosen["model_f2"].tolist() == [0.7, 0.5]
    assert "names its F2 column 'best_f2'" in caplog.text
    pd.DataFrame(rows, columns=["trial_id", "f2", "checkpoint", "status"]).to_csv(
        tmp_path / "trials.csv", index=False
    )
    with pytest.raises(ValueError, match=r"lacks columns \['model_f2'\]"):
        T.select_trials(tmp_path / "trials.csv", 2)


@pytest.mark.parametrize("bad", ["../../evil", "..", ".", "a/b", "", "x y"])
def test_a_trial_id_that_cannot_name_a_file_is_refused(tmp_path, bad):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    rows = [("ok-1.a_b", 0.5, "checkpoint.pt"), (bad, 0.9, "checkpoint.pt")]
    pd.DataFrame(rows, columns=["trial_id", "model_f2", "checkpoint"]).to_csv(
        tmp_path / "trials.csv", index=False
    )
    message = f"Invalid trial_id in {tmp_path / 'trials.csv'}: {bad!r} cannot name a file"
    with pytest.raises(ValueError, match=re.escape(message)):
        T.select_trials(tmp_path / "trials.csv", 2)
    assert T.check_file_name("train_3f2a.1-b", "trial_id") == "train_3f2a.1-b"


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
    for text, what in (("{", "is not JSON"), ("[1, 2]", "is not an ensemble spec")):  # named, for predict.py
        (tmp_path / "ensemble.json").write_text(text)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'ensemble.json'))} {what}"):
            E.EnsembleSpec.load(tmp_path)


# ------------------------------------------------------------------ member choice on OOF probabilities


def _oof_members(noise: list[float], n_series: int = 120, seed: int = 0):
    """Labels ``[N, 5]``, series ids ``[N]`` and one probability array per member: logits = signal + noise
    of the given scale (independent between members), so averaging members cancels part of the noise."""
    rng = np.random.default_rng(seed)
    series = np.repeat([f"s{i:03d}" for i in range(n_series)], 10)
    labels = (rng.random((len(series), 5)) < 0.12).astype(np.int8)
    signal = np.where(labels == 1, 1.0, -1.0)
    members = [1 / (1 + np.exp(-(signal + rng.normal(0, s, labels.shape)))) for s in noise]
    return labels, series, members


def test_top_k_ranks_members_by_their_oof_f2():
    labels, _, members = _oof_members([3.0, 0.5, 1.5, 50.0])
    assert E.top_k_members(labels, members, 2) == [1, 2]
    assert E.top_k_members(labels, members, 9) == [1, 2, 0, 3]
    with pytest.raises(ValueError, match="k must be >= 1"):
        E.top_k_members(labels, members, 0)


def test_greedy_selection_averages_equal_members_and_skips_noise():
    labels, _, members = _oof_members([1.5, 1.5, 1.5, 50.0])
    bag = E.greedy_members(labels, members, max_steps=6)
    assert 3 not in bag and len(set(bag)) >= 2
    single = max(E.tuned_f2(labels, p)[0] for p in members)
    assert E.tuned_f2(labels, E.bag_probs(members, bag))[0] > single + 0.02
    assert E.greedy_members(labels, members[3:]) == [0]  # one member: the bag is that member


def test_cross_fitted_f2_is_perfect_on_separable_data_and_not_above_the_tuned_figure():
    labels, series, members = _oof_members([1.5])
    fold = np.unique(series, return_inverse=True)[1] % 3
    assert E.cross_fitted_f2(labels, labels * 0.8 + 0.1, fold) == pytest.approx(1.0)
    assert E.cross_fitted_f2(labels, members[0], fold) <= E.tuned_f2(labels, members[0])[0] + 1e-9
    with pytest.raises(ValueError, match="at least 2 folds"):
        E.cross_fitted_f2(labels, members[0], np.zeros(len(labels)))


def test_bootstrap_interval_over_series():
    labels, series, members = _oof_members([1.5, 0.7])
    preds = {
        name: (p >= 0.5).astype(np.int8) for name, p in zip(("single", "ensemble"), members, strict=True)
    }
    out = FE.bootstrap_f2(labels, preds, series, n_boot=400, seed=1)
    for name, pred in preds.items():
        assert out[name]["f2"] == pytest.approx(fbeta_score(labels.ravel(), pred.ravel(), beta=2), rel=1e-12)
        assert out[name]["low"] < out[name]["f2"] < out[name]["high"]
    diff = out["ensemble - single"]
    assert diff["f2"] == pytest.approx(out["ensemble"]["f2"] - out["single"]["f2"])
    assert 0 < diff["low"] < diff["f2"] < diff["high"]  # the better member wins on every resample range
    same = FE.bootstrap_f2(labels, {"a": preds["single"], "b": preds["single"]}, series, n_boot=50)
    assert same["b - a"] == {"f2": 0.0, "low": 0.0, "high": 0.0}
    assert FE.bootstrap_f2(labels, preds, series, n_boot=400, seed=1) == out  # seeded


def test_average_predictions_of_tables_read_back_from_parquet(tmp_path):
    # Regression: float64 columns read from parquet give read-only arrays; averaging added into one in place.
    first = table(["a", "b"], [[0.1] * 5, [0.2] * 5], series=["s", "s"])
    first[list(CLASSES)] = first[list(CLASSES)].astype(np.float64)
    first.to_parquet(tmp_path / "a.parquet", index=False)
    back = pd.read_parquet(tmp_path / "a.parquet")
    mean = E.average_predictions([back, back.assign(**{c: back[c] + 0.2 for c in CLASSES})])
    np.testing.assert_allclose(mean[list(CLASSES)].to_numpy(), [[0.2] * 5, [0.3] * 5], rtol=1e-6)


def _oof_frames(noise: list[float], seed: int = 0) -> dict[str, pd.DataFrame]:
    labels, series, members = _oof_members(noise, seed=seed)
    frames = {}
    for i, p in enumerate(members):
        frame = table([f"{s}_{j % 10}" for j, s in enumerate(series)], p, labels, series=list(series))
        frame["position"] = np.arange(len(series)) % 10
        frame["fold"] = np.unique(series, return_inverse=True)[1] % 3
        frames[f"t{i}"] = frame.sample(frac=1.0, random_state=i)  # row order differs between members
    return frames


def test_choose_fold_ensemble_prefers_greedy_when_a_member_is_noise():
    choice, probs = FE.choose_fold_ensemble(_oof_frames([1.5, 1.2, 1.5, 50.0]), n_boot=200)
    assert choice.alignment is None and probs.shape == (1200, 5)
    assert choice.single_best == "t1" and choice.method == "greedy" and "t3" not in choice.bag
    assert choice.greedy_f2["cross_fitted"] > choice.top_k_f2["cross_fitted"]
    assert choice.ensemble_f2["tuned"] > choice.single_f2["tuned"] + 0.02
    assert choice.bootstrap["ensemble - single"]["low"] > 0
    assert choice.bootstrap["ensemble"]["f2"] == pytest.approx(choice.ensemble_f2["tuned"])
    assert len(choice.thresholds) == 5 and set(choice.per_class) == set(CLASSES)


def _scaled(probs: np.ndarray, scale: float, shift: float) -> np.ndarray:
    z = np.log(probs) - np.log1p(-probs)
    return 1 / (1 + np.exp(-(z * scale + shift)))


def test_alignment_gives_each_fold_the_ensembles_reference_scale_and_keeps_its_ranking():
    rng = np.random.default_rng(0)
    base = 1 / (1 + np.exp(-rng.normal(-1.0, 1.5, (400, 5))))
    reference = {0: _scaled(base, 0.5, -1.0), 1: _scaled(base, 2.0, 1.0), 2: _scaled(base, 1.0, 0.0)}
    reference[2][:, 4] = 0.3  # a class this fold's model never separates: shifted, not stretched
    alignment = FoldAlignment.fit(reference)
    ensemble = np.mean(list(reference.values()), axis=0)
    z_ens = np.log(ensemble) - np.log1p(-ensemble)
    np.testing.assert_allclose(alignment.ensemble, np.stack([z_ens.mean(0), z_ens.std(0)], 1), rtol=1e-9)
    for k, probs in reference.items():
        aligned = alignment.apply(probs, np.full(len(probs), k))
        z = np.log(aligned) - np.log1p(-aligned)
        np.testing.assert_allclose(z.mean(0), z_ens.mean(0), atol=1e-6)
        stretched = slice(0, 4) if k == 2 else slice(0, 5)
        np.testing.assert_allclose(z.std(0)[stretched], z_ens.std(0)[stretched], rtol=1e-6)
        for c in range(5):  # the map rises: every fold keeps its order
            order = np.argsort(probs[:, c], kind="stable")
            assert np.all(np.diff(aligned[order, c]) >= -1e-12)
    with pytest.raises(ValueError, match="No reference figures for folds \\[3\\]"):
        alignment.apply(base[:2], np.array([0, 3]))
    with pytest.raises(ValueError, match="same >= 2 reference slices"):
        FoldAlignment.fit({0: base, 1: base[:-1]})


def test_aligned_oof_rows_share_one_threshold_where_raw_fold_scales_differ():
    frames = _oof_frames([1.0, 1.0])
    rng = np.random.default_rng(1)
    ref_base = 1 / (1 + np.exp(-rng.normal(-1.5, 1.2, (300, 5))))
    moves = {0: (0.4, -2.0), 1: (2.5, 1.5), 2: (1.0, 0.0)}  # fold models trained briefly: other scales
    reference = {}
    for name, frame in frames.items():
        probs = frame[list(CLASSES)].to_numpy()
        for k, (scale, shift) in moves.items():
            rows = frame["fold"].to_numpy() == k
            probs[rows] = _scaled(probs[rows], scale, shift)
        frame[list(CLASSES)] = probs
        reference[name] = {k: _scaled(ref_base, scale, shift) for k, (scale, shift) in moves.items()}
    raw, _ = FE.choose_fold_ensemble(frames, n_boot=50)
    aligned, probs = FE.choose_fold_ensemble(frames, n_boot=50, reference=reference)
    assert aligned.ensemble_f2["cross_fitted"] > raw.ensemble_f2["cross_fitted"] + 0.05
    assert aligned.alignment["reference_slices"] == 300 and sorted(aligned.alignment["folds"]) == [0, 1, 2]
    fold = frames["t0"].sort_values(["series_id", "position"])["fold"].to_numpy()
    raw_probs = np.mean([f.sort_values(["series_id", "position"])[list(CLASSES)] for f in frames.values()], 0)

    def fold_spreads(p: np.ndarray) -> np.ndarray:  # [3 folds, 5] logit sd of each fold's rows
        return np.array([(np.log(p[fold == k]) - np.log1p(-p[fold == k])).std(0) for k in range(3)])

    assert np.all(fold_spreads(raw_probs).max(0) / fold_spreads(raw_probs).min(0) > 3)
    assert np.all(fold_spreads(probs).max(0) / fold_spreads(probs).min(0) < 1.3)  # now they spread alike
    with pytest.raises(ValueError, match="lack members or folds: \\['t1'\\]"):
        FE.choose_fold_ensemble(frames, reference={"t0": reference["t0"]})


def test_choose_fold_ensemble_refuses_members_over_other_slices():
    frames = _oof_frames([1.0, 1.0])
    frames["t1"] = frames["t1"].iloc[:-10]
    with pytest.raises(ValueError, match="covers other slices"):
        FE.choose_fold_ensemble(frames)
