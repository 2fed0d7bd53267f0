"""How soon the ingress may reconnect again for the messages it left with the broker.

Each such reconnect (workers/ingress.py) follows a full batch stored, but a broker without an
in-flight window of its own resends all it holds at each, and a store that takes little more
leaves nearly all of it with the broker again: while more than WASTE messages are left again for
each one stored, the reconnects come further apart, from MIN_GAP doubling up to MAX_GAP. Pure,
so the policy is unit-tested without a broker.
"""
from __future__ import annotations

from typing import Optional, Tuple

MIN_GAP = 1.0   # seconds between two such reconnects, at first
MAX_GAP = 16.0  # at most, while each brings far more than the store takes
WASTE = 8       # messages left again per message stored between two reconnects: too many


class RecyclePace:
    def __init__(self) -> None:
        self.last: Optional[float] = None  # when the last such reconnect went
        self.gap = MIN_GAP                 # the least time from it to the next
        self.counts: Tuple[int, int] = (0, 0)  # messages stored and left with the broker by then

    def wait(self, now: float) -> float:
        """Seconds until the next may go (0: now)."""
        return 0.0 if self.last is None else max(0.0, self.last + self.gap - now)

    def went(self, now: float, stored: int, left: int) -> None:
        """A reconnect went now; `stored` and `left` are the running totals of messages stored
        and left with the broker."""
        since_stored, since_left = stored - self.counts[0], left - self.counts[1]
        wasteful = self.last is not None and since_left > WASTE * since_stored
        self.gap = min(2 * self.gap, MAX_GAP) if wasteful else MIN_GAP
        self.last, self.counts = now, (stored, left)
