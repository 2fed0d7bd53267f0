"""How many messages the ingress reads and commits in one batch: as many as its CPU gets through
well within the heartbeat timeout.

A worker's heartbeat goes out between loop passes, and a batch is read and committed in passes
that send none. On a starved CPU (review "slowcpu": 1 % of a core, a Pi Zero busy with other
apps) a batch of BATCH_MAX (1,024) messages of a broker's backlog took over
heartbeatTimeoutSeconds: the ingress was aborted as hung with nothing committed, the broker sent
the same backlog to its replacement, which hung the same way (5 restarts in a row, 90 s without
ingest). So a new worker starts at FIRST messages a batch and doubles while batches go quickly;
a batch that took over its share of the timeout makes the next ones as small as fits in half.

What counts is the time the ingress's thread was running or waiting for a CPU (a starved one's
throttling included), from the kernel's schedstat (`BusyClock`): a commit waiting on a slow SD
card is not counted (a worker blocked on the disk is not taken for hung, workerproc.py), else a
card whose commits take 0.7 s would keep batches at 64 for good, 16 times the syncs (re-read).
"""
from __future__ import annotations

import os
import time

FIRST = 64  # messages: a new worker's first batches (a few milliseconds each on a healthy device)
FLOOR = 8  # messages: the smallest batch, however slow
SHARE = 4  # a batch may take heartbeatTimeoutSeconds / SHARE: a pass's other work fits beside it
SCHEDSTAT = "/proc/thread-self/schedstat"  # ns on a CPU, ns waiting for one, timeslices


class BusyClock:
    """Seconds the calling thread has been running or runnable (schedstat), not sleeping nor
    blocked on I/O; wall time where the kernel keeps no schedstat (then a batch counts its
    commit window and disk waits too: smaller batches, never a longer pass). Open it in the
    thread it times (the worker's, after fork)."""

    def __init__(self) -> None:
        try:
            self._fd = os.open(SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)
            self.busy = self._schedstat
            if os.pread(self._fd, 128, 0).split()[2] == b"0":  # "0 0 0": a kernel keeping no
                raise ValueError("no sched info")  # sched info (a running thread has a timeslice)
        except (OSError, ValueError, IndexError):
            self.busy = time.monotonic

    def _schedstat(self) -> float:
        running, waiting = os.pread(self._fd, 128, 0).split()[:2]
        return (int(running) + int(waiting)) / 1e9


class BatchFit:
    def __init__(self, ceiling: int, heartbeat_timeout: float):
        self.ceiling = ceiling
        self.target = heartbeat_timeout / SHARE
        self.size = min(FIRST, ceiling)

    def took(self, count: int, seconds: float) -> None:
        """A batch of `count` messages kept the CPU (or waited for it) `seconds` in all."""
        if seconds > self.target:
            self.size = max(FLOOR, min(self.size, int(count * self.target / 2 / seconds)))
        elif count >= self.size and seconds < self.target / 4:
            self.size = min(self.ceiling, self.size * 2)
