"""One sentence about a deploy lock, for the messages of the lock and for status.yml."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["FilterModule", "describe"]


def describe(found: dict[str, Any]) -> str:
    """Who holds a lock and for how long, from what the take script printed.

    Args:
        found: ``age`` (seconds) and ``holder`` (the holder file, or None when the
            directory exists without one: a run that died between the two steps, or is
            between them now).
    """
    age = int(found.get("age") or 0)
    hours, rest = divmod(age, 3600)
    taken = f"{hours}h{rest // 60:02d}m{rest % 60:02d}s ago"
    holder = found.get("holder")
    if not isinstance(holder, dict):
        return f"a run that left no holder file, taken {taken}"
    release = holder.get("release") or "?"
    return (
        f"{holder.get('playbook', '?')} of release {release}"
        f" by {holder.get('user', '?')}@{holder.get('controller', '?')}"
        f" (run {holder.get('run', '?')}), since {holder.get('since', '?')}, {taken}"
    )


class FilterModule:
    """Ansible's entry point for the collection's deploy lock filters."""

    def filters(self) -> dict[str, Callable[..., str]]:
        return {"deploy_lock_describe": describe}
