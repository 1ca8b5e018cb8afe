from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ichmodel import decode
from tests import datagen


def _testdata(name: str) -> str:
    """A file shipped inside the installed pydicom package (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped with pydicom {pydicom.__version__}"
    return path


# ---------------------------------------------------------------- HU


def test_needs_12bit_fix_truth_table():
    assert decode.needs_12bit_fix(12, 0, 0.0)
    assert decode.needs_12bit_fix(12, 0, -99.0)
    assert not decode.needs_12bit_fix(12, 0, -1024.0)
    assert not decode.needs_12bit_fix(16, 0, 0.0)
    assert not decode.needs_12bit_fix(12, 1, 0.0)


def test_to_hu_slope_and_intercept():
    pixels = np.array([[0, 1024], [2048, 100]], dtype=np.int16)
    np.testing.assert_array_equal(decode.to_hu(pixels, 1.0, -1024.0), [[-1024, 0], [1024, -924]])
    np.testing.assert_array_equal(decode.to_hu(pixels, 2.0, -1000.0), [[-1000, 1048], [3096, -800]])


def test_12bit_fix_on_a_crafted_dicom(tmp_path):
    hu = datagen.test_hu()
    hu = np.clip(hu, -1000, 3000)
    path = datagen.wrapped_12bit_file(tmp_path / "wrapped.dcm", hu)
    ds = pydicom.dcmread(path)
    assert ds.BitsStored == 12 and ds.PixelRepresentation == 0 and ds.RescaleIntercept == 0
    naive = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
    assert np.abs(naive - hu).max() > 1000  # read as stored, air would be bright
    np.testing.assert_allclose(decode.load_dicom_hu(path), hu, atol=0.5)


def test_pydicom_ct_small_reads_to_the_right_hu_range():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = decode.load_dicom_hu(path)
    assert hu.shape == (128, 128) and hu.dtype == np.float32
    assert float(ds.RescaleIntercept) == -1024
    np.testing.assert_array_equal(hu, ds.pixel_array.astype(np.float32) - 1024)
    assert -1000 < hu.min() < -800 and 1000 < hu.max() < 1300


def test_load_dicom_hu_errors_name_the_file(tmp_path):
    bad = datagen.text_file(tmp_path / "notes.dcm")
    with pytest.raises(ValueError, match="notes.dcm: not a readable DICOM"):
        decode.load_dicom_hu(bad)
    truncated = datagen.truncate(datagen.ct_file(tmp_path / "cut.dcm"))
    with pytest.raises(ValueError, match="cut.dcm: pixel data truncated"):
        decode.load_dicom_hu(truncated)
    no_pixels = datagen.ct_file(tmp_path / "nopix.dcm", PixelData=None)
    with pytest.raises(ValueError, match="nopix.dcm: no pixel data"):
        decode.load_dicom_hu(no_pixels)


def _masked_12bit_file(path):
    """A 12-bit unsigned slice whose stored values have bits above BitsStored set (pydicom masks them)."""
    from ichmodel import synth

    ds = synth.make_ct_dataset(
        np.full((4, 4), 5000, np.uint16), study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4", z_mm=0,
        instance_number=1, patient_id="x", bits_stored=12, pixel_representation=0, intercept=-1024,
    )  # fmt: skip
    ds.save_as(path, enforce_file_format=True)
    return path


def test_native_pixel_path_equals_pydicom_pixel_array(tmp_path):
    from ichmodel import synth

    synth.write_dicom_folder(tmp_path, num_patients=2, slices=(1, 1), size=datagen.SIZE, seed=0)
    paths = [*sorted(tmp_path.rglob("*.dcm")), get_testdata_file("CT_small.dcm")]
    paths.append(_masked_12bit_file(tmp_path / "masked.dcm"))
    bits = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        bits.add((int(ds.BitsStored), int(ds.PixelRepresentation)))
        pixels, slope, intercept = decode.dataset_pixels(ds, path)
        np.testing.assert_array_equal(pixels, ds.pixel_array)
        assert (slope, intercept) == (1.0, float(ds.RescaleIntercept))
    assert bits == {(12, 0), (16, 1)}


def test_pixel_header_reads_raw_elements_as_pydicom_converts_them(tmp_path):
    # The header is parsed from the raw bytes where that is safe; every value equals pydicom's own.
    paths = [
        datagen.ct_file(tmp_path / "plain.dcm"),
        datagen.ct_file(tmp_path / "scaled.dcm", RescaleSlope="0.5", RescaleIntercept="-3000.25"),
        datagen.ct_file(tmp_path / "exponent.dcm", RescaleSlope="2.5E-1", RescaleIntercept="+12"),
        datagen.ct_file(tmp_path / "frames.dcm", NumberOfFrames=1, RescaleSlope=None),
        *(_testdata(n) for n in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm")),
    ]
    for path in paths:
        header = decode._pixel_header(pydicom.dcmread(path))
        converted = pydicom.dcmread(path)
        for keyword, (_, _, default) in decode._PIXEL_HEADER.items():
            expected = converted.get(keyword, default)
            assert header[keyword] == expected and type(header[keyword]) in (int, float, type(expected)), (
                path,
                keyword,
            )
    header = decode._pixel_header(pydicom.dcmread(paths[1]))
    assert (header["RescaleSlope"], header["RescaleIntercept"]) == (0.5, -3000.25)
    assert decode._pixel_header(pydicom.dcmread(paths[2]))["RescaleSlope"] == 0.25  # through pydicom


def test_a_file_without_rows_is_a_clear_error_not_a_crash(tmp_path):
    # Was an AttributeError from the native pixel path, which preprocessing does not catch: one such file
    # stopped the whole job instead of being skipped.
    path = datagen.ct_file(tmp_path / "norows.dcm", Rows=None)
    with pytest.raises(ValueError, match="norows.dcm: cannot decode pixel data"):
        decode.load_dicom_pixels(path)


def _native(path):
    """The pydicom-free reading of one file, or None."""
    return decode._native_file_pixels(Path(path).read_bytes(), path)


def _both_paths(path):
    """``(pydicom-free reading or None, pydicom's dcmread + dataset_pixels)`` of one file."""
    return _native(path), decode.dataset_pixels(pydicom.dcmread(path), path)


def _assert_same(native, reference, path):
    pixels, slope, intercept = native
    assert pixels.dtype == reference[0].dtype and pixels.shape == reference[0].shape, path
    np.testing.assert_array_equal(pixels, reference[0], err_msg=str(path))
    assert (slope, intercept) == reference[1:] and all(type(v) is float for v in (slope, intercept)), path


def test_the_pydicom_free_reader_equals_pydicom_on_every_file_pydicom_ships():
    # Every file it reads gives pydicom's pixels, slope and intercept exactly; the rest (compressed, big
    # endian, 8-bit, colour, multi-frame, deflated, odd headers) it leaves to pydicom by returning None.
    import pathlib

    root = pathlib.Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix not in (".py", ".json", ".gz", ".txt")
    )
    taken = set()
    for path in files:
        native = _native(path)
        if native is not None:
            _assert_same(native, decode.dataset_pixels(pydicom.dcmread(path), path), path)
            taken.add(path.name)
    assert {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"} <= taken
    assert not taken & {"MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"}
    assert 10 <= len(taken) < len(files) // 2


def test_the_pydicom_free_reader_handles_the_rsna_cases_and_leaves_sequences_it_cannot_skip(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    hu = np.clip(datagen.test_hu(), -1000, 3000)
    icon = Dataset()  # a nested image before the slice's own pixels: skipped by its length
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.PixelData = 2, 2, 16, b"\x07\x00" * 4
    paths = {
        "wrapped": datagen.wrapped_12bit_file(tmp_path / "wrapped.dcm", hu),
        "masked": _masked_12bit_file(tmp_path / "masked.dcm"),
        "scaled": datagen.ct_file(tmp_path / "scaled.dcm", hu, RescaleSlope="0.5", RescaleIntercept="-3000.25"),
        "icon": datagen.ct_file(tmp_path / "icon.dcm", hu, IconImageSequence=Sequence([icon])),
    }  # fmt: skip
    for name, path in paths.items():
        native, reference = _both_paths(path)
        assert native is not None, name
        _assert_same(native, reference, path)
    undefined = pydicom.dcmread(paths["icon"])
    undefined["IconImageSequence"].is_undefined_length = True  # its end is a delimiter, not a length
    undefined.save_as(tmp_path / "undefined.dcm")
    assert _native(tmp_path / "undefined.dcm") is None
    _assert_same(
        decode.load_dicom_pixels(tmp_path / "undefined.dcm"), _both_paths(paths["icon"])[1], "undefined"
    )
    np.testing.assert_allclose(decode.load_dicom_hu(paths["wrapped"]), hu, atol=0.5)  # the 12-bit fix, once
    exponent = datagen.ct_file(tmp_path / "exponent.dcm", RescaleSlope="2.5E-1")
    assert _native(exponent) is None  # pydicom converts that one
    assert decode.load_dicom_pixels(exponent)[1] == 0.25
    signed12 = datagen.ct_file(tmp_path / "signed12.dcm", BitsStored=12)
    assert _native(signed12) is None  # needs sign extension: pydicom


def test_load_dlcv_image_error_names_the_file(tmp_path):
    bad = datagen.text_file(tmp_path / "x_1.jpg", "not a jpeg")
    with pytest.raises(ValueError, match="x_1.jpg: unreadable image"):
        decode.load_dlcv_image(bad)


def test_apply_windows_golden_values():
    hu = np.array([[-1000.0, 0.0, 40.0, 80.0, 3000.0]], dtype=np.float32)
    out = decode.apply_windows(hu, [(40.0, 80.0)])
    assert out.dtype == np.uint8 and out.shape == (1, 5, 1)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_apply_windows_folds_the_rescale_and_takes_any_shape():
    stored = np.array([[[0, 1024], [1064, 4095]]], dtype=np.uint16)  # [T, H, W]; HU = stored - 1024
    hu = stored.astype(np.float32) - 1024
    windows = [(40.0, 80.0), (600.0, 2800.0)]
    np.testing.assert_array_equal(
        decode.apply_windows(stored, windows, 1.0, -1024.0), decode.apply_windows(hu, windows)
    )
    assert decode.apply_windows(stored, windows).shape == (1, 2, 2, 2)


def test_window_lookup_table_gives_the_float_path_bit_for_bit():
    # Integer images go through a cached lookup table of the float path's own output; it must be identical
    # for every dtype, rescale (negative slope included), channel count and shape, extreme values included.
    rng = np.random.default_rng(0)
    windows = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0), (0.0, 50.0), (-600.0, 1500.0))
    rescales = (
        (1.0, -1024.0),
        (0.25, -1024.0),
        (1 / 16, -1000.0),
        (2.5, -3000.0),
        (-1.0, 500.0),
        (1e-5, 0.0),
    )
    shapes = ((37, 23), (5,), (2, 9, 11))
    used = 0
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32):
        info = np.iinfo(dtype)
        for (slope, intercept), channels, shape in itertools.product(rescales, (1, 2, 3, 4, 5), shapes):
            image = rng.integers(max(info.min, -5000), min(info.max, 9000), shape, endpoint=True).astype(
                dtype
            )
            image.flat[:2] = info.min, info.max
            chosen = windows[:channels]
            got = decode.apply_windows(image, chosen, slope, intercept)
            expected = decode._apply_windows_float(image, chosen, slope, intercept)
            assert got.shape == (*shape, channels) and got.dtype == np.uint8
            assert np.array_equal(got, expected), (dtype, slope, intercept, channels, shape)
            used += decode.window_table(np.dtype(dtype).str, chosen, slope, intercept) is not None
    assert used == 6 * 6 * 5 * 3 - 2 * 5 * 3  # all but the tiny slope on 32-bit images (10^8 values apart)
    assert decode.window_table("<i4", windows, 0.0, 0.0) is None


# ---------------------------------------------------------------- compressed transfer syntaxes
# pydicom's own test files; with only Pillow's decoders JPEG Lossless, JPEG-LS and JPEG Extended 12-bit fail.

#: file → its uncompressed twin shipped with pydicom (None: no twin), and the largest difference allowed.
COMPRESSED = {
    "MR_small_jpeg_ls_lossless.dcm": ("MR_small.dcm", 0),  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm": (None, None),  # JPEG-LS near-lossless, 16-bit
    "JPEGLSNearLossless_08.dcm": (None, None),  # JPEG-LS near-lossless, 8-bit
    "JPGExtended.dcm": (None, None),  # JPEG Extended (process 2 and 4), 12-bit
    "MR_small_RLE.dcm": ("MR_small.dcm", 0),  # RLE lossless
    "MR_small_jp2klossless.dcm": ("MR_small.dcm", 0),  # JPEG 2000 lossless
    "693_J2KI.dcm": (None, None),  # JPEG 2000 lossy, 14-bit
    "JPEG2000.dcm": (None, None),  # JPEG 2000, 16-bit
}


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compressed_dicom_decodes_through_the_reader(name):
    path = _testdata(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    pixels, slope, intercept = decode.load_dicom_pixels(path)
    assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype.kind in "iu"
    assert pixels.max() > pixels.min()  # an image, not a blank frame
    twin, tolerance = COMPRESSED[name]
    if twin is not None:
        expected, *_ = decode.load_dicom_pixels(_testdata(twin))
        assert np.abs(pixels.astype(np.int64) - expected).max() <= tolerance
    hu = decode.load_dicom_hu(path)
    np.testing.assert_allclose(hu, pixels.astype(np.float64) * slope + intercept, rtol=1e-6, atol=1e-3)


def test_jpeg_lossless_process_14_decodes_through_the_reader():
    # pydicom ships process 14 (SV1) only as an RGB file: decoding succeeds, and the reader then rejects the
    # colour frame by its shape (before the pylibjpeg plugins it failed earlier: "cannot decode pixel data").
    path = _testdata("SC_rgb_jpeg_gdcm.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    with pytest.raises(
        ValueError, match=r"expected one 2-D grayscale frame. Got pixel array shape \(100, 100, 3\)"
    ):
        decode.load_dicom_pixels(path)
    rgb = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(
        rgb, pydicom.dcmread(_testdata("SC_rgb_rle.dcm")).pixel_array
    )  # lossless twin


def test_a_malformed_jpeg_stream_is_a_clear_error_naming_the_file():
    # JPEG-lossy.dcm (12-bit JPEG Extended) has a misplaced marker segment that libjpeg rejects; its repaired
    # copy JPGExtended.dcm decodes (above). The reader says which file and why, and preprocessing skips it.
    with pytest.raises(ValueError, match=r"JPEG-lossy.dcm: cannot decode pixel data"):
        decode.load_dicom_pixels(_testdata("JPEG-lossy.dcm"))
