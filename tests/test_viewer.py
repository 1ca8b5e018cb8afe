"""``ichmodel.viewer``: the prediction viewer's rows, marks and thumbnails, and the page in headless Chromium.

The predictions are real: a fresh model (``tests.datagen.write_checkpoint``) predicts the generated demo shards
through ``ichmodel.predict``, and thresholds at each class's 70th percentile make some slices fire, some
labelled slices go missed (FN) and some fire without a label (FP).
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ichmodel.checkpoint import load_model
from ichmodel.constants import CLASSES
from ichmodel.dataset import SeriesDataset
from ichmodel.predict import predict_dataset
from ichmodel.prediction_table import LABEL_COLUMNS, PROB_COLUMNS
from ichmodel.viewer import (
    series_views,
    thumbnail_image,
    thumbnail_slices,
    window_panels,
    write_viewer,
)
from tests.datagen import write_checkpoint

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class Rows(HTMLParser):
    """The ``section.series`` rows of a page in document order (their attributes), and every ``img`` src."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.lanes: list[dict[str, str]] = []
        self.images: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section" and "series" in a.get("class", "").split():
            self.rows.append(a)
        elif tag == "tr" and a.get("class") == "lane":
            self.lanes.append({**a, "series": self.rows[-1]["data-series"]})
        elif tag == "img":
            self.images.append(a["src"])


@pytest.fixture(scope="module")
def predictions(demo_shards, tmp_path_factory):
    """``(prediction table of the labelled demo shards, thresholds [5], shard folder)``."""
    train_shards = demo_shards[0]
    checkpoint = write_checkpoint(
        tmp_path_factory.mktemp("viewer_ckpt") / "checkpoint.pt", train_shards, seed=1
    )
    model, _, _ = load_model(checkpoint)
    frame = predict_dataset(model, SeriesDataset(train_shards), batch_size=4, amp_bf16=False)
    thresholds = np.quantile(frame[list(PROB_COLUMNS)].to_numpy(), 0.7, axis=0)
    return frame, thresholds, train_shards


def expected_errors(frame: pd.DataFrame, thresholds: np.ndarray) -> dict[str, tuple[int, int]]:
    """``{series_id: (missed, false alarms)}`` slice-class counts straight from the table."""
    fired = frame[list(PROB_COLUMNS)].to_numpy() >= thresholds
    labels = frame[list(LABEL_COLUMNS)].to_numpy() > 0
    work = pd.DataFrame(
        {"series": frame["series_id"], "fn": (labels & ~fired).sum(1), "fp": (~labels & fired).sum(1)}
    )
    sums = work.groupby("series")[["fn", "fp"]].sum()
    return {s: (int(r.fn), int(r.fp)) for s, r in sums.iterrows()}


def test_series_views_mark_missed_and_false_alarm_slices():
    frame = pd.DataFrame(
        {
            "series_id": ["b", "b", "a", "a", "a"],
            "position": [1, 0, 0, 1, 2],
            "slice_id": ["b1", "b0", "a0", "a1", "a2"],
            **{c: [0.0] * 5 for c in CLASSES},
            **{f"label_{c}": [0] * 5 for c in CLASSES},
        }
    )
    frame.loc[frame.slice_id == "a1", "sah"] = 0.9  # fires, labelled: caught
    frame.loc[frame.slice_id == "a1", "label_sah"] = 1
    frame.loc[frame.slice_id == "a2", "label_sah"] = 1  # labelled, 0.0: missed
    frame.loc[frame.slice_id == "b0", "ich"] = 0.6  # fires without a label: false alarm
    views = series_views(frame, [0.5] * 5)
    assert [v.series_id for v in views] == ["a", "b"]
    a, b = views
    assert a.slice_ids == ["a0", "a1", "a2"] and b.slice_ids == ["b0", "b1"]
    assert a.fn[:, 2].tolist() == [False, False, True] and int(a.fn.sum()) == 1 and int(a.fp.sum()) == 0
    assert b.fp[:, 0].tolist() == [True, False] and int(b.fp.sum()) == 1 and int(b.fn.sum()) == 0
    assert thumbnail_slices(a, 8) == [1, 2] and thumbnail_slices(b, 8) == [0]  # fired, then missed
    unlabelled = series_views(frame.drop(columns=[f"label_{c}" for c in CLASSES]), [0.5] * 5)
    assert unlabelled[0].labels is None and not unlabelled[0].fn.any() and not unlabelled[0].fp.any()
    with pytest.raises(ValueError, match="thresholds must hold 5 values"):
        series_views(frame, [0.5] * 4)


def test_thumbnails_put_each_distinct_window_side_by_side():
    image = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 120, 250)])  # [C, H, W]
    brain, subdural, bone = (40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)
    assert window_panels([brain, subdural, bone]) == [0, 1, 2]
    assert window_panels([brain, brain, brain]) == [0]  # DLCV: one JPEG in three channels
    three = np.asarray(thumbnail_image(image, [0, 1, 2], size=80, gap=2))
    assert three.shape == (32, 32 * 3 + 4)  # never enlarged
    assert three[0, 0] == 10 and three[0, 34] == 120 and three[0, -1] == 250 and three[0, 32] == 0
    big = np.zeros((3, 256, 256), np.uint8)
    assert np.asarray(thumbnail_image(big, [0], size=80)).shape == (80, 80)


def test_viewer_writes_one_row_per_series_with_marks_and_small_lazy_thumbnails(predictions, tmp_path):
    frame, thresholds, shards = predictions
    index = write_viewer(tmp_path, frame, thresholds, shards, title="demo <fresh>")
    assert index == tmp_path / "viewer" / "index.html"
    page = index.read_text()
    assert "<title>demo &lt;fresh&gt;</title>" in page and "data:image" not in page
    assert "http://" not in page and "https://" not in page  # nothing from the network
    parsed = Rows(page)
    expected = expected_errors(frame, thresholds)
    assert sorted(r["data-series"] for r in parsed.rows) == sorted(expected)
    assert sum(e[0] for e in expected.values()) > 0 and sum(e[1] for e in expected.values()) > 0
    for row in parsed.rows:
        assert (int(row["data-fn"]), int(row["data-fp"])) == expected[row["data-series"]]
    highest = [float(r["data-max"]) for r in parsed.rows]
    assert highest == sorted(highest, reverse=True)  # the page's first order, before any script runs
    assert len(parsed.lanes) == len(CLASSES) * len(expected)
    strips = page.split("<svg")[1:]
    assert sum('class="fired"' in svg for svg in strips) > 0
    for svg in strips:  # the grey step area of every slice first, the fired bars drawn over it
        assert svg.index('class="below"') < svg.find('class="fired"') or 'class="fired"' not in svg
    assert parsed.images and page.count('loading="lazy"') == len(parsed.images)
    dataset = SeriesDataset(shards)
    order = sorted(frame["series_id"].unique())
    for src in parsed.images:
        path = index.parent / src
        assert path.stat().st_size < 8_000, (src, path.stat().st_size)
        s, p = (int(x[1:]) for x in path.stem.split("_"))  # s<series index>_p<position>
        original = dataset[dataset.series_ids.index(order[s])]["images"][p, 0].numpy()  # [H, W] channel 0
        shown = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
        assert shown.shape == original.shape  # 32 px DLCV slices: one panel, not enlarged
        assert np.abs(shown - original).mean() < 6.0  # lossy WebP of the very pixels the model saw


def test_viewer_without_shards_draws_strips_only_and_names_missing_series(predictions, tmp_path):
    frame, thresholds, shards = predictions
    page = write_viewer(tmp_path / "a", frame, thresholds).read_text()
    assert "<img" not in page and "No thumbnails" in page
    assert len(Rows(page).rows) == frame["series_id"].nunique()
    unlabelled = frame.drop(columns=list(LABEL_COLUMNS))
    page = write_viewer(tmp_path / "u", unlabelled, thresholds).read_text()
    assert "missed (FN)" not in page and 'value="fn"' not in page and "data-labelled" not in page
    assert {(r["data-fn"], r["data-fp"]) for r in Rows(page).rows} == {("0", "0")}
    stranger = frame.assign(
        series_id=frame["series_id"].where(frame["series_id"] != frame["series_id"].iat[0], "ID_nowhere")
    )
    with pytest.raises(ValueError, match=r"Series not in the shard folders .*ID_nowhere"):
        write_viewer(tmp_path / "b", stranger, np.zeros(5), shards)


def chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def run_chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url`` (``--no-sandbox``: the tests may run as root in a container)."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *flags, url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(
    chromium() is None,
    reason="no Chromium installed (Debian: apt-get install chromium; make test does it as root)",
)
def test_viewer_in_headless_chromium_renders_rows_marks_and_sorts(predictions, tmp_path):
    frame, thresholds, shards = predictions
    index = write_viewer(tmp_path, frame, thresholds, shards)
    url = index.resolve().as_uri()
    shot = tmp_path / "shot.png"
    proc = run_chromium(url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1000")
    assert shot.is_file(), proc.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    pixels = rgb.mean(axis=2)
    assert pixels.shape == (1000, 1280)
    assert pixels.std() > 20 and (pixels < 60).mean() > 0.01  # text, bars and CT slices, not a blank page
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)  # fired bars, decision chips
    assert red.mean() > 0.002, red.mean()

    dom = run_chromium(url, tmp_path / "profile", "--dump-dom")
    parsed = Rows(dom.stdout)
    expected = expected_errors(frame, thresholds)
    assert len(parsed.rows) == len(expected), dom.stderr[-2000:]
    assert {r["data-series"]: (int(r["data-fn"]), int(r["data-fp"])) for r in parsed.rows} == expected
    lanes = {
        (lane["series"], lane["data-class"]): (int(lane["data-fn"]), int(lane["data-fp"]))
        for lane in parsed.lanes
    }
    fired = frame[list(PROB_COLUMNS)].to_numpy() >= thresholds
    labels = frame[list(LABEL_COLUMNS)].to_numpy() > 0
    for c, cls in enumerate(CLASSES):
        for series, part in frame.groupby("series_id"):
            rows = frame.index.get_indexer(part.index)
            want = (
                int((labels[rows, c] & ~fired[rows, c]).sum()),
                int((~labels[rows, c] & fired[rows, c]).sum()),
            )
            assert lanes[(series, cls)] == want
    highest = [float(r["data-max"]) for r in parsed.rows]
    assert highest == sorted(highest, reverse=True)
    assert all("hidden" not in r for r in parsed.rows)

    # the script sorts by one class and filters to the series with misses, as the URL hash asks
    dom = run_chromium(url + "#sort=max-sah&show=fn", tmp_path / "profile", "--dump-dom")
    parsed = Rows(dom.stdout)
    by_sah = frame.groupby("series_id")["sah"].max()
    want_order = sorted(by_sah.index, key=lambda s: (-float(f"{by_sah[s]:.4f}"), s))
    assert [r["data-series"] for r in parsed.rows] == want_order
    visible = {r["data-series"] for r in parsed.rows if "hidden" not in r}
    assert visible == {s for s, (fn, _) in expected.items() if fn > 0} and visible != set(expected)
