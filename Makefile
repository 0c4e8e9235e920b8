# The two commands a newcomer runs (README.md): `make demo` and `make test`.
# Everything else here is what those two are made of.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOSTS ?= 3
INVENTORY := inventories/demo

# What the controller needs from Debian: the fleet (systemd-nspawn, mmdebstrap, SSH),
# nginx, nats-server and systemd-analyze for the template checks and the app's room
# tests, Chromium for the browser test, prometheus for promtool (the alert rules' checks;
# Debian ships promtool in no smaller package), pebble for the ACME tests (Let's Encrypt's
# test CA, with its DNS server).
APT_PACKAGES := systemd-container mmdebstrap iproute2 openssh-client util-linux \
	nginx nats-server curl ca-certificates chromium chromium-driver libnss3-tools prometheus \
	pebble

.PHONY: help apt-deps venv lint sanity check test test-unit test-fleet demo demo-down fleet-up fleet-status status bench clean

help:
	@echo "make demo       local fleet of $(HOSTS) hosts, deployed with site.yml; prints the URLs"
	@echo "make demo-down  remove the local fleet"
	@echo "make test       lint, unit, template and fleet tests (installs what it needs)"
	@echo "make check      lint, unit and template tests: no fleet, a few minutes"
	@echo "make test-fleet K=expr  the fleet tests matching expr, on a fleet kept up between runs"
	@echo "make lint       ruff, mypy --strict, yamllint, ansible-lint, the changelog, ansible-test sanity"
	@echo "make bench      capacity figures on the local fleet, and against Socket.IO (PEER=none: not); report in bench/out/"
	@echo "make status     one table of the fleet (FORMAT=json for scripts; INVENTORY=...)"

# Each pip download bounded (seconds per operation, tries again): a stalled index fails in
# minutes, naming what it was fetching, instead of holding the run.
PIP_INSTALL := pip install -q --disable-pip-version-check --timeout 30 --retries 2

apt-deps:
	@scripts/apt-deps.sh $(APT_PACKAGES)

$(BIN)/.installed: requirements/dev.txt requirements/app.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP_INSTALL) -r requirements/dev.txt
	touch $@

.venv-sslyze/.installed: requirements/sslyze.txt
	test -x .venv-sslyze/bin/python || $(PYTHON) -m venv .venv-sslyze
	.venv-sslyze/bin/$(PIP_INSTALL) -r requirements/sslyze.txt
	touch $@

venv: $(BIN)/.installed .venv-sslyze/.installed

lint: venv
	scripts/lint.sh

# The collection as it installs, checked by ansible-test sanity (the script says which
# tests it skips, and why).
sanity: venv
	@scripts/sanity.sh

# The fleet tests' playbooks run with Mitogen's strategy (docs/testing.md, Mitogen), the first
# deploy of a session excepted.
export WSFLEET_MITOGEN ?= 1

test-unit: apt-deps venv
	$(BIN)/pytest -m "not fleet"

# The inner loop: everything that needs no fleet.
check: apt-deps lint test-unit

# Selected fleet tests (K: a pytest -k expression; all when empty) on a fleet that stays
# up afterwards (WSFLEET_KEEP=1), converged again by site.yml at the start of each run.
# `make demo-down` removes it.
test-fleet: apt-deps venv
	WSFLEET_KEEP=1 $(BIN)/pytest -m fleet $(if $(K),-k "$(K)")

# Lint, unit, template and fleet tests from a clean clone (the script says what runs side
# by side). TEST_WORKERS=2: two fleets, a worker each (docs/testing.md, Two workers).
TEST_WORKERS ?= 0
test:
	@PYTHON=$(PYTHON) TEST_WORKERS=$(TEST_WORKERS) scripts/test.sh

$(BIN)/.bench-installed: requirements/bench.txt $(BIN)/.installed
	$(BIN)/$(PIP_INSTALL) -r requirements/bench.txt
	touch $@

# Figures to size a fleet with, on the local fleet and on loopback, then the same
# workloads against the peer users would pick instead (PEER=none leaves it out):
# scripts/bench.sh says which benchmark measures what.
PEER ?= socketio
bench: apt-deps venv $(BIN)/.bench-installed
	PEER=$(PEER) scripts/bench.sh

fleet-up: apt-deps venv
	$(BIN)/python -m localfleet up --hosts $(HOSTS)

fleet-status: venv
	$(BIN)/python -m localfleet status

# The deployed fleet in one table (playbooks/status.yml), the demo's unless
# INVENTORY=inventories/production; FORMAT=json prints the JSON document instead.
status: venv
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/status.yml $(if $(FORMAT),-e status_format=$(FORMAT))

demo: fleet-up
	INVENTORY=$(INVENTORY) scripts/demo.sh

demo-down: venv
	$(BIN)/python -m localfleet down

# The test session's second fleet too (TEST_WORKERS), if a killed run left it up.
clean: venv
	scripts/clean.sh
