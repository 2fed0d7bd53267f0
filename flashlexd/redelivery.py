"""Which messages of an inbox append are redeliveries, without trusting packet ids.

Two databases of the store, written in the append's own transaction (so they survive a kill
and a power cut exactly as the messages do):

  unconfirmed  digest(8) -> count(4) + seq(8): how many committed messages with this topic +
               payload the broker has not yet confirmed as acknowledged (workers/barrier.py
               says when it has). A DUP=1 message whose digest is counted here is a broker's
               redelivery of one of them, whatever its packet id (RabbitMQ renumbers them):
               it is acknowledged, not stored. A DUP=1 message with a digest at 0 is new (a
               first transmission was lost), even if its packet id and content equal those of
               an older, confirmed message. Each confirmation takes one off the count. A
               PUBACK sent just before a disconnect is never confirmed, and if the broker did
               get it no redelivery takes its count off: the table is therefore capped at
               MARKS_MAX entries, the oldest (lowest seq, an inbox id) going first; the live
               ones are those of the last batch or two (the broker's in-flight window and
               the ingress batch size bound them), far below the cap.
  dedupe       b"k" + key(16) -> ms(8) and b"t" + ms(8) + key(16) -> b"": application keys
               (flashlexd/dedupe.py) stored in the last window, the second form ordered by
               time so the expired ones are dropped from the front, a few per append.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import lmdb
from flashlexd.storedamage import CorruptRecord

MARK = struct.Struct(">IQ")  # count, seq
_MS = struct.Struct(">Q")
MARKS_MAX = 16384  # ~0.5 MB of marks at most; live ones are a few batches
PRUNE_PER_APPEND = 1000  # expired dedupe keys dropped per append, at most


class Redeliveries:
    def __init__(self, unconfirmed: object, dedupe: object):
        self.unconfirmed = unconfirmed
        self.dedupe = dedupe

    def settle(self, txn: lmdb.Transaction, digests: Iterable[bytes]) -> None:
        """The broker confirmed one acknowledgement per digest: take each off its count."""
        for digest in digests:
            raw = txn.get(digest, db=self.unconfirmed)
            if raw is None:
                continue
            count, seq = _mark(raw)
            if count > 1:
                txn.put(digest, MARK.pack(count - 1, seq), db=self.unconfirmed)
            else:
                txn.delete(digest, db=self.unconfirmed)

    def choose(self, txn: lmdb.Transaction, dups: Sequence[bool], digests: Sequence[Optional[bytes]],
               keys: Sequence[Optional[bytes]], seq: int, now: float,
               window: Optional[float]) -> List[int]:
        """Indexes of the messages to store; counts the others' marks. `dups` are the DUP
        flags, `digests` from store.dup_marks (None: QoS 0), `keys` the dedupe keys."""
        counts: Dict[bytes, int] = {}
        added: Dict[bytes, int] = {}
        hashes = [hashlib.blake2b(k, digest_size=16).digest() if k is not None and window else None
                  for k in keys]
        now_ms = int(now * 1000)
        since = now_ms - int((window or 0) * 1000)
        fresh: Dict[bytes, None] = {}
        chosen = []
        for i, (dup, digest, key) in enumerate(zip(dups, digests, hashes)):
            if digest is not None:
                if digest not in counts:
                    raw = txn.get(digest, db=self.unconfirmed)
                    counts[digest] = _mark(raw)[0] if raw else 0
                if dup and counts[digest] > 0:
                    continue  # a redelivery of one we hold: its confirmation settles the mark
                counts[digest] += 1
                added[digest] = counts[digest]
            if key is not None:
                if key in fresh or self._seen(txn, key, since):
                    continue  # the application's duplicate: acknowledged, counted, not stored
                fresh[key] = None
            chosen.append(i)
        if added:
            txn.cursor(db=self.unconfirmed).putmulti(
                [(d, MARK.pack(count, seq)) for d, count in sorted(added.items())])
            self._cap(txn, seq)
        if window:
            self._remember(txn, fresh, now_ms, since)
        return chosen

    def _seen(self, txn: lmdb.Transaction, key: bytes, since: int) -> bool:
        raw = txn.get(b"k" + key, db=self.dedupe)
        if raw is not None and len(raw) != _MS.size:
            raise CorruptRecord(f"a dedupe key stamp of {len(raw)} bytes")
        return raw is not None and _MS.unpack(raw)[0] >= since

    def _remember(self, txn: lmdb.Transaction, keys: Dict[bytes, None], now_ms: int,
                  since: int) -> None:
        stamp = _MS.pack(now_ms)
        for key in keys:
            old = txn.get(b"k" + key, db=self.dedupe)
            if old is not None:
                txn.delete(b"t" + old + key, db=self.dedupe)
            txn.put(b"k" + key, stamp, db=self.dedupe)
            txn.put(b"t" + stamp + key, b"", db=self.dedupe)
        cursor = txn.cursor(db=self.dedupe)
        for _ in range(PRUNE_PER_APPEND):
            if not cursor.set_range(b"t"):
                break
            entry = cursor.key()
            if _MS.unpack(entry[1:9])[0] >= since:
                break
            cursor.delete()
            txn.delete(b"k" + entry[9:], db=self.dedupe)

    def _cap(self, txn: lmdb.Transaction, seq: int) -> None:
        """Once the table passes MARKS_MAX, drop the marks older than the last MARKS_MAX / 2
        inbox ids (see the module docstring). One walk that deletes as it goes: sorting the
        whole table in memory cost the ingress worker 2 MB at every cap under load. Each mark
        came with an inbox id of its own (seq only grows), so at most MARKS_MAX / 2 marks plus
        the current batch's are left."""
        if txn.stat(self.unconfirmed)["entries"] <= MARKS_MAX:
            return
        oldest_kept = seq - MARKS_MAX // 2
        cursor = txn.cursor(db=self.unconfirmed)
        more = cursor.first()
        while more:
            if _mark(cursor.value())[1] < oldest_kept:
                more = cursor.delete() and cursor.key() != b""  # deleting moves to the next
            else:
                more = cursor.next()

    @staticmethod
    def migrated(recent: Iterable[Tuple[bytes, bytes]]) -> List[Tuple[bytes, bytes]]:
        """Schema 2 `recent` entries (mid -> digest(8) [+ id(8)]) as `unconfirmed` entries:
        each was a message whose acknowledgement was not yet confirmed."""
        counts: Dict[bytes, Tuple[int, int]] = {}
        for _, value in recent:
            if len(value) < 8:
                raise CorruptRecord(f"a DUP mark of {len(value)} bytes")
            digest, seq = value[:8], (_MS.unpack(value[8:16])[0] if len(value) >= 16 else 0)
            count, old_seq = counts.get(digest, (0, 0))
            counts[digest] = (count + 1, max(seq, old_seq))
        return [(d, MARK.pack(*counts[d])) for d in sorted(counts)]


def _mark(raw: bytes) -> Tuple[int, int]:
    """(count, seq) of an `unconfirmed` value; a damaged one is reported as damage."""
    if len(raw) != MARK.size:
        raise CorruptRecord(f"an unconfirmed-message mark of {len(raw)} bytes")
    return MARK.unpack(raw)
