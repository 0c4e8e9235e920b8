"""The test session's workers each bring up a local fleet of their own.

``make test TEST_WORKERS=2`` runs pytest in two workers (pytest-xdist): ``gwN`` uses fleet
``WSFLEET_FLEET + N`` (its own bridge, subnet, host names and state: localfleet.settings),
so that the fleet modules each worker takes (tests/fleet/conftest.py) run beside the
other's. Set here, before anything imports localfleet, which reads it once.
"""

from __future__ import annotations

import os

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under xdist
if _WORKER.startswith("gw"):
    _BASE = int(os.environ.get("WSFLEET_FLEET", "0") or 0)
    os.environ["WSFLEET_FLEET"] = str(_BASE + int(_WORKER[2:]))
