"""PUBACK 0x97 Quota exceeded (MQTT 5): a throttle to wait out, or an entry the broker never takes.

AWS IoT Core answers 0x97 when a quota is over. A rate quota (the connection's, the account's)
passes: the entry goes again after a pause. But an entry may cross a quota alone, at every try
(which quotas do is not documented: a retained message over the account's retained-message
quota is one candidate), and a pause after each of its refusals held back every entry behind it
for good: one such entry, retried every second, cut a drain of 1,000 entries to ~10 a second,
with a WARNING a second and `status` healthy (review "aws").

So: an entry refused `attempts` times (at least twice) as the head of a burst, the first entry
sent after a pause (or on a fresh link), each time with some other entry accepted since its
previous such refusal, is refused for what it is: it goes to the dead letters, as the poison
search's culprits do. Only the head counts: a rate quota refilled over the pause takes it, and
refuses the burst's tail, which comes back as the next head (counting the tail dead-lettered
100 healthy entries of 600 behind a 20/s quota with no pacing: re-read).
An entry refused alone in flight with nothing sent after it (a paced drain: at 10/s or less
the budget lets one entry out after a pause; a window of 1) could never see another accepted
between its refusals, and held the outbox for good (re-read): the next entry is then sent first
(`probe_before`; refused too, the one after it), and the refused one, still the head, after an
acceptance of one and a pause (sent at once, it met the quota the probe had just spent: a 1/s
quota dead-lettered healthy entries; re-read).
The pause before a head counts from when nothing is in flight any more (`waits_for_window`).
It assumes a quota that refills at least one publish a second (AWS IoT Core's per-connection
ones do); a slower one may still see a healthy entry refused as head with another accepted
between.
Refusals in a row with nothing accepted between them are a throttle: the pause doubles, up to
MAX_PAUSE, so a throttled link is asked less often; an acceptance ends it, and so does a quiet
STALE (the refused entries left the outbox otherwise: dropped, expired). The refusals of one
burst answered during the pause the first of them started make one pause, not a doubling each.
Pure, so the policy is unit-tested without a broker.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

FIRST_PAUSE = 1.0  # seconds before sending again after a refusal
MAX_PAUSE = 30.0   # the longest pause, after refusals in a row (a throttle that lasts)
STALE = 2 * MAX_PAUSE  # no refusal for this long: the throttle is over, whatever ended it
REMEMBERED = 1024  # entries whose refusals are counted at once; more, and the counts start afresh


class QuotaRefusals:
    def __init__(self, attempts: int) -> None:
        self.attempts = max(2, attempts)  # one refusal cannot tell an entry from a throttle
        self.accepted_total = 0  # entries accepted so far: what "accepted since" compares
        self.paused_until = 0.0  # nothing goes out before (time.monotonic())
        self._pauses = 0         # pauses with no acceptance between them
        self._last_refusal: Optional[float] = None
        self._head: Optional[int] = None  # the first entry sent after the last pause
        self._head_due = True
        self._quiet_needed = False  # the pause counts from when nothing is in flight
        self.probing: Optional[int] = None  # the head waiting for the entry sent before it
        # entry id -> (its refusals as a head that count, accepted_total at the last of them)
        self._counts: Dict[int, Tuple[int, int]] = {}

    def new_burst(self) -> None:
        """The next entry sent is a head: a fresh link's quota is whole (and nothing of the
        last link's is in flight any more)."""
        self._head_due, self._quiet_needed = True, False

    def probe_before(self, entry: int) -> None:
        """`entry` was refused alone: the next entry goes first; it stays the head."""
        self.probing, self._head, self._head_due = entry, entry, False

    def end_probe(self, now: Optional[float] = None) -> Optional[int]:
        """The entry sent before the head was answered (or the link dropped): the head to send
        again, if a probe was on. With `now` (the probe was answered): the head goes first after
        a pause, as any head, so a rate quota the probe spent is refilled for it."""
        entry, self.probing = self.probing, None
        if entry is not None and now is not None:
            self.paused_until = max(self.paused_until, now + FIRST_PAUSE)
            self._head_due = self._quiet_needed = True
        return entry

    def waits_for_window(self, inflight: bool, now: float) -> bool:
        """Whether the head must wait for the publishes still in flight: its pause counts from
        when the last was answered, so that all sent before it have reached the broker (behind
        a slow, buffered uplink they came after the pause and spent the refilled quota: healthy
        entries dead-lettered; re-read)."""
        if not self._quiet_needed:
            return False
        if inflight:
            return True
        self._quiet_needed = False
        self.paused_until = max(self.paused_until, now + self._pause_length())
        return False

    def _pause_length(self) -> float:
        return min(MAX_PAUSE, FIRST_PAUSE * 2 ** max(0, self._pauses - 1))

    def sending(self, entry: int) -> None:
        if self._head_due:
            self._head, self._head_due = entry, False

    def accepted(self, entry: int) -> None:
        self.accepted_total += 1
        self._pauses = 0
        self._counts.pop(entry, None)

    def refused(self, entry: int, now: float) -> bool:
        """Count a refusal of `entry`; True when it is refused for good (to dead-letter), else
        the drain pauses."""
        self._pauses = self.pauses_in_a_row(now)
        self._last_refusal = now
        if entry == self._head and self._head_refused(entry):
            return True
        if now >= self.paused_until and not self._quiet_needed:  # else this burst's pause is on
            self._pauses += 1
            self.paused_until = now + self._pause_length()
            self._head_due = self._quiet_needed = True
        return False

    def _head_refused(self, entry: int) -> bool:
        times, accepted_then = self._counts.get(entry, (0, self.accepted_total))
        # nothing accepted since its last refusal: the link's throttle, its count starts afresh
        times = times + 1 if self.accepted_total > accepted_then else 1
        if times >= self.attempts:
            self._counts.pop(entry, None)
            return True
        if entry not in self._counts and len(self._counts) >= REMEMBERED:
            self._counts.clear()
        self._counts[entry] = (times, self.accepted_total)
        return False

    def pauses_in_a_row(self, now: float) -> int:
        """Pauses with nothing accepted between them; 0 once no refusal came for STALE."""
        if self._last_refusal is None or now - self._last_refusal > STALE:
            return 0
        return self._pauses
