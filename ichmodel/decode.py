"""Decode single slices: DICOM pixels (any transfer syntax pydicom can decode) → stored pixels → HU, and DLCV
JPEGs → grey levels; and the window map from HU to ``uint8`` grey levels, used by preprocessing and by the
synthetic JPEG writer alike.

HU = stored pixel × RescaleSlope + RescaleIntercept, after the RSNA 12-bit fix (:func:`fix_12bit`).
Uncompressed little-endian 16-bit slices are read straight from the buffer; everything else goes through
``pydicom``'s ``pixel_array``, whose compressed transfer syntaxes (JPEG Lossless and Extended, JPEG-LS,
JPEG 2000, RLE) are decoded by the ``pylibjpeg`` plugins this package depends on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------------
# HU conversion
# --------------------------------------------------------------------------------------------------


def needs_12bit_fix(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """True for the RSNA files whose 12-bit unsigned pixels are wrapped (their intercept is > -100)."""
    return bits_stored == 12 and pixel_representation == 0 and intercept > -100


def fix_12bit(
    pixels: np.ndarray, bits_stored: int, pixel_representation: int, intercept: float
) -> tuple[np.ndarray, float]:
    """Undo the RSNA 12-bit wrap where :func:`needs_12bit_fix` says so: add 1000, subtract 4096 from values
    ≥ 4096, and use intercept -1000. Returns ``(pixels, intercept)``, unchanged for every other file.
    """
    if not needs_12bit_fix(bits_stored, pixel_representation, intercept):
        return pixels, intercept
    fixed = pixels.astype(np.int32) + 1000
    fixed[fixed >= 4096] -= 4096
    return fixed, -1000.0


def to_hu(
    pixels: np.ndarray,
    slope: float = 1.0,
    intercept: float = -1024.0,
    bits_stored: int = 16,
    pixel_representation: int = 1,
) -> np.ndarray:
    """Stored pixels ``[H, W]`` → Hounsfield units ``[H, W]`` float32: ``pixel × slope + intercept``,
    after :func:`fix_12bit`.
    """
    pixels, intercept = fix_12bit(pixels, bits_stored, pixel_representation, intercept)
    hu = pixels.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    return hu


def dataset_pixels(ds: Any, source: str | Path = "<dataset>") -> tuple[np.ndarray, float, float]:
    """``(pixels [H, W], slope, intercept)`` of a single-frame ``pydicom`` dataset, 12-bit fix applied,
    so that HU = pixels × slope + intercept. Pixels keep their stored integer type (no float copy yet).

    Raises:
        ValueError: naming ``source`` when there is no pixel data, the pixel data is truncated or cannot be
            decoded, or the image is not a single 2-D grayscale frame.
    """
    if "PixelData" not in ds:
        raise ValueError(f"{source}: no pixel data")
    pixels = _native_pixels(ds, source)
    if pixels is None:
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises ValueError / NotImplementedError / RuntimeError by codec
            raise ValueError(f"{source}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise ValueError(f"{source}: expected one 2-D grayscale frame. Got pixel array shape {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    bits_stored, representation = int(ds.get("BitsStored", 16)), int(ds.get("PixelRepresentation", 0))
    pixels, intercept = fix_12bit(pixels, bits_stored, representation, intercept)
    return pixels, slope, intercept


def dataset_to_hu(ds: Any, source: str | Path = "<dataset>") -> np.ndarray:
    """HU ``[H, W]`` float32 of a single-frame ``pydicom`` dataset.

    Raises:
        ValueError: as :func:`dataset_pixels`.
    """
    pixels, slope, intercept = dataset_pixels(ds, source)
    return to_hu(pixels, slope, intercept)


_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit / Explicit VR Little Endian


def _native_pixels(ds: Any, source: str | Path) -> np.ndarray | None:
    """The pixels of an uncompressed little-endian 16-bit single-frame grayscale image straight from the
    buffer (about twice as fast as ``ds.pixel_array``, with the same values: unsigned data is masked to
    BitsStored). ``None`` for anything else, which then goes through ``ds.pixel_array``.

    Raises:
        ValueError: naming ``source`` when the pixel data is shorter than Rows × Columns × 2 bytes.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    if ds.get("BitsAllocated") != 16 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    bits_stored, signed = int(ds.get("BitsStored", 16)), int(ds.get("PixelRepresentation", 0)) == 1
    if signed and bits_stored != 16:
        return None  # needs sign extension: leave it to pydicom
    rows, columns = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if len(data) < rows * columns * 2:
        raise ValueError(f"{source}: pixel data truncated ({len(data)} bytes, {rows}x{columns}x2 expected)")
    pixels = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * columns).reshape(
        rows, columns
    )
    if not signed and bits_stored < 16:
        pixels = pixels & np.uint16((1 << bits_stored) - 1)
    return pixels


def _read_dicom(path: str | Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def load_dicom_pixels(path: str | Path) -> tuple[np.ndarray, float, float]:
    """Read one DICOM file: ``(pixels [H, W], slope, intercept)`` with HU = pixels × slope + intercept.

    Raises:
        ValueError: naming the file when it is not DICOM, is truncated, or has no usable pixel data.
    """
    return dataset_pixels(_read_dicom(path), path)


def load_dicom_hu(path: str | Path) -> np.ndarray:
    """Read one DICOM file and return HU ``[H, W]`` float32.

    Raises:
        ValueError: naming the file when it is not DICOM, is truncated, or has no usable pixel data.
    """
    return dataset_to_hu(_read_dicom(path), path)


def load_dlcv_image(path: str | Path) -> np.ndarray:
    """Read one DLCV JPEG (already windowed) as uint8 ``[H, W]``.

    Raises:
        ValueError: naming the file when it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------


def apply_windows(
    image: np.ndarray, windows: Sequence[tuple[float, float]], slope: float = 1.0, intercept: float = 0.0
) -> np.ndarray:
    """``[...]`` → ``uint8 [..., C]``, one channel per (level, width) in HU: ``level - width/2`` → 0,
    ``level + width/2`` → 255, rounded to the nearest grey level, clipped.

    ``image`` holds HU, or stored pixels (any integer or float type) with HU = image × slope + intercept (the
    rescale is folded into each window's affine map, so no HU image is ever built).
    """
    out = np.empty((*image.shape, len(windows)), dtype=np.uint8)
    scratch = np.empty(image.shape, dtype=np.float32)
    for c, (level, width) in enumerate(windows):
        gain = 255.0 / width
        offset = (intercept - (level - width / 2)) * gain + 0.5  # +0.5: the uint8 cast below truncates
        np.multiply(image, np.float32(slope * gain), out=scratch, casting="unsafe")
        scratch += np.float32(offset)
        np.clip(scratch, 0.0, 255.0, out=out[..., c], casting="unsafe")
    return out
