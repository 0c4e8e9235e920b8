"""The internal role common, run by ansible-playbook on this machine (nothing changes):
it refuses to run on its own, and a role's preflight checks that role's variables
against its argument spec through it, whatever --tags the run was given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


def run(tmp_path: Path, tasks: str, *options: str) -> subprocess.CompletedProcess[str]:
    """A play on localhost (local connection) with ``tasks``, from the kit's roles."""
    play = tmp_path / "play.yml"
    play.write_text("- hosts: localhost\n  connection: local\n  tasks:\n" + tasks)
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
           "ANSIBLE_LOCALHOST_WARNING": "false",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false"}  # fmt: skip
    return subprocess.run(
        [str(PLAYBOOK), str(play), *options],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


def test_the_common_role_refuses_to_run_alone(tmp_path: Path) -> None:
    tasks = "    - ansible.builtin.import_role:\n        name: common\n"
    result = run(tmp_path, tasks)
    assert result.returncode != 0
    assert "The role common is internal" in result.stdout


def test_a_roles_preflight_checks_its_spec_through_it_under_any_tags(tmp_path: Path) -> None:
    # As playbooks/tasks/preflight.yml includes it.
    tasks = (
        "    - ansible.builtin.include_role:\n        name: nginx\n        tasks_from: preflight\n"
        "        apply:\n          tags: [always, preflight]\n      tags: [always, preflight]\n"
    )
    assert run(tmp_path, tasks, "--tags", "configure").returncode == 0
    bad = run(tmp_path, tasks, "--tags", "configure", "-e", "nginx_tls_profile=bogus")
    assert bad.returncode != 0
    assert "value of nginx_tls_profile must be one of: intermediate, modern" in bad.stdout
