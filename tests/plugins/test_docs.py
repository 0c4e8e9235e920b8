"""The collection's plugins document what they take and give, as ansible-doc reads it.

ansible-test sanity's ansible-doc, import and validate-modules tests run in virtualenvs it
bootstraps from a host the kit's build machines need not reach (the Makefile's sanity
target skips them): the same ground, checked here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.plugins.loader import REPO, plugin

MODULES = sorted(path.stem for path in (REPO / "plugins/modules").glob("*.py"))
FILTERS = sorted(
    name
    for path in (REPO / "plugins/filter").glob("*.py")
    for name in plugin("filter", path.stem).FilterModule().filters()
)


@pytest.mark.parametrize("name", MODULES)
def test_a_modules_documentation_matches_its_argument_spec(name: str) -> None:
    """DOCUMENTATION, EXAMPLES and RETURN are YAML, and the options documented are the
    options taken: type, default, choices, required."""
    module = plugin("modules", name)
    doc = yaml.safe_load(module.DOCUMENTATION)
    assert doc["module"] == name
    assert doc["short_description"]
    assert isinstance(yaml.safe_load(module.EXAMPLES), list)
    assert yaml.safe_load(module.RETURN)
    documented = doc["options"]
    assert sorted(documented) == sorted(module.ARGUMENT_SPEC)
    for option, spec in module.ARGUMENT_SPEC.items():
        said = documented[option]
        assert said["description"], option
        for key in ("type", "default", "choices", "required"):
            assert said.get(key) == spec.get(key), (option, key)


@pytest.mark.parametrize(
    ("kind", "name"), [("module", name) for name in MODULES] + [("filter", n) for n in FILTERS]
)
def test_ansible_doc_shows_each_plugin(kind: str, name: str) -> None:
    """ansible-doc finds and renders every plugin by its collection's name, no warning."""
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(REPO / "collections")}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), "-t", kind, f"wsfleet.fleet.{name}"],
        env=env, capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert f"wsfleet.fleet.{name}" in result.stdout
