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

# Each download bounded (seconds per operation, tries again): a stalled mirror or index
# fails in minutes, naming what it was fetching, instead of holding the run.
APT_BOUNDS := -o Acquire::http::Timeout=30 -o Acquire::Retries=2
PIP_INSTALL := pip install -q --disable-pip-version-check --timeout 30 --retries 2

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "apt: installing$$missing"; \
		apt-get $(APT_BOUNDS) update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get $(APT_BOUNDS) install -y -qq $$missing >/dev/null; \
	fi

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
	$(BIN)/ruff check .
	$(BIN)/mypy --strict app localfleet
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/antsibull-changelog lint
	$(MAKE) --no-print-directory sanity

# The collection as it installs (galaxy.yml), checked by ansible-test sanity where it must
# sit: ansible_collections/wsfleet/fleet, in a scratch folder outside the checkout (inside
# it, ansible-test takes git's view of the files and finds none). The tests skipped need
# virtualenvs that ansible-test bootstraps with a pip script from
# ci-files.testing.ansible.com, a host this kit's build machines need not reach; their
# checks (Python style, YAML, the changelog) are ruff's, yamllint's, ansible-lint's and
# antsibull-changelog's above.
SANITY_SKIP := pep8 pylint validate-modules yamllint runtime-metadata changelog pslint shellcheck
sanity: venv
	@set -e; scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	$(BIN)/ansible-galaxy collection build --output-path "$$scratch" . >/dev/null; \
	$(BIN)/ansible-galaxy collection install --no-deps -p "$$scratch" "$$scratch"/wsfleet-fleet-*.tar.gz >/dev/null 2>&1; \
	cd "$$scratch/ansible_collections/wsfleet/fleet"; \
	$(abspath $(BIN))/ansible-test sanity --python $$($(abspath $(BIN))/python -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
		$(addprefix --skip-test ,$(SANITY_SKIP))

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

# One pytest run, so its closing line counts every test; the fleet fixtures bring the
# hosts up for the session and take them down at its end (also when a test fails).
# TEST_WORKERS=2 (pytest-xdist): two processes, each with a fleet of its own
# (tests/conftest.py), taking whole modules in the order tests/fleet/conftest.py gives
# (loadfile, not reordered). One by default: on 2 cores each playbook ran about 1.7 times
# slower beside the other fleet's, so two fleets gained a minute or two, and their
# contention broke timing bounds some tests assert (docs/testing.md, Two workers).
# What can run side by side does, since from a clean clone the set-up is on the critical
# path: the virtualenvs are made while apt installs (a fresh machine); the hosts' images
# (35-50 s) build in the background as soon as apt is done; lint runs beside pytest's
# first minutes, the tests that need no fleet while the fleet comes up (niced: the first
# deploy waits on nothing of it). Lint's output goes to .fleet/lint.log and is printed
# after the tests; a lint that fails fails make test.
# The session's own image build (tests/fleet/conftest.py) waits for the background one
# and finds the images built, or builds them again and says why it failed.
TEST_WORKERS ?= 0
test:
	@mkdir -p .fleet; \
	$(MAKE) --no-print-directory -j2 venv & venv=$$!; \
	if ! $(MAKE) --no-print-directory apt-deps; then wait $$venv; exit 1; fi; \
	setsid $(PYTHON) -m localfleet images > .fleet/images.log 2>&1 & images=$$!; \
	if ! wait $$venv; then kill -- -$$images; wait $$images; exit 1; fi; \
	nice -n 10 $(MAKE) --no-print-directory lint > .fleet/lint.log 2>&1 & lint=$$!; \
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; tests=$$?; \
	wait $$images || echo "images: the early build failed (.fleet/images.log); the tests built them again"; \
	echo "=== lint (.fleet/lint.log)"; cat .fleet/lint.log; \
	if ! wait $$lint; then echo "make test: lint failed (above)"; exit 1; fi; \
	exit $$tests

$(BIN)/.bench-installed: requirements/bench.txt $(BIN)/.installed
	$(BIN)/$(PIP_INSTALL) -r requirements/bench.txt
	touch $@

# Figures to size a fleet with, measured through site.yml on the local fleet (the first
# host, and every host for the fan-out; three are booted when no fleet is up):
# bench/fleet_bench.py says what and how. Then, on loopback (no fleet), 1,000 quiet rooms
# left behind by a bus restart (bench/rooms_bench.py). Then the same workloads on the kit
# and on the peer users would pick instead, side by side on the same hosts
# (bench/peer_bench.py; PEER=none leaves it out): it needs node and npm on this machine
# (the hosts get theirs from it: they have no route out).
PEER ?= socketio
PEER_APT_PACKAGES := nodejs npm
bench: apt-deps venv $(BIN)/.bench-installed
	$(BIN)/python -m bench.fleet_bench
	$(BIN)/python -m bench.rooms_bench
ifneq ($(PEER),none)
	@# By command, not package: a node from elsewhere (with its own npm) is kept.
	command -v npm >/dev/null || $(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(PEER_APT_PACKAGES)"
	$(BIN)/python -m bench.peer_bench --peer $(PEER)
endif

fleet-up: apt-deps venv
	$(BIN)/python -m localfleet up --hosts $(HOSTS)

fleet-status: venv
	$(BIN)/python -m localfleet status

# The deployed fleet in one table (playbooks/status.yml), the demo's unless
# INVENTORY=inventories/production; FORMAT=json prints the JSON document instead.
status: venv
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/status.yml $(if $(FORMAT),-e status_format=$(FORMAT))

demo: fleet-up
	$(BIN)/ansible-playbook -i $(INVENTORY) site.yml
	$(BIN)/python -m localfleet.demo

demo-down: venv
	$(BIN)/python -m localfleet down

# The test session's second fleet too (TEST_WORKERS), if a killed run left it up.
clean: demo-down
	WSFLEET_FLEET=1 $(BIN)/python -m localfleet down
	rm -rf $(VENV) .venv-sslyze .fleet build dist
