"""What ingress logs while the store refuses its commits (full, a full disk, an error), so that
the log's last word on the store is always the truth and yet a store held at its cap does not
flood it: expiry frees a little at every sweep and the store refuses again, for hours, and a
slow sensor into such a store meets a refusal at each of its messages."""
from __future__ import annotations

import logging
from typing import Optional

from flashlexd.logs import KindThrottle
from flashlexd.store import StoreDamaged, StoreError, StoreFull

log = logging.getLogger(__name__)

REFUSED_LOG_SECONDS = 600.0   # the store refusing again within this: DEBUG, counted in the next ERROR
RESUMED_QUIET_SECONDS = 10.0  # storing this long without a refusal ends a logged refusal's episode


class RefusalLog:
    """One ERROR per kind of refusal every REFUSED_LOG_SECONDS, with the count, DEBUG in
    between; "resuming" once the store has taken messages for RESUMED_QUIET_SECONDS without
    refusing, at most once every REFUSED_LOG_SECONDS; and a refusal after a "resuming" line
    always logged, else the log would say all is well while nothing is stored."""

    def __init__(self, retry_seconds: float) -> None:
        self.retry_seconds = retry_seconds
        self._lines = KindThrottle(REFUSED_LOG_SECONDS)  # by the error's type
        self._refusing_said = False  # the log's last word on the store: refusing
        self._resumed_at: Optional[float] = None  # storing again since, the log not told yet
        self._resume_said_at: Optional[float] = None  # the last "resuming" line

    def refused(self, exc: StoreError, now: float, held: int, retry: bool) -> None:
        """The store refused a write; `retry`: nothing was stored since the last refusal, which
        was logged (or counted) then, whatever this one's kind. Damage is logged by the store
        itself."""
        self._resumed_at = None  # not over after all: the log's last word stays right
        if not retry:
            said = isinstance(exc, StoreDamaged) or self._say_refused(exc, now, held)
            self._refusing_said = self._refusing_said or said

    def stored(self, now: float) -> None:
        """A commit succeeded after refusals: the episode ends once it lasts."""
        if self._refusing_said and self._resumed_at is None:
            self._resumed_at = now

    def due(self, now: float) -> float:
        """Log the end of a refusal if it is due; seconds until the next call is needed."""
        if self._resumed_at is None:
            return float("inf")
        due = self._resumed_at + RESUMED_QUIET_SECONDS
        if self._resume_said_at is not None:
            due = max(due, self._resume_said_at + REFUSED_LOG_SECONDS)
        if due > now:
            return due - now
        self._say_resumed(now)
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
