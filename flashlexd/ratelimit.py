"""The egress's budget: publishes per second and bytes per second, as token buckets.

AWS IoT Core drops a PUBLISH over its per-connection quota without a PUBACK, so the egress must
stay under the quota rather than notice it. Each bucket holds at most BURST_SECONDS of its rate,
so sends are paced evenly (100/s goes out as about 5 every 0.05 s, not 100 at once), and it
refills at the rate less that burst: a full bucket's burst and a second of refill together were
110 publishes in one second at 100/s, over a quota counted in any one-second window (review
"aws": 24 of 1,000 dropped, a stall of `mqttOperationTimeout` each). An entry bigger than the
byte bucket goes out when the bucket is full and leaves it in debt: the long-run rate holds.
Pure and clock-injected, so the arithmetic is unit-tested without a broker.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

BURST_SECONDS = 0.05


def paced_rate(rate: float) -> float:
    """Tokens a second a bucket for `rate` refills at: in any one second, its burst and the
    refill come to `rate` at most (a token that arrives as the second ends is in the next)."""
    capacity = max(1.0, rate * BURST_SECONDS)
    return rate - capacity + 1


class TokenBucket:
    """At most `rate` tokens in any one second for a whole `rate` (a fractional one: its next
    whole number), holding at most `rate * BURST_SECONDS` (at least 1). A take bigger than that
    (a big entry in the byte bucket) goes when the bucket is full and leaves it in debt: one
    second may then hold up to that take more than `rate`."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.clock = paced_rate(rate), clock
        self.capacity = max(1.0, rate * BURST_SECONDS)
        self.tokens = self.capacity
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` may be taken (0: now)."""
        self._refill()
        need = min(amount, self.capacity)
        short = need - self.tokens
        return 0.0 if short <= 1e-9 else short / self.rate  # a rounding error is no reason to wait

    def take(self, amount: float) -> None:
        self._refill()
        self.tokens -= amount  # may go negative: a big entry, or resends after a reconnect


class PublishBudget:
    """Both limits together; a rate of 0 is unlimited."""

    def __init__(self, rate: float, bytes_rate: float, clock: Callable[[], float] = time.monotonic):
        self.count: Optional[TokenBucket] = TokenBucket(rate, clock) if rate > 0 else None
        self.volume: Optional[TokenBucket] = TokenBucket(bytes_rate, clock) if bytes_rate > 0 else None

    def wait(self, size: int) -> float:
        """Seconds until a publish of `size` bytes may go out."""
        waits = [bucket.wait(amount) for bucket, amount in ((self.count, 1), (self.volume, size))
                 if bucket is not None]
        return max(waits, default=0.0)

    def allowance(self, most: int) -> int:
        """How many publishes the rate allows now, at most `most` (the bytes are checked per entry)."""
        if self.count is None:
            return most
        if self.count.wait(1) > 0:
            return 0
        return max(1, min(most, int(self.count.tokens)))

    def spend(self, publishes: int, size: int) -> None:
        if self.count is not None:
            self.count.take(publishes)
        if self.volume is not None:
            self.volume.take(size)


def describe_rate(rate: float, bytes_rate: int, backlog_rate: Optional[float], max_inflight: int) -> str:
    """The effective egress rate in words (for `check` and logs)."""
    count = "unlimited publishes/s" if rate == 0 else f"{rate:g} publishes/s"
    volume = "unlimited bytes/s" if bytes_rate == 0 else f"{bytes_rate} bytes/s"
    backlog = (f" (a backlog queued while offline: {backlog_rate:g}/s, drainingFrequency)"
               if backlog_rate else "")
    return f"{count}{backlog}, {volume}, up to {max_inflight} in flight"
