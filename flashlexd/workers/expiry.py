"""The expiry worker: removes inbox messages older than `flashlex.app.db.expireSeconds`, and
those whose own MQTT 5 Message Expiry Interval passed while they were stored (counted as expired).

Sweeps every `sweepSeconds` in bounded transactions, so a large backlog never holds the LMDB
write lock for long (ingress shares it).
"""
from __future__ import annotations

import logging

from flashlexd.store import Store, StoreDamaged, StoreError
from flashlexd.workers.base import Worker

log = logging.getLogger(__name__)
SWEEP_BATCH = 1000


class ExpiryWorker(Worker):
    name = "expiry"

    def setup(self) -> None:
        self.store = Store.from_config(self.config.store, create=False)
        self.counters["expired"] = 0
        self._next_sweep = 0.0

    def tick(self, now: float) -> float:
        if now < self._next_sweep:
            return self._next_sweep - now
        if self.config.store.expire_seconds is None and not self._messages_expire():
            self._next_sweep = now + self.config.store.sweep_seconds
            return self.config.store.sweep_seconds
        try:
            removed = self.store.expire(batch=SWEEP_BATCH)
        except StoreError as exc:
            if not isinstance(exc, StoreDamaged):  # damage: the store logged it once
                log.error("expiry sweep failed: %s", exc)
            removed = 0
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
            if not isinstance(exc, StoreDamaged):
                log.error("expiry sweep failed: %s", exc)
            return False

    def shutdown(self) -> None:
        self.store.close()
