#!/usr/bin/env bash
# `make apt-deps`: install the Debian packages given as arguments that are missing; none
# missing, it asks apt nothing. Each download bounded (seconds per operation, tries
# again): a stalled mirror fails in minutes, naming what it was fetching, instead of
# holding the run.
set -eu
bounds=(-o Acquire::http::Timeout=30 -o Acquire::Retries=2)
missing=()
for package in "$@"; do
	dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "apt: installing ${missing[*]}"
	apt-get "${bounds[@]}" update -qq
	DEBIAN_FRONTEND=noninteractive apt-get "${bounds[@]}" install -y -qq "${missing[@]}" >/dev/null
fi
