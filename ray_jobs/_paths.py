"""Put this checkout's repository root first on ``sys.path``, for a job run as a script.

``python ray_jobs/tune.py`` (also what ``ray job submit --working-dir . -- python ray_jobs/tune.py`` runs in
the uploaded copy) puts only ``ray_jobs/`` on ``sys.path``; without this, ``import ichmodel`` would find an
installed, possibly older copy, or none. Every job script imports this module first, when it runs as a
script (``if not __package__: import _paths``); imported as ``ray_jobs.<job>`` (tests, Ray workers) the root
is on the path already.
"""

from __future__ import annotations

if not __package__:  # run as a script: this checkout's root first on the import path
    import _paths  # noqa: F401

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path[:1] != [ROOT]:
    if ROOT in sys.path:
        sys.path.remove(ROOT)
    sys.path.insert(0, ROOT)
