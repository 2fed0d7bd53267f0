"""When to restart a worker that died, and when to give up (a pure state machine).

Backoff doubles per consecutive failure from `FIRST_DELAY` up to the configured cap, and resets
once a worker has run for `STABLE_AFTER` seconds. More than `limit` failures inside `window`
seconds is a crash loop: the supervisor then stops feeding the systemd watchdog and exits
non-zero, so systemd restarts the whole service cleanly instead of us spinning.
"""
from __future__ import annotations

from collections import deque
from typing import Deque

FIRST_DELAY = 0.1
STABLE_AFTER = 10.0


class CrashLoop(Exception):
    """A worker failed too often too quickly."""


class RestartPolicy:
    def __init__(self, max_delay: float, limit: int, window: float):
        self.max_delay = max_delay
        self.limit = limit
        self.window = window
        self.consecutive = 0
        self.failures: Deque[float] = deque()

    def next_delay(self, now: float, started_at: float) -> float:
        """Record a failure at `now` of a worker started at `started_at`; return the delay
        before the next start, or raise CrashLoop."""
        if now - started_at >= STABLE_AFTER:
            self.consecutive = 0
        self.consecutive += 1
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.window:
            self.failures.popleft()
        if len(self.failures) > self.limit:
            raise CrashLoop(f"{len(self.failures)} failures in {self.window:g}s")
        return min(FIRST_DELAY * 2 ** (self.consecutive - 1), self.max_delay)
