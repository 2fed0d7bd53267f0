"""The expiry worker: removes inbox messages older than `flashlex.app.db.expireSeconds`, and
those whose own MQTT 5 Message Expiry Interval passed while they were stored (counted as expired).

Sweeps every `sweepSeconds` in bounded transactions, so a large backlog never holds the LMDB
write lock for long (ingress shares it).
"""
from __future__ import annotations

import logging
import time

from flashlexd.logs import LineThrottle, since_last
from flashlexd.store import Store, StoreDamaged, StoreError
from flashlexd.workers.base import Worker

log = logging.getLogger(__name__)
SWEEP_BATCH = 1000
FAILED_LOG_SECONDS = 600.0  # a store refusing every sweep (a disk gone read-only): a line per this


class ExpiryWorker(Worker):
    name = "expiry"

    def setup(self) -> None:
        self.store = Store.from_config(self.config.store, create=False)
        self.counters["expired"] = 0
        self._next_sweep = 0.0
        self._failures = LineThrottle(FAILED_LOG_SECONDS)

    def tick(self, now: float) -> float:
        if now < self._next_sweep:
            return self._next_sweep - now
        if self.config.store.expire_seconds is None and not self._messages_expire():
            self._next_sweep = now + self.config.store.sweep_seconds
            return self.config.store.sweep_seconds
        try:
            removed = self.store.expire(batch=SWEEP_BATCH)
        except StoreError as exc:
            self._failed(exc)
            removed = 0
        else:
            if self._failures.last is not None:
                log.info("expiry sweeps work again")
                self._failures = LineThrottle(FAILED_LOG_SECONDS)  # a next failure is news
        self.counters["expired"] += removed
        if removed:
            log.debug("expired %d messages", removed)
        if removed == SWEEP_BATCH:
            return 0.0  # more to do: yield to the loop (heartbeat, stop) and continue
        self._next_sweep = now + self.config.store.sweep_seconds
        return self.config.store.sweep_seconds

    def _messages_expire(self) -> bool:
        try:
            return self.store.has_message_expiry()
        except StoreError as exc:
            self._failed(exc)
            return False

    def _failed(self, exc: StoreError) -> None:
        """One line, then one per FAILED_LOG_SECONDS with a count: a sweep refused at every
        try (an SD card gone read-only, after a clock step made each sweep a write) logged an
        ERROR each time (review "clock"). Damage: the store logged it once."""
        if isinstance(exc, StoreDamaged):
            return
        count = self._failures.due(time.monotonic())
        if count:
            log.error("expiry sweep failed: %s%s", exc, since_last(count, "failed sweeps"))

    def shutdown(self) -> None:
        self.store.close()
