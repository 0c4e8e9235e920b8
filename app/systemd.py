"""The two systemd protocols a service speaks: readiness (sd_notify) and socket activation."""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["activation_socket", "notify"]

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not run by it.

    systemd passes ``$NOTIFY_SOCKET``, a datagram socket path; a leading ``@`` means an
    abstract socket.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as error:
        logger.warning("sd_notify failed: %s", error)
        return False
    return True


def activation_socket() -> socket.socket | None:
    """The listening socket systemd passed (``LISTEN_FDS``), or None to bind our own.

    The variables are removed once read, so a child process does not take them as its own.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "0")
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count.isdigit() or int(count) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.set_inheritable(False)
    return sock
