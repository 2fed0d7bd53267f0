"""The egress worker: outbox -> broker, deleting an entry only after the broker acknowledged it.

Entries go out oldest first, each at its own topic and QoS, with up to `maxInflight` published
and not yet acknowledged, paced by a `PublishBudget` (`publishRatePerSecond`,
`publishBytesPerSecond`: AWS IoT Core drops publishes over its quotas without a PUBACK). A
PUBACK moves the entry's id to a done list, deleted in one store transaction (one fsync) once
it holds a window's worth, nothing is in flight any more, or its oldest id waited DELETE_DELAY.
So the outbox only ever loses entries the broker has; a kill before the delete just sends them
again.

Resends are ours, not paho's: every connection uses a fresh paho client, and when a link drops
the entries it had in flight are sent again from the store, oldest first, through the same
budget (a reconnect does not burst past the quota). Every entry is delivered at least once, in
order per topic; duplicates are bounded by the in-flight window per drop. A link that drops with
entries in flight makes the drain careful (`PoisonWatch`): one entry at a time,
and one that is alone in flight for `poisonAttempts` drops goes to the dead letters, named in
one WARNING line; then the drain goes on at full speed.

QoS 0 entries are deleted just before paho gets them, a drain pass's in one transaction: at
most once, as their QoS says (a kill between the two loses them, never sends them twice).

MQTT 5 says why: a PUBACK with a failure reason (0x87 Not authorized, 0x99 Payload format
invalid...) dead-letters its entry at once under that reason's name, except 0x97 Quota
exceeded, which passes: the entry goes out again after a pause, unless it is refused
`poisonAttempts` times as the first entry sent after a pause while later ones are accepted
(quotarefusals.py). An entry larger
than the broker's Maximum Packet Size (its CONNACK) is dead-lettered instead of sent, and the
in-flight window is also bounded by the broker's Receive Maximum. An entry published with
properties carries them (MQTT 5; 3.1.1 has none to send); one with a message expiry that passed
before it was sent is dropped instead, counted in `expired`, one INFO line per drain pass.

Waking: the supervisor sends `OutboxQueued` when something was queued; every
OUTBOX_RECHECK seconds the worker also looks by itself. `drainingFrequency` (the FlashLex SDK's
drain rate, see `config._publish_rate`) paces the entries the outbox holds when the link comes
up, a budget of their own; the entries queued after them go at `publishRatePerSecond`.
"""
from __future__ import annotations

import logging
import math
import struct
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from paho.mqtt.enums import MQTTErrorCode

from flashlexd.linkmsg import LinkMessage, MqttReport, OutboxQueued
from flashlexd.linkwatch import Verdict
from flashlexd.logs import LineThrottle, since_last
from flashlexd.mqtt import Connection
from flashlexd.mqttv5 import QUOTA_EXCEEDED, V5, publish_packet_size, publish_properties, reason_name
from flashlexd.ratelimit import PublishBudget, describe_rate, paced_rate
from flashlexd.store import OutboxEntry, Store, StoreDamaged, StoreError
from flashlexd.wire import PUBACK_STALLED
from flashlexd.workers.base import Worker
from flashlexd.workers.linkmemory import (connect_ago, earlier_session, fell_back_before,
                                          noting_connects, noting_fallback)
from flashlexd.workers.offlinebacklog import OfflineBacklog
from flashlexd.workers.poison import PATH_CUTS, PoisonWatch
from flashlexd.workers.quotarefusals import QuotaRefusals

log = logging.getLogger(__name__)

DELETE_DELAY = 0.02   # seconds an acknowledged entry may wait for the next delete transaction
OUTBOX_RECHECK = 2.0  # seconds between looks at the outbox without a wake-up
EXPIRY_SWEEP_PAGE = 100  # outbox entries looked at per OUTBOX_RECHECK while the link is down


class _InFlight(NamedTuple):
    entry_id: int
    topic: str
    size: int


class _Drop(NamedTuple):
    """A link the broker closed with entries in flight, judged at the next connection: only a
    broker that took the first attempt after it can have closed it over an entry."""
    sent: List[_InFlight]
    error: Optional[str]
    attempts: int       # the connection's attempts when it dropped
    path_cut: bool    # no TLS close from the broker, or (MQTT 5) before it had all we sent: a fraction


class EgressWorker(Worker):
    name = "egress"

    def setup(self) -> None:
        mqtt = self.config.thing.mqtt
        self.store = Store.from_config(self.config.store, create=False)
        seen_at = earlier_session(self.store, mqtt.egress_client_id)
        self.connection = Connection(self.config, mqtt.egress_client_id, self._on_change,
                                     on_publish=self._on_publish, fresh_client=True, session_seen_at=seen_at,
                                     fell_back=fell_back_before(self.store, mqtt.egress_client_id,
                                                                self.config.thing.broker_identity),
                                     on_fall_back=noting_fallback(self.store, mqtt.egress_client_id,
                                                                  self.config.thing.broker_identity),
                                     connected_ago=connect_ago(self.name, seen_at),
                                     on_connect_sent=noting_connects(self.name))
        self.window = mqtt.max_inflight
        self.bytes_limit = mqtt.publish_bytes_rate
        self.mean_size = 0.0  # of the entries sent lately: the byte limit's rate in entries/s
        self.online_budget = PublishBudget(mqtt.publish_rate, mqtt.publish_bytes_rate)
        self.backlog_budget = PublishBudget(mqtt.backlog_rate or 0, mqtt.publish_bytes_rate)
        self.offline = self._offline_backlog()  # an earlier egress's, across its restarts
        self.link_up = False
        self.poison = PoisonWatch(mqtt.poison_attempts)
        self.inflight: Dict[int, _InFlight] = {}  # packet id -> entry, in the order sent
        self.unacked_since: Dict[int, float] = {}  # entry id -> first sent, until acknowledged
        # the last PUBACK (whatever its reason), or the first send into an empty window since
        self.answered_at = 0.0
        self.unacknowledged_links = (0, 0)         # (oldest entry id, links in a row it stalled)
        self.drop_to_judge: Optional[_Drop] = None  # the last link's drop, judged at the next CONNACK
        self.done: List[int] = []           # acknowledged, to delete
        self.done_since = 0.0               # when the oldest of them was acknowledged
        self.cursor = 0                     # the newest outbox id handed to paho
        self.more = True                    # the outbox may hold entries past the cursor
        self.next_check = 0.0
        self.quota_refusals = QuotaRefusals(mqtt.poison_attempts)
        self._quota_lines = LineThrottle()
        self.sweep_after = 0                # the offline expiry sweep's place in the outbox
        self.meter_start, self.meter_count, self.send_rate = time.monotonic(), 0, 0.0
        self.counters.update(sent=0, inflight=0, outbox_backlog=self.store.outbox_count(),
                             connected=False, invalid=0, rate_limit=mqtt.publish_rate,
                             bytes_limit=mqtt.publish_bytes_rate, send_rate=0.0, eta_s=None,
                             throttled=0, dead_lettered=0, oldest_inflight_age=None,
                             sessions_lost=0, one_at_a_time=False, protocol=None, refused=0,
                             expired=0, stalled_entry=None, delete_error=None,
                             quota_pauses_in_a_row=0, clone_suspected=None)
        self._delete_lines = LineThrottle()
        log.info("egress rate: %s", describe_rate(mqtt.publish_rate, mqtt.publish_bytes_rate,
                                                  mqtt.backlog_rate, mqtt.max_inflight))

    # -- loop hooks -------------------------------------------------------------------------------

    def wait_fds(self) -> Tuple[Sequence[Any], Sequence[Any]]:
        return self.connection.wait_fds()

    def on_ready(self, readable: List[Any], writable: List[Any]) -> None:
        self.connection.on_ready(readable, writable)

    def on_command(self, message: LinkMessage) -> None:
        if isinstance(message, OutboxQueued):
            self.more = True

    def tick(self, now: float) -> float:
        wait = self.connection.service()
        if self.done and (len(self.done) >= self.window or not self.inflight
                          or now - self.done_since >= DELETE_DELAY):
            self._delete_done()
        elif self.done:
            wait = min(wait, self.done_since + DELETE_DELAY - now)
        if now >= self.next_check:
            self.next_check = now + OUTBOX_RECHECK
            self.more = True
            self.counters["outbox_backlog"] = self.store.outbox_count()
            self.counters["stalled_entry"] = self._stalled_entry()
            if not self.connection.connected:
                self._sweep_expired()
        if self.more and self.connection.connected:
            wait = min(wait, self._publish_more())
        self.connection.entry_drops_excused = self.poison.excuses_drops
        self.counters["quota_pauses_in_a_row"] = self.quota_refusals.pauses_in_a_row(now)
        self.counters["clone_suspected"] = self.connection.clone_suspected()
        self._update_counters(now)
        return max(0.0, min(wait, self.next_check - now))

    def shutdown(self) -> None:
        budget = self.link_stop_budget()
        # a graceful stop (a reload, a restart) reads the PUBACKs of what is in flight before
        # the DISCONNECT: else the next worker sends all of it again
        self.connection.pump_until(lambda: not self.inflight, budget / 2)
        self.connection.close(budget / 2)
        self._delete_done()  # PUBACKs read while closing
        if self.link_up:  # all queued so far was queued online: not the next egress's backlog
            self._mark_link_down()
        self.store.close()

    # -- MQTT -------------------------------------------------------------------------------------

    def _on_change(self, connected: bool, error: Optional[str]) -> None:
        self.counters["connected"] = connected
        if connected:
            limits = self.connection.limits
            self.window = min(self.config.thing.mqtt.max_inflight, limits.receive_maximum or math.inf)
            self.counters.update(protocol=self.connection.protocol, **limits.counters())
            self._note_session()
            self._judge_drop()
            self.more = True
            self._mark_backlog()
            self.quota_refusals.new_burst()
        else:
            self._end_probe()  # first: the head goes back into what is queued while down
            self._mark_link_down()
            if self.inflight and not self.connection.closing:
                self._link_dropped(error)
        self.report(MqttReport.kind, connected=connected, error=error)

    def _mark_link_down(self) -> None:
        """The link went down: what is queued from now on is queued while it is down."""
        if self.link_up and self.config.thing.mqtt.backlog_rate:
            try:
                self.offline.link_down(self.cursor, self.store.outbox_last_id())
                self.store.note_queued_online(self.offline.queued_online_through or 0,  # for a restarted egress
                                              self.offline.ranges)
            except StoreError as exc:  # damage is logged by the store
                log.debug("outbox's last id not read: %s", exc)
        self.link_up = False

    def _offline_backlog(self) -> OfflineBacklog:
        """The marks an earlier egress left, pinned now: one killed with its link up left the
        link noted up, which takes all the outbox for queued online; should this one stop
        before its link comes up, what apps queue meanwhile was taken so too (re-read 33).
        Without `drainingFrequency`, none (ranges left by a config that had it drained at no
        rate at all, re-read 33)."""
        if not self.config.thing.mqtt.backlog_rate:
            return OfflineBacklog(None, [])
        try:
            backlog = OfflineBacklog(self.store.queued_online(), self.store.backlog_ranges())
        except StoreError as exc:  # damage is logged by the store
            log.debug("last id queued online not read: %s", exc)
            return OfflineBacklog(None, [])
        if backlog.queued_online_through is not None:
            try:  # not pinned (a busy or read-only store): the marks read still hold here
                self.store.note_queued_online(backlog.queued_online_through, backlog.ranges)
            except StoreError as exc:
                log.debug("backlog marks not pinned: %s", exc)
        return backlog

    def _mark_backlog(self) -> None:
        """With `drainingFrequency`: what was queued while the link was down (at the start:
        all the outbox holds) drains at that rate, the FlashLex SDK's offline queue."""
        self.link_up = True
        if not self.config.thing.mqtt.backlog_rate:
            return
        try:
            self.offline.link_up(self.store.outbox_last_id(), not self.store.outbox_count())
            # for an egress replacing this one should it die (SIGKILL)
            self.store.note_link_up(self.offline.queued_online_through or 0, self.offline.ranges)
        except StoreError as exc:  # damage is logged by the store
            log.debug("backlog not marked: %s", exc)

    @property
    def budget(self) -> PublishBudget:
        """The backlog's budget while the drain is in it, else the link's."""
        return self.backlog_budget if self.offline.holds(self.cursor) else self.online_budget

    @property
    def rate_limit(self) -> float:
        mqtt = self.config.thing.mqtt
        return (mqtt.backlog_rate or 0.0) if self.budget is self.backlog_budget else mqtt.publish_rate

    def _note_session(self) -> None:
        try:
            self.store.note_session(self.config.thing.mqtt.egress_client_id, time.time())
        except StoreError as exc:
            log.warning("cannot remember that the broker holds our session: %s", exc)

    def _on_publish(self, mid: int, reason: Any = None) -> None:
        sent = self.inflight.pop(mid, None)
        if sent is None:
            return
        self.answered_at = time.monotonic()
        refused = reason is not None and reason.is_failure
        if refused:
            self.counters["refused"] += 1
        if refused and reason.value == QUOTA_EXCEEDED:
            self._over_quota(sent, reason_name(reason))
            return
        # the refused entry a probe went before goes again: after a pause when the probe was
        # accepted, so that a rate quota the probe spent is refilled for it
        self._end_probe(None if refused else time.monotonic())
        self.poison.acknowledged(sent.entry_id)
        if not refused:
            self._done(sent.entry_id)
            return
        self._dead_letter(sent, f"refused by the broker: {reason_name(reason)}", 1)

    def _over_quota(self, sent: _InFlight, reason: str) -> None:
        """A throttle passes: the entry goes again after a pause (quotarefusals.py); one refused
        as the first sent after a pause, over and over, goes to the dead letters so the entries
        behind it can go."""
        refusals, now = self.quota_refusals, time.monotonic()
        self.poison.answered(sent.entry_id)  # no drop is its doing: sent alone, never told apart
        if refusals.refused(sent.entry_id, now):
            if not self._dead_letter(sent, f"refused by the broker {refusals.attempts} times: {reason},"
                                     f" while later entries were accepted", refusals.attempts):
                self.cursor = min(self.cursor, sent.entry_id - 1)  # not moved: sent again, not left
                self.more = True
            return
        # only probes are sent while one is on: a refused one leaves the cursor past it, and the
        # next entry probes after the pause (two refused in a row held a paced drain for good)
        if refusals.probing is None:
            if not self.inflight and self.cursor == sent.entry_id:  # alone: the next one goes first
                refusals.probe_before(sent.entry_id)
            else:
                self.cursor = min(self.cursor, sent.entry_id - 1)
        self.more = True
        count = self._quota_lines.due(now)
        if count:
            log.warning("broker refused outbox entry %d: %s; sending again in %.3gs%s", sent.entry_id,
                        reason, refusals.paused_until - now, since_last(count, "such refusals"))

    def _end_probe(self, now: Optional[float] = None) -> None:
        probed = self.quota_refusals.end_probe(now)
        if probed is not None:
            self.cursor = min(self.cursor, probed - 1)
            self.more = True

    def _done(self, entry: int) -> None:
        self.unacked_since.pop(entry, None)
        self.quota_refusals.accepted(entry)
        if entry == self.unacknowledged_links[0]:  # it went through after all
            self.unacknowledged_links = (0, 0)
            self.counters["stalled_entry"] = None
        if not self.done:
            self.done_since = time.monotonic()
        self.done.append(entry)

    def _link_dropped(self, error: Optional[str]) -> None:
        """Forget the dead connection's packet ids; its entries go out again from the store."""
        sent = list(self.inflight.values())
        overtaken = self.connection.watch.overtaken_mid() if self.connection.last_verdict is Verdict.OVERTAKEN else None
        skipped = None if overtaken is None else self.inflight.get(overtaken)
        self.inflight.clear()
        if skipped is not None and self.poison.skipped(skipped.entry_id):
            attempts = self.poison.attempts
            self._dead_letter(skipped, f"the broker acknowledged later publishes but never this one,"
                              f" on {attempts} connections in a row", attempts)
        # only a link the broker closed itself can be an entry's fault: one we closed because it
        # went silent or stopped acknowledging (a frozen broker, a quota) says nothing about an entry
        if self.connection.last_verdict is None and not self.connection.closed_for_other_cause:
            self.drop_to_judge = _Drop(sent, error, self.connection.attempts,
                                       self.connection.cut_by_path)
        elif self.connection.last_verdict is Verdict.UNACKNOWLEDGED and sent:
            if len(sent) == 1:
                self._unacknowledged_again(sent[0])  # only a stall of one entry alone names it
            else:
                self.poison.stalled([s.entry_id for s in sent])
        self._delete_done()  # so acknowledged entries are not sent again
        # the lowest id, not the first sent: after a 0x97 rewind an entry is sent again after
        # later ones still in flight
        self.cursor = min(self.cursor, min(s.entry_id for s in sent) - 1)
        self.more = True

    def _judge_drop(self) -> None:
        """Count the last drop against its entries only if the broker took the first attempt
        after it: a broker that refuses an entry closes the link and takes the next CONNECT at
        once, while a broker restarting or a path cut (a flaky cellular link, a NAT) fails the
        attempts until it is back; three of those used to dead-letter a healthy entry."""
        drop, self.drop_to_judge = self.drop_to_judge, None
        if drop is None or self.connection.attempts != drop.attempts + 1:
            return
        victim = self.poison.dropped([s.entry_id for s in drop.sent], drop.path_cut)
        if victim is not None:
            drops = self.poison.culprit_drops  # the path's cuts included: what `outbox --dead` shows
            times = "once" if drops == 1 else f"{drops} times"
            self._dead_letter(drop.sent[0], f"the link dropped {times} while it was alone in flight"
                              f" (a cut without the broker's TLS close, or before it had the entry whole,"
                              f" counts as 1/{PATH_CUTS});"
                              f" last: {drop.error or 'closed by the broker'}", drops)

    def _unacknowledged_again(self, oldest: _InFlight) -> None:
        """A slow or throttling broker and one that took an entry it refuses without a word
        (RabbitMQ over its max_message_size: nothing after it is acknowledged on that link)
        look the same, so such links are no poison search's evidence (a healthy entry would be
        dead-lettered behind a slow broker); the entry is sent again, and once it has been
        alone unacknowledged on `poisonAttempts` such links in a row, one WARNING names it."""
        entry, links = self.unacknowledged_links
        links = links + 1 if entry == oldest.entry_id else 1
        self.unacknowledged_links = (oldest.entry_id, links)
        if links == self.poison.attempts:
            log.warning("outbox entry %d (topic %s, %d bytes with its topic) was not acknowledged on %d links in a"
                        " row while the broker still answered: it is slow, throttling, or refusing"
                        " this entry without a word (RabbitMQ over its max_message_size); it is sent"
                        " again, and if it stays so, `flashlexctl outbox drop %d` gives it up",
                        oldest.entry_id, oldest.topic, oldest.size, links, oldest.entry_id)

    def _stalled_entry(self) -> Optional[int]:
        """The entry that WARNING named while it is still queued: `status` is degraded, as the
        outbox is stuck behind it (the stall was in the log only)."""
        entry, links = self.unacknowledged_links
        if links < self.poison.attempts:
            return None
        queued = self.store.outbox_peek(limit=1, after=entry - 1)
        if queued and queued[0].id == entry:
            return entry
        self.unacknowledged_links = (0, 0)  # dropped or dead-lettered since
        return None

    def _dead_letter(self, sent: _InFlight, reason: str, attempts: int) -> bool:
        """Move an entry aside (one WARNING; the log escapes the topic), so the rest can go;
        False when the store refused (the entry is still queued)."""
        try:
            moved = self.store.outbox_dead_letter(sent.entry_id, reason, attempts)
        except StoreError as exc:
            log.error("cannot move outbox entry %d to the dead letters (tried again at its next"
                      " drop): %s", sent.entry_id, exc)
            return False
        self.unacked_since.pop(sent.entry_id, None)
        if moved:
            self.counters["dead_lettered"] += 1
            log.warning("outbox entry %d (topic %s, %d bytes with its topic) moved to the dead letters"
                        " after %d attempt%s: %s", sent.entry_id, sent.topic, sent.size, attempts,
                        "" if attempts == 1 else "s", reason)
        return True

    # -- the outbox -------------------------------------------------------------------------------

    def _publish_more(self) -> float:
        """Hand entries to paho within the window and the budget; seconds until more may go."""
        room = self.poison.window(self.window) - len(self.inflight)
        if room <= 0:
            return math.inf  # a PUBACK wakes us
        if self.quota_refusals.waits_for_window(bool(self.inflight), time.monotonic()):
            return math.inf  # a PUBACK wakes us
        pause = self.quota_refusals.paused_until - time.monotonic()
        if pause > 0:
            return pause
        allowance = self.budget.allowance(room)
        if allowance <= 0:
            return self.budget.wait(1)
        try:
            entries = self.store.outbox_peek(limit=allowance, after=self.cursor)
        except StoreDamaged:  # logged once by the store; nothing can be sent from it
            self.more = False
            return math.inf
        if not entries and self.quota_refusals.probing is not None:  # none to send before it
            self._end_probe()
            return 0.0
        self.more = len(entries) == allowance
        if not self.inflight and self.unacked_since:  # what is below the next entry left the outbox
            below = entries[0].id if entries else math.inf
            probing = self.quota_refusals.probing  # the head waiting for a probe is still queued
            self._forget_unacked_below(below if probing is None else min(below, probing))
        done = set(self.done)
        flying = {s.entry_id for s in self.inflight.values()}
        expired: List[OutboxEntry] = []
        ready: List[Tuple[OutboxEntry, int]] = []  # within the budget, with their sizes
        wait = 0.0
        for entry in entries:
            if entry.id in done or entry.id in flying:  # acknowledged (delete to come), or awaited
                self.cursor = entry.id
                continue
            if _expiry_left(entry) == 0:
                expired.append(entry)
                self.cursor = entry.id
                continue
            size = len(entry.payload) + len(entry.topic.encode("utf-8"))
            wait = self.budget.wait(size)
            if wait > 0:
                self.more = True
                break
            if not self._unsendable(entry, size):
                self.budget.spend(1, size)
                if self.budget is not self.online_budget:  # the link's quota counts these too: its
                    self.online_budget.spend(1, size)      # bucket left full burst past it (re-read 30)
                ready.append((entry, size))
            self.cursor = entry.id
        self._drop_expired(expired)  # the cursor is past them: now or never
        if not self._send(ready):
            self.more = True
            return math.inf  # not sent: retried after the reconnect (or the next look)
        if wait > 0:
            return wait
        more_room = self.more and len(self.inflight) < self.poison.window(self.window)
        return 0.0 if more_room else math.inf  # QoS 0 entries free their slots at once

    def _sweep_expired(self) -> None:
        """While the link is down the drain reaches nothing: entries whose message expiry
        passed are dropped here, a page per look, so that they do not hold the outbox's cap
        (offlinePublishQueueing, the store's) against fresh publishes."""
        try:
            entries = self.store.outbox_peek(limit=EXPIRY_SWEEP_PAGE, after=self.sweep_after)
        except StoreError:  # damage is logged by the store; the drain says the rest
            return
        self.sweep_after = entries[-1].id if len(entries) == EXPIRY_SWEEP_PAGE else 0
        self._drop_expired([e for e in entries if _expiry_left(e) == 0])

    def _drop_expired(self, expired: List[OutboxEntry]) -> None:
        """Entries whose message expiry passed before they could be sent: dropped, counted."""
        if not expired:
            return
        try:
            dropped = self.store.outbox_drop([e.id for e in expired], expired=True)
        except StoreError as exc:
            log.error("cannot drop %d expired outbox entries (tried again next pass): %s", len(expired), exc)
            return
        self.counters["expired"] += dropped
        self.counters["outbox_backlog"] = self.store.outbox_count()  # offline, nothing else reads it
        for entry in expired:  # one sent before a drop: its age must not stay the oldest
            self.unacked_since.pop(entry.id, None)
        log.info("dropped %d outbox entries whose message expiry passed before they were sent"
                 " (oldest: entry %d, topic %s)", dropped, expired[0].id, expired[0].topic)

    def _unsendable(self, entry: OutboxEntry, size: int) -> bool:
        """Dead-letter an entry the broker's limits refuse (sent, it would close the link, at
        each attempt); True when it did."""
        limit = self.connection.limits.max_packet_size
        refused = self.connection.limits.refuses(entry.qos, entry.retain)
        if refused is None and limit:
            packet = publish_packet_size(entry.topic, entry.payload, entry.properties, _expiry_left(entry),
                                         entry.qos)
            if packet > limit:  # its properties count: the packet's size is named, not the payload's
                refused = f"its {packet}-byte packet is larger than the broker's Maximum Packet Size ({limit} bytes)"
        if refused is None and entry.qos == 0:  # it leaves the store before paho sees it: what
            refused = self._paho_refuses(entry)  # paho would refuse is found while it can be kept
        if refused is not None:
            self._dead_letter(_InFlight(entry.id, entry.topic, size), refused, 0)
        return refused is not None

    def _paho_refuses(self, entry: OutboxEntry) -> Optional[str]:
        """Why paho's publish would raise for `entry` (its own checks: a wildcard or empty
        topic, properties it cannot pack; an entry queued before the API checked them), as a
        dead letter's reason; else None."""
        topic = entry.topic.encode("utf-8")
        if b"+" in topic or b"#" in topic or len(topic) > 0xFFFF or (not topic and self.connection.protocol != V5):
            reason = "the topic is empty, too long or holds a wildcard"
        else:
            try:
                properties = publish_properties(entry.properties, _expiry_left(entry))
                if properties is not None and self.connection.protocol == V5:
                    properties.pack()
                return None
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                reason = str(exc)
        self.counters["invalid"] += 1
        return f"not publishable: {reason}"

    def _send(self, ready: List[Tuple[OutboxEntry, int]]) -> bool:
        """Hand `ready` to paho, oldest first; False when one was not taken (the link is down:
        the cursor goes back to it). QoS 0 is at most once (README "Delivery guarantees"): those
        entries leave the store first, all of the pass's in one transaction (one fsync, not one
        per entry), so a kill before paho wrote them cannot send them again at the next start."""
        qos0 = [entry.id for entry, _ in ready if entry.qos == 0]
        if qos0 and self._remove(qos0, "QoS 0") is None:
            self.cursor = min(self.cursor, ready[0][0].id - 1)
            return False
        for entry, size in ready:
            if not self._publish(entry, size):
                self.cursor = min(self.cursor, entry.id - 1)  # a QoS 0 one behind it is lost
                return False
        return True

    def _publish(self, entry: OutboxEntry, size: int) -> bool:
        """Hand one entry to paho; False when it was not taken."""
        try:
            info = self.connection.publish(entry.topic, entry.payload, entry.qos, entry.retain,
                                           publish_properties(entry.properties, _expiry_left(entry)))
        except (ValueError, TypeError, OverflowError, struct.error) as exc:
            # a wildcard topic, or properties paho cannot pack (an entry queued before the API
            # checked them): it could never go out, and must not crash the worker at each start
            self.counters["invalid"] += 1
            if entry.qos == 0:  # already out of the store (_paho_refuses missed it): nothing to keep
                log.warning("QoS 0 outbox entry %d (topic %s) not publishable, dropped: %s",
                            entry.id, entry.topic, exc)
            else:
                self._dead_letter(_InFlight(entry.id, entry.topic, size), f"not publishable: {exc}", 0)
            return True
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self.mean_size = size if not self.mean_size else 0.9 * self.mean_size + 0.1 * size
        self.meter_count += 1
        if entry.qos == 0:
            self.counters["sent"] += 1  # already out of the store
        else:
            self.quota_refusals.sending(entry.id)  # only a PUBACK can refuse
            if not self.inflight:
                self.answered_at = time.monotonic()
            self.inflight[info.mid] = _InFlight(entry.id, entry.topic, size)
            self.unacked_since.setdefault(entry.id, time.monotonic())
        return True

    def _forget_unacked_below(self, next_id: float) -> None:
        """Entries no longer in the outbox (dropped by an operator while unacknowledged) have no
        age: `oldest_inflight_age` must not grow forever for them."""
        for entry_id in [e for e in self.unacked_since if e < next_id]:
            del self.unacked_since[entry_id]

    def _delete_done(self) -> None:
        if not self.done:
            return
        removed = self._remove(self.done, "sent")
        if removed is not None:
            self.counters["sent"] += removed
            self.done = []

    def _remove(self, ids: List[int], what: str) -> Optional[int]:
        """Delete `ids` from the outbox in one transaction: how many went (not those an operator
        dropped meanwhile), None when the store failed (logged, but damage: the store logs it)."""
        try:
            removed = self.store.outbox_remove(ids)
        except StoreError as exc:
            self.counters["delete_error"] = str(exc)  # `status`: degraded while it lasts
            count = self._delete_lines.due(time.monotonic())  # a retry every 0.2 s: 5 lines a second
            if count and not isinstance(exc, StoreDamaged):
                log.error("cannot delete %d %s outbox entries (retrying; a restart meanwhile sends them"
                          " again): %s%s", len(ids), what, exc, since_last(count, "tries"))
            return None
        if self.counters["delete_error"]:
            log.info("the store takes the egress's deletes again")
            self.counters["delete_error"], self._delete_lines = None, LineThrottle()
        self.counters["outbox_backlog"] = self.store.outbox_count()  # read as tick() reads it
        return removed

    def _drain_rate(self, rate_limit: float) -> float:
        """Entries per second `rate_limit` and the byte limit allow (the slower, as paced), else
        the rate seen."""
        limits = [paced_rate(rate_limit)] if rate_limit else []
        if self.bytes_limit and self.mean_size:
            limits.append(paced_rate(self.bytes_limit) / self.mean_size)
        return min(limits) if limits else self.send_rate

    def _eta(self, backlog: int) -> Optional[float]:
        """Seconds to empty the outbox: what is left of a backlog queued offline at its
        `drainingFrequency`, the entries queued since at the link's own rate (all of it at the
        backlog's rate read 2.7x too long with live publishes behind an outage's backlog)."""
        mqtt = self.config.thing.mqtt
        # the backlog's part not sent yet, also while the cursor is still before it (resending the
        # window after a reconnect: all of it priced at the link's rate read 2.5-5x too short)
        slow = min(backlog, self.offline.left(self.cursor))
        if slow and backlog > slow and not mqtt.publish_rate and not self.bytes_limit:
            return None  # what follows the backlog has no limit, and the rate seen is the backlog's
        seconds = 0.0
        for count, rate in ((slow, self._drain_rate(mqtt.backlog_rate or 0.0)),
                            (backlog - slow, self._drain_rate(mqtt.publish_rate))):
            if count and not rate:
                return None
            seconds += count / rate if count else 0.0
        return round(seconds, 1)

    def _update_counters(self, now: float) -> None:
        if now - self.meter_start >= 1.0:
            self.send_rate = self.meter_count / (now - self.meter_start)
            self.meter_start, self.meter_count = now, 0
        backlog = self.counters["outbox_backlog"]
        drain_rate = self._drain_rate(self.rate_limit)
        oldest = next(iter(self.unacked_since.values()), None)
        silence = max(0.0, round(now - self.answered_at, 1)) if self.inflight else None
        self.counters.update(
            inflight=len(self.inflight), send_rate=round(self.send_rate, 1), rate_limit=self.rate_limit,
            # none while PUBACKs stall (a path gone silent: 2-4 s was shown while none came for 24 s)
            # none while the link is down either (nothing drains; a number read as a promise)
            eta_s=None if not self.link_up or (silence is not None and silence >= PUBACK_STALLED)
            else self._eta(backlog),
            puback_silence=silence,
            drain_rate=round(drain_rate, 1), throttled=self.connection.throttled, sessions_lost=self.connection.sessions_lost,
            # an entry sent after `now` was read: 0, not -0.001
            oldest_inflight_age=None if oldest is None else max(0.0, round(now - oldest, 3)),
            one_at_a_time=self.poison.single)


def _expiry_left(entry: OutboxEntry) -> Optional[int]:
    """Whole seconds left of the entry's message expiry (0: passed), None when it has none."""
    interval = entry.properties.get("message_expiry_interval")
    if interval is None:
        return None
    return max(0, math.ceil(interval - (entry.age or 0.0)))
