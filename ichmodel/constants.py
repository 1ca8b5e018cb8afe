"""Names and numbers shared by every part of the package."""

from __future__ import annotations

#: The five hemorrhage classes, in the order of every label vector and output column.
CLASSES: tuple[str, ...] = ("ich", "ivh", "sah", "sdh", "edh")
NUM_CLASSES = len(CLASSES)

#: Label-count task (LP): a slice carries 0..5 labels, so six classes.
NUM_COUNT_CLASSES = NUM_CLASSES + 1

#: RSNA 2019 subtype names for our classes (``any`` is derived as their maximum).
RSNA_SUBTYPES: dict[str, str] = {
    "ich": "intraparenchymal",
    "ivh": "intraventricular",
    "sah": "subarachnoid",
    "sdh": "subdural",
    "edh": "epidural",
}
#: Row order of the subtypes of one slice in RSNA files (``stage_2_train.csv`` and Kaggle's sample submission).
RSNA_ROW_ORDER: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)

#: CT windows (level, width) in Hounsfield units used by top RSNA solutions: brain, subdural, bone.
DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))

#: The window the DLCV course JPEGs look windowed with (brain: level 40, width 80); the synthetic DLCV
#: data is written with it, and the manifest of DLCV shards records it.
DLCV_WINDOW: tuple[float, float] = (40.0, 80.0)

#: Course leaderboard header and the per-slice CSV header of the DLCV layout.
DLCV_LABEL_HEADER: tuple[str, ...] = ("dirname", "ID", *CLASSES)
LEADERBOARD_HEADER: tuple[str, ...] = ("ID", "prediction")
