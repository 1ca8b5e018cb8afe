from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from PIL import Image

from ichmodel import synth
from ichmodel.constants import CLASSES


def _blood_pixels(hu: np.ndarray) -> np.ndarray:
    """Pixels per slice in the blood range; brain (≤ 38 HU, noise σ 4) almost never reaches 58 HU."""
    return ((hu >= 58) & (hu <= 90)).sum(axis=(1, 2))


def test_generate_series_shapes_and_tissues():
    hu, labels = synth.generate_series(np.random.default_rng(0), 12, 64)
    assert hu.shape == (12, 64, 64) and hu.dtype == np.float32
    assert labels.shape == (12, 5) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    middle = hu[6]
    assert np.median(middle[:4, :4]) < -950  # air in the corner
    assert (middle > 900).sum() > 50  # skull
    centre = middle[28:36, 28:36]
    assert -10 < np.median(centre) < 60  # brain or ventricle, not air or bone


def test_generate_series_is_seeded():
    a = synth.generate_series(np.random.default_rng(3), 6, 32)
    b = synth.generate_series(np.random.default_rng(3), 6, 32)
    c = synth.generate_series(np.random.default_rng(4), 6, 32)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_labels_agree_with_pixels_and_span_neighbouring_slices():
    rng = np.random.default_rng(1)
    runs = []
    for _ in range(40):
        hu, labels = synth.generate_series(rng, 20, 64)
        blood = _blood_pixels(hu)
        positive = labels.max(axis=1) == 1
        assert (blood[positive] >= 3).all()
        assert (blood[~positive] <= 1).all()
        for c in range(len(CLASSES)):
            padded = np.concatenate([[0], labels[:, c], [0]])
            starts, ends = np.flatnonzero(np.diff(padded) == 1), np.flatnonzero(np.diff(padded) == -1)
            runs.extend(ends - starts)
    assert np.mean(runs) >= 3  # lesions cover several neighbouring slices


def test_lesions_shrink_towards_their_ends():
    rng = np.random.default_rng(2)
    shrinking = total = 0
    for _ in range(30):
        hu, labels = synth.generate_series(rng, 24, 64)
        ich = np.flatnonzero(labels[:, CLASSES.index("ich")])
        if len(ich) >= 5:
            area = _blood_pixels(hu)[ich]
            total += 1
            shrinking += area[len(area) // 2] > max(area[0], area[-1])
    assert total >= 3 and shrinking / total >= 0.7


def test_label_rates_resemble_the_real_data():
    rng = np.random.default_rng(5)
    all_labels = [synth.generate_series(rng, int(rng.integers(20, 31)), 64)[1] for _ in range(80)]
    rates = synth._rates(all_labels)
    assert 0.25 <= rates["any"] <= 0.5
    assert 0.08 <= rates["sdh"] <= 0.26  # the most common class in DLCV (16%)
    assert rates["edh"] < rates["sdh"]  # epidural is the rarest


def test_generate_series_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_slices must be >= 1. Got 0"):
        synth.generate_series(np.random.default_rng(0), 0, 64)
    with pytest.raises(ValueError, match="size must be >= 16"):
        synth.generate_series(np.random.default_rng(0), 4, 8)


def test_write_rsna_dataset(tmp_path):
    summary = synth.write_rsna_dataset(
        tmp_path, num_patients=3, slices=(4, 5), size=32, seed=0, duplicate_rows=2
    )
    files = sorted((tmp_path / "stage_2_train").iterdir())
    assert len(files) == summary.num_slices and 12 <= summary.num_slices <= 15
    assert all(f.name.startswith("ID_") and f.suffix == ".dcm" and len(f.stem) == 12 for f in files)
    with open(tmp_path / "stage_2_train.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Label"]
    assert len(rows) - 1 == 6 * summary.num_slices + 2
    subtypes = {r[0].rsplit("_", 1)[1] for r in rows[1:]}
    assert subtypes == set(synth.RSNA_CSV_SUBTYPES)
    bits = set()
    series = set()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "CT"
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1 and ds.BitsAllocated == 16
        assert ds.pixel_array.shape == (32, 32)
        bits.add(int(ds.BitsStored))
        series.add(ds.SeriesInstanceUID)
    assert bits == {12, 16} and len(series) == 3


def test_write_rsna_dataset_any_is_the_max_of_the_five(tmp_path):
    synth.write_rsna_dataset(tmp_path, num_patients=4, slices=(6, 8), size=32, seed=1)
    by_slice: dict[str, dict[str, int]] = {}
    with open(tmp_path / "stage_2_train.csv") as f:
        for row in list(csv.reader(f))[1:]:
            slice_id, subtype = row[0].rsplit("_", 1)
            by_slice.setdefault(slice_id, {})[subtype] = int(row[1])
    for values in by_slice.values():
        assert values["any"] == max(v for k, v in values.items() if k != "any")


def test_write_dlcv_dataset(tmp_path):
    summary = synth.write_dlcv_dataset(
        tmp_path, num_patients=2, slices=(11, 12), size=32, seed=0, test_patients=1
    )
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dirname", "ID", "ich", "ivh", "sah", "sdh", "edh"]
    assert len(rows) - 1 == summary.num_slices
    dirname, name = rows[1][0], rows[1][1]
    assert dirname == f"ID_{name.split('_')[0]}"
    assert [r[1].rsplit("_", 1)[1] for r in rows[1:4]] == ["0.jpg", "1.jpg", "10.jpg"]  # sorted as text
    image = Image.open(tmp_path / "train" / dirname / name)
    assert image.mode == "L" and image.size == (32, 32)
    test_dirs = list((tmp_path / "test").iterdir())
    assert len(test_dirs) == 1 and not {r[0] for r in rows[1:]} & {d.name for d in test_dirs}


def test_cli_writes_both_layouts(tmp_path, capsys):
    rc = synth.main(
        ["--format", "both", "--out", str(tmp_path), "--patients", "2", "--slices", "3-4", "--size", "32"]
    )
    assert rc == 0
    assert (tmp_path / "rsna" / "stage_2_train.csv").is_file()
    assert (tmp_path / "dlcv" / "train.csv").is_file()
    assert "rsna: 2 series" in capsys.readouterr().out


def test_cli_rejects_bad_range(tmp_path):
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path), "--slices", "a-b"])
