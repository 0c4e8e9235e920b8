"""`make bench`: figures to size a fleet with, measured on the local fleet through site.yml.

    .venv/bin/python -m bench.fleet_bench [--idle 20000] [--capacity 50000] [--seconds 5]
                                          [--out bench/out]
                                          [--rollout 20000]
                                          [--only host|fan-out|idle|capacity|listen|rollout]
                                          [--set VAR=VALUE]

Deploys site.yml with bench/vars.yml over the demo settings to the local fleet (booting
three hosts when no fleet is up), then measures, each pair side by side in this one run,
from clients outside the hosts (bench/loadgen.py over localfleet.load); 1 to 4 on the
first host only (``--limit``), 5 over every host:

1. idle wss connections ramped to --idle with N=2: memory per connection of the app
   instances and of nginx, with permessage-deflate negotiated and without;
2. echo at fixed offered loads of 64 B and 16 KiB messages with N=1: straight to the
   instance's port vs through nginx+TLS on the same host (rate, p50/p99 latency), and the
   most each path carries;
3. new wss connections per second through nginx+TLS, with p50/p99 handshake latency;
4. N=1 vs N=2 processes: handshakes/s and 64 B echo through nginx+TLS;
5. fan-out: one room of FANOUT_MEMBERS members through nginx+TLS, spread over the hosts
   and their N=2 processes, FANOUT_PUBLISHERS of them offering FANOUT_RATE messages/s in
   all (the chat handler): deliveries/s and the latency of a delivery to a member in the
   sender's own process vs on another host; with the bus and the rooms' history (the
   default), with the bus alone (``bus_history_max_age=0``) and with ``bus_enabled=false``,
   where a message reaches only the members in the sender's process; and the history's
   disk and memory per 10,000 stored messages;
6. capacity, on the first host: --capacity idle wss connections (50,000) with N=3 and
   CAPACITY_VARS, the clients spread over CAPACITY_WORKERS source addresses added to the
   bridge for the run (one address reaches one destination from about 28,000 ports):
   refused, memory per connection;
8. rollouts, on the first host: --rollout wss connections (20,000) held with N=2, each
   client reconnecting at once when closed, through two ``rollout.yml --limit`` runs whose
   old instances drain over 1 s and over 30 s (``app_drain_spread``): handshakes per client
   (1.0: each closed once), the time until every client is back, the peak of handshakes
   per second and a reconnect's p50/p99, side by side.

``--only listen`` runs, alone, 7: nginx+TLS to the app over TCP loopback vs over a unix
socket (``app_listen``), N=1 on the first host: the most 64 B and 16 KiB echo each
carries against straight to the instance's port, and the CPU per message of nginx and
the app. With ``--set app_listen=unix``, scenario 2 has no direct path (the instances
listen on no port) and reports nginx+TLS alone.

Prints one ``ratio <what>: <value>`` line per pair, the CPU microseconds nginx and the
app spent per echoed message (``cpu us per message ...``), and writes report.md and PNG plots to
--out. Leaves the hosts as the demo deploys them (or takes down the fleet it booted).
The clients share the machine's cores with the host: every figure comes with the CPU the
clients, the app and nginx used, so a saturated client is not read as a slow server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import localfleet
from bench import loadgen
from bench.loadgen import PATHS, FanOut, Result
from localfleet import load as clients
from localfleet.ansible import ansible_playbook
from localfleet.demo import ca_file
from localfleet.hosts import host_pid
from localfleet.instances import instance_get, live_ports
from localfleet.settings import BRIDGE, LB_HOST, NETWORK, REPO

VARS = REPO / "bench" / "vars.yml"
APP = "wsapp"  # app_name of the demo inventory
# Offered loads (messages/s over all connections), from light to past what one 2-core
# host carries through nginx+TLS, so the plots show where latency turns up.
LOADS = {64: [2000, 8000, 16000, 24000], 16 * 1024: [1000, 3000, 6000, 9000]}
ECHO_CONNECTIONS = 32
WORKERS = 2  # client processes for echo and handshakes: as many as the machine has cores
IDLE_WORKERS = 4  # the ramp is TLS-handshake bound on the client side
# Scenario 6: N=3 instances hold the target between them, each under its open-files limit
# (20,000 here); four client processes of 12,500 connections, each from its own address.
CAPACITY_INSTANCES = 3
CAPACITY_WORKERS = 4
CAPACITY_VARS = [
    # Past the default 10,000: a third of 50,000 per instance, with headroom for the
    # uneven spread (app_limit_nofile follows it: 19,024, under the 20,000 ceiling).
    "app_max_connections=18000",
    # nginx's workers and their limits sized for the target (roles/nginx/vars).
    "nginx_connection_target=50000",
]
# Scenario 8: two rollouts of the first host (N=2) while --rollout clients hold a
# connection each and reconnect at once when closed: the old instances drain over
# app_drain_spread, ROLLOUT_SPREADS[0] s in the first, [1] s in the second (the spread is
# the draining instances', set by the deploy before: the second rollout's release).
ROLLOUT_SPREADS = (1, 30)
ROLLOUT_VARS = [
    # Half the clients on each instance, and headroom for an uneven spread.
    "app_max_connections=15000",
    # The old and the new workers hold connections together while the old ones drain.
    "nginx_connection_target=40000",
    # The drain must outlast the spread (the preflight checks it).
    "app_drain_timeout=60",
]
SATURATED = 0.9  # share of a core past which a client process is said to be the limit
# Scenario 5: 10 members per process on 3 hosts of N=2; at 200 messages/s the bus owes
# 12,000 deliveries/s, well below where this 2-core machine saturates (about 1,000
# messages/s, 60,000 deliveries/s: latency then jumps from ms to tens of ms).
FANOUT_ROOM = "bench-fanout"
FANOUT_MEMBERS = 60
FANOUT_PUBLISHERS = 6
FANOUT_RATE = 200
FANOUT_SIZE = 64
FANOUT_INSTANCES = 2

# Per process on the host: PID, resident KiB, user+system clock ticks.
SAMPLE = r"""
units=$(systemctl list-units --plain --no-legend --state=running '{app}@*.service')
for u in $(echo "$units" | cut -d' ' -f1); do
  p=$(systemctl show -p MainPID --value "$u")
  echo "app $p $(awk '/^VmRSS/{{print $2}}' /proc/$p/status) $(cut -d' ' -f14,15 /proc/$p/stat)"
done
for p in $(pgrep -x nginx); do
  echo "nginx $p $(awk '/^VmRSS/{{print $2}}' /proc/$p/status) $(cut -d' ' -f14,15 /proc/$p/stat)"
done
for p in $(pgrep -x nats-server); do
  echo "nats $p $(awk '/^VmRSS/{{print $2}}' /proc/$p/status) $(cut -d' ' -f14,15 /proc/$p/stat)"
done
"""
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    """The app instances', nginx's and the bus server's memory (KiB) and CPU (s) on the
    host, at one moment."""

    at: float
    rss: dict[str, int]
    cpu: dict[str, float]

    def cpu_share(self, later: Sample) -> dict[str, float]:
        """CPU used between this sample and ``later``, in cores, per kind."""
        wall = later.at - self.at
        return {kind: (later.cpu[kind] - self.cpu[kind]) / wall for kind in self.cpu}

    def cpu_seconds(self, later: Sample) -> dict[str, float]:
        """CPU time used between this sample and ``later``, in seconds, per kind."""
        return {kind: later.cpu[kind] - self.cpu[kind] for kind in self.cpu}


def sample(host: localfleet.FleetHost) -> Sample:
    result = host.ssh(SAMPLE.format(app=APP))
    rss = {"app": 0, "nginx": 0, "nats": 0}
    cpu = {"app": 0.0, "nginx": 0.0, "nats": 0.0}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) != 5:  # the process ended between pgrep and /proc: nothing to count
            continue
        kind, _pid, kib, utime, stime = fields
        rss[kind] += int(kib)
        cpu[kind] += (int(utime) + int(stime)) / TICKS
    if not rss["app"] or not rss["nginx"]:
        raise RuntimeError(
            f"no app or nginx process on {host.name}: {result.stdout}{result.stderr}"
        )
    return Sample(time.monotonic(), rss, cpu)


def open_connections(host: localfleet.FleetHost, instances: int) -> list[int]:
    """Each instance's open connections, from its /healthz (asked on the host: an instance
    on a unix socket is out of the clients' reach).

    Raises:
        OSError: when an instance does not answer.
    """
    counts = []
    # The instances' ports: a handover moves them to the other set (8101 and up).
    ports = live_ports(host, APP)
    if len(ports) != instances:
        raise OSError(f"{host.name}: {len(ports)} instances serve, not {instances}")
    for port in ports:
        result = instance_get(host, port, "/healthz")
        if result.returncode != 0:
            raise OSError(f"{host.name}: instance {port} does not answer /healthz")
        counts.append(int(json.loads(result.stdout)["connections"]))
    return counts


def listen_mode(settings: Sequence[str]) -> str:
    """app_listen as the deploys' --set options leave it (the role's default: tcp)."""
    found = "tcp"
    for setting in settings:
        name, _, value = setting.partition("=")
        if name.strip() == "app_listen":
            found = value.strip()
    return found


def wait_until_idle(host: localfleet.FleetHost, instances: int, deadline: float = 120.0) -> None:
    """Wait (bounded) until the instances hold no connection: runs must not overlap."""
    end = time.monotonic() + deadline
    while sum(counts := open_connections(host, instances)) > 0:
        if time.monotonic() > end:
            raise RuntimeError(f"connections still open after {deadline:.0f} s: {counts}")
        time.sleep(0.5)


FRESH = r"""
systemctl restart '{app}@*.service' && systemctl reload nginx
for i in $(seq 600); do
  # [n]: the pattern must not match this shell's own command line.
  pgrep -f 'nginx: worker process is shutting dow[n]' >/dev/null || exit 0
  sleep 0.1
done
echo "old nginx workers still running" >&2; exit 1
"""


def fresh_processes(host: localfleet.FleetHost, instances: int) -> None:
    """New app and nginx processes, so one run's memory is not the baseline of the next
    (neither Python nor nginx gives freed memory back); waits until they are ready."""
    result = host.ssh(FRESH.format(app=APP))
    if result.returncode != 0:
        raise RuntimeError(f"could not renew the processes: {result.stderr}")
    end = time.monotonic() + 60
    while True:
        try:
            open_connections(host, instances)
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def deploy(instances: int, extra: list[str], limit: str | None = None) -> float:
    """site.yml with bench/vars.yml, ``extra`` (VAR=VALUE each) and N=``instances``, to
    ``limit`` or every host; how long it took."""
    started = time.monotonic()
    options = [arg for value in extra for arg in ("-e", value)]
    options += ["--limit", limit] if limit else []
    ansible_playbook("site.yml", "-e", f"@{VARS}", *options, "-e", f"app_instances={instances}")
    return time.monotonic() - started


def client_note(result: Result) -> str:
    busiest = max(result.client_cpu, default=0.0)
    flag = " CLIENT-BOUND" if busiest > SATURATED else ""
    errors = f", errors {result.errors}" if result.errors else ""
    return f"busiest client process {busiest:.0%} of a core{flag}{errors}"


# --- scenarios --------------------------------------------------------------------------------


def measured(
    host: localfleet.FleetHost, scenario: Any, args: tuple[Any, ...], seconds: float
) -> tuple[Result, dict[str, float], dict[str, float]]:
    """``scenario(*args)`` in each of WORKERS client processes, and the cores and the CPU
    seconds the app and nginx used on ``host`` meanwhile."""
    before = sample(host)
    result = loadgen.in_workers(scenario, lambda _i: args, WORKERS, timeout=seconds + 120)
    after = sample(host)
    return result, before.cpu_share(after), before.cpu_seconds(after)


def cpu_per_message(result: Result, cpu: dict[str, float]) -> dict[str, float]:
    """CPU microseconds per echoed message, per kind: what a host needs per message,
    whatever the rate the loaded machine let through. The clients' 32 handshakes fall in
    the window too (about 1% of it)."""
    return {kind: used * 1e6 / max(result.done, 1) for kind, used in cpu.items()}


def echo_targets(host: localfleet.FleetHost, ca: Path, direct: bool) -> dict[str, Any]:
    """The echo paths: through nginx+TLS, and straight to the instance's port if it has one."""
    targets: dict[str, Any] = {"nginx+TLS": (f"wss://{host.address}/", str(ca))}
    if direct:
        # The first instance's port, whichever set the last handover left it on.
        port = live_ports(host, APP)[0]
        targets = {"direct": (f"ws://{host.address}:{port}/", None), **targets}
    return targets


def echo_runs(
    host: localfleet.FleetHost, ca: Path, seconds: float, direct: bool = True
) -> dict[str, Any]:
    """Scenario 2 (N=1): direct (when ``direct``) vs nginx+TLS at each offered load, and
    the most of each."""
    targets = echo_targets(host, ca, direct)
    runs: dict[str, Any] = {"loads": [], "max": {}, "us": {}}
    for size, loads in LOADS.items():
        for name, (url, ca_arg) in targets.items():
            per_worker = ECHO_CONNECTIONS // WORKERS
            result, server, cpu = measured(
                host, loadgen.echo_closed_loop, (url, ca_arg, size, seconds, per_worker), seconds
            )
            runs["max"][(name, size)] = (result, server)
            runs["us"][(name, size)] = us = cpu_per_message(result, cpu)
            print(
                f"echo {size:>5} B most  {name:<9}: {result.rate:>8,.0f} msg/s, "
                f"p50 {result.quantile(0.5):6.2f} ms, p99 {result.quantile(0.99):7.2f} ms; "
                f"app {server['app']:.2f} cores, nginx {server['nginx']:.2f}; CPU per "
                f"message app {us['app']:.1f} us, nginx {us['nginx']:.1f} us; "
                f"{client_note(result)}"
            )
            for load in loads:
                args = (url, ca_arg, size, load / WORKERS, seconds, per_worker)
                result, server, _cpu = measured(host, loadgen.echo_at_rate, args, seconds)
                runs["loads"].append((name, size, load, result, server))
                print(
                    f"echo {size:>5} B {load:>6}/s {name:<9}: {result.rate:>8,.0f} msg/s, "
                    f"p50 {result.quantile(0.5):6.2f} ms, p99 {result.quantile(0.99):7.2f} ms, "
                    f"lost {result.failed}; app {server['app']:.2f} cores, "
                    f"nginx {server['nginx']:.2f}; {client_note(result)}"
                )
    return runs


def handshake_run(host: localfleet.FleetHost, ca: Path, seconds: float, label: str) -> Result:
    """Scenario 3: new wss connections back to back through nginx+TLS."""
    args = (f"wss://{host.address}/", str(ca), seconds, 8)
    result, server, _cpu = measured(host, loadgen.handshakes, args, seconds)
    print(
        f"handshakes {label}: {result.rate:>7,.0f}/s, p50 {result.quantile(0.5):6.2f} ms, "
        f"p99 {result.quantile(0.99):7.2f} ms, refused {result.failed}; "
        f"app {server['app']:.2f} cores, nginx {server['nginx']:.2f}; {client_note(result)}"
    )
    return result


def idle_run(
    host: localfleet.FleetHost,
    ca: Path,
    target: int,
    compression: str | None,
    instances: int,
    workers: int = IDLE_WORKERS,
    sources: Sequence[str] = (),
) -> dict[str, Any]:
    """Scenarios 1 and 6: ramp to ``target`` idle wss connections from ``workers`` client
    processes (process i from ``sources[i]`` when given); memory per connection."""
    wait_until_idle(host, instances)
    fresh_processes(host, instances)
    before = sample(host)
    opened = multiprocessing.Value("i", 0)
    ramped = multiprocessing.Value("i", 0)
    release = multiprocessing.Event()
    measured: dict[str, Any] = {}

    def at_target() -> None:
        end = time.monotonic() + 600
        while ramped.value < workers and time.monotonic() < end:
            time.sleep(0.2)
        measured["after"] = sample(host)
        measured["per_instance"] = open_connections(host, instances)
        release.set()

    per_worker = target // workers
    result = loadgen.in_workers(
        loadgen.hold_idle,
        lambda i: (
            f"wss://{host.address}/",
            str(ca),
            per_worker,
            compression,
            64,
            opened,
            ramped,
            release,
            sources[i] if sources else None,
        ),
        workers,
        timeout=900,
        while_running=at_target,
    )
    after: Sample = measured["after"]
    held = max(result.done, 1)
    kib = {kind: (after.rss[kind] - before.rss[kind]) / held for kind in after.rss}
    name = compression or "none"
    print(
        f"idle {name:<7} N={instances}: {result.done:,} open ({result.failed} refused) in "
        f"{result.seconds:.0f} s ({result.rate:,.0f}/s), per instance {measured['per_instance']}; "
        f"per connection: app {kib['app']:.1f} KiB, nginx {kib['nginx']:.1f} KiB; "
        f"{client_note(result)}"
    )
    wait_until_idle(host, instances)
    return {
        "result": result,
        "kib": kib,
        "per_instance": measured["per_instance"],
        "before": before,
        "after": after,
    }


def fan_out_run(
    hosts: Sequence[localfleet.FleetHost], ca: Path, seconds: float, bus: bool
) -> tuple[FanOut, dict[str, float]]:
    """Scenario 5: one room over every host, at FANOUT_RATE; the cores the hosts used
    while the messages went (not while the members joined)."""
    urls = [f"wss://{host.address}/ws/{FANOUT_ROOM}?events=1" for host in hosts]
    barrier = multiprocessing.Barrier(WORKERS + 1)
    window: dict[str, list[Sample]] = {}

    def while_sending() -> None:
        barrier.wait(120)
        end = time.monotonic() + 0.2 + seconds
        window["before"] = [sample(host) for host in hosts]
        time.sleep(max(0.0, end - time.monotonic()))
        window["after"] = [sample(host) for host in hosts]

    result = loadgen.in_workers(
        loadgen.fan_out,
        lambda i: (
            urls,
            str(ca),
            FANOUT_MEMBERS // WORKERS,
            FANOUT_PUBLISHERS // WORKERS,
            FANOUT_RATE / WORKERS,
            seconds,
            FANOUT_SIZE,
            FANOUT_MEMBERS if bus else None,
            barrier,
            i / WORKERS,
        ),
        WORKERS,
        timeout=seconds + 180,
        while_running=while_sending,
        kind=FanOut,
    )
    assert isinstance(result, FanOut)
    shares = [b.cpu_share(a) for b, a in zip(window["before"], window["after"], strict=True)]
    server = {kind: sum(share[kind] for share in shares) for kind in shares[0]}
    owed = result.expected(bus)
    latency = ", ".join(
        f"{path} {result.paths[path].quantile(0.5):.2f}/{result.paths[path].quantile(0.99):.2f}"
        for path in PATHS
        if result.paths[path].done
    )
    print(
        f"fan-out {'bus' if bus else 'in-process':<10}: {result.members.total()} members on "
        f"{len(result.members)} processes ({min(result.members.values(), default=0)}-"
        f"{max(result.members.values(), default=0)} each), {FANOUT_PUBLISHERS} publishers "
        f"offering {FANOUT_RATE}/s: {result.published:,.0f} msg/s published, "
        f"{result.rate:,.0f} deliveries/s ({result.done:,} of {owed:,} owed); "
        f"p50/p99 ms {latency}; app {server['app']:.2f} cores, nginx {server['nginx']:.2f}, "
        f"nats {server['nats']:.2f} (all hosts); {client_note(result)}"
    )
    return result, server


@contextlib.contextmanager
def source_addresses(count: int) -> Iterator[list[str]]:
    """``count`` extra addresses of the controller on the fleet's bridge, for the block:
    the ones after the gateway, below those of the hosts (.10 up)."""
    if 2 + count > LB_HOST:
        raise ValueError(f"{count} source addresses do not fit below the hosts' addresses")
    addresses = [str(NETWORK[2 + i]) for i in range(count)]
    added = []
    try:
        for address in addresses:
            subprocess.run(
                ["ip", "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", BRIDGE],
                check=True,
            )
            added.append(address)
        yield addresses
    finally:
        for address in added:
            subprocess.run(
                ["ip", "addr", "del", f"{address}/{NETWORK.prefixlen}", "dev", BRIDGE],
                check=False,
            )


def capacity_run(
    host: localfleet.FleetHost, ca: Path, args: argparse.Namespace, lines: list[str]
) -> dict[str, Any]:
    """Scenario 6: --capacity idle wss connections on ``host`` with N=CAPACITY_INSTANCES."""
    took = deploy(CAPACITY_INSTANCES, [*args.set, *CAPACITY_VARS], limit=host.name)
    print(f"deploy N={CAPACITY_INSTANCES}, {' '.join(CAPACITY_VARS)} to {host.name}: {took:.0f} s")
    with source_addresses(CAPACITY_WORKERS) as sources:
        run = idle_run(host, ca, args.capacity, None, CAPACITY_INSTANCES, CAPACITY_WORKERS, sources)
    r: Result = run["result"]
    line = (
        f"capacity idle wss connections held (N={CAPACITY_INSTANCES}, {CAPACITY_WORKERS} source "
        f"addresses): {r.done:,} of {args.capacity:,}, refused {r.failed}; KiB per connection "
        f"app {run['kib']['app']:.1f}, nginx {run['kib']['nginx']:.1f}"
    )
    print(line)
    lines.append(line)
    return run


def capacity_section(run: dict[str, Any], target: int) -> list[str]:
    """Report section 6."""
    r: Result = run["result"]
    k = run["kib"]
    return [
        f"## 6. Capacity: {target:,} idle wss connections on one host "
        f"(N={CAPACITY_INSTANCES}, through nginx+TLS)",
        "",
        f"Deployed with {', '.join(f'`{v}`' for v in CAPACITY_VARS)}; {CAPACITY_WORKERS} "
        "client processes, each from its own address on the bridge.",
        "",
        "| open | refused | ramp /s | per instance | app KiB/conn | nginx KiB/conn "
        "| app MiB | nginx MiB | busiest client |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r.done:,} | {r.failed} | {r.rate:,.0f} | {run['per_instance']} | "
        f"{k['app']:.1f} | {k['nginx']:.1f} | {run['after'].rss['app'] / 1024:,.0f} | "
        f"{run['after'].rss['nginx'] / 1024:,.0f} | {max(r.client_cpu, default=0):.0%} |",
        "",
    ]


def rollout_figures(result: loadgen.Rollout, start: float, end: float) -> dict[str, float]:
    """Scenario 8's figures for the rollout between ``start`` and ``end`` (monotonic)."""
    per_client = [sum(start <= t < end for t in times) for times in result.handshakes_at]
    held = max(len(per_client), 1)
    moments = sorted(t for times in result.handshakes_at for t in times if start <= t < end)
    per_second = Counter(int(t - start) for t in moments)
    waits = [back - closed for closed, back in result.reconnects if start <= closed < end]
    closes = [closed for closed, _back in result.reconnects if start <= closed < end]
    return {
        "handshakes per client": sum(per_client) / held,
        "clients with more than one": sum(count > 1 for count in per_client),
        "most per client": max(per_client, default=0),
        "all back after": (moments[-1] - min(closes)) if moments and closes else float("nan"),
        "peak handshakes/s": max(per_second.values(), default=0),
        "p50 reconnect ms": clients.quantile(waits, 0.5) * 1000,
        "p99 reconnect ms": clients.quantile(waits, 0.99) * 1000,
    }


def rollout_run(
    host: localfleet.FleetHost, ca: Path, args: argparse.Namespace, lines: list[str]
) -> dict[int, dict[str, float]]:
    """Scenario 8: --rollout clients on ``host`` (N=2) through two rollouts, whose old
    instances drain over each of ROLLOUT_SPREADS; the figures of each, by spread."""
    first, second = ROLLOUT_SPREADS
    took = deploy(2, [*args.set, *ROLLOUT_VARS, f"app_drain_spread={first}"], limit=host.name)
    print(f"deploy N=2, {' '.join(ROLLOUT_VARS)} to {host.name}: {took:.0f} s")
    wait_until_idle(host, 2)
    opened = multiprocessing.Value("i", 0)
    ramped = multiprocessing.Value("i", 0)
    release = multiprocessing.Event()
    windows: dict[int, tuple[float, float]] = {}
    stamp = time.strftime("%Y%m%d%H%M%S")

    def rollouts() -> None:
        end = time.monotonic() + 600
        while ramped.value < IDLE_WORKERS and time.monotonic() < end:
            time.sleep(0.2)
        target = opened.value
        try:
            for number, spread in enumerate((first, second)):
                started = time.monotonic()
                # The new instances drain over ``second`` when the next rollout replaces them.
                ansible_playbook(
                    "playbooks/rollout.yml", "--limit", host.name, "-e", f"@{VARS}",
                    *(arg for value in [*args.set, *ROLLOUT_VARS] for arg in ("-e", value)),
                    "-e", f"app_drain_spread={second}", "-e", "app_instances=2",
                    "-e", f"app_version=bench-{stamp}-{number}",
                )  # fmt: skip
                deadline = time.monotonic() + 300
                while opened.value < target and time.monotonic() < deadline:
                    time.sleep(0.1)
                windows[spread] = (started, time.monotonic())
                print(f"rollout {number + 1} (drain over {spread} s): {opened.value:,} of "
                      f"{target:,} back in {time.monotonic() - started:.0f} s")  # fmt: skip
        finally:
            release.set()

    per_worker = args.rollout // IDLE_WORKERS
    result = loadgen.in_workers(
        loadgen.hold_through_rollout,
        lambda _i: (f"wss://{host.address}/", str(ca), per_worker, 256, opened, ramped, release),
        IDLE_WORKERS,
        timeout=1800,
        while_running=rollouts,
        kind=loadgen.Rollout,
    )
    assert isinstance(result, loadgen.Rollout)
    figures = {spread: rollout_figures(result, *window) for spread, window in windows.items()}
    for spread, f in figures.items():
        line = (
            f"rollout of {host.name} holding {result.done:,} connections ({result.failed} "
            f"refused), drain over {spread} s: {f['handshakes per client']:.3f} handshakes per "
            f"client (most {f['most per client']:.0f}, {f['clients with more than one']:.0f} "
            f"with more than one), all back in {f['all back after']:.1f} s, peak "
            f"{f['peak handshakes/s']:,.0f} handshakes/s, reconnect p50 "
            f"{f['p50 reconnect ms']:.0f} ms p99 {f['p99 reconnect ms']:.0f} ms; "
            f"{client_note(result)}"
        )
        print(line)
        lines.append(line)
    line = f"rollout closes, both rollouts: {dict(result.closes)}"
    print(line)
    lines.append(line)
    if len(figures) == len(ROLLOUT_SPREADS):
        ratio(
            lines,
            f"rollout peak handshakes/s, drain over {first} s/{second} s",
            figures[first]["peak handshakes/s"] / max(figures[second]["peak handshakes/s"], 1),
        )
    wait_until_idle(host, 2)
    return figures


def rollout_section(figures: dict[int, dict[str, float]], target: int) -> list[str]:
    """Report section 8."""
    rows = [
        f"| {spread} s | {f['handshakes per client']:.3f} | {f['most per client']:.0f} | "
        f"{f['all back after']:.1f} s | {f['peak handshakes/s']:,.0f} | "
        f"{f['p50 reconnect ms']:.0f} ms | {f['p99 reconnect ms']:.0f} ms |"
        for spread, f in figures.items()
    ]
    return [
        f"## 8. A rollout of one host holding {target:,} connections (N=2, through nginx+TLS)",
        "",
        "Each client reconnects at once when its instance closes it (1012). `rollout.yml "
        "--limit` hands the host's instances over: new ones on the spare ports, nginx moved "
        "to them, the old ones drained over `app_drain_spread`.",
        "",
        "| drain over | handshakes per client | most | all back | peak handshakes/s "
        "| reconnect p50 | p99 |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


# --- report -----------------------------------------------------------------------------------


def ratio(lines: list[str], what: str, value: float, note: str = "") -> None:
    line = f"ratio {what}: {value:.2f}" + (f" ({note})" if note else "")
    print(line)
    lines.append(line)


def plots(
    out: Path,
    echo: dict[str, Any],
    idle: dict[str, Any],
    hs: dict[int, Result],
    most: dict[int, Result],
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    figure, axes = plt.subplots(1, len(LOADS), figsize=(11, 4.2))
    for axis, size in zip(axes, LOADS, strict=True):
        for name, style in (("direct", "tab:blue"), ("nginx+TLS", "tab:orange")):
            rows = [r for r in echo["loads"] if r[0] == name and r[1] == size]
            x = [r[2] for r in rows]
            axis.plot(x, [r[3].quantile(0.5) for r in rows], "o-", color=style, label=f"{name} p50")
            axis.plot(
                x, [r[3].quantile(0.99) for r in rows], "s--", color=style, label=f"{name} p99"
            )
        axis.set_yscale("log")
        axis.set_title(f"echo {size} B, N=1")
        axis.set_xlabel("offered messages/s")
        axis.set_ylabel("latency (ms)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "echo_latency.png", dpi=110)
    files.append("echo_latency.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    names = list(idle)
    app = [idle[n]["kib"]["app"] for n in names]
    nginx = [idle[n]["kib"]["nginx"] for n in names]
    axis.bar(names, app, label="app instances")
    axis.bar(names, nginx, bottom=app, label="nginx")
    axis.set_ylabel("KiB per idle connection")
    axis.set_title(
        f"memory per idle wss connection ({next(iter(idle.values()))['result'].done:,} open, N=2)"
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "idle_memory.png", dpi=110)
    files.append("idle_memory.png")

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, result in hs.items():
        ordered = sorted(x * 1000 for x in result.latencies)
        left.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=f"N={n}")
    left.set_xscale("log")
    left.set_xlabel("handshake latency (ms), TCP + TLS + upgrade")
    left.set_ylabel("share of handshakes")
    left.set_title("new wss connections through nginx+TLS")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    labels = [f"N={n}" for n in hs]
    width = 0.38
    xs = range(len(labels))
    right.bar([x - width / 2 for x in xs], [hs[n].rate for n in hs], width, label="handshakes/s")
    right.bar(
        [x + width / 2 for x in xs],
        [most[n].rate / 10 for n in most],
        width,
        label="64 B echo msg/s ÷ 10",
    )
    right.set_xticks(list(xs), labels)
    right.set_title("processes per host, through nginx+TLS")
    right.legend()
    figure.tight_layout()
    figure.savefig(out / "processes.png", dpi=110)
    files.append("processes.png")
    plt.close("all")
    return files


def fan_out_plot(out: Path, runs: dict[str, tuple[FanOut, dict[str, float]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, (result, _server) in runs.items():
        for path in PATHS:
            if not result.paths[path].latencies:
                continue
            ordered = sorted(x * 1000 for x in result.paths[path].latencies)
            style = {"bus+history": "-", "bus": "-."}.get(name, "--")
            axis.plot(
                ordered,
                [i / len(ordered) for i in range(len(ordered))],
                style,
                label=f"{name}: {path}",
            )
    axis.set_xscale("log")
    axis.set_xlabel("delivery latency (ms), from the message's send time")
    axis.set_ylabel("share of deliveries")
    axis.set_title(f"fan-out: one room of {FANOUT_MEMBERS} members, {FANOUT_RATE} msg/s")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "fan_out_latency.png", dpi=110)
    plt.close("all")
    return "fan_out_latency.png"


def host_sections(
    out: Path,
    echo: dict[str, Any],
    idle: dict[str, Any],
    hs: dict[int, Result],
    most: dict[int, Result],
) -> list[str]:
    """Report sections 1 to 4."""
    files = plots(out, echo, idle, hs, most)
    md = [
        "## 1. Idle connections (N=2, through nginx+TLS)",
        "",
        "| client offers | open | refused | ramp /s | per instance "
        "| app KiB/conn | nginx KiB/conn | total KiB/conn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in idle.items():
        r: Result = run["result"]
        k = run["kib"]
        md.append(
            f"| {name} | {r.done:,} | {r.failed} | {r.rate:,.0f} | {run['per_instance']} | "
            f"{k['app']:.1f} | {k['nginx']:.1f} | {k['app'] + k['nginx']:.1f} |"
        )
    md += [
        "",
        f"![idle memory]({files[1]})",
        "",
        "## 2. Echo, direct to the instance vs through nginx+TLS (N=1)",
        "",
        "| size | offered /s | path | achieved /s | p50 ms | p99 ms | lost "
        "| app cores | nginx cores | busiest client |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, size, load, r, server in echo["loads"]:
        md.append(
            f"| {size} B | {load:,} | {name} | {r.rate:,.0f} | {r.quantile(0.5):.2f} | "
            f"{r.quantile(0.99):.2f} | {r.failed} | {server['app']:.2f} | "
            f"{server['nginx']:.2f} | {max(r.client_cpu):.0%} |"
        )
    for (name, size), (r, server) in echo["max"].items():
        md.append(
            f"| {size} B | most | {name} | {r.rate:,.0f} | {r.quantile(0.5):.2f} | "
            f"{r.quantile(0.99):.2f} | {r.failed} | {server['app']:.2f} | "
            f"{server['nginx']:.2f} | {max(r.client_cpu):.0%} |"
        )
    md += [
        "",
        f"![echo latency]({files[0]})",
        "",
        "## 3 and 4. New connections, and N=1 vs N=2 (through nginx+TLS)",
        "",
        "| N | handshakes/s | p50 ms | p99 ms | refused | 64 B echo most /s |",
        "|---|---|---|---|---|---|",
    ]
    for n in hs:
        md.append(
            f"| {n} | {hs[n].rate:,.0f} | {hs[n].quantile(0.5):.2f} | "
            f"{hs[n].quantile(0.99):.2f} | {hs[n].failed} | {most[n].rate:,.0f} |"
        )
    md += ["", f"![processes]({files[2]})", ""]
    return md


def fan_out_section(
    out: Path, runs: dict[str, tuple[FanOut, dict[str, float]]], seconds: float
) -> list[str]:
    """Report section 5."""
    md = [
        f"## 5. Fan-out: one room over {len(runs['bus'][0].members) // FANOUT_INSTANCES} "
        f"hosts (N={FANOUT_INSTANCES}, through nginx+TLS)",
        "",
        f"{FANOUT_MEMBERS} members of one room (the chat handler), spread evenly over the "
        f"hosts; {FANOUT_PUBLISHERS} of them send {FANOUT_RATE} messages/s of {FANOUT_SIZE} "
        f"B in all for {seconds:g} s. A delivery is timed from its message's send time (the "
        "time it was due when the sender ran late); one not in "
        f"{loadgen.LINGER:g} s after the last send is lost. Same process: the member shares "
        "the sender's process (the sender included); same host: another process of its "
        "host; cross-host: a process on another host. In-process: `bus_enabled=false`, a "
        "message reaches only the members in the sender's process. Cores: summed over the "
        "hosts while the messages went; busiest client: over its whole run, the joins and "
        "the wait for the last deliveries included.",
        "",
        "| run | members per process | published /s | deliveries/s | owed | lost "
        + "".join(f"| {path} p50/p99 ms " for path in PATHS)
        + "| app cores | nginx cores | nats cores | busiest client |",
        "|---|---|---|---|---|---" + "|---" * len(PATHS) + "|---|---|---|---|",
    ]
    for name, (r, server) in runs.items():
        owed = r.expected(name != "in-process")
        latency = "".join(
            f"| {r.paths[path].quantile(0.5):.2f}/{r.paths[path].quantile(0.99):.2f} "
            if r.paths[path].done
            else "| - "
            for path in PATHS
        )
        md.append(
            f"| {name} | {sorted(r.members.values())} | {r.published:,.0f} | {r.rate:,.0f} "
            f"| {owed:,} | {owed - r.done:,} {latency}| {server['app']:.2f} "
            f"| {server['nginx']:.2f} | {server['nats']:.2f} | {max(r.client_cpu):.0%} |"
        )
    md += ["", f"![fan-out latency]({fan_out_plot(out, runs)})", ""]
    return md


def report(out: Path, context: dict[str, Any], ratios: list[str], sections: list[str]) -> None:
    md = [
        "# wsfleet benchmark",
        "",
        f"{context['when']}; controller {context['cpus']} CPUs, load average "
        f"{context['load']:.2f} at start; hosts {context['hosts']} (systemd-nspawn on the "
        "same machine: clients, nginx and the app share its cores). `make bench` wrote "
        f"this; variables set over bench/vars.yml: {context['set']}.",
        "",
        "```",
        *ratios,
        "```",
        "",
        *sections,
    ]
    (out / "report.md").write_text("\n".join(md))
    print(f"report: {out / 'report.md'}")


# --- main -------------------------------------------------------------------------------------


def idle_scenario(
    host: localfleet.FleetHost, ca: Path, args: argparse.Namespace, ratios: list[str]
) -> None:
    """Scenario 1's idle connections without compression alone: what a tuning (--set) does
    to the memory per connection, without the echo runs around it."""
    print(f"deploy N=2 to {host.name}: {deploy(2, args.set, limit=host.name):.0f} s")
    run = idle_run(host, ca, args.idle, None, 2)
    kib = run["kib"]
    ratio(ratios, "idle KiB per connection nginx/app (none)", kib["nginx"] / kib["app"])


def host_scenarios(
    host: localfleet.FleetHost, ca: Path, args: argparse.Namespace, ratios: list[str]
) -> list[str]:
    """Scenarios 1 to 4 on ``host`` alone; their report sections."""
    print(f"deploy N=1 to {host.name}: {deploy(1, args.set, limit=host.name):.0f} s")
    echo = echo_runs(host, ca, args.seconds, direct=listen_mode(args.set) == "tcp")
    hs = {1: handshake_run(host, ca, args.seconds * 2, "N=1")}
    most = {1: echo["max"][("nginx+TLS", 64)][0]}

    print(f"deploy N=2 to {host.name}: {deploy(2, args.set, limit=host.name):.0f} s")
    hs[2] = handshake_run(host, ca, args.seconds * 2, "N=2")
    wss_64 = (f"wss://{host.address}/", str(ca), 64, args.seconds, ECHO_CONNECTIONS // WORKERS)
    most[2], server, _cpu = measured(host, loadgen.echo_closed_loop, wss_64, args.seconds)
    print(
        f"echo    64 B most  nginx+TLS N=2: {most[2].rate:>8,.0f} msg/s; app "
        f"{server['app']:.2f} cores, nginx {server['nginx']:.2f}; {client_note(most[2])}"
    )
    idle = {
        "none": idle_run(host, ca, args.idle, None, 2),
        "deflate": idle_run(host, ca, args.idle, "deflate", 2),
    }

    for size in LOADS:
        if ("direct", size) not in echo["max"]:
            continue
        direct = echo["max"][("direct", size)][0].rate
        ratio(
            ratios,
            f"echo {size} B msg/s nginx+TLS/direct (N=1)",
            echo["max"][("nginx+TLS", size)][0].rate / direct,
        )
    total = {n: run["kib"]["app"] + run["kib"]["nginx"] for n, run in idle.items()}
    ratio(
        ratios,
        "idle KiB per connection deflate/none (app+nginx)",
        total["deflate"] / total["none"],
    )
    ratio(
        ratios,
        "idle KiB per connection nginx/app (none)",
        idle["none"]["kib"]["nginx"] / idle["none"]["kib"]["app"],
    )
    ratio(ratios, "handshakes/s N=2/N=1", hs[2].rate / hs[1].rate)
    ratio(ratios, "echo 64 B msg/s through nginx+TLS N=2/N=1", most[2].rate / most[1].rate)
    for (name, size), us in echo["us"].items():
        line = (
            f"cpu us per echoed {size} B message, most, {name} (N=1): "
            f"nginx {us['nginx']:.1f}, app {us['app']:.1f}"
        )
        print(line)
        ratios.append(line)
    sections = host_sections(args.out, echo, idle, hs, most)
    if args.capacity:
        sections += capacity_section(capacity_run(host, ca, args, ratios), args.capacity)
    return sections


def listen_scenario(
    host: localfleet.FleetHost, ca: Path, args: argparse.Namespace, ratios: list[str]
) -> list[str]:
    """Scenario 7 (N=1): nginx+TLS to the instance over TCP loopback vs a unix socket, the
    direct path (measured with TCP) the baseline of both; its report section."""
    runs: dict[tuple[str, str, int], tuple[Result, dict[str, float]]] = {}
    for listen in ("tcp", "unix"):
        took = deploy(1, [*args.set, f"app_listen={listen}"], limit=host.name)
        print(f"deploy N=1, app_listen={listen} to {host.name}: {took:.0f} s")
        for size in LOADS:
            for name, (url, ca_arg) in echo_targets(host, ca, listen == "tcp").items():
                per_worker = ECHO_CONNECTIONS // WORKERS
                work = (url, ca_arg, size, args.seconds, per_worker)
                result, _server, cpu = measured(host, loadgen.echo_closed_loop, work, args.seconds)
                runs[(listen, name, size)] = (result, cpu_per_message(result, cpu))
                print(
                    f"echo {size:>5} B most  {name:<9} app_listen={listen}: "
                    f"{result.rate:>8,.0f} msg/s; {client_note(result)}"
                )
    md = [
        "## 7. nginx+TLS to the app: TCP loopback vs unix socket (N=1)",
        "",
        "| size | path | achieved /s | p50 ms | p99 ms | nginx us/msg | app us/msg |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in LOADS:
        direct = runs[("tcp", "direct", size)][0].rate
        for listen in ("tcp", "unix"):
            result, us = runs[(listen, "nginx+TLS", size)]
            ratio(
                ratios,
                f"echo {size} B msg/s nginx+TLS/direct (N=1)",
                result.rate / direct,
                f"app_listen={listen}",
            )
            line = (
                f"cpu us per echoed {size} B message, most, nginx+TLS app_listen={listen} "
                f"(N=1): nginx {us['nginx']:.1f}, app {us['app']:.1f}"
            )
            print(line)
            ratios.append(line)
        tcp_us, unix_us = (runs[(mode, "nginx+TLS", size)][1] for mode in ("tcp", "unix"))
        ratio(
            ratios,
            f"nginx cpu per echoed {size} B message unix/tcp",
            unix_us["nginx"] / tcp_us["nginx"],
        )
    for (listen, name, size), (result, us) in runs.items():
        path = name if name == "direct" else f"{name}, {listen}"
        md.append(
            f"| {size} B | {path} | {result.rate:,.0f} | {result.quantile(0.5):.2f} | "
            f"{result.quantile(0.99):.2f} | {us['nginx']:.1f} | {us['app']:.1f} |"
        )
    return [*md, ""]


# Scenario 5's runs: name, bus_enabled, bus_history_max_age.
VARIANTS = (("bus+history", True, 3600), ("bus", True, 0), ("in-process", False, 0))
# nats-server's monitoring documents, each pretty-printed over lines: one line each here.
JSZ = (
    "for doc in jsz varz; do curl -s 127.0.0.1:8222/$doc"
    " | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))'; done"
)


def jetstream_usage(hosts: Sequence[localfleet.FleetHost]) -> dict[str, float]:
    """Messages and bytes JetStream holds, and nats-server's RSS (KiB), summed over hosts."""
    usage = {"messages": 0.0, "storage": 0.0, "rss": 0.0}
    for host in hosts:
        jsz, varz = host.ssh(JSZ).stdout.split("\n", 1)
        usage["messages"] += json.loads(jsz).get("messages", 0)
        usage["storage"] += json.loads(jsz).get("storage", 0)
        usage["rss"] += json.loads(varz)["mem"] / 1024
    return usage


def history_footprint(stored: dict[str, dict[str, float]]) -> dict[str, float]:
    """KiB of disk and of nats-server memory per 10,000 stored messages and host copy: the
    history run against the run without (the same traffic, nothing stored)."""
    kept = stored["bus+history"]
    copies = max(kept["messages"], 1) / 10_000
    return {
        "disk": kept["storage"] / 1024 / copies,
        "memory": (kept["rss"] - stored["bus"]["rss"]) / copies,
    }


def fan_out_scenario(
    hosts: Sequence[localfleet.FleetHost], ca: Path, args: argparse.Namespace, ratios: list[str]
) -> list[str]:
    """Scenario 5 on every host, with the bus and without; its report section."""
    runs = {}
    stored: dict[str, dict[str, float]] = {}
    chat = [*args.set, "app_handler=app.handlers:chat"]
    for name, enabled, max_age in VARIANTS:
        settings = [f"bus_enabled={str(enabled).lower()}", f"bus_history_max_age={max_age}"]
        took = deploy(FANOUT_INSTANCES, [*chat, *settings])
        print(f"deploy N={FANOUT_INSTANCES}, chat, {' '.join(settings)}: {took:.0f} s")
        runs[name] = fan_out_run(hosts, ca, args.seconds, enabled)
        if enabled:
            stored[name] = jetstream_usage(hosts)
    history, bus, local = runs["bus+history"][0], runs["bus"][0], runs["in-process"][0]
    per_10k = history_footprint(stored)
    line = (
        f"history footprint per 10,000 stored {FANOUT_SIZE} B messages (each host's copy): "
        f"disk {per_10k['disk']:.0f} KiB, nats-server memory {per_10k['memory']:.0f} KiB"
    )
    print(line)
    ratios.append(line)
    for quantile in (0.5, 0.99):
        for path in ("same process", "cross-host"):
            ratio(
                ratios,
                f"fan-out latency p{quantile * 100:g} {path} history/no history",
                history.paths[path].quantile(quantile) / bus.paths[path].quantile(quantile),
            )
    ratio(ratios, "fan-out deliveries/s history/no history", history.rate / (bus.rate or math.nan))
    ratio(
        ratios,
        "fan-out latency p50 cross-host/same-process",
        bus.paths["cross-host"].quantile(0.5) / bus.paths["same process"].quantile(0.5),
    )
    ratio(
        ratios,
        "fan-out latency p50 same-process bus/in-process",
        bus.paths["same process"].quantile(0.5) / local.paths["same process"].quantile(0.5),
    )
    ratio(
        ratios,
        "fan-out deliveries/s bus/in-process",
        bus.rate / (local.rate or math.nan),
        f"total over the room at the same offered rate, so set by the placement: "
        f"it owes {bus.expected(True) / max(local.expected(False), 1):.2f}",
    )
    return fan_out_section(args.out, runs, args.seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=20000, help="idle connections to hold")
    parser.add_argument(
        "--capacity", type=int, default=50000,
        help=f"idle connections to hold with N={CAPACITY_INSTANCES} (scenario 6); 0: none",
    )  # fmt: skip
    parser.add_argument(
        "--rollout", type=int, default=20000,
        help="connections held through the rollouts of scenario 8; 0: none",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="length of each echo or fan-out run, s"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument(
        "--set", action="append", default=[], metavar="VAR=VALUE",
        help="a role variable for the deploys (ansible -e), to measure a tuning; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--only", choices=["host", "fan-out", "idle", "capacity", "listen", "rollout"],
        help="only scenarios 1-4 (on the first host), only 5 (over every host), only the "
        "idle memory of 1 (a tuning's KiB per connection in a minute or two), only 6, or "
        "only 7 (TCP loopback vs unix socket, on the first host), or only 8 (rollouts)",
    )  # fmt: skip
    args = parser.parse_args()
    # Every idle connection is a descriptor in one of the client processes (a quarter of
    # --idle each); they inherit this limit, raised as far as the machine lets.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for option, target, workers in (
        ("--idle", args.idle, IDLE_WORKERS),
        ("--capacity", args.capacity, CAPACITY_WORKERS),
        ("--rollout", args.rollout, IDLE_WORKERS),
    ):
        if target // workers + 1024 > hard:
            parser.error(
                f"{option} {target} needs {target // workers + 1024} descriptors "
                f"per client process; the limit here is {hard}"
            )
    args.out.mkdir(parents=True, exist_ok=True)

    fleet = localfleet.read_fleet()
    booted = not (fleet.app_servers and host_pid(fleet.app_servers[0]))
    if booted:
        fleet = localfleet.up(hosts=3)
    hosts = fleet.app_servers
    fan_out = args.only in (None, "fan-out")
    if fan_out and len(hosts) < 2:
        print(
            f"fan-out skipped: the fleet has {len(hosts)} app server, it takes 2 or more "
            "(`python -m localfleet up --hosts 3`)"
        )
        fan_out = False
    context = {
        "set": " ".join(args.set) or "none",
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0],
        "hosts": ", ".join(host.name for host in hosts),
    }
    ratios: list[str] = []
    sections: list[str] = []
    try:
        ca = ca_file()
        if args.only == "idle":
            idle_scenario(hosts[0], ca, args, ratios)
        elif args.only == "capacity":
            sections += capacity_section(capacity_run(hosts[0], ca, args, ratios), args.capacity)
        elif args.only == "listen":
            sections += listen_scenario(hosts[0], ca, args, ratios)
        elif args.only in (None, "host"):
            sections += host_scenarios(hosts[0], ca, args, ratios)
        if args.only in (None, "rollout") and args.rollout:
            figures = rollout_run(hosts[0], ca, args, ratios)
            sections += rollout_section(figures, args.rollout)
        if fan_out:
            sections += fan_out_scenario(hosts, ca, args, ratios)
        report(args.out, context, ratios, sections)
    finally:
        if booted:
            localfleet.down()
        elif fan_out:
            print("putting every host back as the demo deploys it")
            ansible_playbook("site.yml")
        else:
            print(f"putting {hosts[0].name} back as the demo deploys it")
            ansible_playbook("site.yml", "--limit", hosts[0].name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
