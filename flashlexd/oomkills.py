"""How many processes of the daemon's cgroup the kernel's OOM killer has taken, so that a
worker's SIGKILL the supervisor did not send is named for what it was: "died (signal SIGKILL)"
left an operator under a `MemoryMax=` to find the cause in the kernel's log.

The count is the cgroup's own (`oom_kill` in cgroup v2's memory.events, or v1's
memory.oom_control): every kill in it, under its limit or the machine's. Where neither can be
read (no memory controller, a container's view), nothing is said.

The kernel counts a kill before its victim is gone, and the victim may take a while to exit
under memory pressure. The supervisor looks at the count every second, so that a kill of another
process in the cgroup does not name a worker's later SIGKILL; a look between a worker's kill and
its reap took the kill away from it (seen in CI). A look leaves a new kill to the reap of the
workers then on their way out (a SIGKILL pending, exiting, or a zombie), and to no other child.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterable, Optional, Set

CGROUP_ROOT = Path("/sys/fs/cgroup")
PF_EXITING = 0x4  # a task's flag (/proc/PID/stat's 9th field) once it has begun to exit
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)  # in /proc/PID/status's pending-signal masks


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
        self._held_for: Set[int] = set()  # workers dying when a look saw a kill: theirs to name

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

    def look(self, workers: Iterable[int]) -> None:
        """The periodic look: a new kill is another process's, unless some of the `workers`
        (pids) are on their way out: then it is left to their reaps."""
        if self._new_kill():
            self._held_for = {pid for pid in workers if dying(pid)}

    def took_one(self, pid: int) -> bool:
        """At the reap of child `pid`: whether the OOM killer took a process of the cgroup
        since the last look, or took it while a look saw `pid` dying."""
        held = pid in self._held_for
        self._held_for.discard(pid)
        return self._new_kill() or held

    def _new_kill(self) -> bool:
        count = self._count()
        took = count is not None and self.seen is not None and count > self.seen
        if count is not None:
            self.seen = count
        return took


def dying(pid: int) -> bool:
    """Whether process `pid` is on its way out: a SIGKILL pending, exiting, or a zombie not
    reaped yet. False when it is gone or cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
        if fields[0] in ("Z", "X") or int(fields[6]) & PF_EXITING:
            return True
        pending = (line.split()[1] for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:")))
        return any(int(mask, 16) & SIGKILL_BIT for mask in pending)
    except (OSError, ValueError, IndexError):
        return False
