"""Put this checkout's repository root first on ``sys.path``, for a benchmark run as a script.

``python bench/train_step.py`` puts only ``bench/`` on ``sys.path``; without this, ``import ichmodel`` would
find an installed, possibly older copy, or none. Every benchmark imports this module first when it runs as a
script, which is when it has no module spec (``if __spec__ is None: import _paths``); imported as a module
(from its file by tests/test_bench.py) the root is on the path already.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path[:1] != [ROOT]:
    if ROOT in sys.path:
        sys.path.remove(ROOT)
    sys.path.insert(0, ROOT)
