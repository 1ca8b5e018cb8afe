from __future__ import annotations

import csv
import shutil

import pydicom
import pytest

from ichmodel import dicom_readers, readers
from ichmodel.constants import RSNA_SUBTYPES
from tests import datagen


def _reasons(result) -> dict[str, str]:
    return {s.path: s.reason for s in result.skipped}


# ---------------------------------------------------------------- DLCV


def test_slice_number_sorts_numerically():
    ids = ["a_10.jpg", "a_2.jpg", "a_1.jpg", "a_0.jpg"]
    assert sorted(ids, key=readers.slice_number) == ["a_0.jpg", "a_1.jpg", "a_2.jpg", "a_10.jpg"]
    assert readers.slice_number("e00b013d9_14.jpg") == 14
    with pytest.raises(ValueError, match="'nonumber.jpg'"):
        readers.slice_number("nonumber.jpg")


def test_read_dlcv_orders_numerically_and_reads_labels(tmp_path):
    summary = datagen.dlcv(tmp_path, patients=2, slices=(12, 12))
    result = readers.read_dlcv(tmp_path / "train", tmp_path / "train.csv")
    assert result.has_labels and not result.skipped
    assert len(result.series) == 2 and result.num_slices == summary.num_slices == 24
    first = result.series[0]
    numbers = [readers.slice_number(s.slice_id) for s in first.slices]
    assert numbers == list(range(12))  # _2 before _10
    with open(tmp_path / "train.csv") as f:
        rows = {(r["dirname"], r["ID"]): r for r in csv.DictReader(f)}
    for s in first.slices:
        row = rows[(first.series_id, s.slice_id)]
        assert s.labels == tuple(int(row[c]) for c in ("ich", "ivh", "sah", "sdh", "edh"))


def test_read_dlcv_blood_data_root_and_unlabelled_test_split(tmp_path):
    datagen.dlcv(tmp_path, patients=2, test_patients=1)
    root = readers.read_dlcv(tmp_path)  # Blood_data root: train/ + train.csv found
    assert root.has_labels and len(root.series) == 2
    test = readers.read_dlcv(tmp_path / "test")
    assert not test.has_labels and len(test.series) == 1
    assert all(s.labels is None for s in test.series[0].slices)


def test_read_dlcv_wrong_header_names_it(tmp_path):
    datagen.dlcv(tmp_path, patients=1)
    (tmp_path / "bad.csv").write_text("dirname,ID,ich,ivh,sah,sdh,any\nx,y,0,0,0,0,0\n")
    with pytest.raises(ValueError, match="'dirname,ID,ich,ivh,sah,sdh,any'"):
        readers.read_dlcv(tmp_path / "train", tmp_path / "bad.csv")


def test_read_dlcv_bad_rows_are_skipped_and_never_leave_the_folder(tmp_path):
    datagen.dlcv(tmp_path, patients=2, slices=(4, 4))
    train = tmp_path / "train"
    secret = tmp_path / "secret_1.jpg"
    shutil.copy(next(next(train.iterdir()).iterdir()), secret)  # a real JPEG outside the image folder
    series_dir = sorted(train.iterdir())[0]
    datagen.text_file(series_dir / "extra_99.jpg", "unlabelled")
    with open(tmp_path / "train.csv", "a", newline="") as f:
        w = csv.writer(f)
        w.writerow(["..", "secret_1.jpg", 1, 0, 0, 0, 0])
        w.writerow([str(tmp_path), "secret_1.jpg", 1, 0, 0, 0, 0])
        w.writerow([series_dir.name, "../../secret_1.jpg", 1, 0, 0, 0, 0])
        w.writerow([series_dir.name, "gone_7.jpg", 0, 0, 0, 0, 0])
        w.writerow([series_dir.name, "bad_8.jpg", 0, 2, 0, 0, 0])
    result = readers.read_dlcv(train, tmp_path / "train.csv")
    reasons = _reasons(result)
    assert "../secret_1.jpg" in reasons and "invalid name '..'" in reasons["../secret_1.jpg"]
    assert any("absolute path" in r for r in reasons.values())
    assert any("'..' not allowed" in r and "../../secret_1.jpg" in p for p, r in reasons.items())
    assert reasons[str(series_dir / "gone_7.jpg")] == "label row for a missing file"
    assert reasons[str(series_dir / "extra_99.jpg")].startswith("image without a label row")
    assert len(result.skipped) == 6  # incl. the bad label value
    paths = [s.path for series in result.series for s in series.slices]
    assert all(str(train) in p for p in paths) and "secret" not in " ".join(paths)
    assert result.num_slices == 8


# ---------------------------------------------------------------- RSNA


def test_read_rsna_groups_and_orders_by_position(tmp_path):
    summary = datagen.rsna(tmp_path, patients=3, slices=(5, 7))
    result = readers.read_rsna(tmp_path / "stage_2_train", tmp_path / "stage_2_train.csv")
    assert not result.skipped and result.has_labels
    assert len(result.series) == 3 and result.num_slices == summary.num_slices
    for series in result.series:
        headers = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in series.slices]
        assert {h.SeriesInstanceUID for h in headers} == {series.series_id}
        z = [float(h.ImagePositionPatient[2]) for h in headers]
        assert z == sorted(z)
        assert [int(h.InstanceNumber) for h in headers] == list(range(1, len(headers) + 1))
        assert series.patient_id == str(headers[0].PatientID) and series.patient_id  # kept for the folds
    # file names are random: ordering by name would not give slice order
    names = [s.slice_id for s in result.series[0].slices]
    assert names != sorted(names)


def test_read_rsna_labels_match_the_csv_and_tolerate_duplicates(tmp_path):
    datagen.rsna(tmp_path, patients=2)
    csv_path = tmp_path / "stage_2_train.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([*lines, *lines[1:5]]) + "\n")  # duplicate rows
    labels, skipped = dicom_readers.read_rsna_labels(csv_path)
    assert not skipped
    result = readers.read_rsna(tmp_path / "stage_2_train", csv_path)
    for series in result.series:
        for s in series.slices:
            assert s.labels == labels[s.slice_id]
    values = {}
    for line in lines[1:]:
        key, value = line.split(",")
        values[key] = int(value)
    some = result.series[0].slices[0].slice_id
    expected = tuple(
        values[f"{some}_{sub}"]
        for sub in ("intraparenchymal", "intraventricular", "subarachnoid", "subdural", "epidural")
    )
    assert labels[some] == expected


def test_read_rsna_bad_inputs_are_skipped_with_reasons(tmp_path):
    datagen.rsna(tmp_path, patients=2, slices=(4, 4))
    images, csv_path = tmp_path / "stage_2_train", tmp_path / "stage_2_train.csv"
    datagen.text_file(images / "ID_text00000.dcm")
    datagen.ct_file(images / "ID_nopix0000.dcm", PixelData=None)
    datagen.ct_file(images / "ID_mr0000000.dcm", Modality="MR")
    datagen.ct_file(images / "ID_nolabel00.dcm")
    with open(csv_path, "a") as f:
        for sid in ("ID_text00000", "ID_nopix0000", "ID_mr0000000", "ID_missing00"):
            for sub in (*RSNA_SUBTYPES.values(), "any"):
                f.write(f"{sid}_{sub},0\n")
        f.write("ID_partial00_subdural,1\n")
    result = readers.read_rsna(images, csv_path)
    reasons = _reasons(result)
    assert reasons[str(images / "ID_text00000.dcm")].startswith("not a readable DICOM file")
    assert reasons[str(images / "ID_nopix0000.dcm")] == "no pixel data"
    assert reasons[str(images / "ID_mr0000000.dcm")] == "not a CT image (Modality='MR')"
    assert reasons[str(images / "ID_missing00.dcm")] == "label rows for a missing file"
    assert reasons[str(images / "ID_nolabel00.dcm")].startswith("image without labels")
    assert "labels incomplete" in reasons["ID_partial00"]
    assert len(result.skipped) == 6
    assert len(result.series) == 2 and result.num_slices == 8


def test_read_rsna_wrong_header_names_it(tmp_path):
    datagen.rsna(tmp_path, patients=1)
    (tmp_path / "bad.csv").write_text("Image,Label\n")
    with pytest.raises(ValueError, match="'ID,Label'. Got 'Image,Label'"):
        readers.read_rsna(tmp_path / "stage_2_train", tmp_path / "bad.csv")


def test_read_input_finds_the_rsna_root_and_rejects_unknown_formats(tmp_path):
    datagen.rsna(tmp_path, patients=2)
    assert readers.read_input("rsna", tmp_path).has_labels
    with pytest.raises(ValueError, match="'nifti'"):
        readers.read_input("nifti", tmp_path)


# ---------------------------------------------------------------- plain DICOM folder


def test_read_dicom_folder_recursive_and_unlabelled(tmp_path):
    summary = datagen.rsna(tmp_path / "flat", patients=1, slices=(3, 3))
    synth_nested = tmp_path / "nested"
    from ichmodel import synth

    synth.write_dicom_folder(synth_nested, num_patients=2, slices=(4, 5), size=datagen.SIZE, seed=2)
    shutil.copytree(tmp_path / "flat" / "stage_2_train", synth_nested / "other" / "deeper")
    datagen.text_file(synth_nested / "README.txt")
    datagen.text_file(synth_nested / ".hidden")
    result = readers.read_dicom_folder(synth_nested)
    assert not result.has_labels and result.format == "dicom"
    assert len(result.series) == 3
    assert result.num_slices - summary.num_slices in range(8, 11)
    assert [s.path for s in result.skipped] == [str(synth_nested / "README.txt")]
    for series in result.series:
        assert all(s.labels is None for s in series.slices)
        ids = [s.slice_id for s in series.slices]
        assert all(not i.startswith("/") for i in ids)
        if ids[0].startswith("patient"):
            assert ids == sorted(ids)  # IM00001.dcm... written in slice order


def test_read_dicom_folder_uses_a_map_fn(tmp_path):
    datagen.rsna(tmp_path, patients=2, slices=(3, 3))
    calls = []

    def map_fn(fn, chunks):
        calls.append(len(chunks))
        return [fn(c) for c in chunks]

    result = readers.read_dicom_folder(tmp_path / "stage_2_train", map_fn=map_fn)
    assert calls == [1] and result.num_slices == 6
