"""When to restart a worker that died, and when to give up (pure: no clock, no processes).

Backoff doubles per consecutive failure from `FIRST_DELAY` up to the configured cap, and resets
once a worker has run for `STABLE_AFTER` seconds. More than `limit` failures inside `window`
seconds is a crash loop: the worker goes FATAL, the supervisor stops feeding the systemd
watchdog and exits non-zero, so systemd restarts the whole service cleanly instead of us spinning.

The limits come from the config (and change on reload); the history belongs to the worker.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Optional

from flashlexd.config import Supervision

FIRST_DELAY = 0.1
STABLE_AFTER = 10.0
# past this many doublings any cap has long won; the bound keeps 2 ** n from overflowing a
# float (at 1,024) for a worker that fails for ever without ever making a crash loop
MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class RestartLimits:
    max_delay: float
    limit: int
    window: float

    @classmethod
    def from_config(cls, supervision: Supervision) -> "RestartLimits":
        return cls(supervision.backoff_max_seconds, supervision.crash_loop_restarts,
                   supervision.crash_loop_window)


class RestartHistory:
    """One worker's recent failures."""

    def __init__(self) -> None:
        self.consecutive = 0
        self.failures: Deque[float] = deque()

    def next_delay(self, now: float, started_at: float, limits: RestartLimits) -> Optional[float]:
        """Record a failure at `now` of a worker started at `started_at`; return the delay
        before the next start, or None when this failure makes a crash loop."""
        if now - started_at >= STABLE_AFTER:
            self.consecutive = 0
        self.consecutive += 1
        self.failures.append(now)
        while self.failures and now - self.failures[0] > limits.window:
            self.failures.popleft()
        if len(self.failures) > limits.limit:
            return None
        return min(FIRST_DELAY * 2 ** min(self.consecutive - 1, MAX_DOUBLINGS), limits.max_delay)

    def describe(self, limits: RestartLimits) -> str:
        return f"{len(self.failures)} failures in {limits.window:g}s"
