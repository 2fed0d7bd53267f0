"""Bytes the daemon writes to disk, for `status()["store"]` and `flashlexctl status` (issue 20).

SD cards wear out by bytes written, and that wear is otherwise invisible. The kernel counts,
per process, the bytes it sent (or will send) to the block device (`write_bytes` in
/proc/PID/io: page-cache pages dirtied, so a 4 KiB page rewritten by each commit counts 4 KiB
every time it is flushed). The supervisor samples its own and each worker's once a second and
sums them; a worker that was restarted keeps what it wrote until its last sample.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Iterable, Optional, Tuple, Union

WINDOW = 60.0  # seconds the projected rate is averaged over
DAY = 86400.0
GIB = 1024 ** 3


def written_bytes(pid: Union[int, str] = "self") -> Optional[int]:
    """`write_bytes` of /proc/PID/io, or None when it cannot be read (gone, no permission,
    a kernel without task I/O accounting)."""
    try:
        with open(f"/proc/{pid}/io", "rb") as io:
            for line in io:
                if line.startswith(b"write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class WriteMeter:
    """The daemon's bytes written since it started, per message stored since then, and the
    rate over the last WINDOW seconds projected to a day."""

    def __init__(self, window: float = WINDOW):
        self.window = window
        self._last: Dict[int, int] = {}  # pid -> its latest reading
        self._start: Dict[int, int] = {}  # pid -> its reading when first seen here
        self._gone = 0  # bytes of processes that went away (from their first to last sample)
        self._received_at_start: Optional[int] = None
        self.samples: Deque[Tuple[float, int, int]] = deque()  # (time, written, received)

    def sample(self, now: float, pids: Iterable[int], received: int) -> None:
        """Read each live process's counter; `received` is the store's running total. The
        supervisor's own writes before its first sample (opening the store) are left out."""
        readings = {pid: value for pid in pids if (value := written_bytes(pid)) is not None}
        for pid, value in self._last.items():
            if pid not in readings:
                self._gone += value - self._start.pop(pid)
        for pid, value in readings.items():
            self._start.setdefault(pid, value if not self.samples else 0)
        self._last = readings
        if self._received_at_start is None:
            self._received_at_start = received
        self.samples.append((now, self.written, received))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    @property
    def written(self) -> int:
        return self._gone + sum(value - self._start[pid] for pid, value in self._last.items())

    def figures(self) -> Dict[str, Optional[float]]:
        """For `status()["store"]`: bytes written since start, per message stored since start
        (None before the first), and the recent rate as GiB a day, once a whole window was
        measured (5 s after start, the start's own writes were told as 0.98 GiB/day)."""
        if not self.samples:
            return {"written_bytes": None, "written_per_message": None, "written_gib_per_day": None}
        (t0, w0, _), (t1, w1, received) = self.samples[0], self.samples[-1]
        stored = received - (self._received_at_start or 0)
        span = t1 - t0
        return {"written_bytes": w1,
                "written_per_message": round(w1 / stored) if stored > 0 else None,
                "written_gib_per_day": round((w1 - w0) / span * DAY / GIB, 3) if span >= self.window else None}
