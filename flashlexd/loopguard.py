"""What the supervisor does when one pass of its loop raises something nobody expected.

A bug in one pass (a store error in a status line, a surprise from a library) must not take the
daemon down with a "cannot start" message, nor spin silently: the first failure of a streak is
logged with its traceback (and again whenever the error changes), every failure is counted
(`status` shows `counters.loop_errors`), and the loop goes on. Only `limit` failures in a row
mean the supervisor itself is broken: then it gives up and lets systemd restart the service.
"""
from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("flashlexd.supervisor")

FAILURES_IN_A_ROW = 20


class LoopGuard:
    def __init__(self, limit: int = FAILURES_IN_A_ROW):
        self.limit = limit
        self.total = 0
        self.in_a_row = 0
        self._last: Optional[str] = None

    def passed(self) -> None:
        if self.in_a_row:
            log.info("supervisor loop recovered after %d failed passes", self.in_a_row)
        self.in_a_row = 0
        self._last = None

    def failed(self, exc: BaseException) -> bool:
        """Count a failed pass (call from an `except` block); True when it is time to give up."""
        self.total += 1
        self.in_a_row += 1
        described = f"{type(exc).__name__}: {exc}"
        if described != self._last:
            log.error("supervisor loop pass failed (%d in a row): %s", self.in_a_row, described,
                      exc_info=True)
            self._last = described
        if self.in_a_row >= self.limit:
            log.error("supervisor loop failed %d passes in a row: giving up", self.in_a_row)
            return True
        return False
