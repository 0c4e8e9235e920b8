"""wsfleet's server process: a production `websockets` server around an operator's handler."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "1.0.0"
