"""The roles' filters over the fleet's hosts: what a host answers to the first of several
names, and the Prometheus targets of a host's instances."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["FilterModule", "first_of", "metrics_targets"]


def first_of(hosts: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[Any]:
    """For each host's variables (``hostvars[host]``), the value of the first of ``names``
    it has; a host with none of them is left out.

    Args:
        hosts: each host's variables, e.g. ``groups['app_servers'] | map('extract', hostvars)``.
        names: the variables to try, in order; end with one every host has, such as
            ``inventory_hostname``, to leave none out.
    """
    found = []
    for host in hosts:
        for name in names:
            if name in host:
                found.append(host[name])
                break
    return found


def metrics_targets(
    names: Sequence[Any], address: str, labels: Mapping[str, str], host: str
) -> list[dict[str, Any]]:
    """One Prometheus target group per instance: each is scraped at ``address`` (host and
    port of the metrics listener) on ``/metrics/<name>``, and named ``<host>:<name>``.

    Args:
        names: the instances' names in the listener's paths (nginx_instance_names).
        address: ``host:port`` of the listener; empty, none (no one could scrape it).
        labels: labels every group carries besides its path and instance.
        host: the host's inventory name.
    """
    if not address:
        return []
    return [
        {
            "targets": [address],
            "labels": {
                "__metrics_path__": f"/metrics/{name}",
                "instance": f"{host}:{name}",
                **labels,
            },
        }
        for name in names
    ]


class FilterModule:
    """Ansible's entry point for the collection's fleet filters."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {"first_of": first_of, "metrics_targets": metrics_targets}
