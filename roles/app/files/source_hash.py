"""Print a short hash of a release's sources, on the controller: the build's name.

Run by the app role's build with the controller's Python::

    source_hash.py app pyproject.toml requirements/app.txt [extra package folders...]

Every file under each folder (and each file given), by its path relative to the folder's
parent and its bytes, in a stable order; compiled bytecode left out. The same sources give
the same hash on any checkout, so a build is made once and a changed source is a new one.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def source_hash(roots: list[Path]) -> str:
    """The first 12 hex digits of the SHA-256 over the files of ``roots``."""
    digest = hashlib.sha256()
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(path.relative_to(root.parent).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


if __name__ == "__main__":
    print(source_hash([Path(arg) for arg in sys.argv[1:]]))
