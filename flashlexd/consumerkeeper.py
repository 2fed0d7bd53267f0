"""The supervisor's care of the named consumers: the store agrees with the config (at start and
after each reload), and every `sweepSeconds` idle dynamic consumers go (one WARNING each) and
each consumer is trimmed to its maxBacklog. Ingest never does this work: it adds no write per
message for consumers."""
from __future__ import annotations

import logging
import time
from typing import Callable

from flashlexd.configconsumers import ConsumerSettings
from flashlexd.store import Store, StoreDamaged, StoreError

log = logging.getLogger(__name__)


class ConsumerKeeper:
    def __init__(self, store: Callable[[], Store], settings: Callable[[], ConsumerSettings],
                 every: Callable[[], float]):
        self._store, self._settings, self._every = store, settings, every
        self.next_run = 0.0  # monotonic

    def declare(self) -> None:
        try:
            created = self._store().consumer_declare(self._settings().declared, time.time())
        except StoreError as exc:
            self._failed("declaring the configured consumers", exc)
            return
        for name in created:
            log.info("consumer %r declared: it starts at the earliest stored message", name)

    def tick(self, now: float) -> None:
        if now < self.next_run:
            return
        self.next_run = now + self._every()
        settings = self._settings()
        try:
            removed = self._store().consumers_upkeep(time.time(), settings.idle_seconds)
        except StoreError as exc:
            self._failed("consumer upkeep", exc)
            return
        for name in removed:
            log.warning("consumer %r removed: unused for %g days (flashlex.app.consumerIdleDays);"
                        " the messages only it held were released", name, settings.idle_seconds / 86400)

    @staticmethod
    def _failed(what: str, exc: StoreError) -> None:
        if not isinstance(exc, StoreDamaged):  # damage: the store logged it once
            log.error("%s failed: %s", what, exc)
