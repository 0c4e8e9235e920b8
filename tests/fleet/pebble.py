"""Pebble, Let's Encrypt's ACME test server, on the controller of the local fleet.

Pebble (Debian package ``pebble``) validates HTTP-01 challenges on port 80 of the
addresses its DNS resolver gives for a name. That resolver is pebble-challtestsrv's DNS
server (same package), which answers exactly the A records set through its management
API and nothing else: a name without records does not resolve. Both listen on loopback
only; the hosts' nginx is reached on the bridge.

Pebble keeps no state between runs (a new root each time) and logs every request, one
line each, so the log says which orders a run placed.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DIRECTORY_PORT, MANAGEMENT_PORT = 14000, 15000
DNS_PORT, DNS_MANAGEMENT_PORT = 8053, 8055


@dataclass(frozen=True)
class Pebble:
    """A running Pebble: its directory URL, the CA file its HTTPS is checked against,
    and its log."""

    directory: str
    tls_ca: Path
    log: Path

    def root(self) -> str:
        """The root certificate (PEM) that the certificates issued in this run chain to."""
        context = ssl.create_default_context(cafile=str(self.tls_ca))
        url = f"https://127.0.0.1:{MANAGEMENT_PORT}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return str(response.read().decode())

    def orders(self) -> int:
        """Orders placed so far (one POST to the new-order URL each)."""
        return self.log.read_text().count("POST /order-plz")

    def requests(self) -> int:
        """Requests of any kind so far."""
        return self.log.read_text().count(" -> calling handler()")


def resolve(name: str, addresses: list[str]) -> None:
    """Make ``name`` resolve, for Pebble, to ``addresses`` in that order (its validation
    connects to the first)."""
    body = json.dumps({"host": name, "addresses": addresses}).encode()
    url = f"http://127.0.0.1:{DNS_MANAGEMENT_PORT}/add-a"
    with urllib.request.urlopen(urllib.request.Request(url, body), timeout=10) as response:
        assert response.status == 200, response.status


def _directory_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and, from it, the certificate of Pebble's HTTPS listeners on 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble directory CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = folder / "directory-ca.crt", folder / "directory.crt", folder / "directory.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited {process.returncode}: {log.read_text()}")
        ss = subprocess.run(
            ["ss", "-Hltnu", f"sport = :{port}"], capture_output=True, text=True, check=False
        )
        if ss.stdout.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{process.args[0]} not listening on {port} within 20 s: {log.read_text()}")


@contextlib.contextmanager
def run(folder: Path) -> Iterator[Pebble]:
    """Pebble and its DNS server, up for the block, stopped by their process ids after it."""
    tls_ca, cert, key = _directory_tls(folder)
    config = folder / "pebble.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{DIRECTORY_PORT}",
        "managementListenAddress": f"127.0.0.1:{MANAGEMENT_PORT}",
        "certificate": str(cert), "privateKey": str(key),
        # Where it validates: nginx's ports on the hosts.
        "httpPort": 80, "tlsPort": 443,
        "ocspResponderURL": "", "externalAccountBindingRequired": False,
    }}))  # fmt: skip
    # No random sleep before a validation, no nonce refused on purpose, and every order's
    # names validated afresh (Pebble would reuse half of the authorizations otherwise).
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
           "PEBBLE_AUTHZREUSE": "0"}  # fmt: skip
    dns_log, log = folder / "challtestsrv.log", folder / "pebble.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with dns_log.open("wb") as out:
            processes.append(subprocess.Popen(
                ["pebble-challtestsrv", "-defaultIPv4", "", "-defaultIPv6", "",
                 "-dns01", f"127.0.0.1:{DNS_PORT}", "-http01", "", "-https01", "",
                 "-tlsalpn01", "", "-management", f"127.0.0.1:{DNS_MANAGEMENT_PORT}"],
                stdout=out, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        _wait_listening(DNS_MANAGEMENT_PORT, processes[-1], dns_log)
        with log.open("wb") as out:
            processes.append(subprocess.Popen(
                ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{DNS_PORT}"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            ))  # fmt: skip
        _wait_listening(DIRECTORY_PORT, processes[-1], log)
        _wait_listening(MANAGEMENT_PORT, processes[-1], log)
        yield Pebble(f"https://127.0.0.1:{DIRECTORY_PORT}/dir", tls_ca, log)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
