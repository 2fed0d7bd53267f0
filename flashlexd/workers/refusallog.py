"""What ingress logs while the store refuses its commits (full, a full disk, an error), so that
the log's last word on the store is always the truth and yet a store held at its cap does not
flood it: expiry frees a little at every sweep and the store refuses again, for hours, and a
slow sensor into such a store meets a refusal at each of its messages."""
from __future__ import annotations

import logging
from typing import Optional

from flashlexd.logs import KindThrottle
from flashlexd.store import DiskFull, StoreDamaged, StoreError, StoreFull

log = logging.getLogger(__name__)

REFUSED_LOG_SECONDS = 600.0   # the store refusing again within this: DEBUG, counted in the next ERROR
RESUMED_QUIET_SECONDS = 10.0  # storing this long without a refusal ends a logged refusal's episode
BROKER_KEEPS_WARNING = 0.75   # of how long the broker keeps what we do not acknowledge: warned then


class RefusalLog:
    """One ERROR per kind of refusal every REFUSED_LOG_SECONDS, with the count, DEBUG in
    between; "resuming" once the store has taken messages for RESUMED_QUIET_SECONDS without
    refusing, at most once every REFUSED_LOG_SECONDS; and a refusal after a "resuming" line
    always logged, else the log would say all is well while nothing is stored. With
    `broker_keeps` (AWS IoT Core drops a QoS 1 message it has had no PUBACK for in an hour:
    review "aws"), one WARNING once an episode has lasted most of that: the broker's patience,
    not the store, then decides what is lost."""

    def __init__(self, retry_seconds: float, broker_keeps: Optional[float] = None) -> None:
        self.retry_seconds, self.broker_keeps = retry_seconds, broker_keeps
        self._lines = KindThrottle(REFUSED_LOG_SECONDS)  # by the error's type
        self._refusing_said = False  # the log's last word on the store: refusing
        self._resumed_at: Optional[float] = None  # storing again since, the log not told yet
        self._resume_said_at: Optional[float] = None  # the last "resuming" line
        self._since: Optional[float] = None  # this episode's first refusal
        self._keeps_said = False  # its WARNING about the broker's patience
        self._last: Optional[StoreError] = None  # its latest refusal: what the WARNING advises on

    def refused(self, exc: StoreError, now: float, held: int, retry: bool) -> None:
        """The store refused a write; `retry`: nothing was stored since the last refusal, which
        was logged (or counted) then, whatever this one's kind. Damage is logged by the store
        itself."""
        self._resumed_at = None  # not over after all: the log's last word stays right
        if self._since is None:
            self._since, self._keeps_said = now, False
        self._last = exc
        if not retry:
            said = isinstance(exc, StoreDamaged) or self._say_refused(exc, now, held)
            self._refusing_said = self._refusing_said or said

    def stored(self, now: float) -> None:
        """A commit succeeded after refusals: the episode ends once it lasts."""
        if self._refusing_said and self._resumed_at is None:
            self._resumed_at = now
        elif not self._refusing_said:
            self._since = None  # nothing was said of it (damage is the store's to say): over

    def due(self, now: float) -> float:
        """Log the end of a refusal, or the broker's patience running out, if due; seconds until
        the next call is needed."""
        keeps = self._keeps_due(now)
        if self._resumed_at is None:
            return keeps
        due = self._resumed_at + RESUMED_QUIET_SECONDS
        if self._resume_said_at is not None:
            due = max(due, self._resume_said_at + REFUSED_LOG_SECONDS)
        if due > now:
            return min(keeps, due - now)
        self._say_resumed(now)
        return float("inf")

    def _keeps_due(self, now: float) -> float:
        """Seconds until the WARNING about the broker's patience (inf: none to come); said if due."""
        if self.broker_keeps is None or self._since is None or self._keeps_said:
            return float("inf")
        due = self._since + self.broker_keeps * BROKER_KEEPS_WARNING
        if due > now:
            return due - now
        self._keeps_said = True
        log.warning("the store has refused messages for %d min: AWS IoT Core drops a QoS 1 message it"
                    " has had no PUBACK for in %d min, so what it holds for this thing is lost from"
                    " then: %s", (now - self._since) // 60, self.broker_keeps // 60, _remedy(self._last))
        return float("inf")

    def close(self, now: float) -> None:
        """The worker stops: the last word this process logs must be the truth."""
        if self._resumed_at is not None:
            self._say_resumed(now)

    def _say_refused(self, exc: StoreError, now: float, held: int) -> bool:
        """Whether it was logged."""
        what = "store full" if isinstance(exc, StoreFull) else "store error"
        count = self._lines.due(type(exc), now)
        if not count and not self._refusing_said:
            count = 1
        holding = f"not acknowledging {held} messages, " if held else ""
        if not count:
            log.debug("%s: %s; %sretrying", what, exc, holding)
            return False
        again = f" ({count} such refusals since the last line about them)" if count > 1 else ""
        log.error("%s: %s; %sretrying every %gs%s", what, exc, holding, self.retry_seconds, again)
        return True

    def _say_resumed(self, now: float) -> None:
        log.info("store accepts messages again; resuming")
        self._refusing_said, self._resumed_at, self._resume_said_at = False, None, now
        self._since = None


def _remedy(refusal: Optional[StoreError]) -> str:
    """What ends a refusal of this kind (room is no cure for a read-only or failing disk: re-read 30)."""
    if isinstance(refusal, StoreFull):
        return "free room now (apps acknowledging, a larger capMegabytes) or set whenFull: dropOldest"
    if isinstance(refusal, DiskFull):
        return "free space on the data dir's disk now"
    return "mend what the store's ERROR above names now (its disk: dmesg and fsck, or flashlexd store recover)"
