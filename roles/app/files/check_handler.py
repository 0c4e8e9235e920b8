"""Check that app_handler names a callable the release will have, on the controller.

Run by the app role's preflight with the controller's Python::

    check_handler.py MODULE:NAME SOURCE_DIR [app_extra_packages...]

The module is found on the given roots (a folder, or its src/ layout) and read, never
imported: the handler's own dependencies need not be on the controller. A module only
inside a wheel of app_extra_packages passes here and is checked when the release starts.
Exits non-zero with a message naming app_handler when the module or the name is missing.
"""

from __future__ import annotations

import ast
import importlib.util
import sys


def defined_names(source: str) -> set[str]:
    """The names a module's top level defines: functions, classes, assignments, imports."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def check(spec: str, roots: list[str]) -> str | None:
    """What is wrong with ``spec`` on ``roots``, or None when it is found."""
    sys.path[:0] = [r for r in roots if not r.endswith(".whl")] + [r + "/src" for r in roots]
    module, _, name = spec.partition(":")
    try:
        found = importlib.util.find_spec(module)
    except ImportError:
        found = None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        if any(r.endswith(".whl") for r in roots):
            return None  # inside a wheel: checked when the release starts
        return f"app_handler {spec!r}: no module {module!r} in the app or app_extra_packages"
    with open(found.origin, encoding="utf-8") as source:
        if name not in defined_names(source.read()):
            return f"app_handler {spec!r}: {module} defines no {name!r}"
    return None


if __name__ == "__main__":
    sys.exit(check(sys.argv[1], sys.argv[2:]))
