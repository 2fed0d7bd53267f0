"""The egress worker: outbox -> broker, deleting an entry only after the broker acknowledged it.

Entries go out oldest first, each at its own topic and QoS, with up to `maxInflight` published
and not yet acknowledged. A PUBACK moves the entry's id to a done list, deleted in one store
transaction (one fsync) once it holds a window's worth, nothing is in flight any more, or its
oldest id waited DELETE_DELAY: at most one delete per loop pass, usually far fewer. So the
outbox only ever loses entries the broker has; a kill before the delete just sends them again.

After a disconnect, paho keeps the unacknowledged QoS 1/2 messages in memory and, on the
reconnect (persistent session), resends them first with DUP set and their old packet ids, so
the packet id -> entry map stays valid and the order holds. After a kill, the new process
starts again from the oldest entry left. Either way every entry is delivered at least once, in
order per topic, and the duplicates are bounded by the in-flight window per reconnect.

QoS 0 entries are deleted as soon as paho has accepted them: at most once, as their QoS says.

Waking: the supervisor sends `{"t": "outbox"}` when something was queued. `drainingFrequency`
(seconds, flashlex.thing.mqtt) is only the slow fallback: how often the worker re-checks the
outbox without being woken (in the FlashLex SDK it paced the whole drain loop).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from paho.mqtt.enums import MQTTErrorCode

from flashlexd.mqtt import Connection
from flashlexd.store import Store, StoreDamaged, StoreError
from flashlexd.workers.base import Worker

log = logging.getLogger(__name__)

DELETE_DELAY = 0.02  # seconds an acknowledged entry may wait for the next delete transaction


class EgressWorker(Worker):
    name = "egress"

    def setup(self) -> None:
        mqtt = self.config.thing.mqtt
        self.store = Store.from_config(self.config.store)
        self.connection = Connection(self.config, mqtt.egress_client_id, self._on_change,
                                     on_publish=self._on_publish)
        self.client = self.connection.client
        self.window = mqtt.max_inflight
        self.inflight: Dict[int, int] = {}  # packet id -> outbox id
        self.done: List[int] = []           # acknowledged, to delete
        self.done_since = 0.0               # when the oldest of them was acknowledged
        self.cursor = 0                     # the newest outbox id handed to paho
        self.more = True                    # the outbox may hold entries past the cursor
        self.next_check = 0.0
        self.counters.update(sent=0, inflight=0, outbox_backlog=self.store.outbox_count(),
                             connected=False, invalid=0)

    # -- loop hooks -------------------------------------------------------------------------------

    def wait_fds(self) -> Tuple[Sequence[Any], Sequence[Any]]:
        return self.connection.wait_fds()

    def on_ready(self, readable: List[Any], writable: List[Any]) -> None:
        self.connection.on_ready(readable, writable)

    def on_command(self, message: Dict[str, Any]) -> None:
        if message.get("t") == "outbox":
            self.more = True

    def tick(self, now: float) -> float:
        wait = self.connection.service()
        if self.done and (len(self.done) >= self.window or not self.inflight
                          or now - self.done_since >= DELETE_DELAY):
            self._delete_done()
        elif self.done:
            wait = min(wait, self.done_since + DELETE_DELAY - now)
        if now >= self.next_check:
            self.next_check = now + self.config.thing.mqtt.draining_frequency
            self.more = True
            self.counters["outbox_backlog"] = self.store.outbox_count()
        if self.more and self.connection.connected:
            self._publish_more()
            if self.more and len(self.inflight) < self.window:
                wait = 0.0  # QoS 0 entries free their slots at once: no PUBACK will wake us
        self.counters["inflight"] = len(self.inflight)
        return min(wait, self.next_check - now)

    def shutdown(self) -> None:
        self.connection.close(min(self.config.thing.mqtt.connect_timeout,
                                  self.config.supervision.stop_timeout / 2))
        self._delete_done()  # PUBACKs read while closing
        self.store.close()

    # -- MQTT -------------------------------------------------------------------------------------

    def _on_change(self, connected: bool, error: Optional[str]) -> None:
        self.counters["connected"] = connected
        self.report("mqtt", connected=connected, error=error)

    def _on_publish(self, mid: int) -> None:
        entry = self.inflight.pop(mid, None)
        if entry is not None:
            self._done(entry)

    def _done(self, entry: int) -> None:
        if not self.done:
            self.done_since = time.monotonic()
        self.done.append(entry)

    # -- the outbox -------------------------------------------------------------------------------

    def _publish_more(self) -> None:
        room = self.window - len(self.inflight)
        if room <= 0:
            return
        try:
            entries = self.store.outbox_peek(limit=room, after=self.cursor)
        except StoreDamaged:  # logged once by the store; nothing can be sent from it
            self.more = False
            return
        self.more = len(entries) == room
        for entry in entries:
            try:
                info = self.client.publish(entry.topic, entry.payload, entry.qos, entry.retain)
            except ValueError as exc:  # e.g. a wildcard topic: it could never go out
                log.error("outbox entry %d cannot be published to %r (%s); deleted", entry.id,
                          entry.topic, exc)
                self.counters["invalid"] += 1
                self._done(entry.id)
                self.cursor = entry.id
                continue
            if entry.qos == 0:
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self.more = True  # not sent: retried after the reconnect
                    return
                self._done(entry.id)
            else:
                self.inflight[info.mid] = entry.id  # paho resends it itself if the link drops
            self.cursor = entry.id

    def _delete_done(self) -> None:
        if not self.done:
            return
        try:
            self.store.outbox_remove(self.done)
            self.counters["outbox_backlog"] = self.store.outbox_count()
        except StoreError as exc:
            if not isinstance(exc, StoreDamaged):  # damage: the store logged it once
                log.error("cannot delete %d sent outbox entries (retrying): %s", len(self.done), exc)
            return
        self.counters["sent"] += len(self.done)
        self.done = []
