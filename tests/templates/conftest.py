"""Fixtures of the template tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def nginx_prefix(tmp_path: Path) -> Path:
    """A copy of the machine's /etc/nginx (mime.types, modules) and a self-signed cert."""
    prefix = tmp_path / "nginx"
    shutil.copytree("/etc/nginx", prefix, symlinks=True)
    for site in (prefix / "sites-enabled").iterdir():
        site.unlink()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=test", "-days", "1",
         "-keyout", str(prefix / "test.key"), "-out", str(prefix / "test.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    return prefix
