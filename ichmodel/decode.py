"""Decode single slices: DICOM pixels (any transfer syntax pydicom can decode) → stored pixels → HU, and DLCV
JPEGs → grey levels; and the window map from HU to ``uint8`` grey levels, used by preprocessing and by the
synthetic JPEG writer alike.

HU = stored pixel × RescaleSlope + RescaleIntercept, after the RSNA 12-bit fix (:func:`fix_12bit`).
Uncompressed little-endian 16-bit slices are read straight from the file (a scan of the top-level elements,
:func:`_scan_native`, ~5x faster than ``pydicom.dcmread``) or, from a pydicom dataset, from its buffer;
everything else, and anything unusual, goes through ``pydicom`` and its ``pixel_array``, whose compressed transfer syntaxes (JPEG Lossless and Extended, JPEG-LS,
JPEG 2000, RLE) are decoded by the ``pylibjpeg`` plugins this package depends on.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Sequence
from io import BytesIO
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
    header = _pixel_header(ds)
    pixels = _native_pixels(ds, header, source)
    if pixels is None:
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises ValueError / NotImplementedError / RuntimeError by codec
            raise ValueError(f"{source}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise ValueError(f"{source}: expected one 2-D grayscale frame. Got pixel array shape {pixels.shape}")
    return _rescaled(pixels, header)


def _rescaled(pixels: np.ndarray, header: dict[str, Any]) -> tuple[np.ndarray, float, float]:
    """``(pixels, slope, intercept)`` from a :func:`_pixel_header` header, the 12-bit fix applied."""
    slope = float(header["RescaleSlope"] or 1.0)
    intercept = float(header["RescaleIntercept"] or 0.0)
    bits_stored, representation = int(header["BitsStored"]), int(header["PixelRepresentation"])
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

#: The header elements the pixel path reads: keyword → (tag, value kind, default when absent).
_PIXEL_HEADER = {
    "BitsAllocated": (0x00280100, "US", None),
    "SamplesPerPixel": (0x00280002, "US", 1),
    "NumberOfFrames": (0x00280008, "IS", 1),
    "BitsStored": (0x00280101, "US", 16),
    "PixelRepresentation": (0x00280103, "US", 0),
    "Rows": (0x00280010, "US", None),
    "Columns": (0x00280011, "US", None),
    "RescaleSlope": (0x00281053, "DS", 1.0),
    "RescaleIntercept": (0x00281052, "DS", 0.0),
}


def _pixel_header(ds: Any) -> dict[str, Any]:
    """The :data:`_PIXEL_HEADER` values of ``ds``, each as ``ds.get(keyword, default)`` gives it.

    An element still raw as read from a little-endian file (a one-value ``US``, or an ``IS``/``DS`` plain
    decimal) is parsed here from its bytes: pydicom's conversion costs ~10 µs per element, and nine of them
    are a sixth of the time a 512 px slice may take. Anything else (converted, big-endian, multi-valued,
    empty, exponent notation) goes through ``ds.get``, so the values are pydicom's own.
    """
    from pydicom.dataelem import RawDataElement

    header = {}
    for keyword, (tag, kind, default) in _PIXEL_HEADER.items():
        elem = ds.get_item(tag)
        value = _raw_number(elem, kind) if isinstance(elem, RawDataElement) else None
        header[keyword] = ds.get(keyword, default) if value is None else value
    return header


_DECIMAL = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)")
_INTEGER = re.compile(rb"[+-]?\d+")


def _raw_number(elem: Any, kind: str) -> int | float | None:
    """The number in the bytes of an unconverted little-endian ``RawDataElement`` of VR ``kind`` (``US``,
    ``IS`` or ``DS``); ``None`` when its bytes are not one plain value or it is not little-endian."""
    raw = elem.value
    if not elem.is_little_endian or not isinstance(raw, bytes) or elem.VR not in (None, kind):
        return None  # implicit VR files carry no VR
    return _number_from_bytes(raw, kind)


def _number_from_bytes(raw: bytes, kind: str) -> int | float | None:
    """The one plain number little-endian value bytes of VR ``kind`` (``US``, ``IS``, ``DS``) hold, else None."""
    if kind == "US":
        return int.from_bytes(raw, "little") if len(raw) == 2 else None
    text = raw.strip(b" \0")
    if kind == "DS":
        return float(text) if _DECIMAL.fullmatch(text) else None
    return int(text) if _INTEGER.fullmatch(text) else None


def _native_pixels(ds: Any, header: dict[str, Any], source: str | Path) -> np.ndarray | None:
    """The pixels of an uncompressed little-endian 16-bit single-frame grayscale image straight from the
    buffer (about twice as fast as ``ds.pixel_array``, with the same values: unsigned data is masked to
    BitsStored). ``None`` for anything else, which then goes through ``ds.pixel_array``. ``header``: from
    :func:`_pixel_header`.

    Raises:
        ValueError: naming ``source`` when the pixel data is shorter than Rows × Columns × 2 bytes.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in _NATIVE_LITTLE_ENDIAN or not _plain_16bit(header):
        return None
    raw = ds.get_item(0x7FE00010).value  # bytes as read (the conversion would only wrap them)
    return _buffer_pixels(raw if isinstance(raw, bytes) else ds.PixelData, header, source)


def _plain_16bit(header: dict[str, Any]) -> bool:
    """Whether a :func:`_pixel_header` header describes pixels :func:`_buffer_pixels` reads: 16 bits
    allocated, one sample, one frame, rows and columns given, unsigned or a full 16 signed bits."""
    if header["BitsAllocated"] != 16 or int(header["SamplesPerPixel"]) != 1:
        return False
    if int(header["NumberOfFrames"] or 1) != 1:
        return False
    if int(header["PixelRepresentation"]) == 1 and int(header["BitsStored"]) != 16:
        return False  # needs sign extension: leave it to pydicom
    return header["Rows"] is not None and header["Columns"] is not None  # else pydicom names what is missing


def _buffer_pixels(data: bytes | memoryview, header: dict[str, Any], source: str | Path) -> np.ndarray:
    """``[Rows, Columns]`` little-endian 16-bit pixels of a :func:`_plain_16bit` header from the pixel data's
    bytes, unsigned data masked to BitsStored (as pydicom does).

    Raises:
        ValueError: naming ``source`` when the pixel data is shorter than Rows × Columns × 2 bytes.
    """
    rows, columns = int(header["Rows"]), int(header["Columns"])
    bits_stored, signed = int(header["BitsStored"]), int(header["PixelRepresentation"]) == 1
    if len(data) < rows * columns * 2:
        raise ValueError(f"{source}: pixel data truncated ({len(data)} bytes, {rows}x{columns}x2 expected)")
    pixels = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * columns).reshape(
        rows, columns
    )
    if not signed and bits_stored < 16:
        pixels = pixels & np.uint16((1 << bits_stored) - 1)
    return pixels


def _read_dicom(path: str | Path, data: bytes | None = None) -> Any:
    """``pydicom.dcmread`` of ``path``, or of its bytes ``data`` when already read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path if data is None else BytesIO(data))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


# Value representations whose explicit-VR header has 2 reserved bytes and a 4-byte length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_PIXEL_TAGS = {tag: keyword for keyword, (tag, _, _) in _PIXEL_HEADER.items()}
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF


def _scan_native(data: bytes) -> tuple[dict[str, bytes], int, int] | None:
    """``(raw values of the _PIXEL_HEADER elements found, pixel data offset, its length)`` of a DICOM file's
    bytes: preamble and ``DICM``, the file meta group, then the top-level elements in Implicit or Explicit VR
    Little Endian up to (7FE0,0010). ``None`` for anything else or anything unusual (another transfer syntax,
    an undefined length, an unknown VR, an element running past the end, no pixel data): the caller then reads
    the file with pydicom, which either decodes it or names the problem.
    """
    n, unpack = len(data), struct.unpack_from
    if n < 132 or data[128:132] != b"DICM":
        return None
    pos, syntax = 132, None
    while pos + 8 <= n and unpack("<H", data, pos)[0] == 0x0002:  # file meta: always explicit VR LE
        element, vr = unpack("<H", data, pos + 2)[0], data[pos + 4 : pos + 6]
        long = vr in _LONG_VRS
        length, header = (unpack("<I", data, pos + 8)[0], 12) if long else (unpack("<H", data, pos + 6)[0], 8)
        if not (long or vr in _SHORT_VRS) or length == _UNDEFINED or pos + header + length > n:
            return None
        if element == 0x0010:
            syntax = data[pos + header : pos + header + length].rstrip(b"\0 ")
        pos += header + length
    if syntax not in (b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1"):
        return None
    explicit, found = syntax.endswith(b".1"), {}
    while pos + 8 <= n:
        group, element = unpack("<HH", data, pos)
        tag = group << 16 | element
        if explicit:
            vr = data[pos + 4 : pos + 6]
            long = vr in _LONG_VRS
            if not (long or vr in _SHORT_VRS):
                return None
            length, header = (
                (unpack("<I", data, pos + 8)[0], 12) if long else (unpack("<H", data, pos + 6)[0], 8)
            )
        else:
            length, header = unpack("<I", data, pos + 4)[0], 8
        if length == _UNDEFINED or pos + header + length > n:
            return None
        if tag == _PIXEL_DATA:
            return found, pos + header, length
        if tag in _PIXEL_TAGS:
            found[_PIXEL_TAGS[tag]] = data[pos + header : pos + header + length]
        pos += header + length
    return None


def _native_file_pixels(data: bytes, source: str | Path) -> tuple[np.ndarray, float, float] | None:
    """:func:`load_dicom_pixels` of a file's bytes without pydicom, for the common case: an uncompressed
    little-endian 16-bit single-frame grayscale file (:func:`_scan_native`; ~0.05 ms against ~0.26 ms at
    512 px). The values are the pydicom path's own (``tests/test_decode.py`` compares both on every file
    pydicom ships); ``None`` whenever the file is anything else, which then goes through pydicom.

    Raises:
        ValueError: naming ``source`` when the pixel data is shorter than Rows × Columns × 2 bytes.
    """
    scanned = _scan_native(data)
    if scanned is None:
        return None
    raw, offset, length = scanned
    header: dict[str, Any] = {}
    for keyword, (_, kind, default) in _PIXEL_HEADER.items():
        value = default if keyword not in raw else _number_from_bytes(raw[keyword], kind)
        if keyword in raw and value is None:
            return None  # empty, several values, exponent notation: as pydicom converts it
        header[keyword] = value
    if not _plain_16bit(header) or not 0 < header["BitsStored"] <= 16:
        return None
    pixels = _buffer_pixels(memoryview(data)[offset : offset + length], header, source)
    return _rescaled(pixels, header)


def load_dicom_pixels(path: str | Path) -> tuple[np.ndarray, float, float]:
    """Read one DICOM file: ``(pixels [H, W], slope, intercept)`` with HU = pixels × slope + intercept.

    Uncompressed little-endian 16-bit slices are read by :func:`_native_file_pixels`, everything else (and
    anything unusual) by pydicom, from the same bytes.

    Raises:
        ValueError: naming the file when it is not DICOM, is truncated, or has no usable pixel data.
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return dataset_pixels(_read_dicom(path), path)  # pydicom names the problem
    native = _native_file_pixels(data, path)
    return native if native is not None else dataset_pixels(_read_dicom(path, data), path)


def load_dicom_hu(path: str | Path) -> np.ndarray:
    """Read one DICOM file and return HU ``[H, W]`` float32.

    Raises:
        ValueError: naming the file when it is not DICOM, is truncated, or has no usable pixel data.
    """
    return to_hu(*load_dicom_pixels(path))  # the 12-bit fix is applied; to_hu's defaults apply none again


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

    An integer image (up to 32 bits) is mapped through a lookup table of :func:`window_table`, which holds
    this same float arithmetic for every value between the windows' ends, so the result is identical to the
    float path, at a fraction of its cost; the result is then read-only.
    """
    if image.dtype.kind in "iu" and image.dtype.itemsize <= 4 and image.ndim and image.size:
        windows = tuple((float(level), float(width)) for level, width in windows)
        table = window_table(image.dtype.str, windows, float(slope), float(intercept))
        if table is not None:
            return _look_up(image, *table)
    return _apply_windows_float(image, windows, slope, intercept)


def _apply_windows_float(
    image: np.ndarray, windows: Sequence[tuple[float, float]], slope: float, intercept: float
) -> np.ndarray:
    out = np.empty((*image.shape, len(windows)), dtype=np.uint8)
    scratch = np.empty(image.shape, dtype=np.float32)
    for c, (level, width) in enumerate(windows):
        gain = 255.0 / width
        offset = (intercept - (level - width / 2)) * gain + 0.5  # +0.5: the uint8 cast below truncates
        np.multiply(image, np.float32(slope * gain), out=scratch, casting="unsafe")
        scratch += np.float32(offset)
        np.clip(scratch, 0.0, 255.0, out=out[..., c], casting="unsafe")
    return out


#: Most entries of a window lookup table (a wider range of values between the windows' ends, e.g. a tiny
#: slope, takes the float path).
MAX_TABLE_SIZE = 1 << 18


@functools.lru_cache(maxsize=64)
def window_table(
    dtype: str, windows: tuple[tuple[float, float], ...], slope: float, intercept: float
) -> tuple[int, np.ndarray, int] | None:
    """``(lowest, table, channels)`` such that :func:`apply_windows` of any value ``v`` of integer ``dtype``
    is the ``channels`` bytes of ``table[clip(v - lowest, 0, len(table) - 1)]``; ``None`` when the values
    between the windows' ends span more than :data:`MAX_TABLE_SIZE` entries, or ``slope`` is 0 or not finite.

    The table holds the float path's own output for every value from ``lowest`` to the highest one before
    every channel saturates: the window map is monotonic in the value, so values beyond either end give the
    end's entry (checked against the dtype's extreme values). Entries pack 1, 2 or 4 channels into one
    ``uint8``/``uint16``/``uint32``, and 3 channels into a ``uint32`` with a zero fourth byte; other counts
    keep ``[K, C]`` bytes. Cached: the windows are fixed per run and the rescale per series.
    """
    info = np.iinfo(np.dtype(dtype))
    if slope == 0 or not math.isfinite(slope) or not math.isfinite(intercept):
        return None
    ends = [(level + sign * width / 2 - intercept) / slope for level, width in windows for sign in (-1, 1)]
    lowest = min(max(info.min, math.floor(min(ends)) - 2), info.max)  # within the dtype's values
    highest = max(min(info.max, math.ceil(max(ends)) + 2), info.min)
    if highest - lowest + 1 > MAX_TABLE_SIZE:
        return None
    values = np.arange(lowest, highest + 1).astype(dtype)  # the same type: the same float arithmetic
    table = _apply_windows_float(values, windows, slope, intercept)
    extremes = _apply_windows_float(np.array([info.min, info.max], dtype), windows, slope, intercept)
    if not (np.array_equal(extremes[0], table[0]) and np.array_equal(extremes[1], table[-1])):
        return None  # not saturated at the ends (cannot happen for a monotonic map; kept as a guard)
    channels = table.shape[1]
    if channels == 3:
        table = np.concatenate([table, np.zeros((len(table), 1), np.uint8)], axis=1)
    if table.shape[1] in (1, 2, 4):
        table = np.ascontiguousarray(table).view(f"<u{table.shape[1]}")[:, 0]
    table.flags.writeable = False
    return lowest, table, channels


def _look_up(image: np.ndarray, lowest: int, table: np.ndarray, channels: int) -> np.ndarray:
    """``uint8 [..., channels]`` of integer ``image`` through a :func:`window_table` table (read-only)."""
    index = np.subtract(image, lowest, dtype=np.intp)
    if table.ndim == 2:  # 5 or more channels: rows of bytes
        return np.take(table, index, axis=0, mode="clip")
    words = np.take(table, index, mode="clip")  # [...] of uint8 / uint16 / uint32
    if channels != 3:
        return words.view(np.uint8).reshape(*image.shape, channels)
    from PIL import Image  # drops every 4th byte in C; numpy's strided copy of 3 of 4 bytes is ~6x slower

    width = image.shape[-1]
    packed = Image.frombuffer("RGBX", (width, image.size // width), words, "raw", "RGBX", 0, 1)
    return np.frombuffer(packed.tobytes("raw", "RGB"), np.uint8).reshape(*image.shape, 3)
