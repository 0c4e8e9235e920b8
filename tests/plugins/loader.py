"""The collection's plugins (plugins/), loaded from their files as Ansible would run them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def plugin(kind: str, name: str) -> ModuleType:
    """plugins/<kind>/<name>.py as a Python module of its own."""
    path = REPO / "plugins" / kind / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"wsfleet_{kind}_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
