"""The one error the local fleet raises, and the helpers that run its commands."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

__all__ = ["FleetError", "log", "run"]


class FleetError(Exception):
    """A fleet operation that cannot go on; the message says what and how to fix it."""


def log(message: str) -> None:
    # One write per line: images are built from two threads at once.
    sys.stdout.write(f"fleet: {message}\n")
    sys.stdout.flush()


def run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, raising FleetError with its output when it fails."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise FleetError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result  # type: ignore[no-any-return]
