#!/usr/bin/env bash
# `make bench`: figures to size a fleet with, each benchmark printing its own table and
# `ratio` lines (docs/sizing.md says what each measures):
#   bench/fleet_bench.py      through site.yml on the local fleet (three hosts are booted
#                             when no fleet is up)
#   bench/host_lost_bench.py  a host lost behind the balancer
#   bench/rooms_bench.py      1,000 quiet rooms left behind by a bus restart (loopback)
#   bench/acks_bench.py       acknowledged publishing against plain broadcast (loopback)
#   bench/peer_bench.py       the same workloads on the kit and on the peer users would
#                             pick instead, side by side on the same hosts
# Environment: PEER (socketio; none leaves the peer out), APT_PACKAGES for the peer
# (nodejs npm: node and npm on this machine, the hosts getting theirs from it, since they
# have no route out).
set -eu
cd "$(dirname "$0")/.."
BIN=.venv/bin
PEER=${PEER:-socketio}

"$BIN"/python -m bench.fleet_bench
"$BIN"/python -m bench.host_lost_bench
"$BIN"/python -m bench.rooms_bench
"$BIN"/python -m bench.acks_bench
if [ "$PEER" != none ]; then
	# By command, not package: a node from elsewhere (with its own npm) is kept.
	command -v npm >/dev/null || scripts/apt-deps.sh ${PEER_APT_PACKAGES:-nodejs npm}
	"$BIN"/python -m bench.peer_bench --peer "$PEER"
fi
