"""How many processes of the daemon's cgroup the kernel's OOM killer has taken, so that a
worker's SIGKILL the supervisor did not send is named for what it was: "died (signal SIGKILL)"
left an operator under a `MemoryMax=` to find the cause in the kernel's log.

The count is the cgroup's own (`oom_kill` in cgroup v2's memory.events, or v1's
memory.oom_control): every kill in it, under its limit or the machine's. Where neither can be
read (no memory controller, a container's view), nothing is said.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _counter_file(membership: str) -> Optional[Path]:
    """The file holding `oom_kill` for the cgroup named in /proc/self/cgroup's text."""
    for line in membership.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            unified = CGROUP_ROOT / path.lstrip("/") / "memory.events"
            if unified.exists():
                return unified
        elif "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.oom_control"
    return None


class OomKills:
    """The cgroup's OOM kill count, read again when a worker dies by SIGKILL."""

    def __init__(self) -> None:
        try:
            self.path = _counter_file(Path("/proc/self/cgroup").read_text())
        except (OSError, ValueError):
            self.path = None
        self.seen = self._count()

    def _count(self) -> Optional[int]:
        if self.path is None:
            return None
        try:
            for line in self.path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return None

    def took_one(self) -> bool:
        """Whether the OOM killer took a process of the cgroup since the last look."""
        count = self._count()
        took = count is not None and self.seen is not None and count > self.seen
        if count is not None:
            self.seen = count
        return took
