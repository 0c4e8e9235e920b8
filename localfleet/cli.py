"""``python -m localfleet``: bring the local fleet up, show it, take it down.

Usage (as root)::

    python -m localfleet up [--hosts K] [--lb]   # build the image once, boot K hosts
        [--release bookworm|trixie | --mix]      # all Debian 12, all 13, or both in turn
    python -m localfleet images                  # only build the images (both releases)
    python -m localfleet status                  # each host and what systemd says
    python -m localfleet down                    # remove every container, mount, link
"""

from __future__ import annotations

import argparse
import sys

from localfleet.errors import FleetError
from localfleet.fleet import down, up
from localfleet.hosts import nspawn_pids, system_state
from localfleet.image import MIX, RELEASES, build_images
from localfleet.inventory import read_fleet

__all__ = ["main"]


def status() -> int:
    fleet = read_fleet()
    if not fleet.hosts and not nspawn_pids():
        print("no fleet (run: python -m localfleet up)")
        return 1
    healthy = True
    for host in fleet.hosts:
        state = system_state(host)
        healthy &= state == "running"
        print(
            f"{host.name:<10} {host.address:<12} {','.join(host.groups):<16} "
            f"{host.release:<10} {state}"
        )
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localfleet", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="build the image if needed and boot the hosts")
    up_parser.add_argument("--hosts", type=int, default=3, help="app servers to run (default 3)")
    up_parser.add_argument("--lb", action="store_true", help="also run a load balancer host")
    release = up_parser.add_mutually_exclusive_group()
    release.add_argument(
        "--release", choices=RELEASES,
        help="the Debian release every host runs (default: a mixed fleet, see --mix)",
    )  # fmt: skip
    release.add_argument(
        "--mix", action="store_true",
        help=f"hosts alternate between releases: {', '.join(MIX)}, ... (the default)",
    )  # fmt: skip
    sub.add_parser("images", help="build the images of both releases if missing or stale")
    sub.add_parser("down", help="remove every container, mount, link and the bridge")
    sub.add_parser("status", help="list the hosts and what systemd in each says")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.hosts, args.lb, (args.release,) if args.release else MIX)
        elif args.command == "images":
            build_images(RELEASES)
        elif args.command == "down":
            down()
        else:
            return status()
    except FleetError as error:
        print(f"fleet: error: {error}", file=sys.stderr)
        return 1
    return 0
