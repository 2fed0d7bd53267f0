"""The durable LMDB store shared by every flashlexd process.

One environment, eleven named databases:
  inbox   id(8 bytes, big-endian) -> msgpack record; key order is arrival order
  expiry  empty since schema 4 (kept for the schema-1 to 3 stores it migrates, and for expiry
          times of their own: an index of the exceptions). One TTL for every message makes the
          inbox key order its expiry order within a boot: each record carries its expiry time
          (in its boot's frame, flashlexd/clock.py: boottime + the boot's first offset, so a
          clock step never moves it) and the sweep walks the inbox from the front (expire()).
          Writing no index entry per message is one page less per append and per ack (wear).
  outbox  id(8) -> msgpack entry; FIFO towards the cloud
  dead    id(8) -> msgpack dead letter: an outbox entry the broker kept refusing, moved here
          under its outbox id (ids are never reused, so it names the entry in both lists)
          with the reason and the attempts, until it is retried (back to the outbox's tail,
          under a new id) or dropped. Never deleted to make room. Added after schema 1 was
          released; a schema-1 store simply gains the empty database when it is opened.
  recent  schema 2's DUP marks (mid(2) -> digest(8)); empty since schema 3, which moved them
          to `unconfirmed`
  unconfirmed, dedupe: what recognises a broker's redeliveries (flashlexd/redelivery.py)
  consumers, cacks: named consumers' floors and acks-ahead (flashlexd/storeconsumers.py)
  msgexpiry  per-message expiry (MQTT 5 Message Expiry Interval) of the inbox messages that
          carry one (flashlexd/storemsgexpiry.py)
  meta    name -> value: schema version, id counters, totals (`acked` is derived from the
          others and the inbox count, so an ack writes the inbox alone); b"frame" + seq(4) -> the BootFrame
          of each boot that stamped a record still stored (clock.py)

Stamps: an inbox record is (wall, topic, payload, qos, retain, mid, expiry, boot seq, boottime,
[properties]), an outbox entry (wall, topic, payload, qos, retain, boot seq, boottime,
[properties]); schema-1 records lack the stamp fields (seq 0: the wall-clock rule), records
without MQTT 5 properties (all before schema 4) lack the last one. Ages, arrival times and expiry times that the
store hands out go through a `Timeline` (clock.py), so they survive clock steps.

Every process opens its own `Store` after fork: an LMDB environment must never cross a fork
(py-lmdb's rule; an inherited handle closed in a child also drops the parent's reader slots).
The store remembers the pid that opened it and refuses to be used from another one.

Size: the memory map is `cap + headroom`. Appends refuse (or, under `dropOldest`, make room)
once the used pages reach the cap, so the headroom is always there for deletes, which in LMDB
also need fresh pages (copy-on-write). LMDB grows the file on demand up to the map, so growth
up to the cap needs nothing from us. Durability: `sync=True`, one fsync per write transaction,
which is why callers batch (group commit). An append does its per-message work (packing,
digests) before taking the write lock and writes each database with one `putmulti` call; at
100 messages a batch it runs at about 0.7x the rate of raw LMDB puts of the bare payloads
(bench/bench_store.py), the rest being the DUP marks, the counters and the record fields.
Bytes written per message: docs/WEAR.md.
"""
from __future__ import annotations

import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import lmdb
import msgpack
from flashlexd.clock import STEP_TOLERANCE
from flashlexd.storebase import POLICIES, SCHEMA_VERSION, ScanPage
from flashlexd.storedamage import guarded, unpack_record
from flashlexd.storeacks import JournaledAcks
from flashlexd.storeconsumers import BacklogCount, ConsumerStore, note_left
from flashlexd.storeoutbox import OutboxStore
from flashlexd.storerecords import (_ID, _RECORD_OVERHEAD, DeadLetter, DiskFull, DupMark,
                                    Incoming, Message, OutboxEntry, StoreBusy, StoreDamaged,
                                    StoreError, StoreForkError, StoreFull, _Kept, _kept, _keys_of, _ms, _outbox_entry, _stamp_of,
                                    _topic_of, message_selector)
from flashlexd.topics import topic_matches

# meta: + client id -> when its link was last up (wall clock, a double: exactly the 8 bytes the
# previous release writes and reads, so that a downgrade still reads it)
_SESSION = b"session:"
# meta: + client id + NUL + broker identity -> when its link was last up on that broker (a double)
_SESSION_ON = b"session@"
# meta: + client id -> the broker identity of its last link (the previous release wrote none)
_LAST_BROKER = b"sessionbroker:"
_FALLBACK = b"fallback:"  # meta: + client id + NUL + broker -> b"3.1.1": it lacks MQTT 5 (this run)
_TOPICS = b"topics:"  # meta: + client id -> the filters its broker session may hold (msgpack list)
_QUEUED_ONLINE = b"queued_online"  # meta: the last outbox id queued while egress's link was up (drainingFrequency)
_LINK_UP = b"egress_link_up"  # meta: egress's link came up, no drop or stop noted since (it died)
# meta: {"through": the last id queued online, "ranges": [[after, through], ...] still to drain at
# drainingFrequency}; `_QUEUED_ONLINE` then holds the oldest range's start, as an earlier release
# (which reads it alone) takes it: a rollback mid-drain drains the rest of the outage slowly too
_BACKLOG_RANGES = b"egress_backlog"
_INGRESS_ID = b"ingress_client_id"  # meta: the client id of the ingress's last link up
_WALL = struct.Struct(">d")
__all__ = ["COUNTERS", "POLICIES", "SCHEMA_VERSION", "DeadLetter", "DiskFull", "DupMark", "Incoming",
           "Message", "OutboxEntry", "Store", "StoreBusy", "StoreDamaged", "StoreError",
           "StoreForkError", "StoreFull", "dup_marks"]
COUNTERS = ("received", "duplicates", "acked", "released", "expired", "dropped_full", "purged", "queued", "sent",
            "outbox_dropped", "outbox_expired", "dead_lettered", "dead_retried", "dead_dropped")  # totals in meta


class Store(JournaledAcks, ConsumerStore, OutboxStore):
    """One process's handle on the store. Not thread-safe: one per process, used by one thread.

    `write_wait` (seconds; None: no bound) bounds how long a write waits for LMDB's write lock,
    which is shared by every process: a process stopped inside a write transaction (a hung
    worker) holds it until it is killed. The supervisor uses it so that an API call cannot
    stall its loop, which is what kills hung workers. Such a write runs in a helper thread
    (LMDB's lock wait releases the GIL) and raises StoreBusy when the wait runs out.

    This module holds the inbox and the figures; `storebase` the plumbing, `storeoutbox` the
    outbox and dead letters, `storerecords` the records and key layout, `storeacks` the
    supervisor's journaled acks."""

    def close(self) -> None:
        self._close_journal()  # the waiting acks applied: a clean stop leaves nothing to replay
        super().close()

    # -- inbox --------------------------------------------------------------------------------

    @guarded
    def append(self, messages: Sequence[Incoming], now: Optional[float] = None,
               settled: Sequence[DupMark] = (), dedupe_window: Optional[float] = None,
               links: Sequence[int] = (), ids_kept: bool = False) -> List[Optional[int]]:
        """Store a batch in ONE transaction (group commit). Returns each message's id, or None
        for a duplicate: a redelivery (DUP) of a message stored and not yet confirmed, or a
        message whose dedupe key was stored in the last `dedupe_window` seconds. All or nothing.

        `settled` are the DUP marks (`dup_marks`) of earlier messages whose PUBACK the broker
        has processed (see workers/barrier.py): they can no longer be redelivered, so their
        marks are taken off in the same transaction, before this batch is looked at. `links`
        name the connection each message came on (redelivery.py: a broker resends a copy once
        per connection); `ids_kept`: they came where a resend keeps its packet id (MQTT 5), so
        a DUP is judged by its packet id too."""
        reading = self._frames.reading(now)
        seq = self._frames.current.seq
        # in this boot's first frame: a later step does not move it (clock.py)
        steady = reading.boottime + self._frames.current.first
        # kept in each record for its format (earlier versions read it); the sweep and the API use
        # the expireSeconds configured now
        expires_at = steady + self.expire_seconds if self.expire_seconds else None
        records, marks = self._prepare(messages, (reading.wall, seq, reading.boottime), expires_at)
        due = [(steady + m.properties["message_expiry_interval"], i) for i, m in enumerate(messages)
               if m.properties and m.properties.get("message_expiry_interval")]
        needed = sum(map(len, records)) + _RECORD_OVERHEAD * len(records)

        def work(txn: lmdb.Transaction) -> List[Optional[int]]:
            self._frames.note(txn, reading)
            # first: taking confirmed marks off only frees space, and the room it frees counts.
            # Checked before it, a store whose cap the marks filled (1 MiB: 16,128 marks) refused
            # every batch for good, the inbox empty (found by review)
            self._redeliveries.settle(txn, settled)
            if messages:
                self._make_room(txn, needed, "inbox")
            first_id = self._counter(txn, b"inbox_last_id") + 1
            # dedupe windows run on the same step-proof time as expiry
            chosen = self._not_redelivered(txn, messages, marks, first_id, steady, dedupe_window, links,
                                           ids_kept)
            new_records = [records[i] for i in chosen]
            last_id = first_id + len(new_records) - 1
            if new_records:
                keys = list(map(_ID.pack, range(first_id, last_id + 1)))
                _, added = txn.cursor(db=self._inbox).putmulti(zip(keys, new_records), append=True)
                if added != len(keys):
                    raise StoreError(f"store in {self.path}: inbox ids out of order (corrupt meta?)")
            self._set_counter(txn, b"inbox_last_id", last_id)
            self._add_counter(txn, b"received", len(new_records))
            self._add_counter(txn, b"duplicates", len(messages) - len(new_records))
            ids: List[Optional[int]] = [None] * len(messages)
            for i, record_id in zip(chosen, range(first_id, last_id + 1)):
                ids[i] = record_id
            if due:
                self._msg_expiry.index(txn, seq, [(at, _ID.pack(ids[i])) for at, i in due if ids[i]])
            if self.when_full == "dropOldest":
                self._settle_cap(txn, first_id)
            return ids

        # marks taken off alone only free space: they may use the reserve (appends may not)
        return self._write(work, reserve=not messages)  # type: ignore[return-value]

    def _prepare(self, messages: Sequence[Incoming], stamp: Tuple[float, int, float],
                 expires_at: Optional[float]) -> Tuple[List[bytes], List[Optional[DupMark]]]:
        """The per-message work, done before taking the write lock: each packed inbox record
        and its DUP mark. `stamp` is (wall, boot seq, boottime)."""
        pack = self._packer.pack
        wall, seq, boot = stamp
        records = [pack((wall, m.topic, m.payload, m.qos, m.retain, m.mid, expires_at, seq, boot,
                         m.properties) if m.properties else
                        (wall, m.topic, m.payload, m.qos, m.retain, m.mid, expires_at, seq, boot))
                   for m in messages]
        return records, dup_marks(messages)

    def _not_redelivered(self, txn: lmdb.Transaction, messages: Sequence[Incoming],
                         marks: List[Optional[DupMark]], first_id: int, wall: float,
                         dedupe_window: Optional[float], links: Sequence[int],
                         ids_kept: bool) -> List[int]:
        """Indexes of the messages to store: all but the DUPs of a message stored (in the store
        or earlier in this batch) and not yet confirmed, and the repeated dedupe keys."""
        if not dedupe_window and not any(m.dup for m in messages) and not any(marks):
            return list(range(len(messages)))  # QoS 0 only: nothing to mark
        return self._redeliveries.choose(txn, [m.dup for m in messages], marks,
                                         [m.key for m in messages], first_id, wall, dedupe_window,
                                         links, [m.mid for m in messages] if ids_kept else None)

    @guarded
    def messages(self, limit: int = 100, topic: Optional[str] = None,
                 after: Optional[int] = None,
                 user_property: Optional[Tuple[str, str]] = None) -> List[Message]:
        """Oldest first; `topic` is an MQTT filter (`+`/`#` allowed); `after` an exclusive id;
        `user_property` (name, value): only messages carrying that MQTT 5 user property."""
        return self.messages_page(limit, topic, after, None, user_property).found

    @guarded
    def messages_page(self, limit: int = 100, topic: Optional[str] = None,
                      after: Optional[int] = None, budget: Optional[int] = None,
                      user_property: Optional[Tuple[str, str]] = None,
                      size: Optional[int] = None) -> ScanPage[Message]:
        """`messages`, looking at no more than `budget` inbox records (see `_scan_page`)."""
        select = None if topic is None else (lambda raw: topic_matches(topic, _topic_of(raw)))
        return self._scan_page(self._inbox, limit, after, self._message,
                               message_selector(None, user_property), budget, select, size)

    @guarded
    def ack(self, ids: Iterable[int]) -> int:
        """Remove messages by id. Idempotent: an id already gone is not an error."""
        return self.ack_each([ids])[0]

    @guarded
    def ack_each(self, calls: Sequence[Iterable[int]]) -> List[int]:
        """`ack` of several calls in ONE transaction (apps' acks sharing a commit:
        ipc/sharedcommit.py); each call's count of messages it removed, an id in two calls
        counting for the first. Writes the inbox alone: `acked` is derived (StoreBase._acked_total).
        With the ack journal open (the supervisor's handle): one journal record, storeacks.py."""
        keys = [_keys_of(ids) for ids in calls]
        if self._journal is not None:
            return self._journal_ack(keys)

        def work(txn: lmdb.Transaction) -> Tuple[List[int], List[BacklogCount]]:
            leaving = self._backlogs_left(txn, (key for call in keys for key in call))
            return [sum(1 for key in call if self._delete_inbox(txn, key)) for call in keys], leaving

        if not any(keys):
            return [0] * len(keys)
        try:
            removed_each, leaving = self._write(work, reserve=False)  # type: ignore[misc]
            note_left(leaving)
            return removed_each
        except DiskFull:
            removed = self._delete_in_steps([key for call in keys for key in call])
        counts = []
        for call in keys:  # an id in two calls counts for the first
            counts.append(sum(1 for key in call if key in removed))
            removed.difference_update(call)
        return counts

    @guarded
    def purge(self) -> int:
        """Remove every inbox message (the API asks for confirmation first). Waiting journaled
        acks are applied first, so that they count as acked, not purged."""
        if self._journal is not None:
            self.apply_acks()

        def work(txn: lmdb.Transaction) -> int:
            count = txn.stat(self._inbox)["entries"]
            txn.drop(self._inbox, delete=False)
            txn.drop(self._consumer_acks, delete=False)  # acks of ids that are gone
            txn.drop(self._msg_expiry.db, delete=False)  # entries of messages that are gone
            self._add_counter(txn, b"purged", count)
            return count

        return self._write(work)  # type: ignore[return-value]

    @guarded
    def forget_unconfirmed(self) -> int:
        """The broker holds no session for us (CONNACK session present 0): it can redeliver
        nothing we committed, so every DUP mark is stale, and would take a later message of
        that content whose first transmission was lost for a redelivery. A read first: a commit
        costs wear, and there is seldom anything to drop."""
        with self._read() as txn:
            if not txn.stat(self._redeliveries.unconfirmed)["entries"]:
                return 0

        def work(txn: lmdb.Transaction) -> int:
            count = txn.stat(self._redeliveries.unconfirmed)["entries"]
            txn.drop(self._redeliveries.unconfirmed, delete=False)
            return count

        return self._write(work)  # type: ignore[return-value]

    # -- the ingress link's persistent session ------------------------------------------------

    @guarded
    def session_seen(self, client_id: str) -> Optional[float]:
        """When (wall clock) a link of `client_id` was last up on a persistent session, or None.
        It tells a new process (after a restart or a power cut) that the broker held a session
        for us, so a session it lost meanwhile is reported, not passed over in silence."""
        with self._read() as txn:
            return _wall(txn.get(_SESSION + client_id.encode(), db=self._meta))

    @guarded
    def session_seen_on(self, client_id: str, broker: str) -> Optional[float]:
        """When a link of `client_id` was last up on `broker` (`Thing.broker_identity`), or
        None: no session was ever up there, so session present 0 on it loses nothing. A store
        with no per-broker record of `client_id` yet has `session_seen`'s, unless its last
        link is noted on another broker."""
        with self._read() as txn:
            raw = txn.get(_session_on_key(client_id, broker), db=self._meta)
            if raw is None and not self._prefixed(txn, _session_on_key(client_id, "")):
                # no link noted per broker yet (the previous release's store): its session was
                # most likely on this broker, unless a last link elsewhere is noted
                last = txn.get(_LAST_BROKER + client_id.encode(), db=self._meta)
                if last is None or bytes(last).decode("utf-8", "replace") == broker:
                    raw = txn.get(_SESSION + client_id.encode(), db=self._meta)
        return _wall(raw)

    @guarded
    def session_broker(self, client_id: str) -> Optional[str]:
        """The broker identity of `client_id`'s last link; None: no link yet, or only links of
        the previous release, which recorded none (an unknown broker)."""
        with self._read() as txn:
            raw = txn.get(_LAST_BROKER + client_id.encode(), db=self._meta)
            return None if raw is None else bytes(raw).decode("utf-8", "replace")

    @guarded
    def note_session(self, client_id: str, wall: float, ingress: bool = False,
                     broker: Optional[str] = None, last: bool = True) -> None:
        """`ingress`: the link of the thing's own messages, whose client id is remembered;
        `broker`: the identity of the one the link is up on (a session is up there from now
        on), and the last link's broker (`session_broker`) unless not `last` (the marks of the
        one before are not dropped yet: a next process must drop them too)."""
        def work(txn: lmdb.Transaction) -> None:
            txn.put(_SESSION + client_id.encode(), _WALL.pack(wall), db=self._meta)
            if broker is not None:
                txn.put(_session_on_key(client_id, broker), _WALL.pack(wall), db=self._meta)
                if last:
                    txn.put(_LAST_BROKER + client_id.encode(), broker.encode(), db=self._meta)
            if ingress:
                txn.put(_INGRESS_ID, client_id.encode(), db=self._meta)
        self._write(work)

    @guarded
    def last_ingress_client_id(self) -> Optional[str]:
        """The client id of the ingress's last link up, None for a store that never connected:
        by record, not by the session marks' wall times, which a clock set back would reorder.
        A store from before the record: the session marked last by the wall clock among the
        ingress's (those with topic filters recorded, which only the ingress does, when its
        filters were more than the pubsub topic), else among all but egress ids (`-egress`)."""
        with self._read() as txn:
            raw = txn.get(_INGRESS_ID, db=self._meta)
            if raw is not None:
                return bytes(raw).decode("utf-8", "replace")
            marked = {client_id: wall for client_id, wall in self._prefixed(txn, _SESSION).items()
                      if len(wall) >= _WALL.size and not client_id.endswith("-egress")}
            ingress = set(self._prefixed(txn, _TOPICS)) & set(marked) or set(marked)
        return max(ingress, key=lambda client_id: _WALL.unpack(marked[client_id][:_WALL.size])[0],
                   default=None)

    def _prefixed(self, txn: lmdb.Transaction, prefix: bytes) -> Dict[str, bytes]:
        """The meta records under `prefix`: what follows it (a client id) -> the value."""
        found: Dict[str, bytes] = {}
        cursor = txn.cursor(db=self._meta)
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not bytes(key).startswith(prefix):
                    break
                found[bytes(key)[len(prefix):].decode("utf-8", "replace")] = bytes(value)
        return found

    @guarded
    def session_topics(self, client_id: str) -> List[str]:
        """The topic filters the session `client_id`'s broker keeps may hold (the ingress's
        record): a filter taken out of the config stays in that session, and its messages keep
        coming, until the ingress unsubscribes it."""
        with self._read() as txn:
            raw = txn.get(_TOPICS + client_id.encode(), db=self._meta)
            try:
                topics = msgpack.unpackb(raw) if raw is not None else []
            except (ValueError, msgpack.UnpackException):
                return []
        return [t for t in topics if isinstance(t, str)] if isinstance(topics, list) else []

    @guarded
    def queued_online(self) -> Optional[int]:
        """The last outbox id the egress saw queued while its link was up, across its restarts:
        noted at its last drop or stop; when it died with its link up (SIGKILL: nothing noted),
        the newest id, all the outbox holds taken as queued online (the rest of an outage's
        backlog it was draining too: one mark cannot tell them apart); None when never noted."""
        with self._read() as txn:
            if txn.get(_LINK_UP, db=self._meta) is not None:
                return self._counter(txn, b"outbox_last_id")
            through = self._backlog_marks(txn)[0]
            if through is not None:
                return through
            return self._old_mark(txn)

    def _old_mark(self, txn: lmdb.Transaction) -> Optional[int]:
        raw = txn.get(_QUEUED_ONLINE, db=self._meta)
        return _ID.unpack(raw)[0] if raw is not None and len(raw) == _ID.size else None

    @guarded
    def backlog_ranges(self) -> List[Tuple[int, int]]:
        """The outbox id ranges the egress had still to drain at `drainingFrequency` when it
        last noted its link (workers/offlinebacklog.py); [] when none (or never noted)."""
        with self._read() as txn:
            return self._backlog_marks(txn)[1]

    def _backlog_marks(self, txn: lmdb.Transaction) -> Tuple[Optional[int], List[Tuple[int, int]]]:
        raw = txn.get(_BACKLOG_RANGES, db=self._meta)
        try:
            marks = msgpack.unpackb(raw) if raw is not None else {}
        except (ValueError, msgpack.UnpackException):
            return None, []
        if not isinstance(marks, dict) or marks.get("old") != self._old_mark(txn):
            return None, []  # an earlier release wrote the old key since (a rollback): its word holds
        through, ranges = marks.get("through"), marks.get("ranges")
        kept = [(r[0], r[1]) for r in ranges if isinstance(r, list) and len(r) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in r)] \
            if isinstance(ranges, list) else []
        return (through if isinstance(through, int) and not isinstance(through, bool) else None), kept

    @guarded
    def note_queued_online(self, last_id: int, ranges: Sequence[Tuple[int, int]] = ()) -> None:
        """The egress's link went down or it stops (or starts with its link left noted up, a
        kill): `last_id` ends what was queued online, and `ranges` of the backlog before it
        are not drained yet."""
        def note(txn: lmdb.Transaction) -> None:
            self._put_marks(txn, last_id, ranges)
            txn.delete(_LINK_UP, db=self._meta)
        self._write(note)

    @guarded
    def note_link_up(self, last_id: int, ranges: Sequence[Tuple[int, int]] = ()) -> None:
        """The egress's link is up, draining `ranges` slowly: should it die before it notes the
        link down, what the outbox holds beyond them was queued online (see `queued_online`)."""
        def note(txn: lmdb.Transaction) -> None:
            txn.put(_LINK_UP, b"1", db=self._meta)
            self._put_marks(txn, last_id, ranges)
        self._write(note)

    def _put_marks(self, txn: lmdb.Transaction, last_id: int, ranges: Sequence[Tuple[int, int]]) -> None:
        # an earlier release reads the first key alone: for it, all past the backlog's start
        # is backlog (its one mark), which keeps the outage's rest slow after a rollback
        old = min([last_id, *(after for after, _ in ranges)])
        txn.put(_QUEUED_ONLINE, _ID.pack(old), db=self._meta)
        txn.put(_BACKLOG_RANGES, msgpack.packb({"through": last_id, "ranges": [list(r) for r in ranges],
                                                "old": old}), db=self._meta)

    @guarded
    def note_session_topics(self, client_id: str, topics: Sequence[str]) -> None:
        self._write(lambda txn: txn.put(_TOPICS + client_id.encode(), msgpack.packb(list(topics)),
                                        db=self._meta))

    # -- a broker without MQTT 5, remembered until the daemon restarts --------------------------

    @guarded
    def fell_back(self, client_id: str, broker: str) -> bool:
        """Whether a worker of this daemon run found that `broker` (`Thing.broker_identity`) lacks MQTT 5
        for `client_id` (protocol `auto`): a replaced worker then starts on 3.1.1 instead of
        probing again. Per broker: a move to another one probes it (a record of an earlier
        version, per client id alone, is never read: the daemon's start drops it)."""
        with self._read() as txn:
            return txn.get(_fallback_key(client_id, broker), db=self._meta) is not None

    @guarded
    def note_fallback(self, client_id: str, broker: str) -> None:
        self._write(lambda txn: txn.put(_fallback_key(client_id, broker), b"3.1.1", db=self._meta))

    @guarded
    def forget_fallbacks(self) -> None:
        """At the daemon's start: probe MQTT 5 again (the broker may have been upgraded). A
        read first: most starts have nothing to forget, and a write costs a commit (wear)."""
        with self._read() as txn:
            cursor = txn.cursor(db=self._meta)
            if not (cursor.set_range(_FALLBACK) and bytes(cursor.key()).startswith(_FALLBACK)):
                return

        def work(txn: lmdb.Transaction) -> None:
            cursor = txn.cursor(db=self._meta)
            while cursor.set_range(_FALLBACK) and bytes(cursor.key()).startswith(_FALLBACK):
                cursor.delete()
        self._write(work)

    @guarded
    def expire(self, now: Optional[float] = None, batch: int = 1000) -> int:
        """Remove up to `batch` messages that are due (bounded txn): a message of this boot
        once its real age reached expireSeconds, one of an earlier boot by the wall clock
        (clock.py), and messages whose own expiry (MQTT 5) passed. `now` (tests) is a wall-clock time in this boot's first frame.

        One TTL for every message makes the inbox's key (arrival) order its expiry order within
        a boot, so the sweep walks the inbox from the front, and at the first message not yet
        due it goes on with the next boot's messages (ids follow the boots: a binary search
        finds where they start): no index is written per message. The TTL is the one configured
        now, whatever it was when a message came (a reload that sets or lowers expireSeconds
        applies to every message stored: the one stored with each was the key before, so
        messages stored without one never went, and newer ones waited behind older ones).
        Messages with an expiry of their own are found by their index (storemsgexpiry.py)."""
        reading = self._frames.reading(now)

        def work(txn: lmdb.Transaction) -> int:
            self._frames.note(txn, reading)
            timeline = self._frames.timeline(txn, reading)
            cutoffs: Dict[int, int] = {}
            firsts: Dict[int, Optional[float]] = {}  # boot frames' offsets, for expiry keys
            inbox = txn.cursor(db=self._inbox)
            removed = visited = 0
            found = inbox.first() if self.expire_seconds else False
            while found and removed < batch and visited < batch:
                record = unpack_record(inbox.value(), 7)
                seq, boot = _stamp_of(record, 7)
                # the expireSeconds configured now, not the one stored with the message
                expires_at = timeline.arrival_key(record[0], seq, boot) + self.expire_seconds
                if seq not in cutoffs:
                    cutoffs[seq] = _ms(timeline.cutoff(seq))
                if _ms(expires_at) > cutoffs[seq]:  # none of this boot's later ones is due
                    visited += 1
                    found = _first_of_later_boot(inbox, seq)
                    continue
                if len(record) > 9:  # MQTT 5 properties: its own expiry's entry goes along
                    entry = self._expiry_key(txn, bytes(inbox.key()), record, firsts)
                    self._msg_expiry.forget(txn, [entry] if entry is not None else [])
                inbox.delete()  # moves to the next record; past the last, to no record (key b"")
                found = bool(inbox.key())
                removed += 1
            if removed < batch:
                own_cutoffs: Dict[int, bytes] = {}

                def own_cutoff(seq: int) -> bytes:
                    if seq not in own_cutoffs:
                        own_cutoffs[seq] = _ID.pack(_ms(timeline.cutoff(seq)) + 1)
                    return own_cutoffs[seq]

                removed += self._msg_expiry.sweep(txn, own_cutoff, lambda key: self._remove(txn, key),
                                                  batch - removed)
            self._add_counter(txn, b"expired", removed)
            return removed

        return self._write(work)  # type: ignore[return-value]

    @guarded
    def note_clock(self) -> Optional[float]:
        """Record a step of the wall clock in this boot's frame now, not at the next append or
        sweep: after a power cut the frame's last offset is what re-bases this boot's stamps,
        and a quiet device (no expireSeconds, no message since the step) wrote none. No write
        unless the clock stepped since this process last looked (another process may have
        recorded it: then nothing is written). The step in seconds (negative: back), or None."""
        reading = self._frames.reading()
        if self._told_offset is None:
            self._told_offset = self._frames.current.last
        if self._frames.current.stepped(reading):
            written = self._write(lambda txn: self._frames.note(txn, reading))
            if written is not None:
                self._frames.current = written  # committed: not noticed again at the next call
        # told once, whichever write recorded it: this process's own publishes take a recorded
        # step into its frame, and a step an app's publishing met first was never logged
        step = reading.offset - self._told_offset
        if abs(step) <= STEP_TOLERANCE:
            return None
        self._told_offset = reading.offset
        return step

    def _remove(self, txn: lmdb.Transaction, key: bytes) -> bool:
        """Delete inbox message `key` if it is still stored; True if it was."""
        return txn.delete(key, db=self._inbox)

    @guarded
    def has_message_expiry(self) -> bool:
        """Whether some stored message carries its own expiry (the expiry worker sweeps then)."""
        with self._read() as txn:
            return self._msg_expiry.pending(txn) > 0

    # -- figures ------------------------------------------------------------------------------

    @guarded
    def stats(self) -> Dict[str, object]:
        """Counts, oldest ages, totals and size used against the cap. Read once per snapshot
        (`_per_snapshot`: eleven database stats and twenty counter reads); between commits only
        the ages move, told from the two oldest records kept aside."""
        with self._read() as txn:
            kept, oldest_in, oldest_out = self._per_snapshot(txn, "figures", self._read_figures)
            figures = dict(kept)
            timeline = self._frames.snapshot_timeline(txn) if oldest_in or oldest_out else None
        oldest = self._message(*oldest_in, timeline) if oldest_in else None
        oldest_entry = _outbox_entry(oldest_out[0], unpack_record(oldest_out[1], 5), timeline) \
            if oldest_out else None
        figures.update(inbox_oldest=oldest.timestamp if oldest else None,
                       inbox_oldest_age=oldest.age if oldest else None,
                       outbox_oldest=oldest_entry.created if oldest_entry else None,
                       outbox_oldest_age=oldest_entry.age if oldest_entry else None)
        return figures

    def _read_figures(self, txn: lmdb.Transaction) -> Tuple[Dict[str, object], Optional[_Kept], Optional[_Kept]]:
        """`stats` but the oldest records' times: the figures, and those records (key, value)."""
        first_inbox = txn.cursor(db=self._inbox)
        found = first_inbox.first()
        while found and _ID.unpack(first_inbox.key())[0] in self._hidden:
            found = first_inbox.next()
        first_outbox = txn.cursor(db=self._outbox)
        waiting = self.pending_in(txn) if self._hidden else 0
        figures: Dict[str, object] = {
            "inbox_count": txn.stat(self._inbox)["entries"] - waiting,
            "inbox_last_id": self._counter(txn, b"inbox_last_id"),
            "outbox_count": txn.stat(self._outbox)["entries"],
            "dead_count": txn.stat(self._dead)["entries"],
            "used_bytes": self._used_bytes(txn),
            "cap_bytes": self.cap_bytes,
            "when_full": self.when_full,
        }
        for name in COUNTERS:
            figures[name] = self._counter(txn, name.encode())
        figures["acked"] = self._acked_total(txn) + waiting
        figures["acks_waiting"] = waiting  # journaled, not applied to the inbox yet
        return figures, _kept(first_inbox.key(), self._checked(first_inbox.value()), 7) if found else None, \
            _kept(first_outbox.key(), self._checked(first_outbox.value()), 5) if first_outbox.first() else None

    @guarded
    def inbox_count(self) -> int:
        with self._read() as txn:
            return txn.stat(self._inbox)["entries"] - (self.pending_in(txn) if self._hidden else 0)


def _seq_at(cursor: lmdb.Cursor) -> int:
    return _stamp_of(unpack_record(cursor.value(), 7), 7)[0]


def _first_of_later_boot(inbox: lmdb.Cursor, seq: int) -> bool:
    """Move `inbox` (on a record of boot `seq`) to the first record of a later boot; False if
    there is none. Boot seqs never decrease along the ids, so a binary search over ids finds it."""
    low = _ID.unpack(inbox.key())[0]  # the first record at or after it is of boot <= seq
    if not inbox.last() or _seq_at(inbox) <= seq:
        return False
    high = _ID.unpack(inbox.key())[0]  # ... of a later boot
    while high - low > 1:
        middle = (low + high) // 2
        inbox.set_range(_ID.pack(middle))
        if _seq_at(inbox) > seq:
            high = middle
        else:
            low = middle
    return inbox.set_range(_ID.pack(high))
def dup_marks(messages: Sequence[Incoming]) -> List[Optional[DupMark]]:
    """Each message's DUP mark (`Incoming.mark`, computed once per message)."""
    return [m.mark for m in messages]


def _wall(raw: Optional[bytes]) -> Optional[float]:
    """A session record's wall time."""
    return _WALL.unpack(bytes(raw))[0] if raw is not None and len(raw) == _WALL.size else None


def _session_on_key(client_id: str, broker: str) -> bytes:
    """NUL ends the client id: MQTT forbids U+0000 in one."""
    return _SESSION_ON + client_id.encode() + b"\0" + broker.encode()


def _fallback_key(client_id: str, broker: str) -> bytes:
    """NUL ends the client id: MQTT forbids U+0000 in one."""
    return _FALLBACK + client_id.encode() + b"\0" + broker.encode()
