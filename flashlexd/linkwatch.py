"""Is the broker still answering? Deadlines for every acknowledgement we wait for.

TCP does not notice a frozen or half-open peer, and paho's keepalive alone takes up to two
keepalive periods (a PINGREQ after one, its PINGRESP awaited for another: 58 s measured with
a SIGSTOPped broker). Three rules, checked from the worker's loop:

- silence: nothing at all received for `keepalive + min(operation timeout, keepalive / 2)`.
  paho sends a PINGREQ once the link was quiet for `keepalive`, so a live broker always speaks
  well within that; a frozen one is found within 1.5 x keepalive at most.
- no acknowledgement: an expected PUBACK, SUBACK or UNSUBACK older than `operation_timeout`
  with no acknowledgement (nor, for a subscriber, a message) at all in that time, while the
  broker still answers (pings). This is how a broker that drops publishes without a word (AWS
  IoT Core over its rate quota) shows.
- overtaken: an expected acknowledgement still awaited `operation_timeout` after one of the
  same kind for a later packet arrived (counted from then: a window may wait in a slow uplink
  longer than the timeout). A broker acknowledges QoS 1 publishes in the order it
  received them (MQTT 3.1.1 4.6, MQTT 5 4.6), so that packet was dropped; the acknowledgements
  of the later ones would otherwise keep the rule above content while it waits forever in the
  window. The timeout is the grace for a broker that reorders (RabbitMQ acknowledges a message
  once its queues have it: one no queue takes goes before an earlier one being written).

Pure and clock-injected: `Connection` feeds it, tests drive it with a fake clock.
"""
from __future__ import annotations

import enum
import time
from typing import Callable, Dict, Optional, Tuple


class Verdict(enum.Enum):
    SILENT = "silent"                  # nothing received: the broker or the path is gone
    UNACKNOWLEDGED = "unacknowledged"  # the broker talks but does not acknowledge
    OVERTAKEN = "overtaken"            # it acknowledged later packets but not an older one


class LinkWatch:
    def __init__(self, keepalive: float, operation_timeout: float,
                 clock: Callable[[], float] = time.monotonic):
        self.operation_timeout = operation_timeout
        self.silence_limit = keepalive + min(operation_timeout, keepalive / 2)
        self.clock = clock
        self.awaiting: Dict[Tuple[str, int], float] = {}  # (packet kind, mid) -> sent at, oldest first
        self.overtaken: Optional[Tuple[str, int]] = None  # the oldest awaited, once a later one was answered
        self.overtaken_at = 0.0  # when: the grace for a reordering broker counts from then
        self.heard = self.progress = clock()

    def up(self) -> None:
        """A new connection: nothing awaited yet, the CONNACK was just heard."""
        self.awaiting.clear()
        self.overtaken = None
        self.heard = self.progress = self.clock()

    def arriving(self) -> None:
        """Bytes of a packet came and more of it are due: what we await may be queued behind it
        (a large PUBLISH over a slow link took longer than the operation timeout, and every
        link was closed before its SUBACK could come: nothing stored again)."""
        self.progress = self.clock()

    def heard_from(self) -> None:
        self.heard = self.clock()

    def delivered(self) -> None:
        """Messages came in. A broker answers a connection in order, so a SUBACK or UNSUBACK
        queued behind a backlog it is sending us is on its way: a deep backlog (a session
        resumed after an outage, drained at a Pi's pace) must not look like a dead link."""
        self.heard = self.progress = self.clock()

    def expect(self, kind: str, mid: int) -> None:
        self.awaiting[(kind, mid)] = self.clock()

    def answered(self, kind: str, mid: int) -> None:
        """An acknowledgement came. paho also reports a QoS 0 publish as "published" once it
        is written: nothing was awaited for it, and nothing was heard."""
        key = (kind, mid)
        oldest = next(iter(self.awaiting), None)
        if self.awaiting.pop(key, None) is None:
            return
        self.heard = self.progress = self.clock()
        if key == self.overtaken:  # late, not lost
            self.overtaken = None
        elif self.overtaken is None and oldest != key and oldest[0] == kind:  # type: ignore[index]
            self.overtaken = oldest  # sent before the one answered
            self.overtaken_at = self.clock()

    def silent_for(self) -> float:
        """Seconds since anything at all came from the broker (a packet, or part of one)."""
        return self.clock() - max(self.heard, self.progress)

    def overtaken_mid(self) -> Optional[int]:
        """The packet id of the awaited packet a later one's acknowledgement overtook."""
        return None if self.overtaken is None else self.overtaken[1]

    def _oldest(self) -> float:
        return next(iter(self.awaiting.values()))  # inserted in the order sent

    def pending(self, kind: str) -> int:
        return sum(1 for k, _ in self.awaiting if k == kind)

    def verdict(self) -> Optional[Verdict]:
        now = self.clock()
        if now - self.heard >= self.silence_limit:
            return Verdict.SILENT
        if self.awaiting:
            if now - max(self._oldest(), self.progress) >= self.operation_timeout:
                return Verdict.UNACKNOWLEDGED
            if self.overtaken is not None and now - self.overtaken_at >= self.operation_timeout:
                return Verdict.OVERTAKEN
        return None

    def next_check(self) -> float:
        """Seconds until `verdict()` could change if nothing happens meanwhile."""
        now = self.clock()
        due = self.heard + self.silence_limit
        if self.awaiting:
            due = min(due, max(self._oldest(), self.progress) + self.operation_timeout)
            if self.overtaken is not None:
                due = min(due, self.overtaken_at + self.operation_timeout)
        return max(0.0, due - now)
