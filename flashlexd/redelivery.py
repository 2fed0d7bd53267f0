"""Which messages of an inbox append are redeliveries: by content, and under MQTT 5 by packet id.

Two databases of the store, written in the append's own transaction (so they survive a kill
and a power cut exactly as the messages do):

  unconfirmed  digest(8) -> count(4) + seq(8) + link(8) + taken(4) [+ id(2) per copy]: how many
               committed messages with this topic + payload the broker has not yet confirmed as
               acknowledged (workers/barrier.py says when it has). A DUP=1 message whose digest
               is counted here is a broker's redelivery of one of them, whatever its packet id
               (RabbitMQ renumbers them): it is acknowledged, not stored. A DUP=1 message with a
               digest at 0 is new (a first transmission was lost), even if its packet id and
               content equal those of an older, confirmed message. Each confirmation takes one
               off the count. A broker resends each unconfirmed copy once per connection, so
               `taken` counts the copies already accounted for on connection `link` (the
               ingress's random id of it): those that arrived on it, new or recognised. A DUP is
               a redelivery only while an earlier connection's copy is not resent yet (MQTT 5
               forbids resending on the same connection; a 3.1.1 broker that does is caught by
               the ingress while both copies wait in its batch): two copies of "on" in flight at
               a drop, one committed, the other's first transmission lost, are one redelivery
               and one new message. A broker resends what it holds of a topic before anything
               newer on it, so when a fresh copy (DUP=0) comes, the earlier connections' copies
               not resent by then are dropped: their PUBACKs reached the broker, only the
               barrier's answer was lost (a PUBACK sent just before a drop or a kill), and
               left, they would take new copies first sent as a DUP for redeliveries. Under
               MQTT 5 a broker must resend a copy under its packet id, so the ids of the
               unconfirmed copies are kept (up to MIDS_MAX, the newest, in the order their
               confirmations come): a DUP under one of them is a redelivery, and while they are
               known for each copy a DUP under another id is not, whatever the count. A mark
               of an earlier version, or with a copy of a 3.1.1 connection, has no ids, and past
               MIDS_MAX copies the oldest have none: the count decides until those are
               confirmed or dropped. A content that never comes fresh again keeps a stale count:
               the table is therefore capped at MARKS_MAX entries, the oldest going first by
               `seq`, the inbox id from which the content has had unconfirmed copies (a content
               that keeps coming does not keep a stale count young); the live ones are those of
               the last batch or two, far below the cap.
  dedupe       b"k" + key(16) -> ms(8) and b"t" + ms(8) + key(16) -> b"": application keys
               (flashlexd/dedupe.py) stored in the last window, the second form ordered by
               time so the expired ones are dropped from the front, a few per append.
"""
from __future__ import annotations

import hashlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import lmdb
from flashlexd.clock import STEP_TOLERANCE
from flashlexd.storedamage import CorruptRecord

MARK = struct.Struct(">IQQI")  # count, seq, link, taken; then the copies' packet ids (2 bytes each)
MID_BYTES = 2
# packet ids kept per content (16 KB at most): more copies unconfirmed, the count alone decides
# for the oldest. Two batches (workers/ingress.py BATCH_MAX) of one content wait for the barrier
# at once under load: kept, whatever the broker's window.
MIDS_MAX = 8192
_OLD_MARK = struct.Struct(">IQ")  # count, seq: before the links were counted (link 0, none taken)
_MS = struct.Struct(">Q")
MARKS_MAX = 16384  # ~0.5 MB of marks at most (more with many copies); live ones are a few batches
_AHEAD_TOLERANCE_MS = int(STEP_TOLERANCE * 1000)  # a stamp later than now by less: a clock's jitter
PRUNE_PER_APPEND = 1000  # expired dedupe keys dropped per append, at most


class Redeliveries:
    def __init__(self, unconfirmed: object, dedupe: object):
        self.unconfirmed = unconfirmed
        self.dedupe = dedupe

    def settle(self, txn: lmdb.Transaction, digests: Iterable[bytes]) -> None:
        """The broker confirmed one acknowledgement per digest: take each off its count (each
        mark read and written once: a batch confirms up to a thousand copies of one content)."""
        for digest, confirmed in Counter(digests).items():
            raw = txn.get(digest, db=self.unconfirmed)
            if raw is None:
                continue
            mark = _Mark.read(raw)
            for _ in range(min(confirmed, mark.count)):
                mark.confirm_oldest()
            if mark.count:
                txn.put(digest, mark.packed(), db=self.unconfirmed)
            else:
                txn.delete(digest, db=self.unconfirmed)

    def choose(self, txn: lmdb.Transaction, dups: Sequence[bool], digests: Sequence[Optional[bytes]],
               keys: Sequence[Optional[bytes]], seq: int, now: float,
               window: Optional[float], links: Sequence[int] = (),
               mids: Optional[Sequence[int]] = None) -> List[int]:
        """Indexes of the messages to store; counts the others' marks. `dups` are the DUP
        flags, `digests` from store.dup_marks (None: QoS 0), `keys` the dedupe keys, `links`
        the connection each message came on (none: a caller that does not know, and any DUP of
        a counted content is a redelivery). `mids`: the packet ids, when the broker keeps them
        on a resend (MQTT 5 requires it): a DUP is then a redelivery only when its packet id is
        an unconfirmed copy's, so a new message of that content whose first transmission was
        lost is stored even while an older copy's count waits for a confirmation that will
        never come (the link dropped between the broker's handling of its PUBACK and our
        barrier's answer)."""
        marks: Dict[bytes, _Mark] = {}
        changed: Dict[bytes, None] = {}
        hashes = [hashlib.blake2b(k, digest_size=16).digest() if k is not None and window else None
                  for k in keys]
        now_ms = int(now * 1000)
        since = now_ms - int((window or 0) * 1000)
        fresh: Dict[bytes, None] = {}
        chosen = []
        for i, (dup, digest, key) in enumerate(zip(dups, digests, hashes)):
            if digest is not None:
                mark = marks.get(digest)
                if mark is None:
                    mark = marks[digest] = _Mark.read(txn.get(digest, db=self.unconfirmed))
                if links:
                    mark.account(links[i])
                    changed[digest] = None
                mid = mids[i] if mids is not None else None
                if dup and mark.redelivered(mid, bool(links)):
                    continue  # a redelivery of one we hold: its confirmation settles the mark
                if links and not dup:
                    mark.drop_unresent()
                mark.add_copy(seq, mid)
                changed[digest] = None
            if key is not None:
                if key in fresh or self._seen(txn, key, since, now_ms):
                    continue  # the application's duplicate: acknowledged, counted, not stored
                fresh[key] = None
            chosen.append(i)
        if changed:
            txn.cursor(db=self.unconfirmed).putmulti(
                [(d, marks[d].packed()) for d in sorted(changed)])
            self._cap(txn, seq)
        if window:
            self._remember(txn, fresh, now_ms, since)
        return chosen

    def _seen(self, txn: lmdb.Transaction, key: bytes, since: int, now_ms: int) -> bool:
        """Whether `key` was stored in the window (from `since` on). A stamp later than now
        was written by an earlier boot whose clock ran ahead of this one's (this boot started
        in 1970, or at an old fake-hwclock time): its age is unknown, and holding it against
        the key would throw new messages away for as long as the gap lasts (a whole boot:
        stamps stay in the boot's first frame), so it is not; a duplicate stored is the
        lesser harm."""
        raw = txn.get(b"k" + key, db=self.dedupe)
        return raw is not None and since <= decode_stamp(raw) <= now_ms + _AHEAD_TOLERANCE_MS

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
            if decode_mark(cursor.value())[1] < oldest_kept:
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
        return [(d, MARK.pack(*counts[d], 0, 0)) for d in sorted(counts)]


def decode_stamp(raw: bytes) -> int:
    """The milliseconds of a dedupe key's stamp (`k` entries); a damaged one is reported as damage."""
    if len(raw) != _MS.size:
        raise CorruptRecord(f"a dedupe key stamp of {len(raw)} bytes")
    return _MS.unpack(raw)[0]


@dataclass
class _Mark:
    """One content's unconfirmed copies, in the order their confirmations come: first those of
    earlier connections that this one (`link`) has not resent yet, then the `taken` ones this
    connection accounted for, in arrival order (recognised resends and new copies alike: their
    PUBACKs go out in that order). `since` is the inbox id from which the content has had
    copies (the cap drops by it, so a content that keeps coming does not make a stale count
    young again). `ids` are the packet ids of the newest copies in that order, at most MIDS_MAX;
    the copies without one come first, so after a burst of more than MIDS_MAX, a copy of a
    3.1.1 connection, or for a mark of an earlier version, the ids are known for every copy
    again once the older ones are confirmed or dropped."""
    count: int = 0
    since: int = 0
    link: int = 0
    taken: int = 0
    ids: List[int] = field(default_factory=list)

    @classmethod
    def read(cls, raw: Optional[bytes]) -> _Mark:
        return cls(*decode_mark(raw), decode_mids(raw)) if raw else cls()

    def packed(self) -> bytes:
        ids = self.ids[-MIDS_MAX:]
        return MARK.pack(self.count, self.since, self.link, self.taken) + struct.pack(f">{len(ids)}H", *ids)

    def account(self, link: int) -> None:
        """One more copy accounted for on connection `link` (none yet when it is a new one)."""
        if self.link != link:
            self.link, self.taken = link, 0
        self.taken += 1

    def _unresent(self) -> int:
        """Copies of earlier connections not resent on this one (the copy being accounted
        for, already in `taken`, is not one of them)."""
        return max(0, self.count - (self.taken - 1))

    def redelivered(self, mid: Optional[int], on_links: bool) -> bool:
        """Whether a DUP of this content is the broker's resend of a copy held: under its packet
        id when the broker keeps ids (`mid`) and the id is an unconfirmed copy's, or is not one
        while every copy's id is known; else while an earlier connection's copy is not resent
        yet on this one (any copy, when `on_links` is false). A resend recognised moves to
        this connection's copies, with its id."""
        if mid is not None and mid in self.ids:
            if on_links:
                self._resent(self.ids.index(mid))
            return True
        if mid is not None and self.ids and len(self.ids) == self.count:
            return False
        if not (self._unresent() if on_links else self.count):
            return False
        if mid is not None:
            self.ids.append(mid)  # an id-less copy (the oldest) resent: its id is known now
        return True

    def _resent(self, at: int) -> None:
        """The copy of `ids[at]` resent on this connection: an earlier connection's moves to
        this one's copies; one of this connection's own was accounted for already."""
        if at < self._unresent() - (self.count - len(self.ids)):
            self.ids.append(self.ids.pop(at))
        else:
            self.taken -= 1  # resent on this connection again (3.1.1)

    def drop_unresent(self) -> None:
        """A fresh copy (DUP 0) came: a broker sends what it still holds of a topic before
        anything newer on it, so the earlier connections' copies not resent by now had their
        PUBACKs processed before the barrier's answer was lost: left, they would take new
        copies first sent as a DUP for redeliveries. Wrong only for a broker that breaks
        that order, and then a resend is stored twice, never a message lost."""
        stale = self._unresent()
        if stale:
            self.ids = self.ids[max(0, stale - (self.count - len(self.ids))):]
            self.count -= stale

    def add_copy(self, seq: int, mid: Optional[int]) -> None:
        """One more unconfirmed copy, first sent in the batch from inbox id `seq`, under packet
        id `mid` (None: not kept, 3.1.1, and the ids are known for none)."""
        if not self.count:
            self.since = seq
        if mid is None:
            self.ids = []
        else:
            self.ids.append(mid)
        self.count += 1

    def confirm_oldest(self) -> None:
        """This connection's oldest copy confirmed (PUBACKs are confirmed in the order they
        were sent), or with none taken on it, the oldest one (a confirmation that came on an
        earlier connection)."""
        at = (max(0, self.count - self.taken) if self.taken else 0) - (self.count - len(self.ids))
        if at >= 0:
            del self.ids[at]
        self.count -= 1
        self.taken = max(0, self.taken - 1)


def decode_mids(raw: bytes) -> List[int]:
    """The packet ids of the unconfirmed copies ([]: not known for each)."""
    count = max(0, len(raw) - MARK.size) // MID_BYTES
    return list(struct.unpack_from(f">{count}H", raw, MARK.size)) if count else []


def decode_mark(raw: bytes) -> Tuple[int, int, int, int]:
    """(count, seq, link, taken) of an `unconfirmed` value; a damaged one is reported as damage."""
    if MARK.size <= len(raw) <= MARK.size + MIDS_MAX * MID_BYTES and (len(raw) - MARK.size) % MID_BYTES == 0:
        return MARK.unpack_from(raw)
    if len(raw) == _OLD_MARK.size:
        return (*_OLD_MARK.unpack(raw), 0, 0)
    raise CorruptRecord(f"an unconfirmed-message mark of {len(raw)} bytes")
