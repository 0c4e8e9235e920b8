"""Put the wheels of pinned requirements for the hosts' Python into a folder, on the controller.

Run by the app role's build with the controller's Python::

    fetch_wheels.py --requirements requirements/app.txt --python-version 3.11 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        --cache ~/.cache/wsfleet/wheels --dest build/releases/<id>.tmp

The wheels are kept in a cache outside the checkout, one folder per set of pinned
requirements, Python version and platforms: a second checkout, or a new release of the same
requirements, takes them from there and asks no index. A download has a bounded time
(``--timeout`` per network operation, ``--retries``, and ``--deadline`` for one package in
all), so a stalled index costs about a minute, and its failure names the package and the
index it was asked of.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Where pip looks when nothing configures another index.
PYPI = "https://pypi.org/simple"
_INDEX_SETTING = re.compile(r"^(?::env:|global|download)\.index-url='(?P<url>[^']*)'$")


def requirements(path: Path) -> list[str]:
    """The requirement lines of a pinned requirements file, without comments."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def cache_key(pins: list[str], python_version: str, platforms: list[str]) -> str:
    """A name for one set of wheels: what is pinned, for which Python and platforms."""
    recipe = "\n".join([python_version, *sorted(platforms), *sorted(pins)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def index_url() -> str:
    """The index pip asks, as configured for it (environment, then pip's config files)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    for line in listing.stdout.splitlines():
        match = _INDEX_SETTING.match(line.strip())
        if match:
            return match["url"]
    return PYPI


def download(pin: str, folder: Path, args: argparse.Namespace, index: str) -> None:
    """Download one pinned wheel for the hosts' Python, or exit naming it and the index."""
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off",
        "--timeout", str(args.timeout), "--retries", str(args.retries),
        "--python-version", args.python_version, "--implementation", "cp",
        *(f"--platform={platform}" for platform in args.platform),
        "--index-url", index, "--dest", str(folder), pin,
    ]  # fmt: skip
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=args.deadline
        )
    except subprocess.TimeoutExpired:
        sys.exit(f"no wheel of {pin} from {index} within {args.deadline} s (the index stalled)")
    if result.returncode != 0:
        reason = " ".join(result.stderr.split())[-600:] or f"pip exited {result.returncode}"
        sys.exit(f"no wheel of {pin} from {index}: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requirements", type=Path, required=True)
    parser.add_argument("--python-version", required=True, help="the hosts' Python, e.g. 3.11")
    parser.add_argument("--platform", action="append", required=True, help="pip's platform tags")
    parser.add_argument("--cache", type=Path, required=True, help="the wheel cache's folder")
    parser.add_argument("--dest", type=Path, required=True, help="where the wheels go")
    parser.add_argument("--timeout", type=int, default=15, help="seconds per network operation")
    parser.add_argument("--retries", type=int, default=2, help="tries again after a failure")
    parser.add_argument("--deadline", type=int, default=50, help="seconds for one package")
    args = parser.parse_args(argv)

    pins = requirements(args.requirements)
    cached = args.cache / cache_key(pins, args.python_version, args.platform)
    args.cache.mkdir(parents=True, exist_ok=True)
    # One filler at a time per folder: two deploys from this controller at once (two
    # checkouts, two fleets) would otherwise download into, and replace, one scratch.
    with cached.with_name(cached.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cached / ".complete").is_file():
            index = index_url()
            scratch = cached.with_name(cached.name + ".tmp")
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            for pin in pins:
                download(pin, scratch, args, index)
            (scratch / ".complete").write_text("\n".join(pins) + "\n")
            shutil.rmtree(cached, ignore_errors=True)
            scratch.rename(cached)
            print(f"downloaded {len(pins)} wheels from {index} into {cached}")
        else:
            print(f"{len(pins)} wheels from the cache {cached}")
    args.dest.mkdir(parents=True, exist_ok=True)
    for wheel in cached.glob("*.whl"):
        shutil.copy2(wheel, args.dest / wheel.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
