#!/usr/bin/env bash
# `make lint`: every checker, each on the whole tree; the first that fails stops it.
set -eux
cd "$(dirname "$0")/.."
bin=.venv/bin
"$bin"/ruff check .
"$bin"/mypy --strict app localfleet
"$bin"/yamllint --strict .
# The checkout as wsfleet.fleet, as its playbooks find it (ansible.cfg): ansible-lint then
# checks the calls of the collection's modules against their arguments.
ANSIBLE_COLLECTIONS_PATH=$PWD/collections "$bin"/ansible-lint
# antsibull-changelog runs the venv's tools by name.
PATH=$PWD/$bin:$PATH "$bin"/antsibull-changelog lint
scripts/sanity.sh
