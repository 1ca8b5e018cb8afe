from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ichmodel import decode, readers
from ichmodel import preprocess as pp
from ichmodel import slice_images as si
from ichmodel.constants import DEFAULT_WINDOWS
from ichmodel.shards import SHARD_SCHEMA, load_manifest
from tests import datagen


def _skipped_csv(out) -> dict[str, str]:
    with open(out / "skipped.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason"]
    return {r[0]: r[1] for r in rows[1:]}


def _reference_windows(hu: np.ndarray) -> np.ndarray:
    out = []
    for level, width in DEFAULT_WINDOWS:
        out.append(np.clip(np.round((hu - (level - width / 2)) / width * 255), 0, 255))
    return np.stack(out, axis=-1)


def test_block_sum_stays_in_16_bits_only_when_the_sums_fit():
    image = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]], np.uint16)
    summed = si.block_sum(image, 2)
    assert summed.dtype == np.uint16 and summed.tolist() == [[14, 22], [46, 54]]
    assert si.block_sum(np.full((4, 4), 4095, np.uint16), 4).tolist() == [[65520]]  # 12-bit x 16 fits
    big = si.block_sum(np.full((4, 4), 3000, np.int16), 4)  # 48000 does not fit int16
    assert big.dtype == np.int32 and big.tolist() == [[48000]]
    negative = si.block_sum(np.array([[-2000, -2000], [-2000, 5]], np.int16), 2)
    assert negative.dtype == np.int16 and negative.tolist() == [[-5995]]
    assert si.block_sum(np.full((2, 2), 255, np.uint8), 2).tolist() == [[1020]]  # uint8 widened
    with pytest.raises(ValueError, match="multiple of 3"):
        si.block_sum(image, 3)
    odd = np.random.default_rng(1).integers(-3000, 3000, (15, 15)).astype(np.int16)
    for factor in (1, 3, 5):
        side = 15 // factor
        expected = odd.astype(np.int64).reshape(side, factor, side, factor).sum(axis=(1, 3))
        np.testing.assert_array_equal(si.block_sum(odd, factor), expected)


def test_integer_resize_matches_the_float_block_mean_within_one_grey_level():
    rng = np.random.default_rng(0)
    windows = pp.PreprocessOptions().windows
    for dtype, low, high in ((np.int16, -2000, 3000), (np.uint16, 0, 4095), (np.int32, -3024, 30000)):
        stored = rng.integers(low, high, size=(64, 64)).astype(dtype)
        for factor in (1, 2, 4):
            mean = (
                stored.reshape(64 // factor, factor, 64 // factor, factor)
                .astype(np.float64)
                .mean(axis=(1, 3))
            )
            expected = decode.apply_windows(mean, windows, 1.0, -1024.0).astype(int)
            summed = si.block_sum(stored, factor) if factor > 1 else stored
            got = decode.apply_windows(summed, windows, 1.0 / factor**2, -1024.0).astype(int)
            assert np.abs(got - expected).max() <= 1


def _reference_slice(stored: np.ndarray, slope: float, intercept: float, size: int) -> np.ndarray:
    """The float path written out: HU in float64 → padded with its minimum → block mean (integer factor) or
    antialiased bilinear → windows rounded half up."""
    import torch
    import torch.nn.functional as F

    hu = si.pad_square(stored.astype(np.float64) * slope + intercept, stored.min() * slope + intercept)
    side = hu.shape[0]
    if side % size == 0:
        hu = hu.reshape(size, side // size, size, side // size).mean(axis=(1, 3))
    else:
        hu = F.interpolate(
            torch.from_numpy(hu)[None, None],
            (size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0, 0].numpy()
    return _reference_windows(hu)


def test_fast_path_matches_the_float_reference_within_one_grey_level(tmp_path):
    # Block sum + table lookup (integer factors) and float bilinear (others) against float HU all the way,
    # on CT-like stored values (air, tissue, bone, padding; noise) with rescale slopes and intercepts.
    from ichmodel import synth

    rng = np.random.default_rng(7)
    cases = [  # (rows, cols), size, slope, intercept, bits stored / representation
        ((64, 64), 32, 1.0, -1024.0, 16), ((64, 64), 16, 0.5, -1024.0, 16), ((64, 64), 64, 2.0, -3000.0, 16),
        ((64, 64), 48, 1.0, -1024.0, 16), ((63, 63), 21, 0.25, -1000.0, 16), ((63, 63), 20, 1.0, -1024.0, 12),
        ((50, 64), 32, 1.0, -1024.0, 12), ((45, 37), 9, 1.5, -2048.0, 16), ((45, 37), 15, 1.0, -1024.0, 12),
    ]  # fmt: skip
    for i, (shape, size, slope, intercept, bits) in enumerate(cases):
        hu = rng.choice([-1000.0, -60.0, 35.0, 75.0, 1200.0], shape) + rng.normal(0, 15, shape)
        stored = np.rint((hu - intercept) / slope)
        stored[:2, :] = -2000 if bits == 16 else 0  # the padding some scanners write outside the circle
        stored = stored.astype(np.int16) if bits == 16 else np.clip(stored, 0, 4095).astype(np.uint16)
        ds = synth.make_ct_dataset(
            stored, study_uid="1.2", series_uid="1.2.3", sop_uid=f"1.2.3.{i}", z_mm=0, instance_number=1,
            patient_id="x", bits_stored=bits, pixel_representation=int(bits == 16), intercept=intercept,
        )  # fmt: skip
        ds.RescaleSlope = slope
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
        got = si.dicom_slice_image(tmp_path / f"{i}.dcm", pp.PreprocessOptions(size=size))
        expected = _reference_slice(stored, slope, intercept, size)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - expected).max() <= 1, (shape, size, slope, intercept, bits)


def test_resize_square_block_mean_and_bilinear():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(si.resize_square(image, 2), [[2.5, 4.5], [10.5, 12.5]])
    assert si.resize_square(image, 3).shape == (3, 3)
    assert si.resize_square(image, 4) is image
    padded = si.pad_square(np.ones((2, 4), np.float32), -5.0)
    assert padded.shape == (4, 4) and padded[0].tolist() == [-5.0] * 4 and padded[1].tolist() == [1.0] * 4


def test_options_are_validated():
    with pytest.raises(ValueError, match="Got 4"):
        pp.PreprocessOptions(size=4)
    with pytest.raises(ValueError, match="width > 0"):
        pp.PreprocessOptions(windows=((40, 0),))
    assert pp.PreprocessOptions(windows=[[40, 80]]).windows == ((40.0, 80.0),)


def test_round_trip_dicom_to_parquet_matches_windowed_hu(tmp_path):
    datagen.rsna(tmp_path / "in", patients=2, slices=(3, 4))
    result = readers.read_input("rsna", tmp_path / "in")
    manifest = pp.preprocess(result, tmp_path / "out", pp.PreprocessOptions(size=datagen.SIZE))
    assert manifest["num_series"] == 2 and manifest["num_skipped"] == 0
    for shard in manifest["shards"]:
        pf = pq.ParquetFile(tmp_path / "out" / shard["file"])
        for entry in shard["series"]:
            table = pf.read_row_group(entry["row_group"])
            series = next(s for s in result.series if s.series_id == entry["series_id"])
            assert table.column("slice_id").to_pylist() == [s.slice_id for s in series.slices]
            for row, record in zip(table.to_pylist(), series.slices, strict=True):
                shape = (row["height"], row["width"], row["channels"])
                image = np.frombuffer(row["image"], np.uint8).reshape(shape)
                expected = _reference_windows(decode.load_dicom_hu(record.path))
                assert np.abs(image.astype(int) - expected).max() <= 1
                assert row["labels"] == list(record.labels)


def test_resized_dicom_matches_windowed_block_mean_hu(tmp_path):
    from pydicom.data import get_testdata_file

    from ichmodel import synth

    synth.write_dicom_folder(tmp_path, num_patients=1, slices=(2, 2), size=datagen.SIZE, seed=4)
    paths = [*sorted(tmp_path.rglob("*.dcm")), get_testdata_file("CT_small.dcm")]
    for path in paths:
        hu = decode.load_dicom_hu(path)
        side = hu.shape[0] // 2
        image = si.dicom_slice_image(path, pp.PreprocessOptions(size=side))
        assert image.shape == (side, side, 3) and image.dtype == np.uint8
        expected = _reference_windows(hu.reshape(side, 2, side, 2).mean(axis=(1, 3)))
        assert np.abs(image.astype(int) - expected).max() <= 1
    odd = si.dicom_slice_image(paths[-1], pp.PreprocessOptions(size=48))  # non-integer factor: bilinear
    assert (
        odd.shape == (48, 48, 3) and odd[..., 2].max() > 150
    )  # bone (~1100 HU) stays bright in the bone window


def test_shards_follow_the_contract(tmp_path):
    datagen.rsna(tmp_path / "in", patients=5, slices=(3, 5))
    result = readers.read_input("rsna", tmp_path / "in")
    manifest = pp.preprocess(result, tmp_path / "out", pp.PreprocessOptions(size=16), series_per_shard=2)
    assert set(manifest) == {
        "format", "size", "windows", "classes", "has_labels",
        "num_series", "num_slices", "num_skipped", "shards",
    }  # fmt: skip
    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "rsna" and manifest["size"] == 16 and manifest["has_labels"]
    assert manifest["windows"] == [list(w) for w in DEFAULT_WINDOWS]
    assert manifest["classes"] == ["ich", "ivh", "sah", "sdh", "edh"]
    assert [s["file"] for s in manifest["shards"]] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    assert manifest["num_slices"] == result.num_slices == sum(s["num_rows"] for s in manifest["shards"])
    for shard in manifest["shards"]:
        pf = pq.ParquetFile(tmp_path / "out" / shard["file"])
        assert pf.schema_arrow.remove_metadata().equals(SHARD_SCHEMA)
        assert pf.schema_arrow.field("labels").type == pa.list_(pa.int8(), 5)
        assert pf.metadata.num_row_groups == len(shard["series"])
        assert pf.metadata.row_group(0).column(4).compression == pp.SHARD_COMPRESSION.upper() == "LZ4"
        for entry in shard["series"]:
            table = pf.read_row_group(entry["row_group"])
            assert table.num_rows == entry["num_slices"]
            assert set(table.column("series_id").to_pylist()) == {entry["series_id"]}
            assert table.column("position").to_pylist() == list(range(entry["num_slices"]))
            assert set(table.column("channels").to_pylist()) == {3}
            assert set(table.column("height").to_pylist()) == {16}


def test_dlcv_jpeg_repeats_its_channel_and_unlabelled_gets_minus_one(tmp_path):
    datagen.dlcv(tmp_path / "in", patients=1, slices=(3, 3), test_patients=1)
    manifest = pp.preprocess(
        readers.read_dlcv(tmp_path / "in" / "test"), tmp_path / "out", pp.PreprocessOptions(size=16)
    )
    assert manifest["format"] == "dlcv" and not manifest["has_labels"]
    table = pq.read_table(tmp_path / "out" / manifest["shards"][0]["file"])
    image = np.frombuffer(table.column("image")[1].as_py(), np.uint8).reshape(16, 16, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    assert image.max() > 100  # skull is white in the brain window
    assert table.column("labels").to_pylist()[0] == [-1] * 5
    path = next(p for p in (tmp_path / "in" / "test").rglob("*_1.jpg"))
    original = np.asarray(Image.open(path), dtype=np.float32)
    expected = original.reshape(16, 2, 16, 2).mean(axis=(1, 3))
    assert np.abs(image[..., 0] - expected).max() <= 1


def test_bad_inputs_are_counted_and_listed(tmp_path):
    datagen.dlcv(tmp_path / "in", patients=3, slices=(4, 4))
    train = tmp_path / "in" / "train"
    series = sorted(train.iterdir())
    broken = sorted(series[0].iterdir())[1]
    broken.write_bytes(b"\xff\xd8\xff garbage")  # unreadable JPEG
    for f in sorted(series[1].iterdir())[1:]:
        f.unlink()  # a series of one slice remains
    unlabelled = shutil.copy(sorted(series[2].iterdir())[0], series[2] / "extra_50.jpg")
    with open(tmp_path / "in" / "train.csv", "a", newline="") as f:
        csv.writer(f).writerow(["..", "x_1.jpg", 0, 0, 0, 0, 0])
    result = readers.read_dlcv(train, tmp_path / "in" / "train.csv")
    assert len(result.skipped) == 5  # 3 label rows for deleted files, the '..' row, the unlabelled image
    manifest = pp.preprocess(result, tmp_path / "out", pp.PreprocessOptions(size=16))
    skipped = _skipped_csv(tmp_path / "out")
    assert manifest["num_skipped"] == len(skipped) == 7
    assert skipped[str(broken)].startswith("unreadable image")
    assert skipped[str(unlabelled)].startswith("image without a label row")
    assert "invalid name '..'" in skipped["../x_1.jpg"]
    assert sum(r == "label row for a missing file" for r in skipped.values()) == 3
    lone = str(sorted(series[1].iterdir())[0])
    assert skipped[lone] == f"series {series[1].name} has 1 usable slice(s); at least 2 needed"
    assert manifest["num_series"] == 2 and manifest["num_slices"] == 3 + 4
    ids = [e["series_id"] for s in manifest["shards"] for e in s["series"]]
    assert series[1].name not in ids


def test_truncated_and_non_dicom_files_in_a_dicom_folder(tmp_path):
    from ichmodel import synth

    root = tmp_path / "in"
    synth.write_dicom_folder(root, num_patients=2, slices=(3, 3), size=datagen.SIZE, seed=0)
    cut = datagen.truncate(root / "patient0000" / "series1" / "IM00002.dcm")
    datagen.text_file(root / "patient0001" / "notes.dcm")
    manifest = pp.preprocess(readers.read_dicom_folder(root), tmp_path / "out", pp.PreprocessOptions(size=16))
    skipped = _skipped_csv(tmp_path / "out")
    assert manifest["num_skipped"] == 2 == len(skipped)
    assert str(cut) in skipped and str(root / "patient0001" / "notes.dcm") in skipped
    assert manifest["num_slices"] == 5 and not manifest["has_labels"]


def test_nothing_usable_still_writes_a_manifest(tmp_path):
    datagen.dlcv(tmp_path / "in", patients=1, slices=(2, 2))
    for f in (tmp_path / "in" / "train").rglob("*.jpg"):
        f.write_bytes(b"broken")
    manifest = pp.preprocess(
        readers.read_input("dlcv", tmp_path / "in"), tmp_path / "out", pp.PreprocessOptions(size=16)
    )
    assert manifest["num_series"] == 0 and manifest["shards"] == [] and manifest["num_skipped"] == 2


def test_rerun_reuses_finished_shards_and_rewrites_stale_ones(tmp_path):
    datagen.rsna(tmp_path / "in", patients=4, slices=(3, 3))
    result = readers.read_input("rsna", tmp_path / "in")
    options = pp.PreprocessOptions(size=16)
    tasks = pp.plan_shards(result.series, 2)
    first = [pp.write_shard(t, tmp_path / "out", options) for t in tasks]
    assert not any(r.reused for r in first)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")}
    os.remove(tmp_path / "out" / tasks[1].file)  # an interrupted run: shard 1 never finished
    second = [pp.write_shard(t, tmp_path / "out", options) for t in tasks]
    assert [r.reused for r in second] == [True, False]
    assert second[0].series == first[0].series and second[0].num_rows == first[0].num_rows
    assert (tmp_path / "out" / tasks[0].file).stat().st_mtime_ns == stamps[tasks[0].file]
    third = pp.write_shard(tasks[0], tmp_path / "out", pp.PreprocessOptions(size=8))
    assert not third.reused  # other options: rewritten
    assert pq.read_table(tmp_path / "out" / tasks[0].file).column("height")[0].as_py() == 8
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_plan_shards_keeps_order_and_rejects_zero():
    datagen_series = [readers.SeriesRecord(f"s{i}", (), "dicom") for i in range(5)]
    tasks = pp.plan_shards(datagen_series, 2)
    assert [len(t.series) for t in tasks] == [2, 2, 1]
    assert [s.series_id for t in tasks for s in t.series] == [f"s{i}" for i in range(5)]
    with pytest.raises(ValueError, match="Got 0"):
        pp.plan_shards(datagen_series, 0)


def test_load_manifest_missing_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_manifest(tmp_path)
