#!/usr/bin/env bash
# `make clean`: the local fleets down (the demo's, and the test session's second one,
# which a killed run with TEST_WORKERS may have left up), then the virtualenvs and the
# build and fleet folders removed.
set -eu
cd "$(dirname "$0")/.."
.venv/bin/python -m localfleet down
WSFLEET_FLEET=1 .venv/bin/python -m localfleet down
rm -rf .venv .venv-sslyze .fleet build dist
