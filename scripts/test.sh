#!/usr/bin/env bash
# `make test`: lint, unit, template and fleet tests in one pytest run, so its closing line
# counts every test; the fleet fixtures bring the hosts up for the session and take them
# down at its end (also when a test fails).
#
# From a clean clone the set-up is on the critical path, so what can run side by side
# does: the virtualenvs are made while apt installs (a fresh machine); the hosts' images
# build in the background as soon as apt is done; lint runs beside pytest's first
# minutes, the tests that need no fleet while the fleet comes up (niced: the first deploy
# waits on nothing of it). Lint's output goes to .fleet/lint.log and is printed after the
# tests; a lint that fails fails the run. The session's own image build
# (tests/fleet/conftest.py) waits for the background one and finds the images built, or
# builds them again and says why it failed.
#
# TEST_WORKERS=2 (pytest-xdist): two processes, each with a fleet of its own
# (tests/conftest.py), taking whole modules in the order tests/fleet/conftest.py gives
# (loadfile, not reordered). One by default: two fleets on this kit's 2-core build
# machines contend for the CPUs, and their contention broke timing bounds some tests
# assert (docs/testing.md, Two workers).
#
# Environment: PYTHON (python3), TEST_WORKERS (0: one process); WSFLEET_MITOGEN as the
# Makefile exports it (1: the fleet tests' later playbooks with Mitogen's strategy).
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TEST_WORKERS=${TEST_WORKERS:-0}
BIN=.venv/bin

mkdir -p .fleet
make --no-print-directory -j2 venv & venv=$!
if ! make --no-print-directory apt-deps; then
	wait "$venv"
	exit 1
fi
setsid "$PYTHON" -m localfleet images > .fleet/images.log 2>&1 & images=$!
if ! wait "$venv"; then
	kill -- -"$images"
	wait "$images"
	exit 1
fi
nice -n 10 make --no-print-directory lint > .fleet/lint.log 2>&1 & lint=$!
"$BIN"/pytest -n "$TEST_WORKERS" --dist loadfile --no-loadscope-reorder
tests=$?
wait "$images" || echo "images: the early build failed (.fleet/images.log); the tests built them again"
echo "=== lint (.fleet/lint.log)"
cat .fleet/lint.log
if ! wait "$lint"; then
	echo "make test: lint failed (above)"
	exit 1
fi
exit "$tests"
