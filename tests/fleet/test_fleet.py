"""The local fleet itself: hosts boot, `up` is idempotent and heals, bad input is named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import localfleet
from localfleet import hosts, settings
from localfleet.image import MIX, RELEASES
from localfleet.inventory import bus_server_package, plan
from localfleet.settings import REPO

# The hosts themselves, whatever site.yml settings they were left with (tests/fleet/restore.py).
NEEDS_DEFAULTS = False


def localfleet_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localfleet", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_status_says_running_for_every_host(fleet: localfleet.Fleet) -> None:
    """`status` lists each host with systemd's own word: running."""
    result = localfleet_cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    for host in fleet.hosts:
        assert f"{host.name} " in result.stdout
        line = next(x for x in result.stdout.splitlines() if x.startswith(host.name + " "))
        assert line.split()[-1] == "running", line


def test_hosts_answer_over_ssh_on_their_own_address(fleet: localfleet.Fleet) -> None:
    """Each host is reached by SSH at its static address and knows its own name."""
    for host in fleet.hosts:
        result = host.ssh("hostname && ip -4 -o addr show host0")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == host.name
        assert f"{host.address}/24" in result.stdout


def test_each_host_runs_the_release_the_inventory_names(fleet: localfleet.Fleet) -> None:
    """The test fleet is mixed: each host's os-release names the Debian release that its
    inventory entry (localfleet_release) does, and both releases are there."""
    assert {h.release for h in localfleet.read_fleet().hosts} == set(RELEASES)
    versions = {"bookworm": "12", "trixie": "13"}
    for host in localfleet.read_fleet().hosts:
        result = host.ssh(". /etc/os-release && echo $VERSION_CODENAME $VERSION_ID")
        assert result.stdout.split() == [host.release, versions[host.release]], host.name


def test_mix_alternates_releases_and_a_release_is_one_for_all(fleet: localfleet.Fleet) -> None:
    """--mix: hosts take the releases in turn (the balancer the first); --release: all one;
    an unknown release is refused by name before anything boots."""
    assert [h.release for h in plan(3, True, MIX)] == ["trixie", "trixie", "bookworm", "trixie"]
    assert {h.release for h in plan(3, False, ("bookworm",))} == {"bookworm"}
    # Both releases among the app servers: one nats-server for the bus, the newest's.
    package = bus_server_package(plan(3, True, MIX))
    assert package is not None
    assert "/trixie/" in str(package), package
    assert bus_server_package(plan(3, True, ("bookworm",))) is None
    with pytest.raises(localfleet.FleetError, match="sid"):
        plan(3, False, ("sid",))
    before = hosts.nspawn_pids()
    result = localfleet_cli("up", "--release", "sid")
    assert result.returncode == 2
    assert "invalid choice: 'sid'" in result.stderr
    assert hosts.nspawn_pids() == before


def test_up_twice_leaves_running_hosts_alone(fleet: localfleet.Fleet) -> None:
    """A second `up` boots nothing: the same container processes keep running."""
    before = hosts.nspawn_pids()
    result = localfleet_cli("up", "--hosts", str(len(fleet.hosts)), "--mix")
    assert result.returncode == 0, result.stderr
    assert "booted now: none" in result.stdout
    assert hosts.nspawn_pids() == before


def test_up_heals_a_host_whose_nspawn_was_killed(fleet: localfleet.Fleet) -> None:
    """After a SIGKILL of one container's nspawn, `up` removes the orphan and reboots it."""
    victim = fleet.hosts[-1]
    pid = hosts.host_pid(victim)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while hosts.host_pid(victim) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim.name in hosts.orphan_inits().values()

    result = localfleet_cli("up", "--hosts", str(len(fleet.hosts)), "--mix")
    assert result.returncode == 0, result.stderr
    assert f"booted now: {victim.name}" in result.stdout
    assert not hosts.orphan_inits()
    assert hosts.system_state(victim) == "running"
    assert victim.ssh("true").returncode == 0


def test_a_host_that_fails_to_boot_is_named_with_its_journal(fleet: localfleet.Fleet) -> None:
    """A host whose boot ends degraded is named, with its failed unit and journal tail."""
    name = f"{settings.NAME}9"
    broken = localfleet.FleetHost(name, str(settings.NETWORK[19]), ("app_servers",))
    key = (settings.SSH_DIR / "id_ed25519.pub").read_text()
    try:
        hosts.prepare_host(broken, key)
        unit = broken.root / "etc/systemd/system/broken-on-boot.service"
        unit.write_text("[Service]\nType=oneshot\nExecStart=/bin/false\n"
                        "[Install]\nWantedBy=multi-user.target\n")  # fmt: skip
        wants = broken.root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
        hosts.boot(broken)
        with pytest.raises(localfleet.FleetError) as failure:
            hosts.wait_running(broken, time.monotonic() + 60)
        message = str(failure.value)
        assert message.startswith(f"{name} did not come up (systemd says 'degraded')")
        assert "broken-on-boot.service" in message
        assert "journal tail:" in message
    finally:
        hosts.stop_host(broken.name, hosts.host_pid(broken))
    assert not any(name in item for item in localfleet.leftovers())


def test_up_without_root_says_so_and_touches_nothing(fleet: localfleet.Fleet) -> None:
    """`up` as an unprivileged user fails at once, saying it needs root."""
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "localfleet", "up"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "must run as root" in result.stderr


def test_up_without_the_tools_names_the_packages(fleet: localfleet.Fleet) -> None:
    """`up` on a machine without systemd-nspawn or mmdebstrap names the apt packages."""
    before = hosts.nspawn_pids()
    result = localfleet_cli("up", env={**os.environ, "PATH": "/nonexistent"})
    assert result.returncode == 1
    assert "apt-get install" in result.stderr
    for package in ("systemd-container", "mmdebstrap", "iproute2", "openssh-client"):
        assert package in result.stderr
    assert hosts.nspawn_pids() == before
