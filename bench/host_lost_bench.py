"""Benchmark of a lost host behind the balancer: how long its members take to come back.

    .venv/bin/python -m bench.host_lost_bench [--runs 2]

On the local fleet of three app servers with the balancer tier (fleetlb, booted for the
run and taken out again at its end). A chat room's traffic, all of it through the
balancer (localfleet.history: 24 members that come back with their last id, three
publishers that send under references and again what was not acknowledged); then the
last app server's machine is killed (its link cut, then SIGKILL to its PID 1: no close
frame, no FIN), its
members' clients sending no pings, as browsers don't. Measured from the kill: when each
member served by that host was served by another one again (its next ``hello``), the
first, median and last; and whether every member got every message once, in order, each
acknowledged once. The host is booted again between runs and at the end, and waited for
until its bus server is current. Ends with ``ratio host-lost back-last/target: X``
(TARGET s).
"""

from __future__ import annotations

import argparse
import sys
import time

import localfleet
from localfleet import hosts
from localfleet.ansible import ansible_playbook
from localfleet.history import Member, assert_nothing_lost, room_traffic
from localfleet.load import quantile

TARGET = 30.0
"""Seconds from a host's loss until the last of its members is back on another host."""
# The whole /healthz of a host's bus server: up, and every stream it holds current.
BUS_CURRENT = "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8222/healthz"


def served_by(member: Member, host: localfleet.FleetHost, after: float = 0.0) -> bool:
    """Whether ``member``'s latest hello (after ``after``) came from ``host``."""
    hellos = [instance for at, instance in member.hellos if at >= after]
    return bool(hellos) and hellos[-1].startswith(f"{host.name}:")


def one_run(balancer: localfleet.FleetHost, victim: localfleet.FleetHost) -> list[float]:
    """One host lost under traffic; each of its members' seconds until back elsewhere."""
    room = f"host-lost-bench-{time.monotonic_ns()}"
    with room_traffic([balancer.address] * 3, room) as traffic:
        deadline = time.monotonic() + 10
        while not any(served_by(m, victim) for m in traffic.members):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no member on {victim.name} to lose")
            time.sleep(0.1)
        time.sleep(2)  # traffic before the loss, for the figures
        lost = [m for m in traffic.members if served_by(m, victim)]
        lost_at = time.monotonic()
        hosts.kill_machine(victim)
        deadline = lost_at + 90
        while not all(m.hellos[-1][0] > lost_at for m in lost):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(3)  # traffic after the return, for the figures
    back = [
        next((at for at, _ in m.hellos if at > lost_at), deadline) - lost_at for m in lost
    ]
    figures = assert_nothing_lost(traffic, frozenset({1001, 1012, 1006}))
    print(f"{len(lost)} of {len(traffic.members)} members were on {victim.name}; back after "
          f"first {min(back):.1f} s, p50 {quantile(back, 0.5):.1f} s, last {max(back):.1f} s; "
          f"missed {figures['missed']}, duplicated {figures['duplicated']}, "
          f"unacked {figures['unacked']}, refused {figures['refused']}")  # fmt: skip
    return back


def restore(victim: localfleet.FleetHost) -> None:
    """Boot the lost host again, from its disk, and wait until its bus server is current."""
    hosts.boot_again(victim)
    deadline = time.monotonic() + 120
    while victim.ssh(BUS_CURRENT).stdout.strip() != "200":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{victim.name}'s bus server not current within 120 s")
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="hosts lost, one after the other")
    args = parser.parse_args()
    fleet = localfleet.read_fleet()
    booted = not (fleet.app_servers and hosts.host_pid(fleet.app_servers[0]))
    fleet = localfleet.up(hosts=len(fleet.app_servers) or 3, lb=True)
    victim = fleet.app_servers[-1]
    print(f"the balancer in front of {len(fleet.app_servers)} app servers; {victim.name} lost "
          f"{args.runs} times; target: its members back within {TARGET:g} s")  # fmt: skip
    backs: list[float] = []
    try:
        ansible_playbook("site.yml")
        for _ in range(args.runs):
            try:
                backs += one_run(fleet.load_balancers[0], victim)
            finally:
                restore(victim)
    finally:
        if booted:
            localfleet.down()
        else:
            localfleet.up(hosts=len(fleet.app_servers), lb=False)
            print("putting every host back as the demo deploys it (no balancer)")
            ansible_playbook("site.yml")
    if backs:
        print(f"ratio host-lost back-last/target: {max(backs) / TARGET:.2f} "
              f"(target {TARGET:g} s; p50 {quantile(backs, 0.5):.1f} s over {len(backs)} "
              f"members)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
