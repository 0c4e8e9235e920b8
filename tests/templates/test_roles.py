"""The roles' variables: defaults, argument specs and the example inventory agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = ["app", "bus", "lb", "monitoring", "nginx", "tls"]


def defaults(role: str) -> dict[str, object]:
    return yaml.safe_load((REPO / "roles" / role / "defaults/main.yml").read_text())


def spec(role: str) -> dict[str, dict[str, object]]:
    text = (REPO / "roles" / role / "meta/argument_specs.yml").read_text()
    return yaml.safe_load(text)["argument_specs"]["main"]["options"]


@pytest.mark.parametrize("role", ROLES)
def test_argument_spec_matches_the_defaults_exactly(role: str) -> None:
    """Every default has a described spec entry with the same default, and nothing more."""
    found, specified = defaults(role), spec(role)
    assert sorted(specified) == sorted(found)
    for name, value in found.items():
        assert specified[name].get("default") == value, name
        assert specified[name].get("description"), name


@pytest.mark.parametrize("role", ROLES)
def test_variables_are_prefixed_and_documented(role: str) -> None:
    """Each default is named <role>_... and has a comment above it or its group."""
    lines = (REPO / "roles" / role / "defaults/main.yml").read_text().splitlines()
    for number, line in enumerate(lines):
        name = re.match(r"^([a-z_0-9]+):", line)
        if name:
            assert name[1].startswith(f"{role}_"), name[1]
            above = next(
                lines[n] for n in range(number - 1, -1, -1) if not re.match(r"^[a-z_]", lines[n])
            )
            assert above.startswith("#"), f"{name[1]} has no comment"


def test_default_app_version_is_the_pyproject_version() -> None:
    """app_version's default follows the version the app's wheel is built with."""
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version
    assert defaults("app")["app_version"] == version[1]


def test_example_inventory_shows_every_variable() -> None:
    """inventories/example lists every role variable, set or commented with its default."""
    text = ""
    for group in ("app_servers", "load_balancers"):
        part = (REPO / f"inventories/example/group_vars/{group}.yml").read_text()
        yaml.safe_load(part)
        text += part
    shown = set(re.findall(r"^(?:# )?([a-z]+_[a-z_0-9]+):", text, re.MULTILINE))
    missing = {name for role in ROLES for name in defaults(role)} - shown
    assert not missing


def test_every_play_applying_nginx_takes_its_wiring_from_one_place() -> None:
    """Every play that writes nginx's site (the nginx role, or the app role's handover)
    hands it the app's instances and the tls role's certificate from playbooks/vars/ and
    sets none of those variables itself: a rollout must not move nginx back to loopback,
    nor a rollback serve another certificate."""
    wiring = {
        "vars/app_servers.yml": "app_servers",
        "vars/tls_to_nginx.yml": "",
    }
    wired = {
        name
        for path in wiring
        for name in yaml.safe_load((REPO / "playbooks" / path).read_text())
        if name.startswith("nginx_")
    }
    plays = {
        "deploy.yml": lambda play: True,
        "rollout.yml": lambda play: play.get("serial") is not None,
        "rollback.yml": lambda play: play.get("serial") is not None,
        "loadbalancers.yml": lambda play: True,
    }
    for playbook, writes_nginx in plays.items():
        for play in yaml.safe_load((REPO / "playbooks" / playbook).read_text()):
            if not writes_nginx(play):
                continue
            on_app_servers = play["hosts"] == "app_servers"
            wanted = [path for path, group in wiring.items() if on_app_servers or not group]
            assert play.get("vars_files") == wanted, (playbook, play["name"])
            assert not wired & set(play.get("vars") or {}), (playbook, play["name"])
    # The handover passes nginx the ports taking over, nothing else of the wiring.
    handover = (REPO / "roles/app/tasks/handover.yml").read_text()
    assert set(re.findall(r"^ +(nginx_[a-z_]+):", handover, re.M)) == {"nginx_upstream_ports"}


def test_no_two_roles_defaults_read_each_other() -> None:
    """A role's defaults may read another role's public variables (app reads what bus
    sets), never in a circle: a role read alone must not need the one that reads it. The
    playbooks wire the rest (playbooks/vars/)."""
    roles = [path.name for path in (REPO / "roles").iterdir() if (path / "defaults").is_dir()]
    groups = {"app_servers", "load_balancers"}
    reads: dict[str, set[str]] = {}
    for role in roles:
        # The names in the values (comments are not read: safe_load drops them).
        named = set(re.findall(r"\b[a-z][a-z0-9_]+\b", yaml.safe_dump(defaults(role)))) - groups
        reads[role] = {other for other in roles if other != role
                       and any(name.startswith(f"{other}_") for name in named)}  # fmt: skip
    for role, others in reads.items():
        for other in others:
            assert role not in reads[other], f"{role} and {other} read each other's defaults"
    # The graph has no longer circle either: each role reachable from itself is one.
    for role in roles:
        seen, todo = set(), list(reads[role])
        while todo:
            other = todo.pop()
            assert other != role, f"{role}'s defaults read themselves through {reads}"
            if other not in seen:
                seen.add(other)
                todo.extend(reads[other])


def test_no_jinja_statement_in_variables() -> None:
    """Variables are expressions: a loop or a mutation belongs in a filter of plugins/filter/
    or in a template, not in a variable's value."""
    files = [*REPO.glob("roles/*/vars/*.yml"), *REPO.glob("roles/*/defaults/*.yml"),
             *REPO.glob("playbooks/vars/*.yml")]  # fmt: skip
    assert files
    statements = [str(path.relative_to(REPO)) for path in files if "{%" in path.read_text()]
    assert not statements
