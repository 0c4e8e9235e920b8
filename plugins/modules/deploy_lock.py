#!/usr/bin/python
"""The deploy lock of one host: a directory, made with mkdir, with its holder inside."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: deploy_lock
short_description: Take, break, read or release the deploy lock of a host
description:
  - The lock is a directory on the host; making it with mkdir is the atomic step (of two
    runs making it at once, exactly one succeeds). Inside it, C(run_id) holds the id of the
    run that took it and C(holder.json) who that run is (written beside and renamed into
    place, so that a reader sees all of it or nothing).
  - The role C(wsfleet.fleet.deploy_lock) calls it, one host after the other; its entry
    points C(acquire), C(release) and C(inspect) are the way to use it.
version_added: 1.0.0
author: wsfleet maintainers
options:
  path:
    description: The lock directory. Its parent is made if missing.
    type: path
    required: true
  operation:
    description:
      - C(take) makes the lock for O(run) unless another run holds it.
      - C(break) removes another run's lock first, then takes it.
      - C(check) reads the lock and changes nothing.
      - C(release) removes the lock only where it carries the id O(run).
    type: str
    choices: [take, break, check, release]
    default: check
  run:
    description:
      - This run's id, written into the lock by C(take) and C(break), compared by
        C(release).
    type: str
  holder:
    description:
      - Who this run is (controller, user, playbook, release, since), written into the lock's
        C(holder.json) with O(run) added as C(run).
    type: dict
    default: {}
notes:
  - In check mode nothing is written or removed; C(take) and C(break) then read the lock as
    C(check) does.
"""

EXAMPLES = r"""
- name: Take the lock, stopping if another run holds it
  wsfleet.fleet.deploy_lock:
    path: /var/lib/wsfleet/deploy.lock
    operation: take
    run: r0123456789abcde
    holder:
      controller: ctl1
      user: deploy
      playbook: site.yml
      release: 1.1.0
      since: "2025-01-01T00:00:00Z"
  register: lock

- name: Release it, leaving another run's lock in place
  wsfleet.fleet.deploy_lock:
    path: /var/lib/wsfleet/deploy.lock
    operation: release
    run: r0123456789abcde
"""

RETURN = r"""
state:
  description:
    - C(taken) (this run took it), C(broken) (another run's lock was removed and this run
      took it), C(held) (another run holds it), C(free) (no lock), C(released) (this run's
      lock was removed) or C(kept) (release found no lock of this run's).
  returned: always
  type: str
  sample: held
age:
  description:
    - Seconds since the lock was taken (by the directory's time on the host); for
      C(broken), the age of the lock broken.
  returned: always
  type: int
  sample: 3725
holder:
  description:
    - What the holder file says, for C(held) the holder's and for C(broken) the broken
      run's; null when there is none (a run that died between mkdir and writing it) or for
      the other states.
  returned: always
  type: dict
  sample:
    controller: ctl1
    user: deploy
    playbook: site.yml
    release: 1.1.0
    since: "2025-01-01T00:00:00Z"
    run: r0123456789abcde
"""

import errno
import json
import os
import shutil
import time
from typing import Any

from ansible.module_utils.basic import AnsibleModule

HOLDER = "holder.json"
RUN_ID = "run_id"
# What DOCUMENTATION says of the options (tests/plugins/test_docs.py holds them equal).
ARGUMENT_SPEC = {
    "path": {"type": "path", "required": True},
    "operation": {
        "type": "str",
        "default": "check",
        "choices": ["take", "break", "check", "release"],
    },
    "run": {"type": "str"},
    "holder": {"type": "dict", "default": {}},
}


def read_holder(path: str) -> dict[str, Any] | None:
    """The lock's holder file as a dict; None when missing or not a JSON object."""
    try:
        with open(os.path.join(path, HOLDER)) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def lock_age(path: str, now: float | None = None) -> int:
    """Seconds since the lock directory was made (its mtime); 0 when it is gone."""
    try:
        made = os.stat(path).st_mtime
    except OSError:
        return 0
    return max(0, int((time.time() if now is None else now) - made))


def report(state: str, age: int = 0, holder: dict[str, Any] | None = None) -> dict[str, Any]:
    """The module's answer: what RETURN documents."""
    return {"state": state, "age": age, "holder": holder}


def read(path: str) -> dict[str, Any]:
    """The lock as it is: held (with its age and holder) or free."""
    if os.path.isdir(path):
        return report("held", lock_age(path), read_holder(path))
    return report("free")


def _write(path: str, run: str, holder: dict[str, Any]) -> None:
    with open(os.path.join(path, RUN_ID), "w") as f:
        f.write(run)
    new = os.path.join(path, HOLDER + ".new")
    with open(new, "w") as f:
        json.dump({**holder, "run": run}, f)
    os.replace(new, os.path.join(path, HOLDER))


def _make(path: str) -> bool:
    """Make the lock directory; False when it exists (another run holds it)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    return True


def take(path: str, run: str, holder: dict[str, Any], breaking: bool = False) -> dict[str, Any]:
    """Take the lock for ``run``; with ``breaking``, remove another run's lock first.

    Returns the report: taken; broken, with the age and holder of the lock removed; or held
    (another run holds it, or took it between the removal and this run's mkdir).
    """
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if _make(path):
        _write(path, run, holder)
        return report("taken")
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", path)
    if not breaking:
        return read(path)
    old, was = read_holder(path), lock_age(path)
    shutil.rmtree(path, ignore_errors=True)
    if _make(path):
        _write(path, run, holder)
        return report("broken", was, old)
    return read(path)


def ours(path: str, run: str) -> bool:
    """Whether the lock carries ``run``'s id."""
    try:
        with open(os.path.join(path, RUN_ID)) as f:
            return f.read() == run
    except OSError:
        return False


def release(path: str, run: str, remove: bool = True) -> dict[str, Any]:
    """Remove the lock where it carries ``run``'s id: released, or kept (not this run's).
    With ``remove`` False, only say which it would be."""
    if not ours(path, run):
        return report("kept")
    if remove:
        shutil.rmtree(path)
    return report("released")


def run_module() -> None:
    """Ansible's entry point: the operation on the host, its report as the result."""
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        required_if=[("operation", name, ["run"]) for name in ("take", "break", "release")],
        supports_check_mode=True,
    )
    path, operation = module.params["path"], module.params["operation"]
    run, holder = module.params["run"], module.params["holder"]
    try:
        if operation == "release":
            result = release(path, run, remove=not module.check_mode)
        elif operation == "check" or module.check_mode:
            result = read(path)
        else:
            result = take(path, run, holder, breaking=operation == "break")
    except OSError as error:
        module.fail_json(msg=f"deploy lock {path}: {error}")
    module.exit_json(changed=result["state"] in ("taken", "broken", "released"), **result)


def main() -> None:
    run_module()


if __name__ == "__main__":
    main()
