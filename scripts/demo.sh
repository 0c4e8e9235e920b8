#!/usr/bin/env bash
# `make demo`, once the local fleet is up (make fleet-up): deploy it with site.yml, as an
# operator deploys theirs, then print the URLs to open and what to try.
# Environment: INVENTORY (the demo's, inventories/demo).
set -eu
cd "$(dirname "$0")/.."
.venv/bin/ansible-playbook -i "${INVENTORY:-inventories/demo}" site.yml
.venv/bin/python -m localfleet.demo
