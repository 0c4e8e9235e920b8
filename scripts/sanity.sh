#!/usr/bin/env bash
# `make sanity`: ansible-test sanity on the collection as it installs (galaxy.yml), where it
# must sit: ansible_collections/wsfleet/fleet, in a scratch folder outside the checkout
# (inside it, ansible-test takes git's view of the files and finds none).
#
# The tests skipped need virtualenvs that ansible-test bootstraps with a pip script from
# ci-files.testing.ansible.com, a host this kit's build machines need not reach. Their
# checks are made elsewhere: Python style, YAML and the changelog by ruff, yamllint,
# ansible-lint and antsibull-changelog (make lint); the plugins' documentation and
# imports (ansible-doc, import, validate-modules) by tests/plugins/test_docs.py.
set -eu
cd "$(dirname "$0")/.."
bin=$PWD/.venv/bin
skip=(pep8 pylint validate-modules yamllint runtime-metadata changelog pslint shellcheck ansible-doc import)

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$bin"/ansible-galaxy collection build --output-path "$scratch" . >/dev/null
"$bin"/ansible-galaxy collection install --no-deps -p "$scratch" "$scratch"/wsfleet-fleet-*.tar.gz >/dev/null 2>&1
cd "$scratch/ansible_collections/wsfleet/fleet"
python=$("$bin"/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$bin"/ansible-test sanity --python "$python" "${skip[@]/#/--skip-test=}"
