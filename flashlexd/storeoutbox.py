"""The store's outbox (publishes waiting for the egress connection, FIFO) and its dead letters
(entries the broker kept refusing, kept aside until retried or dropped)."""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Tuple

import lmdb
import msgpack
from flashlexd.storebase import StoreBase
from flashlexd.storedamage import guarded
from flashlexd.storerecords import (_DEAD_FIELDS, _RECORD_OVERHEAD, DeadLetter, OutboxEntry, StoreFull,
                                    _key, _keys_of, _read_dead_letter, _read_outbox_entry, _stamp_of)


class OutboxStore(StoreBase):
    # -- outbox -------------------------------------------------------------------------------

    @guarded
    def outbox_append(self, entries: Sequence[Tuple[Any, ...]],
                      max_entries: int = -1, now: Optional[float] = None) -> List[int]:
        """Queue (topic, payload, qos, retain[, properties]) entries for the cloud; `max_entries`
        < 0 is unlimited. Refused (never dropped) when full: these are the application's data.
        `properties` (MQTT 5, OutboxEntry's names) go at the record's end, only when given."""
        return self._outbox_write(entries, max_entries, now, each=False)  # type: ignore[return-value]

    @guarded
    def outbox_append_each(self, entries: Sequence[Tuple[Any, ...]],
                           max_entries: int = -1, now: Optional[float] = None) -> List[Optional[int]]:
        """`outbox_append` of several calls of one entry each in ONE transaction (publishes of
        several apps sharing a commit: ipc/sharedcommit.py): each entry's id, or None for one
        that found the outbox at `max_entries` (the others are queued)."""
        return self._outbox_write(entries, max_entries, now, each=True)

    def _outbox_write(self, entries: Sequence[Tuple[Any, ...]], max_entries: int,
                      now: Optional[float], each: bool) -> List[Optional[int]]:
        reading = self._frames.reading(now)
        stamp = (reading.wall, self._frames.current.seq, reading.boottime)
        needed = sum(len(p) + len(t) + _RECORD_OVERHEAD for t, p, *_ in entries)

        def work(txn: lmdb.Transaction) -> List[Optional[int]]:
            self._frames.note(txn, reading)
            room = max_entries - txn.stat(self._outbox)["entries"] if max_entries >= 0 else len(entries)
            if room < len(entries) and not each:
                raise StoreFull(f"outbox is full ({max_entries} entries, offlinePublishQueueing)")
            self._make_room(txn, needed, "outbox")
            last = self._counter(txn, b"outbox_last_id")
            ids: List[Optional[int]] = []
            for topic, payload, qos, retain, *properties in entries:
                if len(ids) >= room:
                    ids.append(None)
                    continue
                last += 1
                record = [stamp[0], topic, payload, qos, retain, *stamp[1:], *filter(None, properties)]
                txn.put(_key(last), msgpack.packb(record, use_bin_type=True), db=self._outbox, append=True)
                ids.append(last)
            self._set_counter(txn, b"outbox_last_id", last)
            self._add_counter(txn, b"queued", sum(1 for i in ids if i is not None))
            if self.when_full == "dropOldest":  # the room made was an estimate, as for the inbox
                self._settle_cap(txn, self._counter(txn, b"inbox_last_id") + 1)
            return ids

        return self._write(work, reserve=False)  # type: ignore[return-value]

    @guarded
    def outbox_peek(self, limit: int = 100, after: Optional[int] = None,
                    size: Optional[int] = None) -> List[OutboxEntry]:
        """Oldest first; `after` is an exclusive id; `size`: see `_scan_page`."""
        return self._scan(self._outbox, limit, after, _read_outbox_entry, size=size)

    @guarded
    def outbox_remove(self, ids: Iterable[int]) -> int:
        keys = _keys_of(ids)

        def work(txn: lmdb.Transaction) -> int:
            removed = sum(1 for key in keys if txn.delete(key, db=self._outbox))
            self._add_counter(txn, b"sent", removed)
            return removed

        return self._write(work) if keys else 0  # type: ignore[return-value]

    @guarded
    def outbox_last_id(self) -> int:
        """The newest id handed out to an outbox entry (the entry may be gone since)."""
        with self._read() as txn:
            return self._counter(txn, b"outbox_last_id")

    @guarded
    def outbox_drop(self, ids: Iterable[int], dead: bool = False, expired: bool = False) -> int:
        """Delete outbox entries (or, with `dead`, dead letters) at an application's or an
        operator's request, or (`expired`) the egress's, their message expiry passed: counted
        apart, not as anyone's drop. Ids not in that list are skipped. Returns how many were
        deleted. An outbox entry already handed to the broker may still be delivered."""
        keys = _keys_of(ids)
        db = self._dead if dead else self._outbox
        counter = b"dead_dropped" if dead else b"outbox_expired" if expired else b"outbox_dropped"

        def work(txn: lmdb.Transaction) -> int:
            removed = sum(1 for key in keys if txn.delete(key, db=db))
            self._add_counter(txn, counter, removed)
            return removed

        return self._write(work) if keys else 0  # type: ignore[return-value]

    # -- dead letters -------------------------------------------------------------------------

    @guarded
    def outbox_dead_letter(self, entry_id: int, reason: str, attempts: int,
                           now: Optional[float] = None) -> bool:
        """Move outbox entry `entry_id` to the dead letters, with why and after how many
        attempts, in one transaction; False if it is no longer in the outbox (sent or dropped
        meanwhile). A move, so never refused by the cap: a full store must not stop the drain."""
        keys = _keys_of([entry_id])
        if not keys:
            return False
        key, reading = keys[0], self._frames.reading(now)
        # stamped like a record (wall, boot seq, boottime): re-based when the clock steps
        dead_at = [reading.wall, self._frames.current.seq, reading.boottime]

        def work(txn: lmdb.Transaction) -> bool:
            raw = txn.pop(key, db=self._outbox)
            if raw is None:
                return False
            self._frames.note(txn, reading)
            newest = txn.cursor(db=self._dead)
            in_order = not newest.last() or newest.key() < key  # the usual case: pack pages full
            # the outbox record whole, after the dead letter's own fields: its clock stamp
            # (any layout) keeps giving its real age, and a retry puts it back as it was
            txn.put(key, self._packer.pack([attempts, reason, dead_at, *msgpack.unpackb(raw)]),
                    db=self._dead, append=in_order)
            self._add_counter(txn, b"dead_lettered", 1)
            return True

        return bool(self._write(work))

    @guarded
    def dead_letters(self, limit: int = 100, after: Optional[int] = None,
                     size: Optional[int] = None) -> List[DeadLetter]:
        """Oldest (lowest outbox id) first; `after` is an exclusive id; `size`: see `_scan_page`."""
        return self._scan(self._dead, limit, after, _read_dead_letter, size=size)

    @guarded
    def dead_retry(self, ids: Iterable[int]) -> List[int]:
        """Move dead letters back to the outbox's tail (in id order, under new ids, attempts
        starting again; `created` stays the application's publish time). Ids that are not dead
        letters are skipped. Returns the new outbox ids. A move: not refused by the cap nor by
        offlinePublishQueueing."""
        keys = _keys_of(ids)

        def work(txn: lmdb.Transaction) -> List[int]:
            last = self._counter(txn, b"outbox_last_id")
            moved, seqs = [], []
            for key in keys:
                raw = txn.pop(key, db=self._dead)
                if raw is None:
                    continue
                last += 1
                record = msgpack.unpackb(raw)[_DEAD_FIELDS:]
                txn.put(_key(last), self._packer.pack(record), db=self._outbox, append=True)
                moved.append(last)
                seqs.append(_stamp_of(record, 5)[0])
            if seqs:  # the outbox is out of boot order now: their boots' frames must stay
                self._mark_retried(txn, min(seqs), last)
            self._set_counter(txn, b"outbox_last_id", last)
            self._add_counter(txn, b"dead_retried", len(moved))
            return moved

        return self._write(work) if keys else []  # type: ignore[return-value]

    @guarded
    def dead_count(self) -> int:
        with self._read() as txn:
            return txn.stat(self._dead)["entries"]

    @guarded
    def outbox_count(self) -> int:
        with self._read() as txn:
            return txn.stat(self._outbox)["entries"]
