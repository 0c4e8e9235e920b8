"""The defaults deployed back after a module that deployed settings of its own, at the
start of the module after it rather than at its own end (tests/fleet/conftest.py)."""

from __future__ import annotations

from localfleet.ansible import ansible_playbook

__all__ = ["RESTORE", "Restore"]


class Restore:
    """The run that deploys the defaults back after a module that deployed settings of its
    own, left by that module to the module after it instead of run at its end.

    The next module gets it before its first test (the autouse fixture ``defaults``),
    unless it needs none: it says ``NEEDS_DEFAULTS = False`` when each of its tests runs on
    settings it deploys itself at its start (that site.yml run converges the fleet from
    whatever it was left in) or on any settings. A fleet kept up (WSFLEET_KEEP=1) gets it
    at the session's end. Each restore left this way to such a module is one site.yml run
    less (about 20 s): in ORDER, test_unix.py after test_nginx_ops.py, test_loadbalancer.py
    after test_unix.py, and test_fleet.py after test_loadbalancer.py.
    """

    def __init__(self) -> None:
        self.options: tuple[str, ...] | None = None  # site.yml's options; None: nothing left

    def leave(self, *options: str) -> None:
        """What deploys the defaults back: site.yml with these options (``--tags``)."""
        self.options = options

    def drop(self) -> None:
        """The module starting needs no defaults: its own deploy converges the fleet, or
        its tests run on any settings."""
        self.options = None

    def run(self) -> None:
        if self.options is not None:
            options, self.options = self.options, None
            ansible_playbook("site.yml", *options)


RESTORE = Restore()
