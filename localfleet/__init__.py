"""The local fleet: real Debian systemd hosts as systemd-nspawn containers on this machine.

Debian 12 and 13 hosts, one release for all or both in turn (a mixed fleet, the default).

What ``make demo``, ``make bench`` and the fleet tests deploy to, over real SSH, with
``ansible-playbook site.yml`` like any real fleet. One module per concern:

- :mod:`localfleet.settings`: where the state lives, the bridge, the addresses, the names;
- :mod:`localfleet.image`: the base images, one per Debian release (mmdebstrap, cached,
  rebuilt on a new recipe);
- :mod:`localfleet.network`: the private bridge;
- :mod:`localfleet.hosts`: one container: overlay, boot, readiness, SSH, stop;
- :mod:`localfleet.inventory`: the demo inventory that ``up`` writes and reads back;
- :mod:`localfleet.fleet`: ``up``, ``down`` and what a run left behind;
- :mod:`localfleet.cli`: ``python -m localfleet up|status|down``;
- :mod:`localfleet.ansible`: running playbooks against the fleet, reading their recaps;
- :mod:`localfleet.demo`: what ``make demo`` prints, and a round trip through a host;
- :mod:`localfleet.instances`: a GET on one app instance, where its unit says it listens;
- :mod:`localfleet.load`: WebSocket clients that load the fleet (tests and bench);
- :mod:`localfleet.variables_doc`: docs/variables.md, rendered from the roles' argument specs.

This package is product code: tests and the bench import it, never the reverse.
"""

from __future__ import annotations

from localfleet.errors import FleetError
from localfleet.fleet import down, leftovers, up
from localfleet.hosts import FleetHost
from localfleet.inventory import Fleet, read_fleet

__all__ = ["Fleet", "FleetError", "FleetHost", "down", "leftovers", "read_fleet", "up"]
