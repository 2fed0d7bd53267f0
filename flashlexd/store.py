"""The durable LMDB store shared by every flashlexd process.

One environment, ten named databases:
  inbox   id(8 bytes, big-endian) -> msgpack record; key order is arrival order
  expiry  boot seq(4) + expiry_ms(8) + first id(8) -> last id(8): one range per appended batch
          (a batch expires together). Expiry times are in their boot's frame (flashlexd/clock.py:
          boottime + the boot's first offset), so a clock step never moves them; the sweep walks
          each boot's part from its front up to that boot's cut-off. Boot seq 0: entries of
          schema-1 stores, plain wall-clock times. Kept exact: the first id of
          every range is a stored message (removing it moves the start to the next stored id
          of the range, or removes the range), so no range outlives its messages. An empty
          value (older stores: one entry per message) means last == first.
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
  meta    name -> value: schema version, id counters, totals; b"frame" + seq(4) -> the BootFrame
          of each boot that stamped a record still stored (clock.py)

Stamps: an inbox record is (wall, topic, payload, qos, retain, mid, expiry, boot seq, boottime),
an outbox entry (wall, topic, payload, qos, retain, boot seq, boottime); schema-1 records lack
the last two fields (seq 0: the wall-clock rule). Ages, arrival times and expiry times that the
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
(bench/bench_store.py), the rest being the DUP and expiry indexes and the record fields.
"""
from __future__ import annotations

import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import lmdb
from flashlexd.storebase import POLICIES, SCHEMA_VERSION, ScanPage
from flashlexd.storedamage import guarded, unpack_record
from flashlexd.storeconsumers import ConsumerStore
from flashlexd.storeoutbox import OutboxStore
from flashlexd.storerecords import (_ID, _RECORD_OVERHEAD, _SEQ, DeadLetter, DiskFull, DupMark,
                                    Incoming, Message, OutboxEntry, StoreBusy, StoreDamaged,
                                    StoreError, StoreForkError, StoreFull, _decode_message,
                                    _expiry_prefix, _keys_of, _ms, _outbox_entry)
from flashlexd.topics import topic_matches

_SESSION = b"session:"  # meta: + client id -> when its link was last up (wall clock, a double)
_WALL = struct.Struct(">d")
__all__ = ["COUNTERS", "POLICIES", "SCHEMA_VERSION", "DeadLetter", "DiskFull", "DupMark", "Incoming",
           "Message", "OutboxEntry", "Store", "StoreBusy", "StoreDamaged", "StoreError",
           "StoreForkError", "StoreFull", "dup_marks"]
COUNTERS = ("received", "duplicates", "acked", "expired", "dropped_full", "purged", "queued", "sent",
            "outbox_dropped", "dead_lettered", "dead_retried", "dead_dropped")  # totals in meta


class Store(ConsumerStore, OutboxStore):
    """One process's handle on the store. Not thread-safe: one per process, used by one thread.

    `write_wait` (seconds; None: no bound) bounds how long a write waits for LMDB's write lock,
    which is shared by every process: a process stopped inside a write transaction (a hung
    worker) holds it until it is killed. The supervisor uses it so that an API call cannot
    stall its loop, which is what kills hung workers. Such a write runs in a helper thread
    (LMDB's lock wait releases the GIL) and raises StoreBusy when the wait runs out.

    This module holds the inbox and the figures; `storebase` the plumbing, `storeoutbox` the
    outbox and dead letters, `storerecords` the records and key layout."""

    # -- inbox --------------------------------------------------------------------------------

    @guarded
    def append(self, messages: Sequence[Incoming], now: Optional[float] = None,
               settled: Sequence[DupMark] = (), dedupe_window: Optional[float] = None
               ) -> List[Optional[int]]:
        """Store a batch in ONE transaction (group commit). Returns each message's id, or None
        for a duplicate: a redelivery (DUP) of a message stored and not yet confirmed, or a
        message whose dedupe key was stored in the last `dedupe_window` seconds. All or nothing.

        `settled` are the DUP marks (`dup_marks`) of earlier messages whose PUBACK the broker
        has processed (see workers/barrier.py): they can no longer be redelivered, so their
        marks are taken off in the same transaction, before this batch is looked at."""
        reading = self._frames.reading(now)
        seq = self._frames.current.seq
        # in this boot's first frame: a later step does not move it (clock.py)
        steady = reading.boottime + self._frames.current.first
        expires_at = steady + self.expire_seconds if self.expire_seconds else None
        records, marks = self._prepare(messages, (reading.wall, seq, reading.boottime), expires_at)
        needed = sum(map(len, records)) + _RECORD_OVERHEAD * len(records)

        def work(txn: lmdb.Transaction) -> List[Optional[int]]:
            self._frames.note(txn, reading)
            self._make_room(txn, needed, "inbox")
            self._redeliveries.settle(txn, settled)
            first_id = self._counter(txn, b"inbox_last_id") + 1
            # dedupe windows run on the same step-proof time as expiry
            chosen = self._not_redelivered(txn, messages, marks, first_id, steady, dedupe_window)
            new_records = [records[i] for i in chosen]
            last_id = first_id + len(new_records) - 1
            if new_records:
                keys = list(map(_ID.pack, range(first_id, last_id + 1)))
                _, added = txn.cursor(db=self._inbox).putmulti(zip(keys, new_records), append=True)
                if added != len(keys):
                    raise StoreError(f"store in {self.path}: inbox ids out of order (corrupt meta?)")
                if expires_at is not None:  # the batch expires together: one range entry
                    txn.put(_expiry_prefix(seq, expires_at) + keys[0], keys[-1], db=self._expiry)
            self._set_counter(txn, b"inbox_last_id", last_id)
            self._add_counter(txn, b"received", len(new_records))
            self._add_counter(txn, b"duplicates", len(messages) - len(new_records))
            ids: List[Optional[int]] = [None] * len(messages)
            for i, record_id in zip(chosen, range(first_id, last_id + 1)):
                ids[i] = record_id
            return ids

        return self._write(work)  # type: ignore[return-value]

    def _prepare(self, messages: Sequence[Incoming], stamp: Tuple[float, int, float],
                 expires_at: Optional[float]) -> Tuple[List[bytes], List[Optional[DupMark]]]:
        """The per-message work, done before taking the write lock: each packed inbox record
        and its DUP mark. `stamp` is (wall, boot seq, boottime)."""
        pack = self._packer.pack
        wall, seq, boot = stamp
        records = [pack((wall, m.topic, m.payload, m.qos, m.retain, m.mid, expires_at, seq, boot))
                   for m in messages]
        return records, dup_marks(messages)

    def _not_redelivered(self, txn: lmdb.Transaction, messages: Sequence[Incoming],
                         marks: List[Optional[DupMark]], first_id: int, wall: float,
                         dedupe_window: Optional[float]) -> List[int]:
        """Indexes of the messages to store: all but the DUPs of a message stored (in the store
        or earlier in this batch) and not yet confirmed, and the repeated dedupe keys."""
        if not dedupe_window and not any(m.dup for m in messages) and not any(marks):
            return list(range(len(messages)))  # QoS 0 only: nothing to mark
        return self._redeliveries.choose(txn, [m.dup for m in messages], marks,
                                         [m.key for m in messages], first_id, wall, dedupe_window)

    @guarded
    def messages(self, limit: int = 100, topic: Optional[str] = None,
                 after: Optional[int] = None) -> List[Message]:
        """Oldest first; `topic` is an MQTT filter (`+`/`#` allowed); `after` an exclusive id."""
        return self.messages_page(limit, topic, after).found

    @guarded
    def messages_page(self, limit: int = 100, topic: Optional[str] = None,
                      after: Optional[int] = None, budget: Optional[int] = None) -> ScanPage[Message]:
        """`messages`, looking at no more than `budget` inbox records (see `_scan_page`)."""
        select = None if topic is None else (lambda raw: topic_matches(topic, _topic_of(raw)))
        return self._scan_page(self._inbox, limit, after, _decode_message, None, budget, select)

    @guarded
    def ack(self, ids: Iterable[int]) -> int:
        """Remove messages by id. Idempotent: an id already gone is not an error."""
        keys = _keys_of(ids)

        def work(txn: lmdb.Transaction) -> int:
            removed = 0
            for key in keys:
                raw = txn.pop(key, db=self._inbox)
                if raw is not None:
                    self._unindex(txn, key, raw)
                    removed += 1
            self._add_counter(txn, b"acked", removed)
            return removed

        return self._write(work) if keys else 0  # type: ignore[return-value]

    @guarded
    def purge(self) -> int:
        """Remove every inbox message (the API asks for confirmation first)."""
        def work(txn: lmdb.Transaction) -> int:
            count = txn.stat(self._inbox)["entries"]
            txn.drop(self._inbox, delete=False)
            txn.drop(self._expiry, delete=False)
            txn.drop(self._consumer_acks, delete=False)  # acks of ids that are gone
            self._add_counter(txn, b"purged", count)
            return count

        return self._write(work)  # type: ignore[return-value]

    # -- the ingress link's persistent session ------------------------------------------------

    @guarded
    def session_seen(self, client_id: str) -> Optional[float]:
        """When (wall clock) a link of `client_id` was last up on a persistent session, or None.
        It tells a new process (after a restart or a power cut) that the broker held a session
        for us, so a session it lost meanwhile is reported, not passed over in silence."""
        with self._read() as txn:
            raw = txn.get(_SESSION + client_id.encode(), db=self._meta)
            return _WALL.unpack(raw)[0] if raw is not None and len(raw) == _WALL.size else None

    @guarded
    def note_session(self, client_id: str, wall: float) -> None:
        self._write(lambda txn: txn.put(_SESSION + client_id.encode(), _WALL.pack(wall), db=self._meta))

    @guarded
    def expire(self, now: Optional[float] = None, batch: int = 1000) -> int:
        """Remove up to `batch` messages that are due (bounded txn): a message of this boot
        once its real age reached expireSeconds, one of an earlier boot by the wall clock
        (clock.py). `now` (tests) is a wall-clock time in this boot's first frame."""
        reading = self._frames.reading(now)

        def work(txn: lmdb.Transaction) -> int:
            self._frames.note(txn, reading)
            timeline = self._frames.timeline(txn, reading)
            cutoffs: Dict[int, bytes] = {}
            index = txn.cursor(db=self._expiry)
            inbox = txn.cursor(db=self._inbox)
            removed = visited = seq = 0
            while removed < batch and visited < batch and index.set_range(_SEQ.pack(seq)):
                entry, last = index.key(), index.value()
                seq = _SEQ.unpack(entry[:4])[0]
                if seq not in cutoffs:
                    cutoffs[seq] = _ID.pack(_ms(timeline.cutoff(seq)) + 1)
                if entry[4:12] >= cutoffs[seq]:
                    seq += 1  # nothing more due in this boot's part of the index
                    continue
                visited += 1
                last = last or entry[12:]
                inbox.set_range(entry[12:])
                while removed < batch and inbox.key() and inbox.key() <= last:
                    inbox.delete()
                    removed += 1
                index.delete()
                rest = inbox.key()
                if rest and rest <= last:  # out of budget inside this range: keep what is left
                    txn.put(entry[:12] + rest, last, db=self._expiry)
            self._add_counter(txn, b"expired", removed)
            return removed

        return self._write(work)  # type: ignore[return-value]

    # -- figures ------------------------------------------------------------------------------

    @guarded
    def stats(self) -> Dict[str, object]:
        """Counts, oldest ages, totals and size used against the cap."""
        with self._read() as txn:
            timeline = self._frames.timeline(txn)
            first_inbox = txn.cursor(db=self._inbox)
            oldest = _decode_message(first_inbox.key(), self._checked(first_inbox.value()), timeline) \
                if first_inbox.first() else None
            first_outbox = txn.cursor(db=self._outbox)
            oldest_out = _outbox_entry(first_outbox.key(), unpack_record(self._checked(first_outbox.value()), 5),
                                       timeline) \
                if first_outbox.first() else None
            figures: Dict[str, object] = {
                "inbox_count": txn.stat(self._inbox)["entries"],
                "inbox_oldest": oldest.timestamp if oldest else None,
                "inbox_oldest_age": oldest.age if oldest else None,
                "inbox_last_id": self._counter(txn, b"inbox_last_id"),
                "outbox_count": txn.stat(self._outbox)["entries"],
                "outbox_oldest": oldest_out.created if oldest_out else None,
                "outbox_oldest_age": oldest_out.age if oldest_out else None,
                "dead_count": txn.stat(self._dead)["entries"],
                "used_bytes": self._used_bytes(txn),
                "cap_bytes": self.cap_bytes,
                "when_full": self.when_full,
            }
            for name in COUNTERS:
                figures[name] = self._counter(txn, name.encode())
        return figures

    @guarded
    def inbox_count(self) -> int:
        with self._read() as txn:
            return txn.stat(self._inbox)["entries"]


def _topic_of(raw: memoryview) -> str:
    """An inbox record's topic, without building the message (filters look at many records)."""
    return unpack_record(raw, 7)[1]


def dup_marks(messages: Sequence[Incoming]) -> List[Optional[DupMark]]:
    """Each message's DUP mark (`Incoming.mark`, computed once per message)."""
    return [m.mark for m in messages]
