"""Check that app_handler imports in a release, as an instance will import it.

Run by the app role on the host, as the service user, with the Python of the release's
venv, before the release becomes current (a handler it cannot import would stop every
instance)::

    import_handler.py MODULE:NAME

Exits non-zero, naming app_handler, when the module does not import (naming the release
too) or the name is missing or not callable.
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str]) -> int:
    (spec,) = argv
    module, _, name = spec.partition(":")
    try:
        handler = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        print(f"app_handler {spec!r} does not import in release {sys.prefix}: {error!r}",
              file=sys.stderr)  # fmt: skip
        return 1
    if not callable(handler):
        print(f"app_handler {spec!r} is not callable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
