"""``ichmodel.predict``: per-slice probabilities, flip and reversed-sequence TTA, model averaging, series summaries,
and ``ray_jobs/predict.py`` on a folder of real (pydicom's CT_small.dcm) and generated DICOM studies."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ichmodel.augment import normalize, to_float
from ichmodel.checkpoint import load_model
from ichmodel.config import AugmentConfig
from ichmodel.constants import CLASSES
from ichmodel.dataset import SeriesDataset, collate_series
from ichmodel.predict import eval_outputs, predict_dataset, resolve_tta, reverse_padded, series_probs
from ichmodel.prediction_table import KEY_COLUMNS, LABEL_COLUMNS, prediction_arrays, summarize_series
from tests.datagen import small_dataset, write_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
REVERSING = AugmentConfig(reverse_prob=0.5)  # a model trained with reversed series


@pytest.fixture(scope="module")
def model_and_data(demo_shards, tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", demo_shards[0], seed=1)
    model, _, _ = load_model(ckpt)
    return model, demo_shards, ckpt


def test_reverse_padded_reverses_only_the_valid_part_and_is_its_own_inverse():
    x = torch.arange(8).view(2, 4)  # [B=2, T=4]
    out = reverse_padded(x, torch.tensor([3, 4]))
    assert out.tolist() == [[2, 1, 0, 3], [7, 6, 5, 4]]
    y = torch.randn(3, 5, 2, 4, 4)
    lengths = torch.tensor([5, 1, 3])
    assert torch.equal(reverse_padded(reverse_padded(y, lengths), lengths), y)
    with pytest.raises(ValueError, match="lengths must be in"):
        reverse_padded(x, torch.tensor([5, 1]))


def test_predictions_cover_every_slice_with_the_shards_labels_and_match_the_model(model_and_data):
    model, (train_shards, _), _ = model_and_data
    dataset = SeriesDataset(train_shards)
    frame = predict_dataset(model, dataset, batch_size=8)
    table = pq.read_table(train_shards / "shard-00000.parquet").to_pandas()  # independent read of the shards
    assert list(frame.columns) == [*KEY_COLUMNS, *CLASSES, *LABEL_COLUMNS]
    assert len(frame) == dataset.manifest["num_slices"] == len(table)
    merged = frame.merge(table, on=["series_id", "position"], validate="one_to_one")
    assert (merged["slice_id_x"] == merged["slice_id_y"]).all()
    labels = np.stack(merged["labels"].to_numpy())
    assert np.array_equal(merged[list(LABEL_COLUMNS)].to_numpy(), labels)
    probs, got_labels = prediction_arrays(frame)
    assert got_labels is not None and ((probs >= 0) & (probs <= 1)).all()
    # One series through the model directly (batch of 1, no padding) gives the same numbers.
    item = dataset[2]
    direct = series_probs(
        model, normalize(to_float(item["images"][None])), torch.tensor([len(item["slice_ids"])])
    )[0]
    rows = frame[frame["series_id"] == item["series_id"]]
    # Probabilities lie in [0, 1]; batch of 1 vs batch of 8 may pick other CPU kernels: 1e-4 of that scale.
    np.testing.assert_allclose(rows[list(CLASSES)].to_numpy(), direct.numpy(), rtol=0, atol=1e-4)


def test_unlabelled_shards_give_no_label_columns(model_and_data):
    model, (_, test_shards), _ = model_and_data
    frame = predict_dataset(model, SeriesDataset(test_shards))
    assert list(frame.columns) == [*KEY_COLUMNS, *CLASSES]
    assert prediction_arrays(frame)[1] is None
    assert frame.groupby("series_id")["position"].apply(lambda p: list(p) == list(range(len(p)))).all()


def test_averaging_identical_models_equals_the_single_model(model_and_data):
    model, (train_shards, _), ckpt = model_and_data
    dataset = small_dataset(train_shards, 1)
    single = predict_dataset(model, dataset)
    copies = [load_model(ckpt)[0] for _ in range(2)]
    averaged = predict_dataset(copies, dataset, batch_size=2)
    np.testing.assert_allclose(
        averaged[list(CLASSES)].to_numpy(), single[list(CLASSES)].to_numpy(), rtol=0, atol=1e-4
    )


def test_reversal_tta_averages_forward_and_reversed_sequences(model_and_data):
    model, (train_shards, _), _ = model_and_data
    dataset = small_dataset(train_shards, 1)
    plain = predict_dataset(model, dataset)
    tta = predict_dataset(model, dataset, tta="reverse", trained=REVERSING)
    item = dataset[0]
    images = normalize(to_float(item["images"][None]))  # [1, T, C, H, W]
    length = torch.tensor([images.shape[1]])
    forward = series_probs(model, images, length)[0]
    backward = series_probs(model, images.flip(1), length)[0].flip(0)
    rows = tta[tta["series_id"] == item["series_id"]][list(CLASSES)].to_numpy()
    np.testing.assert_allclose(rows, ((forward + backward) / 2).numpy(), rtol=0, atol=1e-4)
    assert not np.allclose(tta[list(CLASSES)].to_numpy(), plain[list(CLASSES)].to_numpy(), atol=1e-4)
    # In a padded batch each series is reversed within its own length: padding does not leak in.
    short = {**item, "images": item["images"][:5], "labels": item["labels"][:5]}
    batch = collate_series([item, short])
    batch_probs = series_probs(
        model, normalize(to_float(batch["images"])), batch["lengths"], tta=("reverse",)
    )
    np.testing.assert_allclose(batch_probs[0].numpy(), rows, rtol=0, atol=1e-4)
    short_images = normalize(to_float(short["images"][None]))
    fwd = series_probs(model, short_images, torch.tensor([5]))[0]
    bwd = series_probs(model, short_images.flip(1), torch.tensor([5]))[0].flip(0)
    np.testing.assert_allclose(batch_probs[1, :5].numpy(), ((fwd + bwd) / 2).numpy(), rtol=0, atol=1e-4)


def test_flip_tta_is_identity_on_a_symmetric_input_and_not_on_an_asymmetric_one(model_and_data):
    model = model_and_data[0]
    item = small_dataset(model_and_data[1][0], 1)[0]
    images = normalize(to_float(item["images"][None]))  # [1, T, C, H, W]
    length = torch.tensor([images.shape[1]])
    symmetric = 0.5 * (images + images.flip(-1))  # left-right symmetric slices
    plain = series_probs(model, symmetric, length)
    flipped = series_probs(model, symmetric, length, tta=("flip",))
    torch.testing.assert_close(flipped, plain, rtol=1e-4, atol=1e-6)
    asymmetric = images.clone()
    asymmetric[..., : images.shape[-1] // 2] = images.amax()  # one bright half
    plain = series_probs(model, asymmetric, length)
    flipped = series_probs(model, asymmetric, length, tta=("flip",))
    mirror = series_probs(model, asymmetric.flip(-1), length)
    torch.testing.assert_close(flipped, 0.5 * (plain + mirror), rtol=1e-4, atol=1e-6)
    assert (flipped - plain).abs().max() > 1e-3 * plain.abs().max()


def test_tta_true_means_flip_and_reversal_needs_reversed_training():
    assert resolve_tta(True) == ("flip",) and resolve_tta(False) == () and resolve_tta(None) == ()
    assert resolve_tta(["reverse", "flip"], REVERSING) == ("flip", "reverse")
    with pytest.raises(ValueError, match="reverse_prob=0.0"):
        resolve_tta(("reverse",), AugmentConfig())  # the default training never reverses
    with pytest.raises(ValueError, match="saved augment configs"):
        resolve_tta("reverse")
    with pytest.raises(ValueError, match="trained without flips"):
        resolve_tta(True, [AugmentConfig(), AugmentConfig(flip_prob=0.0)])
    with pytest.raises(ValueError, match="Unknown test-time augmentation"):
        resolve_tta(("rotate",))


def test_eval_outputs_run_in_eval_mode_without_gradients(model_and_data):
    model, (train_shards, _), _ = model_and_data
    batch = collate_series([small_dataset(train_shards, 2)[i] for i in range(2)])
    images = normalize(to_float(batch["images"]))
    model.train()
    outputs = eval_outputs(model, images, batch["lengths"])
    assert not model.training  # dropout off: the same batch gives the same numbers
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in outputs.values())
    torch.testing.assert_close(
        eval_outputs(model, images, batch["lengths"])["mc_logits"], outputs["mc_logits"]
    )
    probs = series_probs(model, images, batch["lengths"])
    mc, ac = torch.sigmoid(outputs["mc_logits"]), torch.sigmoid(outputs["ac_logits"])
    assert model.cfg.prediction == "mc+ac"  # the default
    torch.testing.assert_close(probs, (mc + ac) / 2)


def test_predict_dataset_rejects_bad_arguments(model_and_data):
    model, (train_shards, _), _ = model_and_data
    with pytest.raises(ValueError, match="at least one model"):
        predict_dataset([], SeriesDataset(train_shards))
    with pytest.raises(ValueError, match="max_slices=4"):
        predict_dataset(model, SeriesDataset(train_shards, max_slices=4))


def test_summarize_series_golden():
    frame = pd.DataFrame(
        {
            "series_id": ["b", "a", "a", "a"],
            "position": [0, 0, 1, 2],
            "slice_id": ["b0", "a0", "a1", "a2"],
            "ich": [0.9, 0.1, 0.6, 0.2],
            "ivh": [0.0, 0.3, 0.3, 0.8],
            "sah": 0.0,
            "sdh": 0.0,
            "edh": [0.0, 0.0, 0.0, 0.5],
        }
    )
    summary = summarize_series(frame, [0.5, 0.5, 0.5, 0.5, 0.5]).set_index("series_id")
    assert list(summary.index) == ["a", "b"]
    assert summary.loc["a", "num_slices"] == 3 and summary.loc["b", "num_slices"] == 1
    assert summary.loc["a", "max_ich"] == pytest.approx(0.6) and summary.loc["a", "max_ivh"] == pytest.approx(
        0.8
    )
    assert (
        summary.loc["a", "positive_ich"],
        summary.loc["a", "positive_ivh"],
        summary.loc["a", "positive_edh"],
    ) == (1, 1, 1)
    assert summary.loc["a", "positive_any"] == 2  # slices a1 and a2
    assert summary.loc["b", "positive_any"] == 1
    with pytest.raises(ValueError, match="5 values"):
        summarize_series(frame, [0.5, 0.5])


def test_predict_job_on_a_folder_of_dicom_studies(model_and_data, tmp_path):
    from pydicom.data import get_testdata_file

    from ichmodel.synth import write_dicom_folder

    _, _, ckpt = model_and_data
    studies = tmp_path / "studies"
    write_dicom_folder(studies / "generated", 2, (3, 5), 32, 7)
    shutil.copy(get_testdata_file("CT_small.dcm"), studies / "CT_small.dcm")  # real CT, 128², one slice
    (studies / "readme.txt").write_text("not a DICOM file")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "ray_jobs/predict.py",
            "--checkpoint",
            str(ckpt),
            "--input",
            str(studies),
            "--out",
            str(out),
            "--tta",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "skipped 1 file(s)" in proc.stdout and "readme.txt: not a readable DICOM file" in proc.stdout
    summary = pd.read_csv(out / "series_summary.csv")
    assert len(summary) == 3
    assert "CT_small.dcm" in summary["first_slice"].tolist()
    per_slice = pd.read_csv(out / "per_slice.csv")
    assert list(per_slice.columns) == ["dirname", "ID", *CLASSES]
    assert sorted(summary["num_slices"]) == sorted(per_slice.groupby("dirname").size())
    assert per_slice["ID"].is_unique and "CT_small.dcm" in set(per_slice["ID"])
    manifest = SeriesDataset(out / "shards").manifest
    assert manifest["size"] == 32 and manifest["num_slices"] == len(per_slice)  # the training image size
    probs = pd.read_csv(out / "probabilities.csv")[list(CLASSES)].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert "CT_small.dcm" in proc.stdout  # the printed per-series table
    # the viewer of the same predictions: one row per series, at the checkpoint's thresholds, thumbnails
    viewer = (out / "viewer" / "index.html").read_text()
    assert viewer.count('<section class="series"') == len(summary)
    assert all(f"<h2>{sid}</h2>" in viewer for sid in summary["series_id"])
    assert f"viewer: {out / 'viewer' / 'index.html'}" in proc.stdout
