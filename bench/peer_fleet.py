"""The peer (bench/peers/socketio) on the local fleet's hosts, for the bench alone: put on,
restarted host by host, taken off. Nothing of it is in the roles or the collection.

- The hosts have no route out, so the controller fetches everything: the npm packages
  (``npm ci`` from the committed package-lock.json, into a tarball), and the Debian
  packages each host lacks (``nodejs``; ``redis-server`` on the first), which the host
  names itself from its own apt lists (``apt-get --print-uris``) and the controller
  downloads, checks against their SHA256 and copies into the host's apt cache.
- Redis runs on the first host as Debian's ``redis-server`` service, bound to the host's
  fleet address and loopback, with a password (Redis's security notes: never an open
  port).
- One node process per core on every host, each a systemd unit instance
  ``wsfleet-peer@<port>`` (9001 and up), behind the same nginx site and certificate as the
  kit's instances: the site gets an upstream over them and ``location /socket.io/``
  (checked with ``nginx -t`` before the reload; the original is restored at the end).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import localfleet
from localfleet.hosts import ssh_options
from localfleet.settings import REPO

__all__ = [
    "PEER_DIR",
    "PORT_BASE",
    "ProcessSample",
    "install",
    "npm_tarball",
    "parse_print_uris",
    "restart_host",
    "sample",
    "uninstall",
    "versions",
]

PEER_DIR = REPO / "bench" / "peers" / "socketio"
PORT_BASE = 9001
REMOTE = "/opt/wsfleet-peer"
UNIT = "wsfleet-peer"
SITE = "/etc/nginx/sites-available/wsfleet.conf"
SITE_ORIGINAL = "/var/lib/wsfleet-peer-site.conf"
DOWNLOAD_TIMEOUT = 60  # seconds per .deb; the controller's mirror answers in well under

UNIT_FILE = f"""\
# The bench's peer (bench/peer_fleet.py): one Socket.IO process on port %i.
[Unit]
Description=wsfleet bench peer (Socket.IO) on port %i
After=network-online.target

[Service]
Environment=PEER_PORT=%i
EnvironmentFile={REMOTE}/env
WorkingDirectory={REMOTE}
ExecStart=/usr/bin/node server.js
DynamicUser=yes
# Each idle connection is a descriptor; as the kit's units, far past systemd's 1024.
LimitNOFILE=65536
# server.js closes its sockets on SIGTERM and flushes their sessions to Redis.
TimeoutStopSec=30
Restart=on-failure
"""

# Inserted into the kit's site: the peer's processes, and their path on the same server
# block (TLS, limits and headers as the kit's locations).
UPSTREAM = """\
upstream wsfleet_peer {{
    least_conn;
{servers}
}}
"""
LOCATION = """\
    location /socket.io/ {
        limit_req zone=handshakes burst=100000 nodelay;
        proxy_pass http://wsfleet_peer;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;
        proxy_next_upstream error timeout http_502 http_503;
        proxy_buffering off;
    }

"""
# The TLS server's first location: the peer's goes before it.
ANCHOR = "    location = /metrics {\n"


def run(
    argv: Sequence[str], timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}...: {result.stderr.strip()[-800:]}")
    return result


def on(host: localfleet.FleetHost, command: str, timeout: float = 300) -> str:
    """``command`` on ``host`` as root; its output, or RuntimeError naming the host."""
    result = host.ssh(command, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{host.name}: {command[:80]}: {result.stderr.strip()[-800:]}")
    return result.stdout


def copy(host: localfleet.FleetHost, files: Sequence[Path], target: str) -> None:
    run(["scp", "-q", *ssh_options(), *map(str, files), f"root@{host.address}:{target}"])


def npm_tarball(out: Path) -> Path:
    """server.js with its pinned packages (``npm ci``: exactly package-lock.json), in one
    tarball for the hosts."""
    run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund"], timeout=600, cwd=PEER_DIR)
    tarball = out / "peer-socketio.tar.gz"
    run(["tar", "-C", str(PEER_DIR), "-czf", str(tarball),
         "server.js", "package.json", "package-lock.json", "node_modules"])  # fmt: skip
    return tarball


# apt-get --print-uris: 'URI' file size ALGO:hex (one line per archive to fetch). The
# algorithm is the one apt names (trixie's apt names MD5Sum); the hash comes from the
# host's own lists, which apt checked against Debian's signed Release file. Some lines
# name none (bookworm's security archive): apt itself checks every archive it installs.
_URI = re.compile(
    r"^'(?P<uri>[^']+)' (?P<file>\S+) (?P<size>\d+)"
    r"(?: (?P<algo>SHA512|SHA256|SHA1|MD5Sum):(?P<hex>[0-9a-f]+))?$"
)
_ALGORITHMS = {"SHA512": "sha512", "SHA256": "sha256", "SHA1": "sha1", "MD5Sum": "md5"}


def parse_print_uris(text: str) -> list[tuple[str, str, str, str]]:
    """(uri, file name, hashlib algorithm, hex digest) of each archive ``apt-get
    --print-uris install`` lists; algorithm and digest empty where it names no hash."""
    return [
        (m["uri"], m["file"], _ALGORITHMS.get(m["algo"] or "", ""), m["hex"] or "")
        for line in text.splitlines()
        if (m := _URI.match(line.strip()))
    ]


def _digest(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def debian_packages(host: localfleet.FleetHost, packages: Sequence[str], cache: Path) -> None:
    """Install ``packages`` on ``host`` from its own apt lists, the archives fetched here."""
    names = " ".join(packages)
    listed = on(host, f"apt-get -qq --print-uris install -y {names}")
    archives = parse_print_uris(listed)
    cache.mkdir(parents=True, exist_ok=True)
    files = []
    for uri, name, algorithm, digest in archives:
        path = cache / name
        if not path.exists() or not algorithm or _digest(path, algorithm) != digest:
            run(["curl", "-fsS", "--max-time", str(DOWNLOAD_TIMEOUT), "--retry", "2",
                 "-o", str(path), uri])  # fmt: skip
        if algorithm and _digest(path, algorithm) != digest:
            raise RuntimeError(f"{name}: its {algorithm} is not the one {host.name}'s lists name")
        files.append(path)
    if files:
        copy(host, files, "/var/cache/apt/archives/")
    on(host, f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-download {names}")


def processes_per_host(host: localfleet.FleetHost) -> int:
    """One node process per core, as the kit's one instance per core."""
    return int(on(host, "nproc").strip())


def patch_site(host: localfleet.FleetHost, ports: Sequence[int]) -> None:
    """The kit's site with the peer's upstream and location; checked, then reloaded."""
    site = on(host, f"cat {SITE}")
    if "upstream wsfleet_peer" in site:  # a run that did not finish: start again from it
        site = on(host, f"cat {SITE_ORIGINAL}")
    if ANCHOR not in site:
        raise RuntimeError(f"{host.name}: the site has no `location = /metrics`: {SITE}")
    servers = "\n".join(f"    server 127.0.0.1:{port} max_fails=0;" for port in ports)
    patched = UPSTREAM.format(servers=servers) + site.replace(ANCHOR, LOCATION + ANCHOR, 1)
    on(host, f"test -f {SITE_ORIGINAL} || cp -p {SITE} {SITE_ORIGINAL}")
    on(host, f"cat > {SITE}.peer <<'EOF'\n{patched}EOF\nmv {SITE}.peer {SITE}")
    check = host.ssh("nginx -t -q")
    if check.returncode != 0:
        on(host, f"cp -p {SITE_ORIGINAL} {SITE}")
        raise RuntimeError(f"{host.name}: nginx -t refused the peer's site: {check.stderr}")
    on(host, "systemctl reload nginx")


def wait_ready(host: localfleet.FleetHost, port: int, deadline: float = 60.0) -> None:
    """Until the process on ``port`` answers /healthz with 200 (bounded)."""
    end = time.monotonic() + deadline
    while host.ssh(f"curl -sf http://127.0.0.1:{port}/healthz").returncode != 0:
        if time.monotonic() > end:
            journal = host.ssh(f"journalctl -u {UNIT}@{port} -n 20 --no-pager").stdout
            raise RuntimeError(f"{host.name}: peer {port} not ready in {deadline:.0f} s\n{journal}")
        time.sleep(0.2)


def install(hosts: Sequence[localfleet.FleetHost], out: Path) -> dict[str, list[int]]:
    """The peer on every host, Redis on the first; each host's ports."""
    tarball = npm_tarball(out)
    redis_host = hosts[0]
    password = secrets.token_hex(16)
    for host in hosts:
        debian_packages(host, ["nodejs", *(["redis-server"] if host == redis_host else [])],
                        out / "debs" / host.name)  # fmt: skip
    conf = "/etc/redis/redis.conf"
    on(redis_host, (
        f"sed -i -e 's/^bind .*/bind 127.0.0.1 {redis_host.address}/' -e '/^requirepass /d' "
        f"{conf} && echo 'requirepass {password}' >> {conf} && systemctl restart redis-server "
        f"&& redis-cli -a {password} --no-auth-warning ping"
    ))  # fmt: skip
    url = f"redis://:{password}@{redis_host.address}:6379"
    ports: dict[str, list[int]] = {}
    for host in hosts:
        ports[host.name] = [PORT_BASE + i for i in range(processes_per_host(host))]
        copy(host, [tarball], f"{REMOTE}.tar.gz")
        on(host, (
            f"rm -rf {REMOTE} && mkdir -p {REMOTE} && tar -C {REMOTE} -xzf {REMOTE}.tar.gz "
            f"&& printf 'PEER_REDIS_URL=%s\\n' {shlex.quote(url)} > {REMOTE}/env "
            f"&& chmod 0644 {REMOTE}/env"
        ))  # fmt: skip
        on(host, f"cat > /etc/systemd/system/{UNIT}@.service <<'EOF'\n{UNIT_FILE}EOF\n"
                 "systemctl daemon-reload")  # fmt: skip
        units = " ".join(f"{UNIT}@{port}" for port in ports[host.name])
        on(host, f"systemctl start {units}")
        for port in ports[host.name]:
            wait_ready(host, port)
        patch_site(host, ports[host.name])
    return ports


def restart_host(host: localfleet.FleetHost, ports: Sequence[int]) -> None:
    """Workload 5's restart of one host: its node processes one at a time, each ready
    before the next, so nginx always has one to send the reconnects to."""
    for port in ports:
        on(host, f"systemctl restart {UNIT}@{port}")
        wait_ready(host, port)


def uninstall(hosts: Sequence[localfleet.FleetHost]) -> None:
    """The hosts as they were: the site restored, the peer's units, files and packages
    gone (a listening Redis would be a port the kit never opened)."""
    for host in hosts:
        host.ssh(
            f"if [ -f {SITE_ORIGINAL} ]; then cp -p {SITE_ORIGINAL} {SITE} && rm {SITE_ORIGINAL}"
            " && nginx -t -q && systemctl reload nginx; fi; "
            f"systemctl stop '{UNIT}@*'; rm -f /etc/systemd/system/{UNIT}@.service; "
            f"systemctl daemon-reload; rm -rf {REMOTE} {REMOTE}.tar.gz; "
            "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q --autoremove nodejs "
            "redis-server >/dev/null 2>&1; true"
        )


def versions(host: localfleet.FleetHost, redis: bool) -> dict[str, str]:
    """The peer's versions on ``host``: node, Redis (its host), the npm packages."""
    found = {"node": on(host, "node --version").strip()}
    if redis:
        found["redis-server"] = on(host, "redis-server --version").split()[2].removeprefix("v=")
    for name in ("socket.io", "engine.io", "@socket.io/redis-streams-adapter", "redis"):
        manifest = on(host, f"cat {REMOTE}/node_modules/{name}/package.json")
        found[name] = json.loads(manifest)["version"]
    return found


# Per process on the host: kind, PID, resident KiB, user+system clock ticks.
SAMPLE = r"""
line() {
  echo "$1 $2 $(awk '/^VmRSS/{print $2}' /proc/$2/status) $(cut -d' ' -f14,15 /proc/$2/stat)"
}
for p in $(pgrep -x node); do line app $p; done
for p in $(pgrep -x nginx); do line nginx $p; done
for p in $(pgrep -f '^/usr/bin/redis-server'); do line broker $p; done
"""


class ProcessSample:
    """Memory (KiB) and CPU (s) of the peer's processes on a host, by kind (app: node,
    nginx, broker: redis-server), at one moment."""

    def __init__(self, text: str, ticks: int) -> None:
        self.at = time.monotonic()
        self.rss = {"app": 0, "nginx": 0, "broker": 0}
        self.cpu = {"app": 0.0, "nginx": 0.0, "broker": 0.0}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) != 5:  # the process ended between pgrep and /proc
                continue
            kind, _pid, kib, utime, stime = fields
            self.rss[kind] += int(kib)
            self.cpu[kind] += (int(utime) + int(stime)) / ticks


def sample(host: localfleet.FleetHost, ticks: int) -> ProcessSample:
    return ProcessSample(host.ssh(SAMPLE).stdout, ticks)
