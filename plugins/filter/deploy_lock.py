"""The deploy lock's filters: one sentence about a lock, and each host's answer of a loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["FilterModule", "describe", "found"]


def describe(lock: dict[str, Any]) -> str:
    """Who holds a lock and for how long, from what the deploy_lock module answered.

    Args:
        lock: ``age`` (seconds) and ``holder`` (the holder file, or None when the
            directory exists without one: a run that died between the two steps, or is
            between them now).
    """
    age = int(lock.get("age") or 0)
    hours, rest = divmod(age, 3600)
    taken = f"{hours}h{rest // 60:02d}m{rest % 60:02d}s ago"
    holder = lock.get("holder")
    if not isinstance(holder, dict):
        return f"a run that left no holder file, taken {taken}"
    release = holder.get("release") or "?"
    return (
        f"{holder.get('playbook', '?')} of release {release}"
        f" by {holder.get('user', '?')}@{holder.get('controller', '?')}"
        f" (run {holder.get('run', '?')}), since {holder.get('since', '?')}, {taken}"
    )


def found(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each host's answer in the results of a loop of the deploy_lock module over hosts
    (the host as the loop's item): host, state, age and holder. A host that failed or was
    unreachable gave no answer and is left out.
    """
    return [
        {
            "host": result["item"],
            "state": result["state"],
            "age": result.get("age", 0),
            "holder": result.get("holder"),
        }
        for result in results
        if "state" in result and not result.get("failed") and not result.get("unreachable")
    ]


class FilterModule:
    """Ansible's entry point for the collection's deploy lock filters."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {"deploy_lock_describe": describe, "deploy_lock_found": found}
