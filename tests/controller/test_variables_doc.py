"""docs/variables.md against the roles' argument specs, and the specs against the roles'
defaults: every role variable is documented once, in its argument spec, and the page is
what the specs render (localfleet/variables_doc.py).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from localfleet.variables_doc import OUTPUT, REPO, render

ROLES = sorted(path.parents[1] for path in REPO.glob("roles/*/meta/argument_specs.yml"))


def test_variables_doc_is_current() -> None:
    assert OUTPUT.exists(), "docs/variables.md is missing: run `python -m localfleet.variables_doc`"
    assert OUTPUT.read_text(encoding="utf-8") == render(), (
        "docs/variables.md is not what roles/*/meta/argument_specs.yml render: "
        "run `python -m localfleet.variables_doc`"
    )


def test_every_default_is_in_its_argument_spec() -> None:
    assert ROLES, "no roles/*/meta/argument_specs.yml found"
    undocumented = []
    for role in sorted(REPO.glob("roles/*")):
        defaults = role / "defaults/main.yml"
        if not defaults.exists():
            continue
        spec_path = role / "meta/argument_specs.yml"
        specs = yaml.safe_load(spec_path.read_text()) if spec_path.exists() else None
        entries = ((specs or {}).get("argument_specs") or {}).values()
        documented = {name for entry in entries for name in (entry.get("options") or {})}
        names = yaml.safe_load(defaults.read_text()) or {}
        undocumented += [f"{role.name}: {name}" for name in names if name not in documented]
    assert not undocumented, (
        "variables in roles/*/defaults/main.yml missing from the role's "
        f"meta/argument_specs.yml (so from docs/variables.md): {', '.join(undocumented)}"
    )


def test_render_shows_types_defaults_choices_and_nested_options(tmp_path: Path) -> None:
    meta = tmp_path / "roles/demo/meta"
    meta.mkdir(parents=True)
    (meta / "argument_specs.yml").write_text(
        """
argument_specs:
  other:
    short_description: Another entry point
    options:
      demo_hosts: {type: list, elements: str, required: true, description: Hosts.}
  main:
    short_description: The demo role
    description: [First paragraph., Second paragraph.]
    options:
      demo_mode:
        type: str
        default: fast
        choices: [fast, safe]
        description: [How it runs;, on <port>.]
      demo_pipe: {type: str, default: "{{ x | default('') }}", description: Piped.}
      demo_empty: {type: str, default: "", description: Empty.}
      demo_unset: {type: int, description: None given.}
      demo_token: {type: str, default: "", no_log: true, description: A secret.}
      demo_limits:
        type: dict
        default: {}
        description: Limits.
        options:
          size: {type: int, default: 16, description: Size.}
""",
        encoding="utf-8",
    )
    text = render(tmp_path)
    assert text.index("### demo: main") < text.index("### demo: other")
    assert "First paragraph.\n\nSecond paragraph." in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| `")}
    assert rows["| `demo_mode`"] == (
        "| `demo_mode` | `str` | `fast` | How it runs; on \\<port\\>. Choices: `fast`, `safe`. |"
    )
    assert rows["| `demo_pipe`"] == "| `demo_pipe` | `str` | `{{ x \\| default('') }}` | Piped. |"
    assert rows["| `demo_empty`"] == '| `demo_empty` | `str` | `""` | Empty. |'
    assert rows["| `demo_unset`"] == "| `demo_unset` | `int` |  | None given. |"
    assert "Kept out of logs" in rows["| `demo_token`"]
    assert rows["| `demo_limits.size`"] == "| `demo_limits.size` | `int` | `16` | Size. |"
    assert rows["| `demo_hosts`"] == "| `demo_hosts` | `list of str` | required | Hosts. |"
