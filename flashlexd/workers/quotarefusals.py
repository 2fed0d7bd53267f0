"""PUBACK 0x97 Quota exceeded (MQTT 5): a throttle to wait out, or an entry the broker never takes.

AWS IoT Core answers 0x97 when a quota is over. A rate quota (the connection's, the account's)
passes: the entry goes again after a pause. But an entry may cross a quota alone, at every try
(which quotas do is not documented: a retained message over the account's retained-message
quota is one candidate), and a pause after each of its refusals held back every entry behind it
for good: one such entry, retried every second, cut a drain of 1,000 entries to ~10 a second,
with a WARNING a second and `status` healthy (review "aws").

So: an entry refused `attempts` times (at least twice), each time with some other entry accepted since its
previous refusal, is refused for what it is, not for the link's rate: it goes to the dead
letters, as the poison search's culprits do. Refusals in a row with nothing accepted between
them are a throttle: the pause doubles, up to MAX_PAUSE, so a throttled link is asked less
often; an acceptance ends it. The refusals of one burst (a window's worth in flight) answered
during the pause the first of them started make one pause, not a doubling each. Pure, so the policy is unit-tested without a broker.
"""
from __future__ import annotations

from typing import Dict, Tuple

FIRST_PAUSE = 1.0  # seconds before sending again after a refusal
MAX_PAUSE = 30.0   # the longest pause, after refusals in a row (a throttle that lasts)
REMEMBERED = 1024  # entries whose refusals are counted at once; more, and the counts start afresh


class QuotaRefusals:
    def __init__(self, attempts: int) -> None:
        self.attempts = max(2, attempts)  # one refusal cannot tell an entry from a throttle
        self.accepted_total = 0  # entries accepted so far: what "accepted since" compares
        self.pauses_in_a_row = 0  # pauses with no acceptance between them
        self.paused_until = 0.0   # nothing goes out before (time.monotonic())
        # entry id -> (its refusals that count, accepted_total at its last refusal)
        self.refusals: Dict[int, Tuple[int, int]] = {}

    def accepted(self, entry: int) -> None:
        self.accepted_total += 1
        self.pauses_in_a_row = 0
        self.refusals.pop(entry, None)

    def refused(self, entry: int, now: float) -> bool:
        """Count a refusal of `entry`; True when it is refused for good (to dead-letter), else
        the drain pauses (refusals of one burst, answered during its pause, pause it once)."""
        times, accepted_then = self.refusals.get(entry, (0, self.accepted_total))
        # nothing accepted since its last refusal: the link's throttle, its count starts afresh
        times = times + 1 if self.accepted_total > accepted_then else 1
        if times >= self.attempts:
            self.refusals.pop(entry, None)
            return True
        if entry not in self.refusals and len(self.refusals) >= REMEMBERED:
            self.refusals.clear()
        self.refusals[entry] = (times, self.accepted_total)
        if now >= self.paused_until:
            self.pauses_in_a_row += 1
            self.paused_until = now + min(MAX_PAUSE, FIRST_PAUSE * 2 ** (self.pauses_in_a_row - 1))
        return False
