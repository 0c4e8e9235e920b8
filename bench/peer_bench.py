"""`make bench` against the peer users would pick instead: Socket.IO with Redis, the same
workloads on both stacks in one run, printed side by side with ratios.

    .venv/bin/python -m bench.peer_bench [--peer socketio] [--idle 10000] [--seconds 5]
                                         [--out bench/out] [--local]

On the local fleet (the default): the kit's chat (bus and history on, N = the host's
cores) deployed with site.yml and bench/vars.yml to every host, and the peer
(bench/peer_fleet.py) beside it on the same hosts, behind the same nginx site and
certificate. ``--local``: both on this machine's loopback instead, no nginx, no TLS
(nats-server with JetStream and 2 kit processes; redis-server and 2 node processes),
each process standing for a host: for developing the workloads, not for sizing.

The workloads, each on both stacks (bench/peer_loadgen.py, one client code):

1. --idle wss members per host in rooms of 10: memory per connection of the app
   processes and the broker (nats-server, redis-server), and of nginx;
2. one room of FANOUT_MEMBERS members over every host, FANOUT_PUBLISHERS of them
   offering FANOUT_RATE messages/s: deliveries/s, p50/p99 latency from the message's
   due time, and the hosts' CPU seconds per 1,000 deliveries;
3. the same room at rising offered rates (SATURATION_RATES), until p99 passes 100 ms or
   a delivery in 100 is lost: the most deliveries/s with p99 under 100 ms, and per core
   the stack's processes used there;
4. new members back to back, each timed to its ``hello``: per second;
5. a room's traffic (8 members and a publisher per host) while every host's processes
   restart: the kit's by ``rollout.yml``, the peer's one host at a time, each process in
   turn (its clients recover their session): messages missed per member, duplicates,
   reconnects per client, failed handshakes.

Prints the table, ``ratio <what> wsfleet/<peer>: <value>`` lines, the versions, and
writes bench/out/peer.md with its plots.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen, peer_loadgen
from bench.loadgen import FanOut, Result
from bench.peer_loadgen import KIT, PEER
from localfleet.settings import REPO

__all__ = [
    "Figures",
    "Row",
    "comparison",
    "main",
    "ratio_lines",
    "saturation_point",
    "table",
]

WORKERS = 2
IDLE_WORKERS = 4
FANOUT_ROOM = "bench-peer-fanout"
FANOUT_MEMBERS = 60
FANOUT_PUBLISHERS = 6
FANOUT_RATE = 200
FANOUT_SIZE = 64
SATURATION_RATES = (200, 500, 1000, 2000, 3000, 4000, 6000)
SATURATION_P99_MS = 100.0
SATURATION_LOSS = 0.01
TRAFFIC_MEMBERS = 8
TRAFFIC_EVERY = 0.05  # one publisher per host, 20 messages/s
TICKS = os.sysconf("SC_CLK_TCK")
NAMES = {KIT: "wsfleet", PEER: "socketio"}
REDIS_LOCAL = "redis://127.0.0.1:17379"  # --local's redis-server
# The peer's packages whose versions the report names.
NPM_PACKAGES = ("socket.io", "engine.io", "@socket.io/redis-streams-adapter", "redis")


# --- figures, rows, ratios (no I/O) -------------------------------------------------------


@dataclass
class Figures:
    """One stack's figures in this run; nan where a workload did not run."""

    idle_kib: float = math.nan  # app processes + broker, per connection
    idle_nginx_kib: float = math.nan
    idle_refused: int = 0
    deliveries: float = math.nan  # workload 2, per second
    p50: float = math.nan
    p99: float = math.nan
    cpu_per_1000: float = math.nan  # CPU seconds of the hosts per 1,000 deliveries
    saturation: float = math.nan  # the most deliveries/s with p99 under 100 ms
    saturation_per_core: float = math.nan
    handshakes: float = math.nan
    handshake_p99: float = math.nan
    restart: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)  # for the plots


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure of both stacks, and which way is better."""

    what: str
    kit: float
    peer: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        """kit/peer; nan when either is missing, inf when only the peer's is 0."""
        if math.isnan(self.kit) or math.isnan(self.peer):
            return math.nan
        if self.peer == 0:
            return math.nan if self.kit == 0 else math.inf
        return self.kit / self.peer

    @property
    def kit_ahead(self) -> bool | None:
        """Whether the kit at least matches the peer here; None when not comparable."""
        if math.isnan(self.kit) or math.isnan(self.peer):
            return None
        return self.kit >= self.peer if self.higher_is_better else self.kit <= self.peer


def comparison(kit: Figures, peer: Figures) -> list[Row]:
    """The table's rows, in the workloads' order."""
    rows = [
        Row("idle KiB per connection (app + broker)", kit.idle_kib, peer.idle_kib, False),
        Row("idle KiB per connection (nginx)", kit.idle_nginx_kib, peer.idle_nginx_kib, False),
        Row("fan-out deliveries/s at fixed load", kit.deliveries, peer.deliveries, True),
        Row("fan-out p50 ms", kit.p50, peer.p50, False),
        Row("fan-out p99 ms", kit.p99, peer.p99, False),
        Row("fan-out CPU s per 1,000 deliveries", kit.cpu_per_1000, peer.cpu_per_1000, False),
        Row("saturation deliveries/s (p99 < 100 ms)", kit.saturation, peer.saturation, True),
        Row(
            "saturation deliveries/s per core",
            kit.saturation_per_core,
            peer.saturation_per_core,
            True,
        ),
        Row("handshakes/s", kit.handshakes, peer.handshakes, True),
        Row("handshake p99 ms", kit.handshake_p99, peer.handshake_p99, False),
    ]
    for what in ("missed per member", "duplicates", "reconnects per client", "failed handshakes"):
        rows.append(
            Row(
                f"restart: {what}",
                kit.restart.get(what, math.nan),
                peer.restart.get(what, math.nan),
                False,
            )
        )
    return rows


def ratio_lines(rows: Sequence[Row], peer: str) -> list[str]:
    """``ratio <what> wsfleet/<peer>: <value>`` for each row both stacks measured."""
    return [
        f"ratio {row.what} wsfleet/{peer}: {row.ratio:.2f}"
        for row in rows
        if not math.isnan(row.ratio)
    ]


def _cell(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def table(rows: Sequence[Row], peer: str) -> list[str]:
    """The comparison as a Markdown table; the last column says where the kit is behind."""
    lines = [
        f"| workload | wsfleet | {peer} | wsfleet/{peer} | kit at least matches |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ahead = {True: "yes", False: "**behind**", None: "-"}[row.kit_ahead]
        ratio = "-" if math.isnan(row.ratio) else f"{row.ratio:.2f}"
        lines.append(f"| {row.what} | {_cell(row.kit)} | {_cell(row.peer)} | {ratio} | {ahead} |")
    return lines


def saturation_point(
    runs: Sequence[tuple[float, float, float, float]],
    p99_ms: float = SATURATION_P99_MS,
    loss: float = SATURATION_LOSS,
) -> tuple[float, float] | None:
    """Of (offered rate, deliveries/s, p99 ms, share lost) runs, the one with the most
    deliveries/s whose p99 is under ``p99_ms`` and loss under ``loss``: its offered rate
    and deliveries/s; None when none is."""
    good = [(rate, done) for rate, done, p99, lost in runs if p99 < p99_ms and lost < loss]
    return max(good, key=lambda run: run[1]) if good else None


# --- one stack under measurement ------------------------------------------------------------


@dataclass
class Usage:
    """Memory (KiB) and CPU (s) of a stack's processes by kind, summed over its hosts."""

    at: float
    rss: dict[str, int]
    cpu: dict[str, float]

    def cpu_seconds(self, later: Usage) -> float:
        return sum(later.cpu[k] - self.cpu[k] for k in self.cpu)


@dataclass
class Target:
    """One stack as the workloads reach it."""

    stack: str
    bases: list[str]  # one per host
    ca: str | None
    usage: Callable[[], Usage]
    restart: Callable[[], None]  # every host's processes, as workload 5 does
    cores: int  # the cores of its hosts


def _workers(result: Result) -> str:
    busiest = max(result.client_cpu, default=0.0)
    return f"busiest client {busiest:.0%}" + (" CLIENT-BOUND" if busiest > 0.9 else "")


def idle_run(target: Target, per_host: int) -> tuple[float, float, int]:
    """Workload 1: KiB per connection (app + broker; nginx), and refusals."""
    count = per_host * len(target.bases)
    before = target.usage()
    opened = multiprocessing.Value("i", 0)
    ramped = multiprocessing.Value("i", 0)
    release = multiprocessing.Event()
    measured: dict[str, Usage] = {}

    def at_target() -> None:
        end = time.monotonic() + 600
        while ramped.value < IDLE_WORKERS and time.monotonic() < end:
            time.sleep(0.2)
        measured["after"] = target.usage()
        release.set()

    result = loadgen.in_workers(
        peer_loadgen.hold_idle,
        lambda i: (
            target.stack,
            target.bases,
            target.ca,
            count // IDLE_WORKERS,
            64,
            i * 100_000,
            opened,
            ramped,
            release,
        ),
        IDLE_WORKERS,
        timeout=900,
        while_running=at_target,
    )
    after = measured["after"]
    held = max(result.done, 1)
    kib = {k: (after.rss[k] - before.rss[k]) / held for k in after.rss}
    print(
        f"{NAMES[target.stack]:<8} idle: {result.done:,} held ({result.failed} refused) in "
        f"{result.seconds:.0f} s; KiB per connection app {kib['app']:.1f}, broker "
        f"{kib['broker']:.1f}, nginx {kib.get('nginx', 0):.1f}; {_workers(result)}"
    )
    return kib["app"] + kib["broker"], kib.get("nginx", math.nan), result.failed


def fan_out_run(target: Target, rate: float, seconds: float) -> tuple[FanOut, float]:
    """Workloads 2 and 3: one room at ``rate``; the result and the CPU seconds the
    stack's processes used while the messages went."""
    barrier = multiprocessing.Barrier(WORKERS + 1)
    window: dict[str, Usage] = {}

    def while_sending() -> None:
        barrier.wait(120)
        end = time.monotonic() + 0.2 + seconds
        window["before"] = target.usage()
        time.sleep(max(0.0, end - time.monotonic()))
        window["after"] = target.usage()

    room = f"{FANOUT_ROOM}-{time.monotonic_ns()}"  # a new room: no history of the last run
    result = loadgen.in_workers(
        peer_loadgen.fan_out,
        lambda i: (
            target.stack,
            target.bases,
            target.ca,
            room,
            FANOUT_MEMBERS // WORKERS,
            FANOUT_PUBLISHERS // WORKERS,
            rate / WORKERS,
            seconds,
            FANOUT_SIZE,
            FANOUT_MEMBERS,
            barrier,
            i / WORKERS,
        ),
        WORKERS,
        timeout=seconds + 180,
        while_running=while_sending,
        kind=FanOut,
    )
    assert isinstance(result, FanOut)
    cpu = window["before"].cpu_seconds(window["after"])
    owed = result.expected(True)
    print(
        f"{NAMES[target.stack]:<8} fan-out {rate:>5,.0f}/s: {result.rate:>9,.0f} deliveries/s "
        f"({result.done:,} of {owed:,}), p50 {result.quantile(0.5):.2f} ms, p99 "
        f"{result.quantile(0.99):.2f} ms; {cpu:.2f} CPU s; {_workers(result)}"
    )
    return result, cpu


def handshake_run(target: Target, seconds: float) -> Result:
    """Workload 4."""
    result = loadgen.in_workers(
        peer_loadgen.handshakes,
        lambda i: (target.stack, target.bases[i % len(target.bases)], target.ca, seconds, 8),
        WORKERS,
        timeout=seconds + 120,
    )
    print(
        f"{NAMES[target.stack]:<8} handshakes: {result.rate:,.0f}/s, p50 "
        f"{result.quantile(0.5):.2f} ms, p99 {result.quantile(0.99):.2f} ms, "
        f"refused {result.failed}; {_workers(result)}"
    )
    return result


def restart_run(target: Target, seconds: float) -> dict[str, float]:
    """Workload 5: the room's traffic for ``seconds``, through ``target.restart()``, and
    ``seconds`` more (a measuring window on each side of the restarts)."""
    _traffic, stop = peer_loadgen.room_traffic(
        target.stack, target.bases, target.ca, f"bench-peer-restart-{time.monotonic_ns()}",
        TRAFFIC_MEMBERS, TRAFFIC_EVERY,
    )  # fmt: skip
    time.sleep(seconds)
    target.restart()
    time.sleep(seconds)
    figures = peer_loadgen.traffic_figures(stop())
    print(f"{NAMES[target.stack]:<8} restart: {json.dumps(figures)}")
    return figures


def measure(target: Target, args: argparse.Namespace) -> Figures:
    """Every workload on one stack."""
    figures = Figures()
    figures.idle_kib, figures.idle_nginx_kib, figures.idle_refused = idle_run(target, args.idle)
    fixed, cpu = fan_out_run(target, FANOUT_RATE, args.seconds)
    figures.deliveries = fixed.rate
    figures.p50, figures.p99 = fixed.quantile(0.5), fixed.quantile(0.99)
    figures.cpu_per_1000 = cpu / max(fixed.done / 1000, 1e-9)
    figures.curves["fixed"] = sorted(x * 1000 for x in fixed.latencies)
    runs: list[tuple[float, float, float, float]] = []
    cores: dict[float, float] = {}
    for rate in SATURATION_RATES:
        result, used = fan_out_run(target, rate, args.seconds)
        owed = max(result.expected(True), 1)
        runs.append((rate, result.rate, result.quantile(0.99), 1 - result.done / owed))
        cores[rate] = used / args.seconds
        if runs[-1][2] >= SATURATION_P99_MS or runs[-1][3] >= SATURATION_LOSS:
            break  # past saturation: a higher rate only queues more
    figures.curves["saturation"] = runs
    point = saturation_point(runs)
    if point is not None:
        figures.saturation = point[1]
        figures.saturation_per_core = point[1] / max(cores[point[0]], 1e-9)
    hs = handshake_run(target, args.seconds * 2)
    figures.handshakes, figures.handshake_p99 = hs.rate, hs.quantile(0.99)
    figures.restart = restart_run(target, args.seconds)
    return figures


# --- on this machine's loopback (--local) ---------------------------------------------------


def _proc_usage(kinds: dict[str, list[int]]) -> Usage:
    rss: dict[str, int] = {}
    cpu: dict[str, float] = {}
    for kind, pids in kinds.items():
        rss[kind], cpu[kind] = 0, 0.0
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # restarting: counted in the next sample
                continue
            rss[kind] += int(
                next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]
            )
            cpu[kind] += (int(stat[11]) + int(stat[12])) / TICKS
    return Usage(time.monotonic(), rss, cpu)


def _wait_port(port: int, process: subprocess.Popen[bytes], deadline: float = 30.0) -> None:
    """Until ``port`` on loopback answers /healthz (bounded; fails if the process died)."""
    import urllib.request

    end = time.monotonic() + deadline
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited ({process.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


@contextmanager
def local_stacks(scratch: Path) -> Iterator[tuple[Target, Target, dict[str, str]]]:
    """Both stacks on loopback: N=2 processes each, their broker; stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    log = (scratch / "processes.log").open("ab")

    def spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, **(env or {})},
                                   cwd=REPO)  # fmt: skip
        started.append(process)
        return process

    try:
        nats = spawn(["nats-server", "-a", "127.0.0.1", "-p", "17422", "-js",
                      "-sd", str(scratch / "js"), "-m", "17822"])  # fmt: skip
        redis = spawn(["redis-server", "--port", "17379", "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no"])  # fmt: skip
        _wait_port(17822, nats)
        kit = {port: spawn([sys.executable, "-m", "app", "--handler", "app.handlers:chat",
                            "--port", str(port), "--bus-url", "nats://127.0.0.1:17422",
                            "--bus-history-max-age", "3600", "--compression", "none",
                            "--log-level", "warning"]) for port in (17101, 17102)}  # fmt: skip
        peer = {port: spawn(["node", str(REPO / "bench/peers/socketio/server.js")],
                            {"PEER_PORT": str(port), "PEER_REDIS_URL": REDIS_LOCAL})
                for port in (17001, 17002)}  # fmt: skip
        for port, process in [*kit.items(), *peer.items()]:
            _wait_port(port, process)

        def restarter(
            procs: dict[int, subprocess.Popen[bytes]], argv_of: Any
        ) -> Callable[[], None]:
            def restart() -> None:
                for port in list(procs):
                    procs[port].send_signal(signal.SIGTERM)
                    procs[port].wait(60)
                    procs[port] = spawn(*argv_of(port))
                    _wait_port(port, procs[port])

            return restart

        def kit_argv(port: int) -> tuple[list[str]]:
            return ([sys.executable, "-m", "app", "--handler", "app.handlers:chat", "--port",
                     str(port), "--bus-url", "nats://127.0.0.1:17422", "--bus-history-max-age",
                     "3600", "--compression", "none", "--log-level", "warning"],)  # fmt: skip

        def peer_argv(port: int) -> tuple[list[str], dict[str, str]]:
            server = str(REPO / "bench/peers/socketio/server.js")
            return ["node", server], {"PEER_PORT": str(port), "PEER_REDIS_URL": REDIS_LOCAL}

        kit_target = Target(
            KIT, [f"ws://127.0.0.1:{p}" for p in kit], None,
            lambda: _proc_usage({"app": [p.pid for p in kit.values()], "broker": [nats.pid]}),
            restarter(kit, kit_argv), os.cpu_count() or 1,
        )  # fmt: skip
        peer_target = Target(
            PEER, [f"ws://127.0.0.1:{p}" for p in peer], None,
            lambda: _proc_usage({"app": [p.pid for p in peer.values()], "broker": [redis.pid]}),
            restarter(peer, peer_argv), os.cpu_count() or 1,
        )  # fmt: skip
        yield kit_target, peer_target, local_versions()
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
        for process in started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def local_versions() -> dict[str, str]:
    """What ran, on this machine."""
    modules = REPO / "bench/peers/socketio/node_modules"
    found = {
        name: json.loads((modules / name / "package.json").read_text())["version"]
        for name in NPM_PACKAGES
    }
    found["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                   check=True).stdout.strip()  # fmt: skip
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    found["redis-server"] = redis[2].removeprefix("v=")
    import websockets

    found["websockets"] = websockets.__version__
    nats = subprocess.run(["nats-server", "--version"], capture_output=True, text=True,
                          check=True).stdout.split()  # fmt: skip
    found["nats-server"] = nats[-1].removeprefix("v")
    return found


# --- on the local fleet ---------------------------------------------------------------------


@contextmanager
def fleet_stacks(out: Path, settings: list[str]) -> Iterator[tuple[Target, Target, dict[str, str]]]:
    """The kit (chat, bus and history) and the peer on every host of the local fleet."""
    import localfleet
    from bench import fleet_bench, peer_fleet
    from localfleet.ansible import ansible_playbook
    from localfleet.demo import ca_file

    fleet = localfleet.read_fleet()
    hosts = fleet.app_servers
    if not hosts:
        raise RuntimeError("no local fleet: `python -m localfleet up --hosts 3` first")
    ca = str(ca_file())
    cores = int(peer_fleet.on(hosts[0], "nproc").strip())
    chat = [*settings, "app_handler=app.handlers:chat", "app_compression=none"]
    print(f"deploy the kit, chat, N={cores}: {fleet_bench.deploy(cores, chat):.0f} s")
    try:
        ports = peer_fleet.install(hosts, out)
        stamp = time.strftime("%Y%m%d%H%M%S")

        def kit_usage() -> Usage:
            samples = [fleet_bench.sample(h) for h in hosts]
            return Usage(time.monotonic(),
                         {"app": sum(s.rss["app"] for s in samples),
                          "broker": sum(s.rss["nats"] for s in samples),
                          "nginx": sum(s.rss["nginx"] for s in samples)},
                         {"app": sum(s.cpu["app"] for s in samples),
                          "broker": sum(s.cpu["nats"] for s in samples),
                          "nginx": sum(s.cpu["nginx"] for s in samples)})  # fmt: skip

        def peer_usage() -> Usage:
            samples = [peer_fleet.sample(h, TICKS) for h in hosts]
            kinds = ("app", "broker", "nginx")
            return Usage(
                time.monotonic(),
                {k: sum(s.rss[k] for s in samples) for k in kinds},
                {k: sum(s.cpu[k] for s in samples) for k in kinds},
            )

        def kit_restart() -> None:
            ansible_playbook(
                "playbooks/rollout.yml", "-e", f"@{fleet_bench.VARS}",
                *(arg for value in chat for arg in ("-e", value)),
                "-e", f"app_instances={cores}", "-e", f"app_version=bench-peer-{stamp}",
            )  # fmt: skip
            # Each host's handover wrote the kit's site anew, without the peer's location:
            # put it back, or the peer's clients would find nothing at /socket.io/.
            for host in hosts:
                peer_fleet.patch_site(host, ports[host.name])

        def peer_restart() -> None:
            for host in hosts:
                peer_fleet.restart_host(host, ports[host.name])

        bases = [f"wss://{h.address}" for h in hosts]
        total = cores * len(hosts)
        versions = {
            **peer_fleet.versions(hosts[0], redis=True),
            "nats-server": peer_fleet.on(hosts[0], "nats-server --version").split()[-1],
            "nginx": peer_fleet.on(hosts[0], "nginx -v 2>&1").split("/")[-1].strip(),
        }
        yield (
            Target(KIT, bases, ca, kit_usage, kit_restart, total),
            Target(PEER, bases, ca, peer_usage, peer_restart, total),
            versions,
        )
    finally:
        peer_fleet.uninstall(hosts)
        print("putting every host back as the demo deploys it")
        ansible_playbook("site.yml")


# --- report ---------------------------------------------------------------------------------


def plots(out: Path, kit: Figures, peer: Figures, peer_name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, figures, style in ((NAMES[KIT], kit, "tab:blue"), (peer_name, peer, "tab:red")):
        ordered = figures.curves.get("fixed", [])
        if ordered:
            left.plot(ordered, [i / len(ordered) for i in range(len(ordered))], color=style,
                      label=name)  # fmt: skip
        runs = figures.curves.get("saturation", [])
        if runs:
            right.plot([r[1] for r in runs], [r[2] for r in runs], "o-", color=style, label=name)
    left.set_xscale("log")
    left.set_xlabel("delivery latency (ms)")
    left.set_ylabel("share of deliveries")
    left.set_title(f"one room of {FANOUT_MEMBERS}, {FANOUT_RATE} msg/s")
    right.set_xscale("log")
    right.set_yscale("log")
    right.axhline(SATURATION_P99_MS, color="grey", linestyle=":")
    right.set_xlabel("deliveries/s")
    right.set_ylabel("p99 latency (ms)")
    right.set_title("rising offered rate")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "peer_fan_out.png", dpi=110)
    plt.close("all")
    return ["peer_fan_out.png"]


def report(
    out: Path, rows: list[Row], ratios: list[str], versions: dict[str, str], where: str,
    kit: Figures, peer: Figures, peer_name: str,
) -> Path:  # fmt: skip
    try:
        files = plots(out, kit, peer, peer_name)
    except ImportError:  # matplotlib: `make bench` installs requirements/bench.txt
        print("no plots: matplotlib is not installed (requirements/bench.txt)")
        files = []
    md = [
        f"# wsfleet against {peer_name}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {where}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        + ".",
        "",
        *table(rows, peer_name),
        "",
        "```",
        *ratios,
        "```",
        "",
        f"Restart figures: wsfleet {kit.restart}; {peer_name} {peer.restart}.",
        "",
        *(f"![fan-out]({name})" for name in files),
        "",
    ]
    path = out / "peer.md"
    path.write_text("\n".join(md))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--peer", default=PEER, choices=[PEER])
    parser.add_argument("--idle", type=int, default=10000, help="idle members per host")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run, s")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--local", action="store_true",
                        help="both stacks on this machine's loopback, no fleet")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                        help="a role variable for the kit's deploy (fleet only)")  # fmt: skip
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="wsfleet-peer-"))
    try:
        stacks = local_stacks(scratch) if args.local else fleet_stacks(args.out, args.set)
        with stacks as (kit_target, peer_target, versions):
            where = (
                "on this machine's loopback (--local: no nginx, no TLS; each process stands "
                "for a host)"
                if args.local
                else f"on the local fleet, {len(kit_target.bases)} hosts through nginx+TLS"
            )
            kit = measure(kit_target, args)
            peer = measure(peer_target, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = comparison(kit, peer)
    ratios = ratio_lines(rows, args.peer)
    print("\n".join(table(rows, args.peer)))
    print("\n".join(ratios))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"report: {report(args.out, rows, ratios, versions, where, kit, peer, args.peer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
