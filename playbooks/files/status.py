"""What one app server is doing, as one JSON object on stdout (run by status.yml).

Runs on the host with its own Python 3 and nothing else (no curl, no jq), reads only,
and never fails on a part that is down: that part is reported as down.
Argument: a JSON object with app_name, tls_cert and bus_monitor_port.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET on loopback; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (OSError, ValueError):
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


def unix_socket(app_name: str, port: int) -> str:
    """The instance's unix socket as its unit names it (app_listen unix); empty on TCP."""
    try:
        with open(f"/etc/systemd/system/{app_name}@.service") as f:
            for line in f:
                if line.startswith("Environment=APP_UNIX_SOCKET="):
                    return line.split("=", 2)[2].strip().replace("%i", str(port))
    except OSError:
        pass
    return ""


def active(unit: str) -> str:
    """systemd's word for a unit: active, inactive, failed, activating, ..."""
    result = subprocess.run(
        ["systemctl", "is-active", unit], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


def current_release(app_name: str) -> str:
    """The release the current link points at; empty when none is installed."""
    try:
        return os.path.basename(os.readlink(f"/opt/{app_name}/current"))
    except OSError:
        return ""


def previous_release(app_name: str) -> str:
    """The release the current one replaced (the deploy writes it); empty when none."""
    try:
        with open(f"/opt/{app_name}/previous") as f:
            return f.read().strip()
    except OSError:
        return ""


def instances(app_name: str) -> list[dict[str, Any]]:
    """Each enabled instance (the deploy enables one unit per port), ready or not."""
    ports = sorted(
        {
            int(match[1])
            for path in glob.glob(f"/etc/systemd/system/*.wants/{app_name}@*")
            if (match := re.search(rf"{re.escape(app_name)}@(\d+)\.(?:service|socket)$", path))
        }
    )
    found = []
    for port in ports:
        path = unix_socket(app_name, port)
        code, body = get_unix(path, "/readyz") if path else get(f"http://127.0.0.1:{port}/readyz")
        try:
            info = json.loads(body) if body else {}
        except ValueError:
            info = {}
        found.append(
            {
                "port": port,
                "unit": active(f"{app_name}@{port}.service"),
                "ready": code == 200,
                "connections": int(info.get("connections", 0)),
                "version": info.get("version", ""),
            }
        )
    return found


def nginx() -> dict[str, Any]:
    """nginx's state and its workers, counting those finishing old connections after a reload."""
    workers = shutting_down = 0
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if args.startswith("nginx: worker process"):
            workers += 1
            shutting_down += "is shutting down" in args
    return {
        "state": active("nginx"),
        "workers": workers - shutting_down,
        "shutting_down": shutting_down,
    }


def certificate_days(path: str) -> float | None:
    """Days until the certificate expires (negative: expired); None without one."""
    result = subprocess.run(
        ["openssl", "x509", "-enddate", "-noout", "-in", path],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0 or "=" not in result.stdout:
        return None
    end = ssl.cert_time_to_seconds(result.stdout.split("=", 1)[1].strip())
    return round((end - time.time()) / 86400, 1)


def bus(port: int) -> dict[str, Any]:
    state = active("nats-server")
    code, body = get(f"http://127.0.0.1:{port}/routez")
    # The other servers this one is routed to: nats-server 2.10 (Debian 13) pools several
    # routes to each peer, 2.9 (Debian 12) has one, so count distinct peers, not routes.
    try:
        found = json.loads(body)["routes"] if code == 200 else None
        routes = None if found is None else len({r.get("remote_id") or r["ip"] for r in found})
    except (ValueError, KeyError, TypeError):
        routes = None
    return {"state": state, "routes": routes}


def main() -> int:
    config = json.loads(sys.argv[1])
    app_name = config["app_name"]
    print(
        json.dumps(
            {
                "release": current_release(app_name),
                "previous": previous_release(app_name),
                "instances": instances(app_name),
                "nginx": nginx(),
                "certificate_days": certificate_days(config["tls_cert"]),
                "bus": bus(int(config["bus_monitor_port"])),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
