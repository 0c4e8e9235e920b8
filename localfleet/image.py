"""The base image every host boots from: a debootstrap of Debian, cached in .fleet/image.

The hosts have no route to any package registry, so the image carries the apt lists and
the .deb archives of what the roles install (PREFETCH): ``apt-get install`` then works
offline, as long as it is not asked to update its lists first. The image is rebuilt when
its recipe (the constants below) changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from localfleet.errors import log, run
from localfleet.settings import IMAGE, STATE

__all__ = ["INCLUDE", "PREFETCH", "SUITE", "build_image", "recipe_hash"]

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What every host has installed: a booting systemd, SSH for Ansible, Python for its modules.
INCLUDE = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "python3",
    "python3-apt",
    "iproute2",
    "ca-certificates",
    "curl",
    "procps",
]
# What the roles install with apt: fetched into the image (lists and archives), not installed.
PREFETCH = ["nginx", "python3-venv", "nats-server"]
RECIPE_VERSION = "2"  # bump when the build steps below change in a way the lists don't show


def recipe_hash() -> str:
    recipe = json.dumps([RECIPE_VERSION, SUITE, MIRROR, INCLUDE, PREFETCH])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def build_image() -> None:
    """Debootstrap the base image unless the cached one was built from this recipe."""
    stamp = IMAGE / ".wsfleet-recipe"
    if stamp.is_file() and stamp.read_text().strip() == recipe_hash():
        return
    log(f"building the base image ({SUITE}); this takes a minute or two")
    STATE.mkdir(exist_ok=True)
    scratch = STATE / "image.new"
    shutil.rmtree(scratch, ignore_errors=True)
    run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
         SUITE, str(scratch), MIRROR])  # fmt: skip
    (scratch / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n"
        f"deb http://deb.debian.org/debian-security {SUITE}-security main\n"
    )
    chroot = ["chroot", str(scratch)]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run([*chroot, "apt-get", "update", "-q"], env=env)
    run([*chroot, "apt-get", "install", "-y", "-q", "--download-only", *PREFETCH], env=env)
    # networkd gives host0 its static address; the apt timers would try the network.
    run([*chroot, "systemctl", "enable", "systemd-networkd", "ssh"])
    run([*chroot, "systemctl", "mask", "apt-daily.timer", "apt-daily-upgrade.timer",
         "systemd-networkd-wait-online.service"])  # fmt: skip
    # Each host gets its own SSH host keys, made in its overlay at boot.
    for key in (scratch / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (scratch / "etc/machine-id").write_text("")
    (scratch / ".wsfleet-recipe").write_text(recipe_hash() + "\n")
    shutil.rmtree(IMAGE, ignore_errors=True)
    scratch.rename(IMAGE)
    log(f"base image ready: {IMAGE}")
