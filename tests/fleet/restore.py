"""The defaults deployed back after a module that deployed settings of its own, at the
start of the module after it rather than at its own end (tests/fleet/conftest.py)."""

from __future__ import annotations

from localfleet.ansible import ansible_playbook

__all__ = ["RESTORE", "Restore"]


class Restore:
    """The run that deploys the defaults back after a module that deployed settings of its
    own, left by that module to the module after it instead of run at its end.

    The next module either deploys settings of its own at its start, every test of it
    running on those or on any (it says ``OWN_SETTINGS = True``): that run converges the
    fleet from whatever it was left in, and the restore is not needed. Or it wants the
    defaults: it gets the restore first (the autouse fixture ``defaults``). A fleet kept
    up (WSFLEET_KEEP=1) gets it at the session's end. Each restore left this way is one
    site.yml run less (about 20 s) when an OWN_SETTINGS module comes next, as
    test_unix.py does after test_nginx_ops.py and test_loadbalancer.py after test_unix.py
    in ORDER.
    """

    def __init__(self) -> None:
        self.options: tuple[str, ...] | None = None  # site.yml's options; None: nothing left

    def leave(self, *options: str) -> None:
        """What deploys the defaults back: site.yml with these options (``--tags``)."""
        self.options = options

    def drop(self) -> None:
        """The module starting deploys settings of its own, which converges the fleet."""
        self.options = None

    def run(self) -> None:
        if self.options is not None:
            options, self.options = self.options, None
            ansible_playbook("site.yml", *options)


RESTORE = Restore()
