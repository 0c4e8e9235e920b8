"""The templates of templates/, rendered with jinja2 and Ansible's filters, checked by the
programs that read them on a host: `nginx -t` and `systemd-analyze` (no hosts needed)."""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from ansible.plugins.filter.core import FilterModule
from ansible.plugins.filter.mathstuff import FilterModule as MathFilters
from ansible.plugins.test.core import TestModule as AnsibleTests

from app.config import parse_settings

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "templates"


def nginx_version_output() -> dict[str, str]:
    """What `nginx -v` says on this machine, whose nginx checks the rendered files."""
    result = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=True)
    return {"stderr": result.stderr}


def host_facts(nofile: int = 524288) -> dict[str, Any]:
    """What the roles read from a 2-CPU host whose processes may hold ``nofile`` files."""
    limits = f"Limit  Soft Limit  Hard Limit  Units\nMax open files  {nofile}  {nofile}  files\n"
    return {
        "ansible_facts": {"processor_vcpus": 2},
        "__nginx_version_output": nginx_version_output(),
        "__nginx_unit_nofile": {"stdout": "524288"},
        "__nginx_init_limits": {"content": base64.b64encode(limits.encode()).decode()},
    }


def role_vars(*roles: str, **overrides: Any) -> dict[str, Any]:
    """Defaults and vars of the roles, as a play would see them on a 2-CPU host."""
    found: dict[str, Any] = {"ansible_managed": "Ansible managed", **host_facts()}
    for role in roles:
        for part in ("defaults", "vars"):
            path = REPO / "roles" / role / part / "main.yml"
            if path.is_file():
                found.update(yaml.safe_load(path.read_text()) or {})
    found.update(overrides)
    return found


def render(template: str, variables: dict[str, Any]) -> str:
    """``template`` (a path under templates/) rendered as Ansible's template module would.

    Includes and imports are looked up as Ansible does for a file under templates/: in the
    template's own folder first, then from templates/ itself.
    """
    loader = jinja2.FileSystemLoader([TEMPLATES / Path(template).parent, TEMPLATES])
    env = jinja2.Environment(  # noqa: S701 (config files, not HTML)
        loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        trim_blocks=True,
    )  # fmt: skip
    env.filters.update(FilterModule().filters())
    env.filters.update(MathFilters().filters())  # zip, unique, ...
    # Ansible's default filter knows its own undefined values only; jinja2's knows these.
    env.filters["default"] = env.filters["d"] = jinja2.filters.do_default
    env.tests.update(AnsibleTests().tests())
    # Values that are themselves templates (e.g. app_limit_nofile) are rendered first,
    # as often as one refers to another.
    resolved = dict(variables)
    for _ in range(4):
        for name, value in resolved.items():
            if isinstance(value, str) and "{{" in value:
                # Lookups and role_path are left out: the templates do not use them.
                with contextlib.suppress(jinja2.UndefinedError):
                    resolved[name] = env.from_string(value).render(resolved)
    return env.get_template(template).render(resolved)


def exposure(root: Path, unit: str) -> float:
    """systemd-analyze's offline exposure score of ``unit`` under ``root``."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", unit],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    score = re.search(rf"Overall exposure level for {re.escape(unit)}: ([\d.]+)", result.stdout)
    assert score, result.stdout + result.stderr
    return float(score[1])


def root_with_dropin(root: Path, unit: str, dropin: str) -> Path:
    """``root`` holding the Debian package's ``unit`` and our drop-in text over it."""
    system = root / "etc/systemd/system"
    (system / f"{unit}.d").mkdir(parents=True)
    shutil.copy(Path("/lib/systemd/system") / unit, system / unit)
    (system / f"{unit}.d/wsfleet.conf").write_text(dropin)
    return root


def nginx_check(
    prefix: Path, roles: tuple[str, ...] = ("nginx",), **overrides: Any
) -> subprocess.CompletedProcess[str]:
    # What the playbooks hand nginx from the tls role (its facts: the overrides' tls_*).
    wiring = yaml.safe_load((REPO / "playbooks/vars/tls_to_nginx.yml").read_text())
    variables = role_vars(
        *roles,
        **{
            **wiring,
            "nginx_upstream_ports": [8001, 8002],
            "nginx_trusted_proxies": [],  # no inventory groups here
            "tls_served_certificate": str(prefix / "test.crt"),
            "tls_served_key": str(prefix / "test.key"),
            **overrides,
        },
    )
    (prefix / "nginx.conf").write_text(render("etc/nginx/nginx.conf.j2", variables))
    if "lb" in roles:
        backends = render("etc/nginx/wsfleet-backends.conf.j2", variables)
        (prefix / "wsfleet-backends.conf").write_text(backends)
    site = render(variables["nginx_site_template"], variables)
    (prefix / "sites-enabled" / "wsfleet.conf").write_text(site)
    return subprocess.run(
        ["nginx", "-t", "-c", str(prefix / "nginx.conf")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_acme_challenges_only_with_an_acme_ca(nginx_prefix: Path) -> None:
    """No challenge path by default; with the tls role's folder, nginx -t takes it, served
    on port 80 ahead of the redirect to HTTPS."""
    assert nginx_check(nginx_prefix).returncode == 0
    site = nginx_prefix / "sites-enabled" / "wsfleet.conf"
    assert "acme-challenge" not in site.read_text()
    result = nginx_check(nginx_prefix, tls_served_challenges="/var/lib/wsfleet/acme-challenge")
    assert result.returncode == 0, result.stderr
    plain = site.read_text().split("server {")[1]  # the port-80 server, before the TLS one
    challenge = plain.index("location ^~ /.well-known/acme-challenge/ {")
    assert "alias /var/lib/wsfleet/acme-challenge/;" in plain
    assert challenge < plain.index("return 301 https://")


@pytest.mark.parametrize("profile", ["intermediate", "modern"])
def test_nginx_accepts_the_rendered_configuration(nginx_prefix: Path, profile: str) -> None:
    """nginx -t passes on nginx.conf and the site, for each TLS profile."""
    result = nginx_check(nginx_prefix, nginx_tls_profile=profile)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def test_ocsp_stapling_only_when_asked(nginx_prefix: Path) -> None:
    """No stapling by default (no responder); on, nginx -t takes it, with a resolver."""
    assert nginx_check(nginx_prefix).returncode == 0
    site = nginx_prefix / "sites-enabled" / "wsfleet.conf"
    assert "ssl_stapling" not in site.read_text()
    result = nginx_check(
        nginx_prefix, tls_ocsp_responder="http://ocsp.example.test/", nginx_resolver=["127.0.0.1"]
    )
    assert result.returncode == 0, result.stderr
    assert "ssl_stapling on;" in site.read_text()
    assert "ssl_stapling_verify on;" in site.read_text()
    assert "resolver 127.0.0.1;" in site.read_text()


@pytest.mark.parametrize(
    ("version", "http2"),
    [("nginx version: nginx/1.22.1", False), ("nginx version: nginx/1.26.3", True)],
)
def test_http2_only_where_nginx_has_the_directive(version: str, http2: bool) -> None:
    """`http2 on;` in the HTTPS server from nginx 1.25.1 (Debian 13's 1.26), never before
    (Debian 12's 1.22 would refuse it), and never when nginx_http2 is false."""
    for template in ("wsfleet.conf.j2", "wsfleet-lb.conf.j2"):
        site = f"etc/nginx/sites-available/{template}"
        on = role_vars("nginx", "lb", __nginx_version_output={"stderr": version + "\n"},
                       nginx_upstream_ports=[8001], nginx_trusted_proxies=[])  # fmt: skip
        assert ("http2 on;" in render(site, on)) is http2, template
        assert "http2 on;" not in render(site, {**on, "nginx_http2": False}), template


def test_workers_and_their_file_limit_fit_the_host(nginx_prefix: Path) -> None:
    """worker_rlimit_nofile never above what the host allows; auto adds workers to fit."""
    assert nginx_check(nginx_prefix).returncode == 0
    conf = (nginx_prefix / "nginx.conf").read_text()
    assert "worker_processes auto;" in conf
    assert "worker_rlimit_nofile 41024;" in conf
    result = nginx_check(nginx_prefix, **host_facts(nofile=20000))
    assert result.returncode == 0, result.stderr
    conf = (nginx_prefix / "nginx.conf").read_text()
    assert "worker_rlimit_nofile 20000;" in conf
    assert "worker_connections 20000;" in conf
    assert "worker_processes 5;" in conf  # 4 x 20,000 descriptors over 18,976 a worker
    result = nginx_check(nginx_prefix, nginx_worker_processes=3, **host_facts(nofile=20000))
    assert "worker_processes 3;" in (nginx_prefix / "nginx.conf").read_text()


def test_load_balancer_site(nginx_prefix: Path) -> None:
    """The balancer's site and its upstream pass nginx -t; a drained server is down."""
    result = nginx_check(
        nginx_prefix,
        roles=("nginx", "lb"),
        nginx_site_template="etc/nginx/sites-available/wsfleet-lb.conf.j2",
        groups={"app_servers": ["ws1", "ws2"]},
        hostvars={"ws1": {"ansible_host": "192.0.2.11"}, "ws2": {"ansible_host": "192.0.2.12"}},
        lb_drained=["ws2"],
        lb_backend_ca_file="system",  # a file nginx -t can read on this machine
    )
    assert result.returncode == 0, result.stderr
    backends = (nginx_prefix / "wsfleet-backends.conf").read_text()
    assert "server 192.0.2.11:443 max_fails=1 fail_timeout=5s;" in backends
    assert "server 192.0.2.12:443 max_fails=1 fail_timeout=5s down;" in backends
    site = (nginx_prefix / "sites-enabled" / "wsfleet.conf").read_text()
    assert "proxy_pass https://wsfleet_backends;" in site
    assert "proxy_ssl_verify on;" in site
    assert "proxy_ssl_name wsfleet-backend.internal;" in site


def test_load_balancer_site_staples_ocsp_only_when_asked(nginx_prefix: Path) -> None:
    """The balancer's site shares the app site's TLS head: stapling only with a responder."""
    balancer: dict[str, Any] = {
        "roles": ("nginx", "lb"),
        "nginx_site_template": "etc/nginx/sites-available/wsfleet-lb.conf.j2",
        "groups": {"app_servers": ["ws1"]},
        "hostvars": {"ws1": {"ansible_host": "192.0.2.11"}},
        "lb_backend_ca_file": "system",
    }
    assert nginx_check(nginx_prefix, **balancer).returncode == 0
    site = nginx_prefix / "sites-enabled" / "wsfleet.conf"
    assert "ssl_stapling" not in site.read_text()
    result = nginx_check(
        nginx_prefix, **balancer, tls_ocsp_responder="http://ocsp.example.test/",
        nginx_resolver=["127.0.0.1"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ssl_stapling on;" in site.read_text()
    assert "resolver 127.0.0.1;" in site.read_text()


def test_app_site_believes_only_the_load_balancers(nginx_prefix: Path) -> None:
    """With balancers, their X-Forwarded-For gives the client address (limits per client)."""
    result = nginx_check(nginx_prefix, nginx_trusted_proxies=["192.0.2.10"])
    assert result.returncode == 0, result.stderr
    site = (nginx_prefix / "sites-enabled" / "wsfleet.conf").read_text()
    assert "set_real_ip_from 192.0.2.10;" in site
    assert "real_ip_header X-Forwarded-For;" in site
    # A rollout's hold answers the balancers' handshakes 503, not the direct clients'.
    via = r"geo \$realip_remote_addr \$wsfleet_via_balancer \{\s+default 0;\s+192\.0\.2\.10 1;"
    held = r"if \(-f /run/wsfleet-balancer-hold\) \{\s+set \$wsfleet_hold \$wsfleet_via_balancer;"
    assert re.search(via, site)
    assert re.search(held, site)
    assert nginx_check(nginx_prefix).returncode == 0
    direct = (nginx_prefix / "sites-enabled" / "wsfleet.conf").read_text()
    assert "set_real_ip_from" not in direct
    assert "wsfleet_hold" not in direct


def test_nginx_accepts_restricted_app_paths(nginx_prefix: Path) -> None:
    """nginx_app_paths other than "/": those prefixes proxy, any other path answers 404."""
    result = nginx_check(nginx_prefix, nginx_app_paths=["/ws/", "/chat"])
    assert result.returncode == 0, result.stderr
    site = (nginx_prefix / "sites-enabled" / "wsfleet.conf").read_text()
    assert "location /ws/ {" in site
    assert "location /chat {" in site
    assert re.search(r"location / \{\s+return 404;", site)


def test_nginx_rejects_a_bad_rate(nginx_prefix: Path) -> None:
    """The check is real: a rate nginx cannot read fails nginx -t."""
    result = nginx_check(nginx_prefix, nginx_limit_req_rate="lots")
    assert result.returncode != 0
    assert "invalid rate" in result.stderr


def test_site_proxies_websockets_with_upgrade_headers(nginx_prefix: Path) -> None:
    """The site speaks HTTP/1.1 upstream with Upgrade/Connection, over every instance."""
    variables = role_vars("nginx", nginx_upstream_ports=[8001, 8002, 8003])
    site = render("etc/nginx/sites-available/wsfleet.conf.j2", variables)
    assert "proxy_http_version 1.1;" in site
    assert "proxy_set_header Upgrade $http_upgrade;" in site
    assert "proxy_set_header Connection $connection_upgrade;" in site
    assert re.findall(r"server 127\.0\.0\.1:(\d+)", site) == ["8001", "8002", "8003"]
    assert "non_idempotent" not in site
    assert "location = /metrics {\n        return 404;" in site
    assert "location = /readyz {\n        return 404;" in site
    # Public health: up or not, nothing of the process (on port 80 and 443 alike).
    assert site.count("proxy_pass http://wsfleet_app/healthz?brief;") == 2
    main = render("etc/nginx/nginx.conf.j2", variables)
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in main
    assert "ssl_prefer_server_ciphers off;" in main
    assert "ssl_session_tickets off;" in main
    assert "server_tokens off;" in main
    assert "worker_connections 40512;" in main  # two per proxied WebSocket


def test_site_reaches_the_instances_on_unix_sockets(nginx_prefix: Path) -> None:
    """With a socket folder, the upstream and /metrics/<port> go to <port>.sock each, and
    nginx -t accepts it; nothing is proxied to a loopback port."""
    result = nginx_check(nginx_prefix, nginx_upstream_socket_dir="/run/wsapp")
    assert result.returncode == 0, result.stderr
    site = (nginx_prefix / "sites-enabled" / "wsfleet.conf").read_text()
    assert re.findall(r"server (\S+) max_fails=0;", site) == [
        "unix:/run/wsapp/8001.sock", "unix:/run/wsapp/8002.sock",
    ]  # fmt: skip
    assert "proxy_pass http://unix:/run/wsapp/8002.sock:/metrics;" in site
    assert "127.0.0.1:800" not in site


def test_units_on_unix_sockets() -> None:
    """app_listen unix: the socket unit listens on the path, for nginx's group only; the
    service binds it itself in the one folder it may write, or is handed it."""
    variables = role_vars("app", app_listen="unix", app_socket_activation=True)
    socket_unit = render("etc/systemd/system/app@.socket.j2", variables)
    assert "ListenStream=/run/wsapp/%i.sock\n" in socket_unit
    assert "SocketUser=wsapp\nSocketGroup=www-data\nSocketMode=0660\n" in socket_unit
    assert "NoDelay" not in socket_unit  # a TCP option
    activated = render("etc/systemd/system/app@.service.j2", variables)
    assert "Environment=APP_UNIX_SOCKET=/run/wsapp/%i.sock\n" in activated
    assert "ReadWritePaths" not in activated
    variables["app_socket_activation"] = False
    binding = render("etc/systemd/system/app@.service.j2", variables)
    assert "ReadWritePaths=/run/wsapp\n" in binding
    assert "UMask=0077\n" in binding
    tmpfiles = render("etc/tmpfiles.d/app.conf.j2", variables)
    assert tmpfiles.splitlines()[-1] == "d /run/wsapp 0750 wsapp www-data -"
    tcp = render("etc/systemd/system/app@.service.j2", role_vars("app"))
    assert "APP_UNIX_SOCKET" not in tcp
    assert "ReadWritePaths" not in tcp
    tcp_socket = render("etc/systemd/system/app@.socket.j2", role_vars("app"))
    assert "ListenStream=127.0.0.1:%i\n" in tcp_socket


def app_env(**overrides: Any) -> dict[str, str]:
    """The app's env file rendered with the role's variables, as NAME: value."""
    # No bus: its URL comes from the bus role, which these tests do not render.
    text = render("opt/app/app.env.j2", role_vars("app", **{"app_bus_url": "", **overrides}))
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


@pytest.mark.parametrize(("bits", "level"), [(10, 3), (15, 9), (9, 1)])
def test_env_file_carries_the_deflate_settings(bits: int, level: int) -> None:
    """app_compression_window_bits and app_compression_memlevel reach the app's settings."""
    env = app_env(app_compression_window_bits=bits, app_compression_memlevel=level)
    assert env["APP_COMPRESSION_WINDOW_BITS"] == str(bits)
    assert env["APP_COMPRESSION_MEMLEVEL"] == str(level)
    settings = parse_settings([], environ=env)
    assert (settings.compression_window_bits, settings.compression_memlevel) == (bits, level)


def test_env_file_defaults_are_the_apps_own() -> None:
    """The role's defaults for deflate are the app's: running it by hand measures the same."""
    env = app_env()
    ours = parse_settings([], environ=env)
    bare = parse_settings([], environ={})
    assert (ours.compression, ours.compression_window_bits, ours.compression_memlevel) == (
        bare.compression, bare.compression_window_bits, bare.compression_memlevel,
    )  # fmt: skip


@pytest.mark.parametrize("size", [0, 65536, 4194304])
def test_env_file_carries_the_queue_bound(size: int) -> None:
    """app_max_queue_bytes reaches the app's settings."""
    env = app_env(app_max_queue_bytes=size)
    assert env["APP_MAX_QUEUE_BYTES"] == str(size)
    assert parse_settings([], environ=env).max_queue_bytes == size


def test_env_file_queue_bound_default_is_the_apps_own() -> None:
    """The role's default app_max_queue_bytes is the app's own --max-queue-bytes default."""
    ours = parse_settings([], environ=app_env())
    assert ours.max_queue_bytes == parse_settings([], environ={}).max_queue_bytes == 1048576


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for systemd-analyze: the machine's units, the app's binary path, env file."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    python = root / "opt/wsapp/current/venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    (root / "opt/wsapp/current/app.env").write_text("")
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


@pytest.mark.parametrize("listen", ["tcp", "unix"])
@pytest.mark.parametrize("activation", [False, True])
def test_systemd_verifies_the_units(unit_root: Path, activation: bool, listen: str) -> None:
    """systemd-analyze verify accepts the template unit (and its socket)."""
    variables = role_vars("app", app_socket_activation=activation, app_listen=listen)
    units = ["app@.service", "app@.socket"] if activation else ["app@.service"]
    for unit in units:
        text = render(f"etc/systemd/system/{unit}.j2", variables)
        (unit_root / "etc/systemd/system" / unit.replace("app", "wsapp", 1)).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={unit_root}", "wsapp@8001.service"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_systemd_verify_catches_a_broken_unit(unit_root: Path) -> None:
    """The check is real: a unit systemd cannot start fails verify."""
    text = render("etc/systemd/system/app@.service.j2", role_vars("app"))
    text = text.replace("ExecStart=/opt/wsapp/current", "ExecStart=/opt/nowhere")
    (unit_root / "etc/systemd/system/wsapp@.service").write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={unit_root}", "wsapp@8001.service"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode != 0


@pytest.mark.parametrize(
    ("listen", "activation"), [("tcp", False), ("unix", False), ("unix", True)]
)
def test_app_unit_exposure_is_at_most_1_5(unit_root: Path, listen: str, activation: bool) -> None:
    """systemd-analyze security scores the hardened unit at 1.5 or below, on a unix socket too."""
    variables = role_vars("app", app_listen=listen, app_socket_activation=activation)
    text = render("etc/systemd/system/app@.service.j2", variables)
    (unit_root / "etc/systemd/system/wsapp@.service").write_text(text)
    assert exposure(unit_root, "wsapp@8001.service") <= 1.5
    # --threshold counts in tenths (15 is 1.5): the exit status says the same.
    threshold = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=15", f"--root={unit_root}",
         "--no-pager", "wsapp@8001.service"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert threshold.returncode == 0, threshold.stdout


def test_site_yml_passes_syntax_check() -> None:
    """ansible-playbook --syntax-check accepts site.yml."""
    result = subprocess.run(
        [str(REPO / ".venv/bin/ansible-playbook"), "--syntax-check", "-i", "localhost,",
         "site.yml"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_unit_takes_its_sandbox_from_one_template() -> None:
    """The app's unit and the nginx and nats-server drop-ins include the one sandbox (the
    drop-ins' folders link to it) and write none of its directives themselves."""
    shared = TEMPLATES / "etc/systemd/system/_sandbox.conf.j2"
    for unit in ("app@.service.j2", "nginx.service.d/wsfleet.conf.j2",
                 "nats-server.service.d/wsfleet.conf.j2"):  # fmt: skip
        path = TEMPLATES / "etc/systemd/system" / unit
        text = path.read_text()
        assert "{% include '_sandbox.conf.j2' %}" in text, unit
        own = re.search(r"^(NoNewPrivileges|ProtectSystem|SystemCallFilter)=", text, re.M)
        assert own is None, unit
        assert (path.parent / "_sandbox.conf.j2").resolve() == shared.resolve(), unit
