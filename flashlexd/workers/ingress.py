"""The ingress worker: broker -> inbox, acknowledging a message only once it is on disk.

paho runs with manual acks. Each PUBLISH joins a pending batch; the batch is committed with ONE
`Store.append` (one fsync: group commit) at the end of each loop pass, that is as soon as the
socket has nothing more to read or a batch's worth (BatchFit: up to BATCH_MAX messages, as many
as a starved CPU reads and commits well within the heartbeat timeout; BATCH_BYTES of payload) waits, and
only after the commit returns are the PUBACKs sent, in arrival order (MQTT 3.1.1, 4.6).

A commit costs about the same bytes written whether it holds one message or a hundred (LMDB
copies a few 4 KiB pages per database it touches: docs/WEAR.md), so at a trickle a batch waits
up to `flashlex.app.db.ingestCommitMs` after its first message for more to share the commit
(its PUBACKs wait too; QoS 1 senders do not mind). It is committed at once when
`ingestCommitBatch` messages are waiting: a broker stops sending once its window of
unacknowledged messages is full (RabbitMQ's default prefetch is 10, mosquitto's in-flight limit
20), so waiting longer would only stall it. It is committed at once, too, when its connection
drops: nothing more can join it, and what came before an outage is readable at once.
A batch set above the broker's window is noticed: when LEARN_FROM or more messages wait and
nothing came for STALL_GAPS times their mean gap (at least STALL_MIN), the broker has stopped
at its window: the batch is committed and windows end at that count for the rest of the
connection (a steady sender's gaps never look like that; a sender's pause that does only makes
the batches smaller). Under load each loop pass reads more than that, so batches are committed
as today: as soon as the socket has nothing more to read, the batch size adapting to the fsync
time.

A kill at any instant loses nothing: an unacknowledged message is redelivered by the broker
(DUP set; mosquitto keeps its packet id, RabbitMQ renumbers it) and the store recognises, by
content, the redelivery of one it committed and whose PUBACK the broker has not confirmed
(flashlexd/redelivery.py); under MQTT 5, where a resend keeps its packet id, by packet id too. With `flashlex.app.db.dedupe`, a message whose application key was
stored in the window is acknowledged and not stored: a broker's redeliveries after its own crash.
PUBACKs are sent only on the connection a message arrived on: after a reconnect, the broker
redelivers whatever we had not acknowledged. The store accounts for each content's copies per
connection (a broker resends a copy once per connection), so a DUP resent on the same
connection is caught here while the first copy waits in the batch; and when the broker comes
back without our session, the DUP marks are dropped (nothing will be resent) once what came
before is committed.

The link is reported connected only once the broker granted the subscriptions (SUBACK), with
the list of what it granted: a connection that does not receive yet is not "up".

A full store (policy `reject`) is back-pressure, not loss: what does not fit stays
unacknowledged, so the broker keeps it, and the commit is retried every RETRY_SECONDS. A full
disk is handled the same way. What the ingress holds meanwhile is bounded by a full batch,
whatever the broker's in-flight window (mosquitto's is the protocol's 65,535 under MQTT 5, or
unlimited where configured): a QoS 1 message past it is left with the broker, unacknowledged and
not kept, and so is every later one on that connection (PUBACKs keep their order: none is sent
for a message that came after one left with the broker). MQTT resends such a message only on a
new connection, so once the store has taken all that is held, and the broker has confirmed our
PUBACKs (their DUP marks taken off in the store first: a mark left unconfirmed would take the
resend of a message of the same content for a redelivery), the ingress reconnects, session kept
(`Connection.recycle`), and the broker sends them again; such reconnects in a row are paced
(workers/recyclepace.py).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from paho.mqtt.enums import MQTTErrorCode

from flashlexd.ackbatch import coalesced_acks
from flashlexd.logs import KindThrottle, since_last
from flashlexd.mqtt import Connection
from flashlexd.mqttv5 import V5, packet_limit, properties_of, properties_size, properties_wire_size
from flashlexd.publishread import Publish
from flashlexd.probemark import is_probe, probe_topic
from flashlexd.quotas import FILTERS_PER_SUBSCRIBE, QOS1_RETRY_SECONDS, is_aws_endpoint
from flashlexd.store import DiskFull, Incoming, Store, StoreError, StoreFull
from flashlexd.topics import topic_matches
from flashlexd.workers.barrier import AckBarrier
from flashlexd.workers.base import Worker
from flashlexd.workers.batchfit import BatchFit, BusyClock
from flashlexd.workers.linkmemory import (connect_ago, earlier_broker, earlier_session, earlier_session_on,
                                          fell_back_before, noting_connects, noting_fallback)
from flashlexd.workers.recyclepace import RecyclePace
from flashlexd.workers.refusallog import REFUSED_LOG_SECONDS, RefusalLog
from flashlexd.workers.subscriptions import Subscriptions

log = logging.getLogger(__name__)

BATCH_MAX = 1024              # messages per commit, at most
BATCH_BYTES = 8 * 1024 * 1024  # payload bytes per commit, at most (payloads go up to 256 KB)
LEARN_FROM = 8                 # fewer waiting messages are never taken for a broker's full window
STALL_GAPS = 4                 # a silence this many mean gaps long: the broker's window is full
STALL_MIN = 0.05               # seconds; the shortest such silence (a burst's gaps are microseconds)
RETRY_SECONDS = 1.0
STALE_CACHE = 1024             # topics remembered by `_unsubscribed`
CACHED_TOPIC = 256             # bytes: a longer topic is matched again each time, not remembered


class _Pending(NamedTuple):
    incoming: Optional[Incoming]  # None: dropped (oversize) or resent, waiting only for its ack
    mid: int
    qos: int
    generation: int  # which connection it arrived on: a random id, also the store's (redelivery.py)


class IngressWorker(Worker):
    name = "ingress"

    def setup(self) -> None:
        self.store = Store.from_config(self.config.store, create=False)
        self.topics = self.config.thing.mqtt.ingress_topics()
        self.session_links: Set[int] = set()  # generations of the connections of the broker's current session
        self.subscriptions = Subscriptions(self.topics, self.config.thing.mqtt.backoff.stable_seconds)
        client_id = self.config.thing.mqtt.client_id
        # the filters the broker's session may hold: those recorded (a store with no record
        # is an earlier version's, which subscribed the pubsub topic, or a new one resuming the
        # session of an earlier life of the client id: its other filters, unknown, are kept
        # and their messages stored, see `_unsubscribed`) and those configured
        known = self.store.session_topics(client_id) or [t for t in [self.config.thing.mqtt.pubsub_topic] if t]
        self.session_topics = list(dict.fromkeys([*known, *self.topics]))
        self.recorded = known == self.session_topics
        self.unwanted = [t for t in self.session_topics if t not in self.topics]
        self.stale: Dict[str, bool] = {}  # topic -> whether only an unwanted filter matches it
        self.said_unwanted = False
        self.said_refused: Optional[str] = None  # the refused subscriptions last logged
        seen_at = earlier_session(self.store, client_id)
        self.fresh_store = seen_at is None  # until its first link: a session kept from before it?
        broker = self.config.thing.broker_identity
        last_broker = earlier_broker(self.store, client_id)
        # links before, on a broker the store does not name (the previous release's): its marks
        # may be another broker's, dropped at the first link (a duplicate at worst, never a loss)
        self.unknown_broker = seen_at is not None and last_broker is None
        self.connection = Connection(self.config, client_id, self._on_change,
                                     on_publishes=self._on_publishes, track_session=True,
                                     session_seen_at=earlier_session_on(self.store, client_id, broker),
                                     session_broker=last_broker, broker_unknown=self.unknown_broker,
                                     on_build=self._set_up_client,
                                     fell_back=fell_back_before(self.store, client_id, broker),
                                     on_fall_back=noting_fallback(self.store, client_id, broker),
                                     connected_ago=connect_ago(self.name, seen_at),
                                     on_connect_sent=noting_connects(self.name),
                                     max_packet=packet_limit(self.config.store.max_payload_bytes))
        self.dedupe = self.config.store.dedupe
        self.barrier = AckBarrier(self.connection, self.config.thing.mqtt.client_id)
        self.batch: List[_Pending] = []
        self.batch_bytes = 0
        self.batch_started = 0.0  # time.monotonic() of the pending batch's first message
        self.fit = BatchFit(BATCH_MAX, self.config.supervision.heartbeat_timeout)
        self.busy = BusyClock().busy
        self.batch_busy_since = 0.0  # `busy()` as the pending batch began
        self.remainder = False  # the batch is what a commit of a batch's worth left
        self.window = self.config.store.ingest_commit_ms / 1000
        self.window_flush = self.config.store.ingest_commit_batch  # messages that end the window
        self.last_arrival = 0.0
        self.generation = 0
        self.retry_at: Optional[float] = None
        self.refusals = RefusalLog(RETRY_SECONDS, QOS1_RETRY_SECONDS if is_aws_endpoint(self.config.thing.endpoint)
                                   else None)
        # the broker lost our session, or the link is on another broker than the marks': every
        # DUP mark is stale once the first this-many batch messages (from the connections
        # before) are committed; None: nothing to forget
        self.stale_marks_until: Optional[int] = None
        # a move's (or an unknown broker's): whose marks they are, for the log; while set, the
        # store's last-link broker is not noted (a next process must drop them too)
        self.stale_marks_of: Optional[str] = None
        self.left_on: Optional[int] = None  # the connection whose messages were left with the broker
        self.left = 0  # how many, on it
        self.recycle_due = False  # a reconnect for them is due (all held before them is stored)
        self.recycle_pace = RecyclePace()
        self._left_lines = KindThrottle(REFUSED_LOG_SECONDS)
        self.marks_refused = False  # the marks' commit before a recycle refused, said
        self.probe_topic = probe_topic(self.config.thing.mqtt.ingress_topic)  # `flashlexd check`'s
        self.counters.update(received=0, stored=0, duplicates=0, dropped_oversize=0,
                             dropped_bad_topic=0, dropped_malformed=0, dropped_unsubscribed=0, dropped_qos0_full=0, held=0, check_probes=0,
                             left_with_broker=0, store_full=False,
                             connected=False, batches=0, marks_settled=0, store_error=None, subscriptions=[], sessions_lost=0, clone_suspected=None,
                             dedupe_keyless=0, acks_confirmed=0, protocol=None, received_straight=0)

    # -- loop hooks -------------------------------------------------------------------------------

    def wait_fds(self) -> Tuple[Sequence[Any], Sequence[Any]]:
        return self.connection.wait_fds()

    def on_ready(self, readable: List[Any], writable: List[Any]) -> None:
        if self._holding_full():  # what comes is left with the broker or dropped: read on
            self.connection.on_ready(readable, writable, max_packets=self.fit.size)
            return
        if self.retry_at is not None:  # the store refuses: held up to BATCH_MAX, a batch's worth a pass
            self.connection.on_ready(readable, writable, max_packets=min(self.fit.size, BATCH_MAX - len(self.batch)),
                                     enough=self._full)
            return
        # a full batch still reads one packet a pass, so a PINGRESP is never left unread; the
        # batch's bytes end a pass too (one pass read 280 messages of 100 KB past BATCH_BYTES)
        fitted = self._fitted()
        self.connection.on_ready(readable, writable, max_packets=1 if fitted else self.fit.size - len(self.batch),
                                 enough=self._fitted)

    def _fitted(self) -> bool:
        """A batch's worth is waiting: commit it (BatchFit)."""
        return len(self.batch) >= self.fit.size or self.batch_bytes >= BATCH_BYTES

    def _full(self) -> bool:
        """As much is held as the ingress may hold while the store refuses."""
        return len(self.batch) >= BATCH_MAX or self.batch_bytes >= BATCH_BYTES

    def _holding_full(self) -> bool:
        """A full batch that is not being committed: the store refuses."""
        return self.retry_at is not None and self._full()

    def tick(self, now: float) -> float:
        wait = self.connection.service()
        self.counters["held"] = len(self.batch)  # received, not yet committed (a refusing store)
        self.counters["clone_suspected"] = self.connection.clone_suspected()
        if self.recycle_due and self.connection.connected:
            wait = min(wait, self._recycle(now))
        if self.counters["connected"] and not self.connection.subscribes_due and not self.recycle_due:
            wait = min(wait, self._ask_again(now))
        if self.batch:  # QoS 0 messages only, while a reconnect is due: no PUBACK, no mark
            due = self.batch_started + self.window
            # a dropped connection adds nothing more to share the commit: no window after it;
            # a full batch neither (its bytes: 100 KB messages grew one to 43 MB in a window)
            if (len(self.batch) < self.window_flush and self.retry_at is None and self.connection.connected
                    and not self._fitted() and not self.remainder):
                stalled = self._stalled_at()
                if now < min(due, stalled):  # the commit window: more may share the commit
                    return min(wait, min(due, stalled) - now)
                if now >= stalled:
                    self._learn_window()
            if self.retry_at is None or now >= self.retry_at:
                self._commit(now)
                if self.batch and self.retry_at is None:
                    wait = 0.0  # more than a batch's worth was due: the rest at the next pass
            if self.retry_at is not None:
                wait = min(wait, max(0.0, self.retry_at - now))
        return min(wait, self.refusals.due(now))

    def _stalled_at(self) -> float:
        """When the broker counts as stopped at its window (never, with few messages waiting)."""
        count = len(self.batch)
        if count < LEARN_FROM:
            return float("inf")
        gap = (self.last_arrival - self.batch_started) / (count - 1)
        return self.last_arrival + max(STALL_MIN, STALL_GAPS * gap)

    def _learn_window(self) -> None:
        self.window_flush = len(self.batch)
        log.info("the broker stops at %d unacknowledged messages (below ingestCommitBatch %d):"
                 " commit windows end at %d on this connection", self.window_flush,
                 self.config.store.ingest_commit_batch, self.window_flush)

    def shutdown(self) -> None:
        # inside the supervisor's stop budget: the barrier's wait and the close take half each
        budget = self.link_stop_budget()
        self._commit_all(time.monotonic())  # when the store refuses, the broker keeps them
        self._await_barrier(budget / 2)
        # confirmed since the last commit: a mark left behind would take a later message of that
        # content, first sent as a DUP, for a redelivery
        refused = self._take_confirmed_marks_off()
        if refused:
            log.warning("%s", refused)
        self.connection.close(budget / 2)
        self.store.close()
        self.refusals.close(time.monotonic())

    def _await_barrier(self, timeout: float) -> None:
        """A graceful stop (a reload, a service restart) waits for the broker to confirm the
        PUBACKs sent: a mark left unconfirmed stays in the store, and after the restart the
        broker's DUP of a message of that content whose first transmission this stop cut off
        would be taken for a redelivery and lost. Under load the barrier lags hundreds of
        PUBACKs behind. What arrives meanwhile is not acknowledged: the broker keeps it, save
        QoS 0 messages (sent once), which are stored. Their commit may take what a refusing
        store held too, whose PUBACKs are then waited for in the time left (re-read 29: they
        went unconfirmed, after the line that counted what was)."""
        deadline = time.monotonic() + timeout
        if self.barrier.unconfirmed():
            log.info("stopping: waiting up to %gs for the broker to confirm %d PUBACKs", timeout,
                     self.barrier.unconfirmed())
        while True:
            held = len(self.batch)
            confirmed = self.connection.pump_until(lambda: not self.barrier.unconfirmed(),
                                                   deadline - time.monotonic())
            self.batch[held:] = [p for p in self.batch[held:] if not p.qos]
            self.batch_bytes = self._held_bytes()
            if len(self.batch) > held:
                self._commit_all(time.monotonic())
            if not confirmed or not self.barrier.unconfirmed():
                break
        if self.barrier.unconfirmed():
            log.info("stopping with %d PUBACKs not yet confirmed by the broker", self.barrier.unconfirmed())

    # -- MQTT -------------------------------------------------------------------------------------

    def _set_up_client(self, client: Any) -> None:
        """Each paho client the connection builds: acks after our commit, SUBACK/UNSUBACK here."""
        client.manual_ack_set(True)
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_malformed_publish = self._on_malformed
        client.on_oversize_publish = self._on_oversize
        client.properties_limit = self.config.store.max_payload_bytes

    def _note_session(self) -> None:
        """The broker has a session for us from now on: remembered for the next process, with
        which broker it is. While a move's marks wait to be dropped (the store refused), the
        last link's broker stays the old one (or none): a next process then drops them too."""
        try:
            self.store.note_session(self.config.thing.mqtt.client_id, time.time(), ingress=True,
                                    broker=self.connection.broker, last=self.stale_marks_of is None)
        except StoreError as exc:
            log.warning("cannot remember that the broker holds our session: %s", exc)

    def _say_if_the_session_is_older_than_the_store(self) -> None:
        """A store's first link resumes whatever session the broker kept for the client id
        (never Clean Start: what it queued is ours). The filters an earlier life subscribed in
        it are unknown here and keep delivering: said once, so that the messages of a filter
        not configured (or a second copy, under MQTT 5, of one overlapping a configured one)
        are not a mystery."""
        fresh, self.fresh_store = self.fresh_store, False
        if fresh and self.connection.session_present:
            log.warning("the broker kept a session for client id %r from before this store (a new SD"
                        " card or store, or another device with this identity): what it queued is"
                        " stored; a filter it subscribed that `subscriptions` lacks keeps delivering"
                        " (under MQTT 5 a second copy where it overlaps a configured one): list such"
                        " a filter once and take it out to unsubscribe it",
                        self.config.thing.mqtt.client_id)

    def _on_change(self, connected: bool, error: Optional[str]) -> None:
        """Up means subscribed: the link is reported connected only once the SUBACK came."""
        self.counters["sessions_lost"] = self.connection.sessions_lost
        if connected:
            # marks are of the broker they were made on: another broker's DUP of the same
            # content is its own message, never a redelivery of ours (a duplicate after a move
            # back is the lesser harm: README, "Delivery guarantees")
            moved_from, unknown, self.unknown_broker = self.connection.moved_from, self.unknown_broker, False
            new_session = not self.connection.session_present or moved_from is not None or unknown
            if moved_from is not None:
                self.stale_marks_of = f"the session on {moved_from}"
            elif unknown:
                self.stale_marks_of = "the earlier version's session (its broker not recorded)"
                log.info("the store names no broker for the earlier links of client id %r (an upgrade):"
                         " its DUP marks are dropped as after a move, in case they were another broker's",
                         self.config.thing.mqtt.client_id)
            self._note_session()
            self._say_if_the_session_is_older_than_the_store()
            self.counters.update(protocol=self.connection.protocol, **self.connection.limits.counters())
            self.generation = int.from_bytes(os.urandom(8), "big")
            recycled, self.recycle_due, self.left_on, self.left = self.recycle_due, False, None, 0
            if self.marks_refused:  # the reconnect it waited for came (a drop): nothing left waits
                self.marks_refused = False
                if self.retry_at is None:  # else the store's own refusal stands (`_refused`)
                    self.counters["store_error"] = None
            if new_session:
                self.session_links = set()
            elif (self.retry_at is not None or recycled) and self.session_links:
                # the store refuses: the QoS 1 messages that came on the earlier connections of
                # this session cannot be acknowledged any more, and the broker, which kept the
                # session, resends them all now; kept, each reconnect would add another window
                # to what is held. (Those of a session the broker lost are never resent: kept.)
                # So, too, after a reconnect for messages left with it: none was committed since
                resent = self.session_links
                kept_batch = [p for p in self.batch if not (p.qos and p.generation in resent)]
                if len(kept_batch) != len(self.batch):
                    self.batch = kept_batch
                    self.batch_bytes = self._held_bytes()
            # the session's connections with messages still waiting, and this one (bounded)
            self.session_links = {p.generation for p in self.batch if p.generation in self.session_links}
            self.session_links.add(self.generation)
            if new_session:
                self.stale_marks_until = len(self.batch)
                self._forget_stale_marks(time.monotonic())
            self.window_flush = self.config.store.ingest_commit_batch  # another broker, maybe
            if not self.connection.session_present and self.unwanted:
                # a new session holds only what is subscribed now: nothing more to take away
                self.session_topics, self.unwanted, self.recorded = list(self.topics), [], False
                self.stale.clear()
            if not self.recorded:  # before the SUBSCRIBE: a run killed before its SUBACK
                self._note_session_topics()  # must not leave a filter of the session unnamed
            if self.connection.session_present and self.unwanted:
                # filters an earlier run subscribed in the session the broker kept, no longer
                # configured; before the SUBSCRIBE, so that "connected" means they are gone.
                # At every such connect: a broker may have ignored it (see `_unsubscribed`)
                log.log(logging.DEBUG if self.said_unwanted else logging.INFO,
                        "unsubscribing from %s: no longer configured", ", ".join(self.unwanted))
                self.said_unwanted = True
                for at in range(0, len(self.unwanted), FILTERS_PER_SUBSCRIBE):
                    self.connection.unsubscribe(self.unwanted[at:at + FILTERS_PER_SUBSCRIBE])
            subscribes = self.subscriptions.at_connect(self.connection.subscribe_closes > 0, time.monotonic())
            for chunk in subscribes:
                self.connection.subscribe([(topic, 1) for topic in chunk])
            if not subscribes:  # every filter refused: up, with nothing to receive
                self._report_subscribed()
            return
        self.subscriptions.link_closed(self.connection.unanswered_at_close, self.connection.subscribe_closes,
                                       time.monotonic())
        self.barrier.disconnected()
        self.counters["connected"] = False
        self.counters["subscriptions"] = []
        self.report("mqtt", connected=False, error=error)

    def _forget_stale_marks(self, now: float) -> bool:
        """The broker lost our session, so it resends nothing committed before (or the link is
        on another broker, which never had what the marks count): once what came on the
        earlier connections is committed (a DUP among them may still need its mark, and their
        marks are stale too), drop every mark, before anything of the new session is committed.
        False: the store refused (a refusal like a commit's), and nothing may be committed
        until it drops them."""
        if self.stale_marks_until != 0:
            return True
        try:
            dropped = self.store.forget_unconfirmed()
        except StoreError as exc:
            log.debug("cannot drop the DUP marks of the session the broker lost: %s", exc)
            self._refused(exc, now)
            return False
        self.stale_marks_until = None
        self.barrier.take_settled()  # their confirmations: nothing left to take them off
        whose, self.stale_marks_of = self.stale_marks_of, None
        if whose is not None:
            self._note_session()  # the last link's broker is the new one only now
        if dropped:
            log.info("dropped %d DUP marks of %s", dropped, whose or "the session the broker lost")
        return True

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: List[Any],
                      properties: Any) -> None:
        chunk = self.connection.acknowledged("SUBACK", mid)
        if chunk is None:
            return  # a SUBACK of an earlier connection's SUBSCRIBE
        self.subscriptions.answered(chunk, reason_codes)
        if self.connection.subscribes_due:
            return  # "connected" once every SUBSCRIBE of this connect is answered
        self._report_subscribed()

    def _report_subscribed(self) -> None:
        """Every SUBSCRIBE of the link answered: up, with what the broker granted and the error
        naming what it refused (logged when it is news, not at each reconnect or retry)."""
        granted, error = self.subscriptions.report()
        self.counters["subscriptions"] = granted
        self.counters["connected"] = True
        if error and error != self.said_refused:
            log.error("%s", error)
        self.said_refused = error
        self.report("mqtt", connected=True, error=error, subscriptions=granted)

    def _ask_again(self, now: float) -> float:
        """Ask for a left-out filter again, alone, when due (workers/subscriptions.py); returns
        how long until the next one is."""
        topic, at = self.subscriptions.due(now)
        if topic is not None:
            log.debug("asking the broker again for the subscription to %s", topic)
            rc, _ = self.connection.subscribe([(topic, 1)], again=True)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.subscriptions.asked(topic)
        return max(0.0, at - now)

    def _note_session_topics(self) -> None:
        """Record the filters the broker's session may hold (never fewer: a filter taken out
        of the config is unsubscribed again at each resumed session, and its messages dropped;
        see `_unsubscribed`). A write only when a configured one is new (SD-card wear)."""
        try:
            self.store.note_session_topics(self.config.thing.mqtt.client_id, self.session_topics)
            self.recorded = True
        except StoreError as exc:
            log.warning("cannot remember the topics subscribed in the broker's session: %s", exc)

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        self.connection.acknowledged("UNSUBACK", mid)
        confirmed = self.barrier.on_unsuback(mid)
        self.counters["acks_confirmed"] += confirmed
        if confirmed and self.retry_at is not None:
            self._marks_off_while_refused()

    def _on_publishes(self, found: List[Publish]) -> None:
        """PUBLISH packets as read (publishread.py), into the batch. One clock reading for
        them all: they came in one run of socket reads."""
        now = time.monotonic()
        if not self.batch:
            self._batch_begins(now)
        self.last_arrival = now
        limit, generation = self.config.store.max_payload_bytes, self.generation
        append = self.batch.append
        for raw_topic, payload, qos, retain, mid, dup, properties in found:
            incoming: Optional[Incoming] = None
            if qos and (self.left_on == generation or self._holding_full()):
                self._leave_with_broker(raw_topic)  # whatever it is: no PUBACK after a left one
                continue  # not acknowledged: the broker keeps it and resends it (`_recycle`)
            try:
                topic: Optional[str] = raw_topic.decode()
            except UnicodeDecodeError:  # MQTT requires UTF-8, but a lax broker may pass it on:
                topic = None            # acked and dropped, not a poison message crashing us forever
            if topic is None:
                self.counters["dropped_bad_topic"] += 1
                log.warning("dropped a %d-byte message: its topic %.80r is not valid UTF-8", len(payload),
                            raw_topic)
            elif self.unwanted and self._unsubscribed(topic):
                self.counters["dropped_unsubscribed"] += 1
            elif is_probe(payload, topic, self.probe_topic):  # `flashlexd check`'s: acknowledged, not for the apps
                self.counters["check_probes"] += 1
                log.info("flashlexd check's probe received on %s: acknowledged, not stored", topic)
            elif not qos and self.retry_at is not None and self._full():
                # the store refuses and the batch is full: a QoS 0 message has nowhere else to wait
                self.counters["dropped_qos0_full"] += 1
                if self.counters["dropped_qos0_full"] == 1:
                    log.warning("dropping QoS 0 messages while the store refuses them (first on %s);"
                                " counted in dropped_qos0_full", topic)
                continue  # nothing to acknowledge: not kept in the batch at all
            elif len(payload) + properties_wire_size(kept := properties_of(properties) or None) > limit:
                # MQTT 5 properties (user properties...) are stored with the payload: counted too,
                # as sent (an empty user property counted 0: 52,428 of them passed a 256 KB limit)
                self.counters["dropped_oversize"] += 1
                log.warning("dropped a %d-byte message on %s: over maxPayloadBytes (%d)",
                            len(payload) + properties_wire_size(kept), topic, limit)
            else:
                incoming = Incoming.received(topic, payload, qos, retain, mid, dup,
                                             self._dedupe_key(payload, properties), kept)
                if dup and self._resent_in_batch(mid, incoming.mark, generation):
                    self.counters["duplicates"] += 1
                    incoming = None  # acknowledged with the first, not stored
                else:  # properties are held (and stored) with the payload: counted too
                    self.batch_bytes += len(payload) + properties_size(kept)
            append(_Pending(incoming, mid, qos, generation))
        self.counters["received"] += len(found)
        self.counters["received_straight"] = self.connection.taken_straight

    def _held_bytes(self, held: Optional[List[_Pending]] = None) -> int:
        """The batch's (or `held`'s) payload and MQTT 5 property bytes (BATCH_BYTES bounds them)."""
        return sum(len(p.incoming.payload) + properties_size(p.incoming.properties)
                   for p in (self.batch if held is None else held) if p.incoming)

    def _on_malformed(self, mid: int, qos: int, topic: bytes, why: str) -> None:
        """A PUBLISH paho calls malformed: not stored, acknowledged in its turn when its packet
        id could be read (else the broker keeps it), one WARNING line; ingest goes on."""
        if self._left_in_turn(mid, qos, topic):
            return
        self.counters["dropped_malformed"] += 1
        log.warning("dropped a malformed message (topic %.80r, packet id %s): %s; %s", topic,
                    mid if mid >= 0 else "unreadable", why,
                    "acknowledged" if qos == 1 and mid >= 0 else "not acknowledged")
        self._drop_in_turn(mid, qos)

    def _on_oversize(self, mid: int, qos: int, topic: bytes, size: int) -> None:
        """An MQTT 5 PUBLISH whose properties alone are over maxPayloadBytes, not decoded
        (DialedClient._oversize_properties): dropped as any message over it."""
        if self._left_in_turn(mid, qos, topic):
            return
        self.counters["dropped_oversize"] += 1
        log.warning("dropped a message on %.80s with %d bytes of MQTT 5 properties and payload: over"
                    " maxPayloadBytes (%d)", topic.decode("utf-8", "backslashreplace"), size,
                    self.config.store.max_payload_bytes)
        self._drop_in_turn(mid, qos)

    def _left_in_turn(self, mid: int, qos: int, topic: bytes) -> bool:
        """A QoS 1 message paho reads itself, after one left with the broker on this connection
        (or past a full hold): left too, as `_on_publishes` leaves any (no PUBACK after a left
        one; it was logged "acknowledged" and counted at each copy, re-read 27), and judged
        when the broker sends it again."""
        if not (qos == 1 and mid >= 0 and (self.left_on == self.generation or self._holding_full())):
            return False
        self._leave_with_broker(topic)
        self.counters["received"] += 1
        return True

    def _drop_in_turn(self, mid: int, qos: int) -> None:
        """A message not stored: acknowledged in its turn when its packet id could be read
        (`_left_in_turn` first)."""
        if qos == 1 and mid >= 0:
            now = time.monotonic()
            if not self.batch:
                self._batch_begins(now)
            self.last_arrival = now
            self.batch.append(_Pending(None, mid, qos, self.generation))
        self.counters["received"] += 1

    def _unsubscribed(self, topic: str) -> bool:
        """Whether `topic` came only for a filter taken out of the config: one the session held
        matches it and no configured one does. RabbitMQ 3.10 ignores an UNSUBSCRIBE of what an
        earlier connection subscribed, so their messages keep coming: acknowledged and dropped,
        counted (`dropped_unsubscribed`), the first one said in the log. Anything else is kept,
        whatever its topic looks like. Remembered per topic up to CACHED_TOPIC bytes."""
        stale = self.stale.get(topic)
        if stale is None:
            stale = _matched(self.unwanted, topic) and not _matched(self.topics, topic)
            if len(topic) <= CACHED_TOPIC:
                if len(self.stale) >= STALE_CACHE:
                    self.stale.clear()
                self.stale[topic] = stale
            if stale and not self.counters["dropped_unsubscribed"]:
                log.warning("dropping messages on %s: only a filter taken out of the config matches"
                            " it (the broker kept it in our session); counted in dropped_unsubscribed",
                            topic)
        return stale

    def _resent_in_batch(self, mid: int, mark: Optional[bytes], generation: int) -> bool:
        """A DUP with the packet id and content of a message of this connection still waiting
        in the batch: the broker resent it on the same connection (MQTT 3.1.1 allows that, and
        a full store or the commit window holds its PUBACK back). The store accounts for copies
        per connection (redelivery.py) and would take it for a new one. Only DUPs pay for this."""
        return mark is not None and any(
            p.generation == generation and p.mid == mid and p.incoming is not None
            and p.incoming.mark == mark for p in self.batch)

    def _dedupe_key(self, payload: bytes, properties: Any) -> Optional[bytes]:
        """The message's application key, when `flashlex.app.db.dedupe` is set; a message
        without one is stored normally and counted in `dedupe_keyless`."""
        if self.dedupe is None:
            return None
        key = self.dedupe.of(payload, properties)
        if key is None:
            self.counters["dedupe_keyless"] += 1
        return key

    # -- commit -----------------------------------------------------------------------------------

    def _batch_begins(self, now: float) -> None:
        self.batch_started = now
        self.batch_busy_since = self.busy()
        self.remainder = False

    def _commit_all(self, now: float) -> None:
        """At a stop (not judged by heartbeats: no batch's worth), all held, until the store
        refuses."""
        while self.batch:
            held = len(self.batch)
            self._commit(now, whole=True)
            if len(self.batch) == held:
                return

    def _commit(self, now: float, whole: bool = False) -> None:
        """Commit a batch's worth (`whole`: all held), or its longest prefix that fits, then ack
        what was committed."""
        if not self._forget_stale_marks(now):
            return
        count = min(len(self.batch), self.stale_marks_until or len(self.batch),
                    len(self.batch) if whole else self.fit.size)
        settled = self.barrier.take_settled()
        while True:
            messages = [p.incoming for p in self.batch[:count] if p.incoming is not None]
            links = [p.generation for p in self.batch[:count] if p.incoming is not None]
            try:
                window = self.dedupe.window_seconds if self.dedupe else None
                # MQTT 5 requires a resend under the original packet id (mosquitto keeps it
                # under 3.1.1 too, RabbitMQ 3.10, 3.1.1 only, renumbers)
                ids = self.store.append(messages, settled=settled, dedupe_window=window, links=links,
                                        ids_kept=self.connection.protocol == V5) if messages else []
                # back from a commit the disk stalled: a heartbeat before the batch's acks, which
                # the supervisor, no longer seeing state D, would take for a hang (re-read 25)
                self._heartbeat(time.monotonic())
                break
            except (StoreFull, DiskFull) as exc:
                if count == 1:
                    self.barrier.give_back(settled)
                    self._refused(exc, now)
                    return
                count //= 2  # a batch bigger than the free space (cap or disk) must not block what fits
            except StoreError as exc:
                self.barrier.give_back(settled)
                self._refused(exc, now)
                return
        if not messages:
            self.barrier.give_back(settled)  # nothing was written: they wait for the next commit
        self.counters["marks_settled"] += len(settled) if messages else 0
        if self.retry_at is not None:
            log.debug("store accepts messages again; resuming")
            self.refusals.stored(now)
        self.retry_at = None
        self.counters["store_full"] = False
        self.counters["store_error"] = None
        self.marks_refused = False
        new = [i for i in ids if i is not None]
        self.counters["stored"] += len(new)
        self.counters["duplicates"] += len(ids) - len(new)
        self.counters["batches"] += 1
        committed, self.batch = self.batch[:count], self.batch[count:]
        if self.stale_marks_until:
            self.stale_marks_until -= count
        self.batch_bytes -= self._held_bytes(committed)  # not the remainder again, chunk by chunk
        acked = []
        with coalesced_acks(self.connection.client):
            for pending in committed:
                if pending.qos and pending.generation == self.generation and self.connection.connected:
                    self.connection.client.ack(pending.mid, pending.qos)
                    if pending.incoming is not None:
                        acked.append(pending.incoming)
        self.barrier.sent_acks(acked)
        self.fit.took(count, self.busy() - self.batch_busy_since)
        if self.batch:
            self._batch_begins(self.batch_started)
        self.remainder = bool(self.batch)  # due already: no commit window, no window learnt
        if new:
            self.report("committed")
        self._forget_stale_marks(now)
        if self.left_on == self.generation and self.connection.connected and not self.batch:
            self.recycle_due = True  # all held is stored: have the broker resend what it kept

    def _leave_with_broker(self, topic: bytes) -> None:
        """A QoS 1 message (whatever its topic) past a full batch that is not being committed, or
        after one such on this connection: not acknowledged and not kept (the broker keeps it), so that the
        ingress's memory does not grow with the broker's window (1,890 messages held under
        MQTT 5 before)."""
        self.counters["left_with_broker"] += 1
        self.left += 1
        if self.left_on != self.generation:
            self.left_on = self.generation
            count = self._left_lines.due("left", time.monotonic())
            (log.info if count else log.debug)(
                "holding %d messages (a full batch) while the store refuses: leaving further QoS 1"
                " messages with the broker, unacknowledged (first on %s)%s", len(self.batch),
                topic.decode("utf-8", "backslashreplace"),
                since_last(count, "such episodes"))

    def _recycle(self, now: float) -> float:
        """Reconnect, session kept, for the messages left with the broker, once its gap since
        the last such reconnect has passed and the broker has confirmed every PUBACK sent, their
        marks taken off in the store (a kill right after the reconnect must not leave one to
        take a resend of the same content for a redelivery). Seconds until it wants to run."""
        wait = self.recycle_pace.wait(now)
        if wait:
            return wait
        if self.barrier.unconfirmed():
            return float("inf")  # the UNSUBACK confirming them wakes the loop
        refused = self._take_confirmed_marks_off()
        if refused:
            self._recycle_waits(refused, now)
            return RETRY_SECONDS
        if self.marks_refused:  # said: now it goes on
            self.marks_refused = False
            self.counters["store_error"] = None
            log.info("confirmed DUP marks taken off; the messages left with the broker come next")
        if not self.connection.recycle():
            return float("inf")
        self.recycle_pace.went(now, self.counters["stored"], self.counters["left_with_broker"])
        count = self._left_lines.due("resent", now)
        (log.info if count else log.debug)(
            "the store took all that was held: reconnecting so that the broker resends the %d messages"
            " left with it%s", self.left, since_last(count, "such reconnects"))
        return float("inf")

    def _recycle_waits(self, refused: str, now: float) -> None:
        """The messages left with the broker wait for the marks to go off, and what arrives
        meanwhile is left there too: said, and shown by `status` (a full disk kept them off
        for good with a DEBUG line, the status healthy; review "diskfull")."""
        self.marks_refused = True
        self.counters["store_error"] = f"{refused} (the {self.left} messages left with the broker wait for it)"
        count = self._left_lines.due("marks", now)
        if count:
            log.warning("%s: the %d messages left with the broker are not asked for again until it"
                        " works%s", refused, self.left, since_last(count, "tries"))

    def _take_confirmed_marks_off(self) -> Optional[str]:
        """Write off the DUP marks of the PUBACKs the broker has confirmed since the last
        commit. On a refusal they go back to the barrier for the next try: the reason, or None."""
        settled = self.barrier.take_settled()
        if not len(settled):
            return None
        try:
            self.store.append([], settled=settled)
        except StoreError as exc:
            self.barrier.give_back(settled)
            return "cannot take %d confirmed DUP marks off: %s" % (len(settled), exc)
        self.counters["marks_settled"] += len(settled)
        return None

    def _refused(self, exc: StoreError, now: float) -> None:
        """Keep the batch unacknowledged (the broker holds the messages) and retry later."""
        self.refusals.refused(exc, now, len(self.batch), retry=self.retry_at is not None)
        self.counters["store_full"] = isinstance(exc, StoreFull)
        self.counters["store_error"] = str(exc)  # shown by `status` until a commit succeeds
        self.retry_at = now + RETRY_SECONDS
        self.batch_busy_since = self.busy()  # holding is no batch's work (BatchFit, re-read)
        self._marks_off_while_refused()

    def _marks_off_while_refused(self) -> None:
        """Confirmed marks go with the next commit, and while the store refuses there is none:
        they stayed for the whole refusal, and after a kill the broker's resends of as many
        held or left messages of that content were taken for redeliveries, lost (re-read 24;
        up to 1,500 a kill, review "samecontent", while they waited 5 s). Taking marks off
        needs no room, so a refusing store takes them alone, at once: at its cap, refusing a
        batch's rest every second, that is one more commit a second (SD-card wear, the price of
        losing none)."""
        refused = self._take_confirmed_marks_off()
        if refused:
            log.debug("%s", refused)


def _matched(filters: Sequence[str], topic: str) -> bool:
    """Whether one of `filters` matches `topic` as a broker delivers it: a shared
    subscription's (`$share/GROUP/FILTER`) by its FILTER, and under RabbitMQ, which turns a
    topic's `.` into `/`, by the filter with its dots turned too."""
    for topic_filter in filters:
        if topic_filter.startswith("$share/") and topic_filter.count("/") >= 2:
            topic_filter = topic_filter.split("/", 2)[2]
        if topic_matches(topic_filter, topic) or topic_matches(topic_filter.replace(".", "/"), topic):
            return True
    return False
