"""The roles' fleet filters (plugins/filter/fleet.py): what each host answers to the
first of several names, and the Prometheus targets of a host's instances."""

from __future__ import annotations

from tests.plugins.loader import plugin

filters = plugin("filter", "fleet")


def test_first_of_takes_each_hosts_first_defined_name_in_order() -> None:
    hosts = [
        {"__bus_address": "10.0.0.1", "ansible_host": "192.0.2.1", "inventory_hostname": "a"},
        {"bus_route_address": "fd00::2", "ansible_host": "192.0.2.2", "inventory_hostname": "b"},
        {"inventory_hostname": "c"},
        {},
    ]
    names = ["__bus_address", "bus_route_address", "ansible_host", "inventory_hostname"]
    assert filters.first_of(hosts, names) == ["10.0.0.1", "fd00::2", "c"]
    assert filters.first_of([], names) == []


def test_metrics_targets_one_group_per_instance_or_none_without_an_address() -> None:
    labels = {"host": "ws1", "wsfleet_target": "instance"}
    groups = filters.metrics_targets([8001, "b"], "10.0.0.1:9180", labels, "ws1")
    assert groups == [
        {"targets": ["10.0.0.1:9180"],
         "labels": {"__metrics_path__": "/metrics/8001", "instance": "ws1:8001", **labels}},
        {"targets": ["10.0.0.1:9180"],
         "labels": {"__metrics_path__": "/metrics/b", "instance": "ws1:b", **labels}},
    ]  # fmt: skip
    assert filters.metrics_targets([8001], "", labels, "ws1") == []
    assert set(filters.FilterModule().filters()) == {"first_of", "metrics_targets"}
