#!/usr/bin/python
"""What one app server is doing: its releases, instances, nginx, certificate and bus."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: host_status
short_description: Read what one app server of the fleet is doing, changing nothing
description:
  - The release the C(current) link points at and the one before it; each enabled instance
    (one systemd unit per port), whether it is ready and its open WebSocket connections (the
    instance's own C(/readyz)), over TCP on loopback or over its unix socket; nginx's state
    and its workers, those still finishing connections after a reload counted apart; the
    days left on the certificate nginx serves; the bus server's state and the other servers
    it is routed to.
  - A part that is down is reported as down; the module fails only on bad arguments.
  - C(playbooks/status.yml) runs it on every app server and shows the fleet in one table.
version_added: 1.0.0
author: wsfleet maintainers
options:
  app_name:
    description:
      - The service's name on the host (its units C(<app_name>@<port>), C(/opt/<app_name>)).
    type: str
    default: wsapp
  tls_cert:
    description: The certificate nginx serves.
    type: path
    default: /etc/ssl/wsfleet/server.crt
  bus_monitor_port:
    description: The bus server's monitoring port on loopback (its C(/routez)).
    type: int
    default: 8222
notes:
  - Supports check mode; it reads only.
"""

EXAMPLES = r"""
- name: Read the releases, instances, nginx, certificate and bus of the host
  wsfleet.fleet.host_status:
    app_name: wsapp
    tls_cert: /etc/ssl/wsfleet/server.crt
  register: read
"""

RETURN = r"""
status:
  description: What the host is doing.
  returned: success
  type: dict
  contains:
    release:
      description: The release the current link points at; empty when none is installed.
      type: str
      sample: 1.1.0
    previous:
      description: The release the current one replaced; empty when none.
      type: str
      sample: 1.0.0
    instances:
      description: Each enabled instance, by port.
      type: list
      elements: dict
      sample:
        - {port: 8001, unit: active, ready: true, connections: 7, version: 1.1.0}
    nginx:
      description: C(state) (systemd's word), C(workers) and C(shutting_down) (workers
        finishing connections after a reload).
      type: dict
      sample: {state: active, workers: 2, shutting_down: 0}
    certificate_days:
      description: Days until the certificate expires (negative, expired); null without one.
      type: float
      sample: 89.5
    bus:
      description: C(state) of nats-server and C(routes), the other servers it is routed to
        (null when its monitoring port does not answer).
      type: dict
      sample: {state: active, routes: 2}
"""

import glob
import http.client
import json
import os
import re
import socket
import ssl
import time
import urllib.error
from collections.abc import Callable
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

# What DOCUMENTATION says of the options (tests/plugins/test_docs.py holds them equal).
ARGUMENT_SPEC = {
    "app_name": {"type": "str", "default": "wsapp"},
    "tls_cert": {"type": "path", "default": "/etc/ssl/wsfleet/server.crt"},
    "bus_monitor_port": {"type": "int", "default": 8222},
}

# A command's return code, stdout and stderr (AnsibleModule.run_command's answer).
Run = Callable[[list[str]], tuple[int, str, str]]


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET on loopback; 0 when nothing answers."""
    try:
        with open_url(url, timeout=2, use_proxy=False) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except Exception:  # refused, timed out, cut short: nothing answers
        return 0, ""


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the unix socket at ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=2)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.sock.connect(self.unix_path)


def get_unix(path: str, target: str) -> tuple[int, str]:
    """Status and body of a GET over a unix socket; 0 when nothing answers."""
    connection = UnixHTTPConnection(path)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read().decode()
    except (OSError, http.client.HTTPException):
        return 0, ""
    finally:
        connection.close()


def unix_socket(app_name: str, port: int, root: str = "/") -> str:
    """The instance's unix socket as its unit names it (app_listen unix); empty on TCP."""
    try:
        with open(os.path.join(root, f"etc/systemd/system/{app_name}@.service")) as f:
            for line in f:
                if line.startswith("Environment=APP_UNIX_SOCKET="):
                    return line.split("=", 2)[2].strip().replace("%i", str(port))
    except OSError:
        pass
    return ""


def active(run: Run, unit: str) -> str:
    """systemd's word for a unit: active, inactive, failed, activating, ..."""
    _, out, _ = run(["systemctl", "is-active", unit])
    return out.strip() or "unknown"


def current_release(app_name: str, root: str = "/") -> str:
    """The release the current link points at; empty when none is installed."""
    try:
        return os.path.basename(os.readlink(os.path.join(root, f"opt/{app_name}/current")))
    except OSError:
        return ""


def previous_release(app_name: str, root: str = "/") -> str:
    """The release the current one replaced (the deploy writes it); empty when none."""
    try:
        with open(os.path.join(root, f"opt/{app_name}/previous")) as f:
            return f.read().strip()
    except OSError:
        return ""


def enabled_ports(app_name: str, root: str = "/") -> list[int]:
    """The ports of the enabled instances (the deploy enables one unit, or socket, per port)."""
    pattern = re.compile(rf"{re.escape(app_name)}@(\d+)\.(?:service|socket)$")
    wants = os.path.join(root, f"etc/systemd/system/*.wants/{app_name}@*")
    return sorted({int(match[1]) for path in glob.glob(wants) if (match := pattern.search(path))})


def instance(port: int, unit: str, code: int, body: str) -> dict[str, Any]:
    """One instance's entry from its unit's state and its /readyz answer (code 0: none)."""
    try:
        info = json.loads(body) if body else {}
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    return {
        "port": port,
        "unit": unit,
        "ready": code == 200,
        "connections": int(info.get("connections", 0)),
        "version": info.get("version", ""),
    }


def instances(run: Run, app_name: str, root: str = "/") -> list[dict[str, Any]]:
    """Each enabled instance, ready or not."""
    found = []
    for port in enabled_ports(app_name, root):
        path = unix_socket(app_name, port, root)
        code, body = get_unix(path, "/readyz") if path else get(f"http://127.0.0.1:{port}/readyz")
        found.append(instance(port, active(run, f"{app_name}@{port}.service"), code, body))
    return found


def nginx_workers(root: str = "/") -> tuple[int, int]:
    """nginx's workers serving, and those finishing old connections after a reload."""
    workers = shutting_down = 0
    for cmdline in glob.glob(os.path.join(root, "proc/[0-9]*/cmdline")):
        try:
            with open(cmdline, "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if args.startswith("nginx: worker process"):
            workers += 1
            shutting_down += "is shutting down" in args
    return workers - shutting_down, shutting_down


def nginx(run: Run, root: str = "/") -> dict[str, Any]:
    """nginx's state and its workers."""
    workers, shutting_down = nginx_workers(root)
    return {"state": active(run, "nginx"), "workers": workers, "shutting_down": shutting_down}


def certificate_days(run: Run, path: str, now: float | None = None) -> float | None:
    """Days until the certificate expires (negative: expired); None without one."""
    code, out, _ = run(["openssl", "x509", "-enddate", "-noout", "-in", path])
    if code != 0 or "=" not in out:
        return None
    end = ssl.cert_time_to_seconds(out.split("=", 1)[1].strip())
    return round((end - (time.time() if now is None else now)) / 86400, 1)


def routes(code: int, body: str) -> int | None:
    """The other servers a bus server is routed to, from its /routez; None without an
    answer. nats-server 2.10 (Debian 13) pools several routes to each peer, 2.9 (Debian 12)
    has one, so distinct peers are counted, not routes."""
    try:
        found = json.loads(body)["routes"] if code == 200 else None
        return None if found is None else len({r.get("remote_id") or r["ip"] for r in found})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def bus(run: Run, port: int) -> dict[str, Any]:
    """The bus server's state and its routes."""
    return {
        "state": active(run, "nats-server"),
        "routes": routes(*get(f"http://127.0.0.1:{port}/routez")),
    }


def read(run: Run, app_name: str, tls_cert: str, bus_monitor_port: int) -> dict[str, Any]:
    """Everything the module returns as ``status``."""
    return {
        "release": current_release(app_name),
        "previous": previous_release(app_name),
        "instances": instances(run, app_name),
        "nginx": nginx(run),
        "certificate_days": certificate_days(run, tls_cert),
        "bus": bus(run, bus_monitor_port),
    }


def run_module() -> None:
    """Ansible's entry point: the host's status, changing nothing."""
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
    )

    def run(argv: list[str]) -> tuple[int, str, str]:
        rc, out, err = module.run_command(argv)
        return rc, out, err

    params = module.params
    status = read(run, params["app_name"], params["tls_cert"], params["bus_monitor_port"])
    module.exit_json(changed=False, status=status)


def main() -> None:
    run_module()


if __name__ == "__main__":
    main()
