"""The base images hosts boot from: a minimal Debian of each release (mmdebstrap), cached
in .fleet/images/<release>.

The hosts have no route to any package registry, so an image carries the apt lists and
the .deb archives of what the roles install (PREFETCH): ``apt-get install`` then works
offline, as long as it is not asked to update its lists first. An image is rebuilt when
its recipe (the constants below and its release) changes; two images are built side by
side, since each build mostly waits on the network and on dpkg. mmdebstrap, not
debootstrap: it fetches with apt, in parallel. The two images side by side, beside
`make test`'s virtualenvs, took 35-50 s on the 2-core machine, where debootstrap took
95-100 s (2026-12-05).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from localfleet.errors import FleetError, log, run
from localfleet.settings import IMAGES, SHARED_STATE

__all__ = [
    "DEFAULT_RELEASE",
    "INCLUDE",
    "MIX",
    "PREFETCH",
    "RELEASES",
    "build_image",
    "build_images",
    "image_dir",
    "recipe_hash",
]

# The Debian releases a host can run, oldest first: 12 (oldstable) and 13 (stable).
# The archive keyring of this Debian 12 controller carries both releases' keys.
RELEASES = ("bookworm", "trixie")
# A host's release where none is named (FleetHost).
DEFAULT_RELEASE = "bookworm"
# A mixed fleet's releases in turn, what ``up`` boots unless told one release: the first
# host runs the current stable, which the tests that use one host then exercise; the
# second host runs oldstable.
MIX = ("trixie", "bookworm")
MIRROR = "http://deb.debian.org/debian"
# What every host has installed: a booting systemd, SSH for Ansible, Python for its modules.
# The same names on both releases.
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
RECIPE_VERSION = "4"  # bump when the build steps below change in a way the lists don't show
# Each download's bounds, for apt (mmdebstrap's and the image's): a stalled mirror fails
# the build in minutes, naming the mirror, instead of holding it for as long as it stalls.
DOWNLOAD_TIMEOUT = 30
DOWNLOAD_TRIES = 3
APT_OPTIONS = {"Acquire::http::Timeout": DOWNLOAD_TIMEOUT, "Acquire::Retries": DOWNLOAD_TRIES - 1}
APT_BOUNDS = [word for key, value in APT_OPTIONS.items() for word in ("-o", f"{key}={value}")]


def image_dir(release: str) -> Path:
    return IMAGES / release


def recipe_hash(release: str) -> str:
    recipe = json.dumps([RECIPE_VERSION, release, MIRROR, INCLUDE, PREFETCH])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def sources(release: str) -> str:
    """apt's sources in the deb822 format, which both releases read (trixie's default)."""
    signed = "/usr/share/keyrings/debian-archive-keyring.gpg"
    return (
        f"Types: deb\nURIs: {MIRROR}\nSuites: {release} {release}-updates\n"
        f"Components: main\nSigned-By: {signed}\n\n"
        f"Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: {release}-security\n"
        f"Components: main\nSigned-By: {signed}\n"
    )


def build_image(release: str) -> None:
    """Build the release's image unless the cached one was built from this recipe."""
    if release not in RELEASES:
        raise FleetError(f"unknown release {release!r}: choose one of {', '.join(RELEASES)}")
    image = image_dir(release)
    stamp = image / ".wsfleet-recipe"
    if stamp.is_file() and stamp.read_text().strip() == recipe_hash(release):
        return
    log(f"building the {release} image; this takes under a minute")
    started = time.monotonic()
    IMAGES.mkdir(parents=True, exist_ok=True)
    scratch = SHARED_STATE / f"image-{release}.new"
    shutil.rmtree(scratch, ignore_errors=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    chroot = ["chroot", str(scratch)]
    try:
        run(["mmdebstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
             *(f'--aptopt={key} "{value}"' for key, value in APT_OPTIONS.items()),
             release, str(scratch), MIRROR], env=env)  # fmt: skip
        # The bounds were the build's: the hosts' apt keeps its defaults.
        (scratch / "etc/apt/apt.conf.d/99mmdebstrap").unlink(missing_ok=True)
        (scratch / "etc/apt/sources.list").unlink(missing_ok=True)
        (scratch / "etc/apt/sources.list.d/debian.sources").write_text(sources(release))
        run([*chroot, "apt-get", *APT_BOUNDS, "update", "-q"], env=env)
        run([*chroot, "apt-get", *APT_BOUNDS, "install", "-y", "-q", "--download-only",
             *PREFETCH], env=env)  # fmt: skip
    except FleetError as error:
        raise FleetError(
            f"the {release} image could not be downloaded from {MIRROR}: {error}"
        ) from None
    # networkd gives host0 its static address; the apt timers would try the network.
    run([*chroot, "systemctl", "enable", "systemd-networkd", "ssh"])
    run([*chroot, "systemctl", "mask", "apt-daily.timer", "apt-daily-upgrade.timer",
         "systemd-networkd-wait-online.service"])  # fmt: skip
    # Each host gets its own SSH host keys, made in its overlay at boot.
    for key in (scratch / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (scratch / "etc/machine-id").write_text("")
    (scratch / ".wsfleet-recipe").write_text(recipe_hash(release) + "\n")
    shutil.rmtree(image, ignore_errors=True)
    scratch.rename(image)
    log(f"{release} image ready in {time.monotonic() - started:.0f} s: {image}")


def build_images(releases: Sequence[str]) -> None:
    """Build the images of these releases that are missing or stale, side by side."""
    wanted = sorted(set(releases))
    # .fleet/image, a release-less image no host boots from (``up`` stops the hosts of
    # unknown release), would only hold its 300 MB.
    shutil.rmtree(SHARED_STATE / "image", ignore_errors=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    # The fleets of a checkout share its images: one builds them while the others wait,
    # then find them built.
    with (SHARED_STATE / "images.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with ThreadPoolExecutor(max_workers=len(wanted) or 1) as pool:
            for future in [pool.submit(build_image, release) for release in wanted]:
                future.result()
