"""How many messages the ingress takes into one batch: as many as it reads and commits well
within the heartbeat timeout.

A worker's heartbeat goes out between loop passes, and a batch is read and committed in passes
that send none. On a starved CPU (review "slowcpu": 1 % of a core, a Pi Zero busy with other
apps) a batch of BATCH_MAX (1,024) messages of a broker's backlog took over
heartbeatTimeoutSeconds: the ingress was aborted as hung with nothing committed, the broker sent
the same backlog to its replacement, which hung the same way (5 restarts in a row, 90 s without
ingest). So a new worker starts at FIRST messages a batch and doubles while batches go quickly;
a batch whose reading and commit took over its share of the timeout makes the next ones as
small as fits in half of it. Wall time is what counts: the heartbeat's timeout is wall time.
"""
from __future__ import annotations

FIRST = 64  # messages: a new worker's first batches (a few milliseconds each on a healthy device)
FLOOR = 8  # messages: the smallest batch, however slow (each commit costs an fsync)
SHARE = 4  # a batch may take heartbeatTimeoutSeconds / SHARE: a pass's other work fits beside it


class BatchFit:
    def __init__(self, ceiling: int, heartbeat_timeout: float):
        self.ceiling = ceiling
        self.target = heartbeat_timeout / SHARE
        self.size = min(FIRST, ceiling)

    def took(self, count: int, seconds: float) -> None:
        """A batch of `count` messages took `seconds` to read and commit."""
        if seconds > self.target:
            self.size = max(FLOOR, min(self.size, int(count * self.target / 2 / seconds)))
        elif count >= self.size and seconds < self.target / 4:
            self.size = min(self.ceiling, self.size * 2)
