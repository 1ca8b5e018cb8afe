"""Put this checkout's repository root first on ``sys.path``, for a job run as a script.

``python ray_jobs/tune.py`` (also what ``ray job submit --working-dir . -- python ray_jobs/tune.py`` runs in
the uploaded copy) puts only ``ray_jobs/`` on ``sys.path``; without this, ``import ichmodel`` would find an
installed, possibly older copy, or none. Every job script imports this module first when it runs as a
script, which is when it has no module spec (``if __spec__ is None: import _paths``); imported as a module
(``ray_jobs.tune`` in tests and Ray workers, or from its file by a test) the root is on the path already.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path[:1] != [ROOT]:
    if ROOT in sys.path:
        sys.path.remove(ROOT)
    sys.path.insert(0, ROOT)
