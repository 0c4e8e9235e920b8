"""nginx's own operation: its systemd drop-in (restart, sandbox) scored by
`systemd-analyze`, the bound on old workers and the metrics allow-list checked by
`nginx -t` (no hosts needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.templates.test_templates import (
    exposure,
    nginx_check,
    render,
    role_vars,
    root_with_dropin,
)


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root with Debian's nginx.service and the role's drop-in over it."""
    dropin = render("etc/systemd/system/nginx.service.d/wsfleet.conf.j2", role_vars("nginx"))
    return root_with_dropin(tmp_path, "nginx.service", dropin)


def test_nginx_unit_restarts_on_failure_and_is_sandboxed(unit_root: Path) -> None:
    """The drop-in restarts nginx after a failure; Debian's 9.6 (UNSAFE) drops below 3."""
    dropin = (unit_root / "etc/systemd/system/nginx.service.d/wsfleet.conf").read_text()
    assert "\nRestart=on-failure\nRestartSec=1\n" in dropin
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={unit_root}", "--man=no", "nginx.service"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    # Only complaints about the container's missing binaries may show, none about the drop-in.
    assert "wsfleet.conf" not in verify.stderr, verify.stderr
    assert exposure(unit_root, "nginx.service") < 3.0


def test_old_workers_are_bounded(nginx_prefix: Path) -> None:
    """worker_shutdown_timeout is in nginx.conf (300 s by default) and nginx -t takes it."""
    result = nginx_check(nginx_prefix)
    assert result.returncode == 0, result.stderr
    assert "\nworker_shutdown_timeout 300s;\n" in (nginx_prefix / "nginx.conf").read_text()
    assert nginx_check(nginx_prefix, nginx_worker_shutdown_timeout=15).returncode == 0
    assert "worker_shutdown_timeout 15s;" in (nginx_prefix / "nginx.conf").read_text()


def test_metrics_listener_answers_only_its_allow_list(nginx_prefix: Path) -> None:
    """The metrics server allows loopback by default, a monitoring address when asked."""
    assert nginx_check(nginx_prefix).returncode == 0
    site = (nginx_prefix / "sites-enabled" / "wsfleet.conf").read_text()
    metrics = site.split("listen 127.0.0.1:9180;", 1)[1]
    assert "allow 127.0.0.1;\n    allow ::1;\n    deny all;" in metrics
    result = nginx_check(
        nginx_prefix, nginx_metrics_listen="9180", nginx_metrics_allow=["10.0.0.5", "10.1.0.0/16"]
    )
    assert result.returncode == 0, result.stderr
    site = (nginx_prefix / "sites-enabled" / "wsfleet.conf").read_text()
    assert "allow 10.0.0.5;\n    allow 10.1.0.0/16;\n    deny all;" in site
