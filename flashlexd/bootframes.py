"""The store's record of boots: one `BootFrame` per boot in the meta database (clock.py says
what they are for). Kept apart from store.py: this is the only code that reads or writes them.

A frame is written when a boot first opens the store and again only when that boot's clock
steps (its offset moves by more than STEP_TOLERANCE): no write per message. The frame cached
in a process follows what is committed: a step written in a transaction that then aborts is
noticed again by the next one."""
from __future__ import annotations

import struct
from typing import Dict, Iterable, Optional, Tuple

import lmdb
import msgpack

from flashlexd.clock import BootFrame, Clock, Reading, Timeline

_SEQ = struct.Struct(">I")
_FRAME = b"frame"
_LATEST = b"boot_seq"
_COUNTER = struct.Struct(">Q")


class BootFrames:
    """This process's view of the boot frames in `meta` (an open named database)."""

    def __init__(self, meta: object, clock: Clock):
        self.meta = meta
        self.clock = clock
        self.current: BootFrame = BootFrame(0, b"", 0.0, 0.0)  # until `register`
        self._snapshot: Optional[Tuple[int, Dict[int, BootFrame]]] = None  # (txn id, its frames)

    def register(self, txn: lmdb.Transaction, oldest_in_use: Iterable[Optional[int]]) -> None:
        """Find or make this boot's frame: the latest one if it has our boot id, else a new one
        (then frames older than `oldest_in_use`, the seqs of the oldest stored records, go)."""
        reading = self.clock.now()
        raw = txn.get(_LATEST, db=self.meta)
        latest = _COUNTER.unpack(raw)[0] if raw else 0
        frame = self._read(txn, latest) if latest else None
        if frame is not None and frame.boot_id == self.clock.boot_id:
            self.current = frame
            if frame.stepped(reading):  # while no process ran: cached now, as the open commits
                self.current = BootFrame(frame.seq, frame.boot_id, frame.first, reading.offset)
                self._write(txn, self.current)  # it or fails (clock_steps_recorded sees it)
            return
        self.current = BootFrame(latest + 1, self.clock.boot_id, reading.offset, reading.offset)
        txn.put(_LATEST, _COUNTER.pack(self.current.seq), db=self.meta)
        self._write(txn, self.current)
        oldest = min([seq for seq in oldest_in_use if seq is not None] or [self.current.seq])
        for seq in range(1, oldest):
            txn.delete(_FRAME + _SEQ.pack(seq), db=self.meta)

    def note(self, txn: lmdb.Transaction, reading: Reading) -> Optional[BootFrame]:
        """Record this boot's offset if the clock stepped, so that after a reboot this boot's
        stamps are re-based on it. The frame written (for the caller to cache once the
        transaction commits), or None."""
        if not self.current.stepped(reading):
            return None
        stored = self._read(txn, self.current.seq) or self.current
        if stored.stepped(reading):
            frame = BootFrame(stored.seq, stored.boot_id, stored.first, reading.offset)
            self._write(txn, frame)
            return frame
        self.current = stored  # another process recorded it
        return None

    def first_of(self, txn: lmdb.Transaction, seq: int) -> Optional[float]:
        """Boot `seq`'s `first` offset, the frame its expiry keys were written in (None: gone)."""
        if seq == self.current.seq:
            return self.current.first
        frame = self._read(txn, seq)
        return None if frame is None else frame.first

    def reading(self, now: Optional[float] = None) -> Reading:
        """The clocks now; `now` (tests) is a wall-clock time in this boot's first frame."""
        if now is None:
            return self.clock.now()
        return Reading(now, now - self.current.first)

    def timeline(self, txn: lmdb.Transaction, reading: Reading) -> Timeline:
        """The timeline of a write transaction (its frames as that transaction sees them)."""
        return Timeline(reading, self.current, self._frames_in(txn))

    def snapshot_timeline(self, txn: lmdb.Transaction) -> Timeline:
        """The timeline of a read-only transaction, now. Frames are read once per snapshot:
        only a commit changes them, and every commit makes a new snapshot id (reads are the API's
        hot path; a write transaction's id is not a snapshot, as it may still abort)."""
        if self._snapshot is None or self._snapshot[0] != txn.id():
            self._snapshot = (txn.id(), self._frames_in(txn))
        return Timeline(self.clock.now(), self.current, self._snapshot[1])

    def _frames_in(self, txn: lmdb.Transaction) -> Dict[int, BootFrame]:
        frames: Dict[int, BootFrame] = {}
        cursor = txn.cursor(db=self.meta)
        if cursor.set_range(_FRAME):
            for key, raw in cursor:
                key = bytes(key)  # a read transaction hands out buffers (store.py)
                if not key.startswith(_FRAME) or len(key) != len(_FRAME) + _SEQ.size:
                    break
                seq = _SEQ.unpack(key[len(_FRAME):])[0]
                frames[seq] = BootFrame.from_wire(seq, msgpack.unpackb(raw))
        return frames

    def _read(self, txn: lmdb.Transaction, seq: int) -> Optional[BootFrame]:
        raw = txn.get(_FRAME + _SEQ.pack(seq), db=self.meta)
        return BootFrame.from_wire(seq, msgpack.unpackb(raw)) if raw else None

    def _write(self, txn: lmdb.Transaction, frame: BootFrame) -> None:
        txn.put(_FRAME + _SEQ.pack(frame.seq), msgpack.packb(frame.to_wire()), db=self.meta)
