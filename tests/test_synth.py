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


# --------------------------------------------------------------------------------------------------
# Difficulty
# --------------------------------------------------------------------------------------------------

_ANATOMY_HU = np.array([-1000.0, 35.0, 1200.0, 28.0, 38.0, 8.0, 6.0, 18.0])  # every lesion-free value


def _lesion_pixels(hu: np.ndarray) -> np.ndarray:
    """Lesion pixels of a noise-free volume: those no anatomy value explains."""
    return ~np.isclose(hu[..., None], _ANATOMY_HU, atol=1e-3).any(axis=-1)


def _series(difficulty: synth.Difficulty, n: int, seed: int = 0, slices: int = 14, size: int = 32) -> list:
    rng = np.random.default_rng(seed)
    return [synth.generate_series(rng, slices, size, difficulty=difficulty) for _ in range(n)]


def test_default_preset_is_the_generator_of_before_bit_for_bit():
    hu, labels = synth.generate_series(np.random.default_rng(7), 10, 32)
    # golden values of the generator before Difficulty existed (main at 23ed633)
    assert float(hu.astype(np.float64).sum()) == pytest.approx(-5034160.683104038, rel=1e-12)
    assert labels.sum(axis=0).tolist() == [0, 0, 0, 5, 0]
    again = synth.generate_series(np.random.default_rng(7), 10, 32, difficulty=synth.PRESETS["default"])
    np.testing.assert_array_equal(hu, again[0])
    np.testing.assert_array_equal(labels, again[1])
    assert synth.get_difficulty("default") == synth.Difficulty()


def test_lesion_contrast_follows_the_blood_density():
    means = []
    for blood in ((70.0, 80.0), (55.0, 60.0), (44.0, 48.0)):
        volumes = _series(synth.Difficulty(blood_hu=blood, faint_hu=blood, noise_hu=0.0), 30)
        lesion = np.concatenate([hu[_lesion_pixels(hu)] for hu, _ in volumes])
        assert lesion.size > 100
        means.append(float(lesion.mean()))
        assert blood[0] - 1e-3 <= means[-1] <= blood[1] + 1e-3
    contrast = np.array(means) - 28.0  # against white matter
    assert contrast[0] > contrast[1] > contrast[2] > 0


def test_faint_classes_take_the_faint_density_only():
    d = synth.Difficulty(faint_classes=("edh",), faint_hu=(45.0, 46.0), noise_hu=0.0, prevalence=3.0)
    faint = normal = 0
    for hu, labels in _series(d, 20, seed=3):
        values = hu[_lesion_pixels(hu)]
        faint += int(((values >= 45.0) & (values <= 46.0)).sum())
        normal += int(((values >= 60.0) & (values <= 80.0)).sum())
        only_edh = labels[:, CLASSES.index("edh")].astype(bool) & (labels.sum(axis=1) == 1)
        if only_edh.any():  # a slice whose only lesion is an EDH holds faint blood only
            lesion = _lesion_pixels(hu[only_edh]) & (hu[only_edh] > 30.0)
            assert (hu[only_edh][lesion] <= 46.0 + 1e-3).all()
    assert faint > 100 and normal > 100


@pytest.mark.parametrize("factor", [0.4, 2.0])
def test_prevalence_scales_the_series_with_each_class(factor):
    def series_rates(difficulty: synth.Difficulty) -> np.ndarray:
        labels = [lab for _, lab in _series(difficulty, 200, seed=11, slices=12, size=32)]
        return np.mean([lab.max(axis=0) for lab in labels], axis=0)  # [5] share of series with each class

    base = series_rates(synth.Difficulty())
    scaled = series_rates(synth.Difficulty(prevalence=factor))
    expected = np.minimum(1.0, np.array([synth.LESION_SERIES_PROB[c] for c in CLASSES]) * factor)
    ratio = expected / np.array([synth.LESION_SERIES_PROB[c] for c in CLASSES])
    # labels need a few pixels, so a drawn lesion shows in most (not all) series: compare to the base rates
    np.testing.assert_allclose(scaled.sum() / base.sum(), (base * ratio).sum() / base.sum(), rtol=0.2)
    assert synth.Difficulty(prevalence=factor).series_prob("ich") == pytest.approx(expected[0], rel=1e-9)


def test_extent_in_slices_and_in_plane():
    def lesion_shape(difficulty: synth.Difficulty) -> tuple[float, float]:
        runs, areas = [], []
        for hu, labels in _series(difficulty, 40, seed=4, slices=24, size=48):
            areas.extend(_lesion_pixels(hu).sum(axis=(1, 2))[labels.max(axis=1) == 1])
            for c in range(len(CLASSES)):
                padded = np.concatenate([[0], labels[:, c], [0]])
                runs.extend(np.flatnonzero(np.diff(padded) == -1) - np.flatnonzero(np.diff(padded) == 1))
        return float(np.mean(runs)), float(np.mean(areas))

    short_run, _ = lesion_shape(synth.Difficulty(half_extent=(0.05, 0.1), noise_hu=0.0))
    long_run, base_area = lesion_shape(synth.Difficulty(half_extent=(0.25, 0.35), noise_hu=0.0))
    _, small_area = lesion_shape(synth.Difficulty(half_extent=(0.25, 0.35), in_plane=0.5, noise_hu=0.0))
    assert long_run > 2 * short_run
    assert small_area < 0.7 * base_area


def test_noise_sets_the_pixel_noise():
    for noise in (1.0, 6.0):
        hu, _ = synth.generate_series(
            np.random.default_rng(0), 4, 64, difficulty=synth.Difficulty(noise_hu=noise)
        )
        corner = hu[:, :6, :6] + 1000.0  # air: -1000 HU plus noise
        assert float(corner.std()) == pytest.approx(noise, rel=0.15)


def test_series_length_overrides_the_writers_range(tmp_path):
    summary = synth.write_dlcv_dataset(
        tmp_path, 3, slices=(20, 40), size=16, difficulty=synth.Difficulty(series_length=(5, 6))
    )
    assert 15 <= summary.num_slices <= 18


def test_hard_preset_is_fainter_thinner_and_rarer_than_default():
    rates = {}
    for name in ("default", "hard"):
        labels = [lab for _, lab in _series(synth.PRESETS[name], 80, seed=5, slices=16, size=48)]
        rates[name] = synth._rates(labels)
    assert rates["hard"]["any"] < 0.75 * rates["default"]["any"]  # few positives
    for c in ("sah", "edh"):
        assert rates["hard"][c] < 0.6 * rates["default"][c]
    hard = synth.PRESETS["hard"]
    assert {"sah", "edh"} <= set(hard.faint_classes)
    faint_contrast = np.mean(hard.faint_hu) - 38.0  # against cortex, where SAH and EDH lie
    assert faint_contrast < 0.5 * (np.mean(synth.PRESETS["default"].blood_hu) - 38.0)
    assert hard.noise_hu > synth.PRESETS["default"].noise_hu
    easy = synth.PRESETS["easy"]
    assert min(easy.blood_hu) >= max(synth.PRESETS["default"].blood_hu) - 10 and easy.noise_hu < 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"faint_classes": ("xyz",)}, "faint_classes must name classes"),
        ({"blood_hu": (80.0, 60.0)}, "blood_hu must be a range"),
        ({"prevalence": 0.0}, "prevalence must be > 0"),
        ({"noise_hu": -1.0}, "noise_hu must be >= 0"),
        ({"series_length": (0, 3)}, "series_length must be A-B"),
    ],
)
def test_difficulty_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synth.Difficulty(**kwargs)
    with pytest.raises(ValueError, match="Unknown difficulty 'medium'"):
        synth.get_difficulty("medium")


def test_cli_writes_a_named_difficulty(tmp_path, capsys):
    rc = synth.main(
        [
            "--format",
            "dlcv",
            "--out",
            str(tmp_path),
            "--patients",
            "2",
            "--slices",
            "3-4",
            "--size",
            "16",
            "--difficulty",
            "hard",
        ]
    )
    assert rc == 0 and (tmp_path / "train.csv").is_file()
