"""A static page to look at predictions: ``OUT/viewer/index.html`` and small slice thumbnails.

One row per series (a ``<section class="series">`` with ``data-*`` attributes the page sorts and filters on):

- the series' decision (a class is positive when any slice reaches the class threshold) and, where the
  prediction table carries labels, the classes it missed or raised falsely;
- one strip per class (inline SVG): a bar per slice for its probability, red where it reaches the threshold
  (dashed line), grey below it; under the bars, for labelled rows, a band marking each labelled slice as
  caught (dark), missed (orange, FN) or a false alarm (purple, FP);
- thumbnails of the slices that fired (the highest first, up to ``max_thumbs``), and of missed slices, as
  the model saw them: the ``uint8`` window channels of the shards, side by side in greyscale, one panel per
  distinct window (brain | subdural | bone for DICOM shards; one panel for DLCV shards, whose three
  channels are the same JPEG). Side by side rather than one RGB composite: a reader knows each window in
  grey, while an RGB blend of brain/subdural/bone has no colour a radiologist reads.

The page is static (no server, no network, opens from ``file://``): the strips are inline SVG paths, the
thumbnails are small WebP files (PNG where Pillow lacks WebP) under ``viewer/thumbs/`` loaded lazily, and a
few lines of vanilla JavaScript sort the rows (highest probability overall or of one class, most errors,
series id) and filter them. The URL hash sets both on load (``index.html#sort=max-sah&show=fn``). This
module reads the rows and writes the thumbnails; :mod:`ichmodel.viewer_page` renders the page.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, features

from ichmodel.constants import NUM_CLASSES
from ichmodel.prediction_table import KEY_COLUMNS, prediction_arrays
from ichmodel.shards import load_manifest, series_index
from ichmodel.viewer_page import SeriesView, page_html

logger = logging.getLogger(__name__)

VIEWER_DIR = "viewer"
VIEWER_INDEX = "index.html"
THUMB_DIR = "thumbs"
#: Names of the usual CT windows (level, width in HU), for the thumbnail captions.
WINDOW_NAMES: dict[tuple[float, float], str] = {
    (40.0, 80.0): "brain",
    (80.0, 200.0): "subdural",
    (600.0, 2800.0): "bone",
}


def series_views(predictions: pd.DataFrame, thresholds: Sequence[float] | np.ndarray) -> list[SeriesView]:
    """The prediction table (``ichmodel.prediction_table``'s columns) split by series, sorted by id and position.

    Raises:
        ValueError: when ``thresholds`` does not hold 5 values or a key column is missing.
        KeyError: naming missing probability columns.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (NUM_CLASSES,):
        raise ValueError(f"thresholds must hold {NUM_CLASSES} values. Got shape {thresholds.shape}")
    missing = [c for c in KEY_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"Prediction table lacks {missing}; has {list(predictions.columns)}")
    frame = predictions.sort_values(["series_id", "position"], kind="stable").reset_index(drop=True)
    probs, labels = prediction_arrays(frame)
    views = []
    bounds = np.flatnonzero(
        np.r_[True, frame["series_id"].to_numpy()[1:] != frame["series_id"].to_numpy()[:-1]]
    )
    for i, (start, stop) in enumerate(zip(bounds, [*bounds[1:], len(frame)], strict=True)):
        p = probs[start:stop]
        views.append(
            SeriesView(
                index=i,
                series_id=str(frame["series_id"].iat[start]),
                slice_ids=[str(s) for s in frame["slice_id"].iloc[start:stop]],
                probs=p,
                labels=None if labels is None else labels[start:stop],
                fired=p >= thresholds,
            )
        )
    return views


def write_viewer(
    out_dir: str | Path,
    predictions: pd.DataFrame,
    thresholds: Sequence[float] | np.ndarray,
    shards: str | Path | Sequence[str | Path] = (),
    *,
    title: str = "Predictions",
    max_thumbs: int = 8,
    thumb_size: int = 80,
) -> Path:
    """Write ``out_dir/viewer/index.html`` and its thumbnails for a prediction table.

    Args:
        out_dir: the job's output folder (local); the page goes into its ``viewer/`` (replaced files only).
        predictions: a prediction table of :mod:`ichmodel.prediction_table` (``series_id, position, slice_id``, the
            five class probabilities, and ``label_<cls>`` columns when the series are labelled: then misses
            and false alarms are marked).
        thresholds: ``[5]`` per-class thresholds; a slice fires for a class when ``prob >= threshold``.
        shards: the shard folder(s) or storage URI(s) holding the series (thumbnails come from there); none:
            strips only.
        title: the page heading (e.g. which model or ensemble, which rows).
        max_thumbs: fired slices shown per series (highest probability first); missed slices add up to
            half as many again.
        thumb_size: side in pixels of one window panel (images are never enlarged).

    Returns:
        The path of ``index.html``.

    Raises:
        ValueError: for a bad table or thresholds, or a series that none of ``shards`` holds, or whose slices
            there differ from the table's.
    """
    if max_thumbs < 0 or thumb_size < 8:
        raise ValueError(f"max_thumbs must be >= 0 and thumb_size >= 8. Got {max_thumbs}, {thumb_size}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    views = series_views(predictions, thresholds)
    folder = Path(out_dir) / VIEWER_DIR
    (folder / THUMB_DIR).mkdir(parents=True, exist_ok=True)
    shard_dirs = [shards] if isinstance(shards, (str, Path)) else list(shards)
    chosen = {v.index: thumbnail_slices(v, max_thumbs) for v in views}
    thumbs, windows = (
        write_thumbnails(folder, views, chosen, shard_dirs, thumb_size)
        if shard_dirs and max_thumbs
        else ({}, [])
    )
    index = folder / VIEWER_INDEX
    index.write_text(page_html(title, views, thresholds, chosen, thumbs, windows))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    logger.info("viewer: %s (%d series, %d thumbnails, %.1f MB)", index, len(views), len(thumbs), size / 1e6)
    return index


def thumbnail_slices(view: SeriesView, max_thumbs: int) -> list[int]:
    """Positions to show, in slice order: the ``max_thumbs`` fired slices of highest probability (over the
    classes they fired for), then up to ``max_thumbs // 2`` missed slices (most missed classes first)."""
    fired_score = np.where(view.fired, view.probs, -1.0).max(axis=1)  # [T]
    fired = [int(i) for i in np.argsort(-fired_score, kind="stable") if fired_score[i] >= 0][:max_thumbs]
    missed_count = view.fn.sum(axis=1)
    missed = [int(i) for i in np.argsort(-missed_count, kind="stable") if missed_count[i] > 0]
    missed = [i for i in missed if i not in fired][: max_thumbs // 2]
    return sorted(fired + missed)


def window_panels(windows: Sequence[Sequence[float]]) -> list[int]:
    """Channels to show side by side: the first channel of each distinct window, in channel order."""
    seen, keep = set(), []
    for c, window in enumerate(windows):
        key = tuple(float(v) for v in window)
        if key not in seen:
            seen.add(key)
            keep.append(c)
    return keep or [0]


def window_label(window: Sequence[float]) -> str:
    level, width = (float(v) for v in window)
    name = WINDOW_NAMES.get((level, width), "window")
    return f"{name} ({level:g}/{width:g})"


def thumbnail_image(image: np.ndarray, channels: Sequence[int], size: int, gap: int = 2) -> Image.Image:
    """The ``channels`` of one ``uint8`` slice ``[C, H, W]`` side by side in greyscale, each at most
    ``size`` pixels wide (never enlarged), ``gap`` black pixels between them."""
    panels = []
    for c in channels:
        panel = Image.fromarray(np.ascontiguousarray(image[c]), mode="L")
        if max(panel.size) > size:
            panel.thumbnail((size, size), Image.Resampling.LANCZOS)
        panels.append(panel)
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("L", (width, max(p.height for p in panels)), 0)
    x = 0
    for panel in panels:
        out.paste(panel, (x, 0))
        x += panel.width + gap
    return out


def thumb_format() -> tuple[str, str, dict]:
    """``(Pillow format, file suffix, save options)``: WebP (lossy, quality 85) where Pillow has it."""
    return (
        ("WEBP", ".webp", {"quality": 85, "method": 4})
        if features.check("webp")
        else ("PNG", ".png", {"optimize": True})
    )


def write_thumbnails(
    folder: Path,
    views: Sequence[SeriesView],
    chosen: dict[int, list[int]],
    shard_dirs: Sequence[str | Path],
    size: int,
) -> tuple[dict[tuple[int, int], str], list[str]]:
    """Write the chosen slices' thumbnails under ``folder/thumbs``.

    Returns:
        ``({(series index, position): relative file name}, labels of the windows shown)``.

    Raises:
        ValueError: for a series in none of ``shard_dirs``, or whose slice ids differ from the table's.
    """
    from ichmodel.dataset import SeriesDataset  # torch: only when thumbnails are asked for

    owner: dict[str, str] = {}
    manifests = {}
    for shard_dir in shard_dirs:
        manifest = load_manifest(shard_dir)
        manifests[str(shard_dir)] = manifest
        for series_id in series_index(manifest):
            owner.setdefault(series_id, str(shard_dir))
    wanted = [v for v in views if chosen[v.index]]
    absent = [v.series_id for v in wanted if v.series_id not in owner]
    if absent:
        raise ValueError(
            f"Series not in the shard folders {[str(s) for s in shard_dirs]}: {absent[:5]} ({len(absent)} in all)"
        )
    fmt, suffix, options = thumb_format()
    written: dict[tuple[int, int], str] = {}
    labels: list[str] = []
    for shard_dir, manifest in manifests.items():
        mine = [v for v in wanted if owner[v.series_id] == shard_dir]
        if not mine:
            continue
        windows = manifest.get("windows") or [[0.0, 0.0]]
        channels = window_panels(windows)
        labels = labels or [window_label(windows[c]) for c in channels]
        dataset = SeriesDataset(shard_dir, [v.series_id for v in mine])
        for i, view in enumerate(mine):
            item = dataset[i]
            if item["slice_ids"] != view.slice_ids:
                raise ValueError(
                    f"Series {view.series_id}: the prediction table's {len(view.slice_ids)} slices differ from "
                    f"the {len(item['slice_ids'])} in {shard_dir}"
                )
            images = item["images"].numpy()  # [T, C, H, W] uint8, what the model was given
            for position in chosen[view.index]:
                name = f"{THUMB_DIR}/s{view.index:05d}_p{position:04d}{suffix}"
                thumbnail_image(images[position], channels, size).save(folder / name, fmt, **options)
                written[(view.index, position)] = name
    return written, labels


__all__ = [
    "SeriesView",
    "series_views",
    "thumbnail_image",
    "thumbnail_slices",
    "window_panels",
    "write_viewer",
]
