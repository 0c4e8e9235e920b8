"""One app instance of a fleet host, reached directly: on TCP or on its unix socket alike."""

from __future__ import annotations

import re
import subprocess

from localfleet.hosts import FleetHost

__all__ = ["instance_get", "live_ports"]


def instance_get(
    host: FleetHost, port: int, path: str, app_name: str = "wsapp"
) -> subprocess.CompletedProcess[str]:
    """``curl -sf`` of ``path`` on the instance named by ``port``, on ``host``.

    The instance listens where its unit says: the unit names a unix socket
    (``APP_UNIX_SOCKET``, app_listen unix) or none (127.0.0.1:<port>); the unit, not the
    files under /run, is the truth the deploy wrote.
    """
    unit = f"/etc/systemd/system/{app_name}@.service"
    command = (
        f"sock=$(sed -n 's/^Environment=APP_UNIX_SOCKET=//p' {unit} | sed 's/%i/{port}/'); "
        f'if [ -n "$sock" ]; then curl -sf --unix-socket "$sock" http://localhost{path}; '
        f"else curl -sf http://127.0.0.1:{port}{path}; fi"
    )
    return host.ssh(command)


def live_ports(host: FleetHost, app_name: str = "wsapp") -> list[int]:
    """The ports of the instances serving on ``host``: those of its active units, service
    or socket. The instances alternate between two sets of ports, a handover at a time
    (roles/app/tasks/handover.yml), so a test asks rather than assumes 8001 and up."""
    listed = host.ssh(f"systemctl list-units --plain --no-legend --state=active '{app_name}@*'")
    assert listed.returncode == 0, f"{host.name}: {listed.stderr}"
    found = re.findall(rf"^{re.escape(app_name)}@(\d+)\.(?:service|socket) ", listed.stdout, re.M)
    return sorted({int(port) for port in found})
