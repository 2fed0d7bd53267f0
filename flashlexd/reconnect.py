"""When the next CONNECT may go out: the reconnect backoff, pure and fake-clock testable."""
from __future__ import annotations

import random
import time
from typing import Callable, Optional

from flashlexd.config import ReconnectPolicy

MIN_CONNECT_INTERVAL = 1.0  # AWS IoT Core allows one CONNECT per second per client id
JITTER = 0.25               # up to -25% on each quiet time, so a fleet does not reconnect in step


class ReconnectBackoff:
    """When the next CONNECT may go out.

    Quiet times start at `base_seconds` and double after each failed attempt or short-lived
    connection, up to `max_seconds`; a connection that stayed up `stable_seconds` resets them.
    Each wait is shortened by up to JITTER (jitter stays inside the cap: `max_seconds` is never
    exceeded), and two CONNECTs are never less than MIN_CONNECT_INTERVAL apart (AWS IoT Core
    allows one CONNECT per second per client id). The first attempt is immediate.
    """

    def __init__(self, policy: ReconnectPolicy, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random):
        self.policy, self.clock, self.rand = policy, clock, rand
        self.quiet = policy.base_seconds
        self.due_at = clock()
        self.last_attempt: Optional[float] = None
        self.connected_at: Optional[float] = None

    def connected_elsewhere(self, seconds_ago: float) -> None:
        """A process before this one connected with the client id `seconds_ago` (a worker
        replaced after a crash, a hang or a reload): the first attempt waits until
        MIN_CONNECT_INTERVAL has passed since, as AWS IoT Core's limit is per client id."""
        self.due_at = self.clock() + MIN_CONNECT_INTERVAL - min(max(seconds_ago, 0.0), MIN_CONNECT_INTERVAL)

    def wait(self) -> float:
        """Seconds until a CONNECT may be attempted (0: now)."""
        return max(0.0, self.due_at - self.clock())

    def attempted(self) -> None:
        """A CONNECT goes out now (after the name lookup and the handshake: a dial that fails
        before it sent none, and AWS IoT Core counts CONNECTs)."""
        now = self.clock()
        self.last_attempt = now
        self.due_at = now + MIN_CONNECT_INTERVAL  # until told how it went

    def connected(self) -> None:
        self.connected_at = self.clock()

    def lost(self, broker_fault: bool = True) -> None:
        """The attempt failed or the connection dropped: schedule the next attempt. A drop that
        was not the broker's fault (one of our entries made it close the link, `broker_fault`
        False) is retried after the base quiet time, without growing it: the poison search
        needs a few quick reconnects, at most `poisonAttempts` per entry."""
        now = self.clock()
        if self.connected_at is not None and now - self.connected_at >= self.policy.stable_seconds:
            self.quiet = self.policy.base_seconds
        self.connected_at = None
        quiet = self.quiet if broker_fault else self.policy.base_seconds
        wait = quiet * (1 - JITTER * self.rand())
        self.due_at = max(now + wait, self._earliest(now))
        if broker_fault:
            self.quiet = min(self.quiet * 2, self.policy.max_seconds)

    def ended(self) -> None:
        """We closed the link on purpose (Connection.recycle): the next CONNECT as soon as one
        may go, the backoff neither grown nor waited."""
        now = self.clock()
        self.connected_at = None
        self.due_at = self._earliest(now)

    def _earliest(self, now: float) -> float:
        """MIN_CONNECT_INTERVAL after the last CONNECT."""
        return (now if self.last_attempt is None else self.last_attempt) + MIN_CONNECT_INTERVAL
