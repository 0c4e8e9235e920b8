"""Ansible against the local fleet: running playbooks, reading recaps and variables."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from localfleet.settings import FACTS, INVENTORY, REPO

__all__ = [
    "ansible_playbook", "failure_summary", "inventory_var", "kill_run", "mitogen_env",
    "parse_recap", "playbook_env",
]  # fmt: skip

# The playbooks that take the deploy lock (roles/deploy_lock).
LOCKING_PLAYBOOKS = ("site.yml", "rollout.yml", "rollback.yml", "renew.yml")

# The hosts' facts gathered once per fleet and kept between the runs (Ansible's "smart"
# gathering with a JSON cache): about 2 s less per playbook, seventy times a session. What
# the roles read of them (Python version, addresses, CPUs, architecture) changes only when
# a host boots afresh, and localfleet.up clears the cache then. The environment overrides.
FACT_CACHE = {
    "ANSIBLE_GATHERING": "smart",
    "ANSIBLE_CACHE_PLUGIN": "ansible.builtin.jsonfile",
    "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(FACTS),
    "ANSIBLE_CACHE_PLUGIN_TIMEOUT": "86400",
}


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid``, from /proc (each one's parent in its stat line)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_run(pid: int) -> None:
    """SIGKILL an ansible-playbook and every process below it, as the death of its
    controller would end them. Its process group is not enough: each of Ansible's workers
    calls setsid(), and one killed with only the group lives on, an orphan in a session of
    its own, for as long as its task takes."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)  # it forks no new worker meanwhile
    for victim in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


_RECAP = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$")


def mitogen_env() -> dict[str, str]:
    """The environment that runs a playbook with Mitogen's strategy, when WSFLEET_MITOGEN=1.

    Mitogen runs the same modules over the same SSH, with one Python interpreter kept per
    host instead of one upload and start per task: a run of site.yml that changes nothing
    takes half the time (docs/testing.md, Mitogen). Empty when not asked for.
    """
    if os.environ.get("WSFLEET_MITOGEN") != "1":
        return {}
    package = importlib.util.find_spec("ansible_mitogen")
    if package is None or not package.submodule_search_locations:
        raise RuntimeError("WSFLEET_MITOGEN=1 but mitogen is not installed: make venv")
    plugins = os.path.join(package.submodule_search_locations[0], "plugins", "strategy")
    return {"ANSIBLE_STRATEGY_PLUGINS": plugins, "ANSIBLE_STRATEGY": "mitogen_linear"}


def playbook_env(mitogen: bool = True) -> dict[str, str]:
    """The environment of the tests' playbook runs: the fact cache, no colours, and
    Mitogen's strategy when WSFLEET_MITOGEN=1 unless ``mitogen`` is False."""
    env = {**FACT_CACHE, **os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    if mitogen:
        env.update(mitogen_env())
    return env


def ansible_playbook(
    *args: str, check: bool = True, mitogen: bool = True, project: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ansible-playbook from the repo root against the demo inventory.

    Args:
        args: playbook and options, e.g. ``"site.yml", "-e", "app_instances=4"``.
        check: raise AssertionError, with the play's output, when it fails.
        mitogen: with Mitogen's strategy when WSFLEET_MITOGEN=1 (False: Ansible's own,
            whatever the environment says).
        project: run from this folder instead, an operator's project of its own (its
            ansible.cfg, its playbooks) with its inventory in ``<project>/inventory``.
    """
    env = playbook_env(mitogen=mitogen)
    inventory = project / "inventory" if project else INVENTORY.parent
    command = [str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i", str(inventory)]
    started = time.monotonic()
    # The output goes to files, not pipes, so that a run cut short still shows how far it got.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # A session of its own: a Ctrl-C at the terminal reaches pytest, not the run.
        process = subprocess.Popen(
            [*command, *args], cwd=project or REPO, env=env, stdout=out, stderr=err,
            start_new_session=True,
        )  # fmt: skip
        try:
            process.wait()
        except BaseException:
            # Interrupted (a test's timeout, Ctrl-C): the run is killed, as a dead
            # controller's would be. Its deploy lock would stay on the hosts and fail every
            # later test with "locked by another run": break it, as an operator would once
            # the run is over, and say where the run was before letting the interruption on.
            kill_run(process.pid)
            process.wait()
            out.seek(0)
            tail = out.read()[-8000:]
            print(f"ansible-playbook {' '.join(args)} interrupted; its output:\n{tail}")
            if project or any(arg.endswith(LOCKING_PLAYBOOKS) for arg in args):
                subprocess.run(
                    [command[0], "-i", str(INVENTORY.parent), "playbooks/unlock.yml"],
                    cwd=REPO, env=env, capture_output=True, check=False, timeout=180,
                )  # fmt: skip
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    _log_run(args, time.monotonic() - started, result)
    if check and result.returncode != 0:
        # The failed task first: a log that keeps only the head of a message still shows it.
        raise AssertionError(
            f"ansible-playbook {' '.join(args)} exited {result.returncode}: "
            f"{failure_summary(result.stdout)}\n"
            f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _log_run(
    args: tuple[str, ...], seconds: float, result: subprocess.CompletedProcess[str]
) -> None:
    """With WSFLEET_PLAYBOOK_LOG=<file>: append the run's options, time and output to it
    (with ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks, its slowest tasks), to see
    where a test session's time went."""
    log = os.environ.get("WSFLEET_PLAYBOOK_LOG")
    if not log:
        return
    with Path(log).open("a") as out:
        command = " ".join(args)
        out.write(f"=== ansible-playbook {command}: {seconds:.1f}s, rc {result.returncode}\n")
        out.write(result.stdout)


def failure_summary(output: str) -> str:
    """The first failure of a run in one line: host, task and message."""
    task = "?"
    lines = output.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("TASK ["):
            task = line[len("TASK [") :].split("]", 1)[0]
        elif line.startswith(("fatal: [", "failed: [")):
            host = line.split("[", 1)[1].split("]", 1)[0]
            message = next(
                (text.strip()[len("msg:") :].strip() for text in lines[number + 1 : number + 60]
                 if text.strip().startswith("msg:")),
                line,
            )  # fmt: skip
            return f"{host}: {task}: {message}"[:400]
    return "no failed task in its output"


def parse_recap(stdout: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of a run: host -> {"ok": n, "changed": n, "failed": n, ...}."""
    recap: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in stdout.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        match = _RECAP.match(line.strip()) if in_recap else None
        if match:
            counts = (pair.split("=") for pair in match["counts"].split())
            recap[match["host"]] = {key: int(value) for key, value in counts}
    return recap


def inventory_var(name: str, host: str = "all") -> str:
    """A variable of the demo inventory as Ansible renders it (for the first host matched)."""
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "ansible"), "-i", str(INVENTORY.parent), host, "-m",
         "ansible.builtin.debug", "-a", f"var={name}", "-o", "--limit", "all[0]"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    payload = result.stdout.split("=>", 1)[1]
    return str(json.loads(payload)[name])
