"""Synthetic head CT: series of slices in Hounsfield units with the five hemorrhage types, written in the
layouts users bring (RSNA DICOM, the DLCV ``Blood_data`` JPEG folders, a plain DICOM folder).

This is the embedded default data of the demo and of every test. The anatomy is simple but placed like
the real thing, so that both the image and the sequence context carry the labels:

* skull ellipse (bone ~1200 HU) with scalp, brain (white matter ~28 HU, cortex ~38 HU), CSF in the
  lateral ventricles, the interhemispheric fissure and a few sulci (~5-8 HU), air (-1000 HU) outside;
* epidural (``edh``): a thick, short lens against the inner skull;
* subdural (``sdh``): a thin, long crescent along the inner skull;
* subarachnoid (``sah``): blood filling sulci / the fissure (thin lines);
* intraventricular (``ivh``): blood layering in the dependent part of a ventricle;
* intraparenchymal (``ich``): a lobulated blob with a low-density oedema rim.

Each lesion spans several neighbouring slices and shrinks towards its ends; a slice is labelled positive
only where the lesion actually covers at least a few pixels, so labels always agree with the pixels.
Blood is 60-80 HU. Slice positive rates are close to the DLCV data (about 35% of slices carry a label).

How hard the data is comes from a :class:`Difficulty` (lesion contrast against brain, extent in slices
and in plane, noise, class prevalence, series length); :data:`PRESETS` names ``easy``, ``default`` (the
generator's behaviour before difficulty was configurable, bit for bit) and ``hard`` (faint, thin SAH and EDH
near the skull, few positives, noisier).

Everything is drawn from one ``numpy.random.Generator``: a seed fixes every pixel, UID and file name.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ichmodel.constants import CLASSES, DLCV_WINDOW, NUM_CLASSES, RSNA_ROW_ORDER, RSNA_SUBTYPES
from ichmodel.decode import apply_windows

if TYPE_CHECKING:
    from pydicom.dataset import FileDataset

logger = logging.getLogger(__name__)

RSNA_CSV_SUBTYPES = RSNA_ROW_ORDER  # rows of ``stage_2_train.csv`` for one slice

#: Probability that a series holds a lesion of each class (tuned so slice rates resemble FACTS.md).
LESION_SERIES_PROB: dict[str, float] = {"ich": 0.23, "ivh": 0.3, "sah": 0.2, "sdh": 0.37, "edh": 0.1}


@dataclass(frozen=True)
class Difficulty:
    """How hard the generated data is. The defaults are the generator's behaviour before this existed.

    Every range is drawn uniformly per lesion (or per series); the scale factors multiply sizes drawn with
    the default ranges, so a factor of 1 leaves every random draw and every pixel unchanged.
    """

    #: Blood density in HU, per lesion (brain is 28 HU, cortex 38 HU, CSF 6-8 HU, bone 1200 HU).
    blood_hu: tuple[float, float] = (60.0, 80.0)
    #: Classes whose lesions take ``faint_hu`` instead (fainter against brain), e.g. ``("sah", "edh")``.
    faint_classes: tuple[str, ...] = ()
    faint_hu: tuple[float, float] = (60.0, 80.0)
    #: Multiplies each class's probability of a lesion per series (``LESION_SERIES_PROB``), capped at 1.
    prevalence: float = 1.0
    #: Multiplies the prevalence of ``faint_classes`` only (on top of ``prevalence``).
    faint_prevalence: float = 1.0
    #: Half length of a lesion along the series, as a fraction of the series' slices.
    half_extent: tuple[float, float] = (0.12, 0.3)
    #: In-plane size of every lesion (EDH/SDH depth, ICH radius, IVH fill, SAH sulcus count) ...
    in_plane: float = 1.0
    #: ... and of ``faint_classes`` only, on top of ``in_plane`` (thin SAH and EDH hug the skull).
    faint_in_plane: float = 1.0
    #: Gaussian pixel noise, HU.
    noise_hu: float = 4.0
    #: Slices per series, ``(low, high)``; ``None``: the range the writer is given.
    series_length: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faint_classes) - set(CLASSES))
        if unknown:
            raise ValueError(f"Difficulty.faint_classes must name classes of {list(CLASSES)}. Got {unknown}")
        for name in ("blood_hu", "faint_hu", "half_extent"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"Difficulty.{name} must be a range (low <= high). Got {(lo, hi)}")
        if self.half_extent[0] <= 0:
            raise ValueError(f"Difficulty.half_extent must be > 0. Got {self.half_extent}")
        for name in ("prevalence", "faint_prevalence", "in_plane", "faint_in_plane"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Difficulty.{name} must be > 0. Got {getattr(self, name)}")
        if self.noise_hu < 0:
            raise ValueError(f"Difficulty.noise_hu must be >= 0. Got {self.noise_hu}")
        if self.series_length is not None and not 1 <= self.series_length[0] <= self.series_length[1]:
            raise ValueError(
                f"Difficulty.series_length must be A-B with 1 <= A <= B. Got {self.series_length}"
            )

    def series_prob(self, cls: str) -> float:
        """Probability that a series holds a lesion of class ``cls``."""
        factor = self.prevalence * (self.faint_prevalence if cls in self.faint_classes else 1.0)
        return LESION_SERIES_PROB[cls] if factor == 1.0 else min(1.0, LESION_SERIES_PROB[cls] * factor)

    def size_factor(self, cls: str) -> float:
        return self.in_plane * (self.faint_in_plane if cls in self.faint_classes else 1.0)


#: Named difficulty settings (``--setting`` of bench/ablation.py). ``default`` is today's data, bit for bit.
PRESETS: dict[str, Difficulty] = {
    "easy": Difficulty(blood_hu=(70.0, 90.0), half_extent=(0.18, 0.35), in_plane=1.25, noise_hu=2.0),
    "default": Difficulty(),
    "hard": Difficulty(
        blood_hu=(52.0, 70.0),
        faint_classes=("sah", "edh"),
        faint_hu=(44.0, 54.0),  # 6-16 HU over cortex, 1/4-1/2 of the default contrast
        prevalence=0.7,
        faint_prevalence=0.6,
        half_extent=(0.08, 0.2),
        in_plane=0.85,
        faint_in_plane=0.6,
        noise_hu=6.0,
    ),
}


def get_difficulty(name: str) -> Difficulty:
    """The preset called ``name``.

    Raises:
        ValueError: naming the presets, for an unknown name.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown difficulty {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]


SLICE_THICKNESS_MM = 5.0
FIELD_OF_VIEW_MM = 250.0
_CSF_HU = 6.0


@dataclass
class SynthSummary:
    """What a ``write_*`` call produced."""

    root: str
    format: str
    num_series: int = 0
    num_slices: int = 0
    #: Fraction of slices positive for each class, plus ``any``.
    positive_rate: dict[str, float] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Head:
    """Per-series anatomy parameters (pixels unless noted)."""

    cx: float
    cy: float
    ax: float  # outer skull semi-axis, left-right
    ay: float  # outer skull semi-axis, antero-posterior
    angle: float  # in-plane rotation, radians
    skull: float  # skull thickness as a fraction of the semi-axes
    sulci: np.ndarray  # angles of the sulci, radians
    vent_range: tuple[float, float]  # slice fraction where the lateral ventricles show


@dataclass(frozen=True)
class _Lesion:
    cls: str
    center: float  # slice index of the largest extent
    half: float  # half length in slices
    hu: float
    params: dict


def _draw_head(rng: np.random.Generator, size: int) -> _Head:
    return _Head(
        cx=size / 2 + rng.normal(0, 0.02 * size),
        cy=size / 2 + rng.normal(0, 0.02 * size),
        ax=size * 0.36 * rng.uniform(0.95, 1.05),
        ay=size * 0.44 * rng.uniform(0.95, 1.05),
        angle=rng.uniform(-0.12, 0.12),
        skull=rng.uniform(0.06, 0.085),
        sulci=np.sort(rng.uniform(-math.pi, math.pi, size=rng.integers(6, 10))),
        vent_range=(rng.uniform(0.3, 0.4), rng.uniform(0.62, 0.75)),
    )


def _head_scale(frac: float) -> float:
    """Relative size of the skull cross-section at slice fraction ``frac`` (0 = skull base, 1 = vertex)."""
    return math.sqrt(min(1.0, max(0.08, 1.0 - ((frac - 0.45) / 0.62) ** 2)))


def _draw_lesions(
    rng: np.random.Generator, head: _Head, num_slices: int, difficulty: Difficulty
) -> list[_Lesion]:
    lesions = []
    for cls in CLASSES:
        if rng.random() >= difficulty.series_prob(cls):
            continue
        half = rng.uniform(*difficulty.half_extent) * num_slices
        if cls == "ivh":
            lo, hi = (f * num_slices for f in head.vent_range)
            center = rng.uniform(lo, hi)
            half = min(half, (hi - lo) / 2 + 1)
        else:
            center = rng.uniform(0.2, 0.8) * num_slices
        params: dict = {"phi": rng.uniform(-math.pi, math.pi)}
        if cls == "edh":
            params |= {"width": rng.uniform(0.3, 0.5), "depth": rng.uniform(0.12, 0.2)}
        elif cls == "sdh":
            params |= {"width": rng.uniform(0.8, 1.4), "depth": rng.uniform(0.05, 0.09)}
        elif cls == "sah":
            params |= {
                "lines": rng.permutation(len(head.sulci))[: rng.integers(2, 5)],
                "fissure": rng.random() < 0.5,
            }
        elif cls == "ivh":
            params |= {"side": int(rng.integers(0, 2)), "fill": rng.uniform(0.35, 0.75)}
        elif cls == "ich":
            r = math.sqrt(rng.uniform(0.0, 0.3))
            params |= {
                "u": r * math.cos(params["phi"]),
                "v": r * math.sin(params["phi"]),
                "radius": rng.uniform(0.12, 0.24),
                "lobes": int(rng.integers(2, 5)),
            }
        scale = difficulty.size_factor(cls)
        if scale != 1.0:
            params = _scaled(cls, params, scale)
        blood = difficulty.faint_hu if cls in difficulty.faint_classes else difficulty.blood_hu
        lesions.append(_Lesion(cls, center, half, rng.uniform(*blood), params))
    return lesions


def _scaled(cls: str, params: dict, scale: float) -> dict:
    """A lesion's in-plane parameters with its size multiplied by ``scale``."""
    params = dict(params)
    if cls in ("edh", "sdh"):
        params["depth"] *= scale
        params["width"] *= math.sqrt(scale)
    elif cls == "sah":
        params["lines"] = params["lines"][: max(1, round(len(params["lines"]) * scale))]
        params["fissure"] = params["fissure"] and scale >= 1.0
    elif cls == "ivh":
        params["fill"] = min(1.0, params["fill"] * scale)
    elif cls == "ich":
        params["radius"] *= scale
    return params


def _angle_diff(a: np.ndarray, b: float) -> np.ndarray:
    return np.abs((a - b + math.pi) % (2 * math.pi) - math.pi)


def generate_series(
    rng: np.random.Generator,
    num_slices: int,
    size: int,
    noise_hu: float | None = None,
    difficulty: Difficulty | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one head CT series.

    Args:
        rng: the generator every random choice comes from.
        num_slices: T, slices from skull base (index 0) to vertex.
        size: H = W of each slice in pixels (64-512).
        noise_hu: standard deviation of the Gaussian pixel noise (default: ``difficulty.noise_hu``).
        difficulty: lesion contrast, extent, prevalence and noise (default: ``PRESETS["default"]``).

    Returns:
        ``(hu, labels)``: ``hu`` float32 ``[T, H, W]`` in Hounsfield units, ``labels`` uint8 ``[T, 5]``
        in ``constants.CLASSES`` order.

    Raises:
        ValueError: if ``num_slices`` < 1 or ``size`` < 16.
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1. Got {num_slices}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels. Got {size}")
    difficulty = difficulty or PRESETS["default"]
    noise_hu = difficulty.noise_hu if noise_hu is None else noise_hu
    head = _draw_head(rng, size)
    lesions = _draw_lesions(rng, head, num_slices, difficulty)
    min_area = max(3.0, 3.0 * (size / 64) ** 2)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cos, sin = math.cos(head.angle), math.sin(head.angle)
    xr = (xs - head.cx) * cos + (ys - head.cy) * sin  # rotated, pixels
    yr = -(xs - head.cx) * sin + (ys - head.cy) * cos

    hu = np.empty((num_slices, size, size), dtype=np.float32)
    labels = np.zeros((num_slices, NUM_CLASSES), dtype=np.uint8)
    for k in range(num_slices):
        frac = (k + 0.5) / num_slices
        s = _head_scale(frac)
        u, v = xr / (head.ax * s), yr / (head.ay * s)
        img, parts = _anatomy(head, u, v, frac, s, size)
        for lesion in lesions:
            profile = 1.0 - ((k - lesion.center) / (lesion.half + 0.5)) ** 2
            if profile <= 0:
                continue
            mask = _lesion_mask(lesion, math.sqrt(profile), u, v, *parts)
            if mask is None or mask.sum() < min_area:
                continue
            if lesion.cls == "ich":
                rim = _ich_mask(lesion, math.sqrt(profile), u, v, parts[2], scale=1.35) & ~mask
                img[rim] = 18.0
            img[mask] = lesion.hu
            labels[k, CLASSES.index(lesion.cls)] = 1
        img += rng.standard_normal((size, size), dtype=np.float32) * np.float32(noise_hu)
        hu[k] = img
    return hu, labels


def _anatomy(
    head: _Head, u: np.ndarray, v: np.ndarray, frac: float, s: float, size: int
) -> tuple[np.ndarray, tuple]:
    """One slice's HU image without lesions or noise, and the masks lesions are drawn against.

    ``u, v`` are the pixel coordinates in head units at this height (``frac`` from the base, head scale
    ``s``). Returns ``(img [H, W], (rho_b, phi, brain, sulci_masks, fissure, ventricles))``. Draws nothing
    at random: the series' randomness is all in ``head`` and the lesions.
    """
    rho = np.sqrt(u * u + v * v)  # 1 on the outer skull
    inner = 1.0 - head.skull
    rho_b = rho / inner  # 1 on the inner skull
    phi = np.arctan2(v, u)
    r_px = 0.5 * (head.ax + head.ay) * s * inner  # mean inner radius in pixels

    img = np.full((size, size), -1000.0, dtype=np.float32)
    img[(rho >= 1.0) & (rho < 1.0 + 0.05)] = 35.0  # scalp
    img[(rho >= inner) & (rho < 1.0)] = 1200.0  # skull
    brain = rho_b < 1.0
    img[brain] = 28.0
    img[brain & (rho_b > 0.84)] = 38.0  # cortex

    line_half_px = max(0.6, size / 128)
    sulci_masks = [
        brain & (rho_b > 0.75) & (_angle_diff(phi, a) * rho_b * r_px < line_half_px) for a in head.sulci
    ]
    fissure = brain & (np.abs(u * head.ax * s) < line_half_px) & (v < -0.15) & (rho_b < 0.97)
    for m in [*sulci_masks, fissure]:
        img[m] = _CSF_HU + 2.0

    vent_lo, vent_hi = head.vent_range
    ventricles = []
    if vent_lo <= frac <= vent_hi:
        vp = math.sqrt(
            max(0.0, 1 - ((frac - (vent_lo + vent_hi) / 2) / ((vent_hi - vent_lo) / 2 + 1e-6)) ** 2)
        )
        for side in (-1.0, 1.0):
            du, dv = (u - side * 0.14) / (0.07 * vp + 1e-3), (v + 0.05) / (0.3 * vp + 1e-3)
            ventricles.append(brain & (du * du + dv * dv < 1.0))
        for m in ventricles:
            img[m] = _CSF_HU
    return img, (rho_b, phi, brain, sulci_masks, fissure, ventricles)


def _ich_mask(lesion: _Lesion, p: float, u, v, brain, scale: float = 1.0) -> np.ndarray:
    q = lesion.params
    du, dv = u - q["u"], v - q["v"]
    r = np.sqrt(du * du + dv * dv)
    theta = np.arctan2(dv, du)
    radius = q["radius"] * p * scale * (1.0 + 0.2 * np.sin(q["lobes"] * theta + q["phi"]))
    return brain & (r < radius)


def _lesion_mask(lesion, p, u, v, rho_b, phi, brain, sulci_masks, fissure, ventricles) -> np.ndarray | None:
    q = lesion.params
    if lesion.cls in ("edh", "sdh"):
        width = q["width"] * (0.6 + 0.4 * p)
        t = np.clip(_angle_diff(phi, q["phi"]) / width, 0.0, 1.0)
        # edh: blunt biconvex lens (sqrt profile); sdh: thin crescent tapering to the tips
        shape = np.sqrt(1.0 - t * t) if lesion.cls == "edh" else 1.0 - t * t
        depth = q["depth"] * p * shape
        return brain & (t < 1.0) & (rho_b > 1.0 - depth)
    if lesion.cls == "sah":
        n = max(1, math.ceil(len(q["lines"]) * p))
        mask = np.zeros_like(brain)
        for i in q["lines"][:n]:
            mask |= sulci_masks[i]
        if q["fissure"]:
            mask |= fissure
        return mask
    if lesion.cls == "ivh":
        if not ventricles:
            return None
        vent = ventricles[q["side"]]
        if not vent.any():
            return None
        vv = v[vent]
        level = vv.max() - (vv.max() - vv.min()) * q["fill"] * p
        return vent & (v >= level)
    if lesion.cls == "ich":
        return _ich_mask(lesion, p, u, v, brain)
    raise ValueError(f"Unknown lesion class {lesion.cls!r}")


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def _random_hex(rng: np.random.Generator, used: set[str], n: int = 9) -> str:
    while True:
        value = "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, size=n))
        if value not in used:
            used.add(value)
            return value


def _random_uid(rng: np.random.Generator) -> str:
    """A valid, seeded DICOM UID under the UUID-derived root ``2.25``."""
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big"))


def _draw_num_slices(
    rng: np.random.Generator, slices: tuple[int, int], difficulty: Difficulty | None = None
) -> int:
    lo, hi = slices if difficulty is None or difficulty.series_length is None else difficulty.series_length
    if lo < 1 or hi < lo:
        raise ValueError(f"slices must be a range A-B with 1 <= A <= B. Got {slices}")
    return int(rng.integers(lo, hi + 1))


def encode_ct_pixels(hu: np.ndarray, bits_stored: int) -> tuple[np.ndarray, int, int]:
    """Encode HU ``[H, W]`` as stored CT pixels with slope 1 / intercept -1024.

    Returns ``(pixels, pixel_representation, intercept)``: uint16 (12-bit, unsigned) or int16 (16-bit, signed).

    Raises:
        ValueError: for ``bits_stored`` other than 12 or 16.
    """
    raw = np.rint(hu + 1024.0)
    if bits_stored == 12:
        return np.clip(raw, 0, 4095).astype(np.uint16), 0, -1024
    if bits_stored == 16:
        return np.clip(raw, -32768, 32767).astype(np.int16), 1, -1024
    raise ValueError(f"bits_stored must be 12 or 16. Got {bits_stored}")


def encode_wrapped_12bit(hu: np.ndarray) -> np.ndarray:
    """Encode HU ``[H, W]`` the way the known-bad RSNA files are stored: 12-bit unsigned pixels that must be
    read with ``+1000``, wrap at 4096, intercept -1000 (their header claims an intercept > -100).
    """
    return (np.rint(np.clip(hu, -1000, 3095)).astype(np.int64) % 4096).astype(np.uint16)


def make_ct_dataset(
    pixels: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    z_mm: float,
    instance_number: int,
    patient_id: str,
    bits_stored: int,
    pixel_representation: int,
    intercept: float,
    pixel_spacing_mm: float = 1.0,
) -> FileDataset:
    """Build a CT Image Storage ``pydicom.FileDataset`` around stored pixels ``[H, W]`` (uint16 / int16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, round(z_mm, 3)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [round(pixel_spacing_mm, 6)] * 2
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def write_dicom_series(
    folder: str | Path,
    hu: np.ndarray,
    rng: np.random.Generator,
    *,
    file_names: list[str] | None = None,
    bits_stored: int = 16,
    patient_id: str = "SYNTH",
) -> list[Path]:
    """Write a volume ``[T, H, W]`` (HU) as one CT series, one file per slice, into ``folder``.

    Slice ``k`` gets z = z0 + 5 mm × k. ``file_names`` (default ``IM00001.dcm``, ...) name the files in slice
    order; pass shuffled random names to hide the order. Returns the written paths in slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    num_slices, height, _ = hu.shape
    names = file_names or [f"IM{k + 1:05d}.dcm" for k in range(num_slices)]
    if len(names) != num_slices:
        raise ValueError(f"Need {num_slices} file names. Got {len(names)}")
    study_uid, series_uid = _random_uid(rng), _random_uid(rng)
    z0 = float(rng.uniform(-200.0, 0.0))
    fov = np.hypot(*np.mgrid[0:height, 0:height] - (height - 1) / 2) > height / 2  # outside the scan circle
    paths = []
    for k in range(num_slices):
        slice_hu = hu[k]
        if bits_stored == 16:  # scanners pad outside the reconstruction circle with a very low value
            slice_hu = np.where(fov, -3024.0, slice_hu)
        pixels, representation, intercept = encode_ct_pixels(slice_hu, bits_stored)
        ds = make_ct_dataset(
            pixels,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=_random_uid(rng),
            z_mm=z0 + SLICE_THICKNESS_MM * k,
            instance_number=k + 1,
            patient_id=patient_id,
            bits_stored=bits_stored,
            pixel_representation=representation,
            intercept=intercept,
            pixel_spacing_mm=FIELD_OF_VIEW_MM / height,
        )
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _rates(all_labels: list[np.ndarray]) -> dict[str, float]:
    if not all_labels:
        return {}
    stacked = np.concatenate(all_labels)
    rates = {c: float(stacked[:, i].mean()) for i, c in enumerate(CLASSES)}
    rates["any"] = float(stacked.max(axis=1).mean())
    return rates


def write_rsna_dataset(
    out: str | Path,
    num_patients: int,
    slices: tuple[int, int] = (20, 40),
    size: int = 64,
    seed: int = 0,
    duplicate_rows: int = 0,
    difficulty: Difficulty | None = None,
) -> SynthSummary:
    """Write an RSNA-2019-style dataset: ``out/stage_2_train/ID_<hex>.dcm`` (all series in one flat folder,
    random names, so only ImagePositionPatient gives the order) and ``out/stage_2_train.csv``
    (``ID,Label`` with rows ``ID_<hex>_<subtype>``). Half the series are 12-bit unsigned, half 16-bit signed.
    ``duplicate_rows`` label rows are repeated at random, as in the real file.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    image_dir = out / "stage_2_train"
    image_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows: list[tuple[str, int]] = []
    all_labels = []
    num_slices_total = 0
    for patient in range(num_patients):
        num_slices = _draw_num_slices(rng, slices, difficulty)
        hu, labels = generate_series(rng, num_slices, size, difficulty=difficulty)
        ids = [f"ID_{_random_hex(rng, used)}" for _ in range(num_slices)]
        write_dicom_series(
            image_dir,
            hu,
            rng,
            file_names=[f"{i}.dcm" for i in ids],
            bits_stored=12 if patient % 2 else 16,
            patient_id=f"ID_{_random_hex(rng, used)}",
        )
        for slice_id, slice_labels in zip(ids, labels, strict=True):
            by_subtype = {RSNA_SUBTYPES[c]: int(slice_labels[i]) for i, c in enumerate(CLASSES)}
            by_subtype["any"] = int(slice_labels.max())
            rows.extend((f"{slice_id}_{sub}", by_subtype[sub]) for sub in RSNA_CSV_SUBTYPES)
        all_labels.append(labels)
        num_slices_total += num_slices
    # the real file lists slices in no particular order; shuffle by slice, keep each slice's six rows together
    order = rng.permutation(len(rows) // len(RSNA_CSV_SUBTYPES))
    n = len(RSNA_CSV_SUBTYPES)
    rows = [rows[i * n + j] for i in order for j in range(n)]
    for i in rng.integers(0, len(rows), size=duplicate_rows) if rows else []:
        rows.insert(int(rng.integers(0, len(rows))), rows[int(i)])
    with open(out / "stage_2_train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Label"])
        writer.writerows(rows)
    summary = SynthSummary(str(out), "rsna", num_patients, num_slices_total, _rates(all_labels))
    summary.extra = {"images": str(image_dir), "labels": str(out / "stage_2_train.csv")}
    logger.info("Wrote RSNA-style data: %d series, %d slices in %s", num_patients, num_slices_total, out)
    return summary


def write_dicom_folder(
    out: str | Path,
    num_patients: int,
    slices: tuple[int, int] = (20, 40),
    size: int = 64,
    seed: int = 0,
    difficulty: Difficulty | None = None,
) -> SynthSummary:
    """Write unlabelled studies as a scanner export would: ``out/<patient>/<series>/IM00001.dcm``, ...
    (for inference on new studies). Returns the summary of the hidden labels' rates.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    all_labels = []
    total = 0
    for patient in range(num_patients):
        num_slices = _draw_num_slices(rng, slices, difficulty)
        hu, labels = generate_series(rng, num_slices, size, difficulty=difficulty)
        write_dicom_series(
            out / f"patient{patient:04d}" / "series1", hu, rng, bits_stored=16 if patient % 2 else 12
        )
        all_labels.append(labels)
        total += num_slices
    logger.info("Wrote plain DICOM folder: %d series, %d slices in %s", num_patients, total, out)
    return SynthSummary(str(out), "dicom", num_patients, total, _rates(all_labels))


def write_dlcv_dataset(
    out: str | Path,
    num_patients: int,
    slices: tuple[int, int] = (20, 40),
    size: int = 64,
    seed: int = 0,
    test_patients: int = 0,
    difficulty: Difficulty | None = None,
) -> SynthSummary:
    """Write the DLCV course layout (``Blood_data``): ``out/train/<dirname>/<ID>.jpg`` with
    ``dirname = ID_<hex>`` and ``ID = <hex>_<n>.jpg`` (n = 0.. in slice order), 8-bit brain-windowed
    grayscale JPEGs, ``out/train.csv`` with header ``dirname,ID,ich,ivh,sah,sdh,edh`` (rows sorted as text,
    so ``_10`` comes before ``_2``), and ``test_patients`` unlabelled series under ``out/test/``.
    """
    from PIL import Image

    out = Path(out)
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    rows = []
    all_labels = []
    total = 0
    for patient in range(num_patients + test_patients):
        split = "train" if patient < num_patients else "test"
        num_slices = _draw_num_slices(rng, slices, difficulty)
        hu, labels = generate_series(rng, num_slices, size, difficulty=difficulty)
        stem = _random_hex(rng, used)
        dirname = f"ID_{stem}"
        folder = out / split / dirname
        folder.mkdir(parents=True, exist_ok=True)
        images = apply_windows(hu, [DLCV_WINDOW])[..., 0]  # [T, H, W] grey levels
        for k in range(num_slices):
            name = f"{stem}_{k}.jpg"
            Image.fromarray(images[k]).save(folder / name, quality=95)
            if split == "train":
                rows.append([dirname, name, *(int(x) for x in labels[k])])
        if split == "train":
            all_labels.append(labels)
            total += num_slices
    rows.sort(key=lambda r: (r[0], r[1]))
    with open(out / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dirname", "ID", *CLASSES])
        writer.writerows(rows)
    summary = SynthSummary(str(out), "dlcv", num_patients, total, _rates(all_labels))
    summary.extra = {"images": str(out / "train"), "labels": str(out / "train.csv")}
    if test_patients:
        summary.extra["test_images"] = str(out / "test")
    logger.info("Wrote DLCV-style data: %d train + %d test series in %s", num_patients, test_patients, out)
    return summary


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse_range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a slice range like 20-40. Got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ich-synth",
        description="Write synthetic head CT series with hemorrhage labels in the RSNA (DICOM) and/or DLCV "
        "(JPEG) layout. 'both' writes OUT/rsna and OUT/dlcv.",
    )
    parser.add_argument("--format", choices=["rsna", "dlcv", "dicom", "both"], default="both")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--patients", type=int, default=20, help="number of series (one per patient)")
    parser.add_argument("--test-patients", type=int, default=0, help="DLCV: unlabelled series under test/")
    parser.add_argument("--slices", type=_parse_range, default=(20, 40), help="slices per series, A-B")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", choices=sorted(PRESETS), default="default", help="named data setting")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    difficulty = PRESETS[args.difficulty]
    summaries = []
    if args.format in ("rsna", "both"):
        root = out / "rsna" if args.format == "both" else out
        summaries.append(
            write_rsna_dataset(root, args.patients, args.slices, args.size, args.seed, difficulty=difficulty)
        )
    if args.format in ("dlcv", "both"):
        root = out / "dlcv" if args.format == "both" else out
        summaries.append(
            write_dlcv_dataset(
                root,
                args.patients,
                args.slices,
                args.size,
                args.seed,
                args.test_patients,
                difficulty=difficulty,
            )
        )
    if args.format == "dicom":
        summaries.append(
            write_dicom_folder(out, args.patients, args.slices, args.size, args.seed, difficulty=difficulty)
        )
    for s in summaries:
        rates = ", ".join(f"{k} {v:.0%}" for k, v in s.positive_rate.items())
        print(f"{s.format}: {s.num_series} series, {s.num_slices} slices in {s.root} (positive: {rates})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
