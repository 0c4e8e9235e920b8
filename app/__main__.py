"""``python -m app``: run one server process (see ``python -m app --help``)."""

from __future__ import annotations

from app.cli import run

if __name__ == "__main__":
    run()
