"""A role's private variables (named ``__...``) stay inside the role: set and read only by
its own files and the templates it renders. What another role or a playbook passes to a
role is a public parameter of one of its entry points (meta/argument_specs.yml)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(path.name for path in (REPO / "roles").iterdir() if path.is_dir())
PRIVATE = re.compile(r"(?<![\w.])__[a-z][a-z0-9_]*")
# Where Ansible reads variables: the roles, the playbooks, the templates, the inventories.
TREES = ("roles", "playbooks", "templates", "inventories")
SUFFIXES = {".yml", ".yaml", ".j2"}


def sources() -> list[Path]:
    """Every file of the trees Ansible reads variables from, site.yml too (not through
    the links to the checkout, collections/: a glob does not follow them)."""
    found = [REPO / "site.yml"]
    for tree in TREES:
        found += [
            path
            for path in sorted((REPO / tree).rglob("*"))
            if path.suffix in SUFFIXES and path.is_file() and "collections" not in path.parts
        ]
    return found


def template_owners() -> dict[Path, set[str]]:
    """The roles that render each template under templates/: those whose files name it (by
    its path under templates/, or else by its name without .j2, as a loop over units
    does), and those rendering a template that includes or imports it."""
    texts = {
        role: "\n".join(path.read_text() for path in (REPO / "roles" / role).rglob("*.yml"))
        for role in ROLES
    }
    templates = sorted((REPO / "templates").rglob("*.j2"))
    owners = {}
    for path in templates:
        named = str(path.relative_to(REPO / "templates"))
        owners[path] = {role for role, text in texts.items() if named in text} or {
            role for role, text in texts.items() if path.stem in text
        }
    changed = True
    while changed:
        changed = False
        for path in templates:
            text = path.read_text()
            for other in templates:
                named = rf"(include|import)[^%]*['\"][^'\"]*{re.escape(other.name)}['\"]"
                if other != path and re.search(named, text) and not owners[path] <= owners[other]:
                    owners[other] |= owners[path]
                    changed = True
    return owners


def owner_units(path: Path, templates: dict[Path, set[str]]) -> set[str]:
    """The units a file belongs to: its role, the roles rendering a template, or the
    playbooks (site.yml and playbooks/, one unit) and the inventories."""
    relative = path.relative_to(REPO)
    if relative.parts[0] == "roles":
        return {relative.parts[1]}
    if relative.parts[0] == "templates":
        return templates[path]
    if relative.parts[0] == "inventories":
        return {"inventories"}
    return {"playbooks"}


def test_no_private_variable_is_used_outside_its_role() -> None:
    templates = template_owners()
    unowned = [str(path.relative_to(REPO)) for path, roles in templates.items() if not roles]
    assert not unowned, f"templates no role renders: {unowned}"
    used: dict[str, dict[str, set[str]]] = {}  # name: {unit: files}
    for path in sources():
        for name in set(PRIVATE.findall(path.read_text())):
            for unit in owner_units(path, templates):
                used.setdefault(name, {}).setdefault(unit, set()).add(str(path.relative_to(REPO)))
    crossing = {}
    for name, units in sorted(used.items()):
        roles = {unit for unit in units if unit in ROLES}
        owners = {role for role in ROLES if name.startswith(f"__{role}_")} or roles
        outside = {unit: files for unit, files in units.items() if owners and unit not in owners}
        if len(owners) > 1 or outside:
            crossing[name] = {unit: sorted(files) for unit, files in units.items()}
    assert not crossing, f"private variables used outside their role: {crossing}"
