"""The durable LMDB store shared by every flashlexd process.

One environment, six named databases:
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
  recent  mid(2) -> digest(8) of the message last stored under that mid: recognises a broker
          redelivery (DUP) of a stored message (older stores append the id; only the first 8
          bytes are read)
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

import hashlib
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import lmdb
import msgpack
from flashlexd import paths, storecheck
from flashlexd.bootframes import BootFrames
from flashlexd.clock import LEGACY_SEQ, Clock, SystemClock, Timeline
from flashlexd.storedamage import DAMAGE_ERRORS, CorruptRecord, describe, guarded, unpack_record
from flashlexd.topics import topic_matches
from flashlexd.wire import FULL_POLICIES

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: boot frames; stamps with boot seq and boottime; boot seq in expiry keys
_ID = struct.Struct(">Q")
_SEQ = struct.Struct(">I")
_MID = struct.Struct(">H")
_MAX_ID = 2 ** 64 - 1
_RECORD_OVERHEAD = 64  # bytes of B-tree node and index entries per message, roughly
POLICIES = FULL_POLICIES  # flashlex.app.db.whenFull
COUNTERS = ("received", "duplicates", "acked", "expired", "dropped_full", "purged", "queued", "sent",
            "outbox_dropped", "dead_lettered", "dead_retried", "dead_dropped")  # totals in meta
DupMark = Tuple[bytes, bytes]  # (packed packet id, digest of topic + payload)
_NEARLY_FULL_BYTES = 1024 * 1024  # free space under which a write's EIO means a full disk


_DEAD_FIELDS = 3  # a dead letter's own fields, before the outbox record it keeps whole


class StoreError(Exception):
    """A store problem that the caller reports in one line."""


class StoreFull(StoreError):
    """The store reached its cap and the policy says refuse."""


class DiskFull(StoreError):
    """The filesystem holding the store has no space left (before the store reached its cap)."""


class StoreForkError(StoreError):
    """The store was used in a process other than the one that opened it."""


class StoreDamaged(StoreError):
    """The store's file is damaged: found before opening it (`storecheck`) or by LMDB or a
    record that does not decode while in use. The store is read-only from then on."""


class StoreBusy(StoreError):
    """A bounded write (`write_wait`) did not get LMDB's write lock in time: another process
    holds it, e.g. a worker that hung inside a transaction. Nothing was written."""


@dataclass(frozen=True)
class Incoming:
    """A message as received from the broker, before it has an id."""
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    mid: int = 0
    dup: bool = False


@dataclass(frozen=True)
class Message:
    """A stored inbox message; the fields the FlashLex SDK kept, plus its expiry."""
    id: int
    timestamp: float
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    expires_at: Optional[float]
    age: float = 0.0  # real seconds since it arrived (clock.py's rule), when it was read

    @property
    def pk(self) -> str:
        return str(self.id)

    def to_dict(self) -> dict:
        return {"id": self.id, "pk": self.pk, "timestamp": self.timestamp, "topic": self.topic,
                "payload": self.payload, "qos": self.qos, "retain": self.retain, "mid": self.mid,
                "expires_at": self.expires_at, "age": self.age}


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    created: float
    topic: str
    payload: bytes
    qos: int
    retain: bool
    age: float

    def to_dict(self) -> dict:
        return {"id": self.id, "created": self.created, "topic": self.topic,
                "payload": self.payload, "qos": self.qos, "retain": self.retain, "age": self.age}


@dataclass(frozen=True)
class DeadLetter(OutboxEntry):
    """An outbox entry moved aside because the broker refused it `attempts` times."""
    attempts: int
    reason: str
    dead_at: float

    def to_dict(self) -> dict:
        return dict(super().to_dict(), attempts=self.attempts, reason=self.reason,
                    dead_at=self.dead_at)


def _key(record_id: int) -> bytes:
    return _ID.pack(record_id)


def _keys_of(ids: Iterable[int]) -> List[bytes]:
    """Sorted distinct keys of `ids`; ids that cannot exist (< 1, >= 2**64) are left out."""
    return sorted({_key(i) for i in map(int, ids) if 0 < i <= _MAX_ID})


def _start(cursor: lmdb.Cursor, after: Optional[int]) -> bool:
    """Position `cursor` on the first record with an id greater than `after` (None: the first)."""
    if after is None or after < 1:
        return cursor.first()
    return after < _MAX_ID and cursor.set_range(_key(after + 1))


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _expiry_prefix(seq: int, expires_at: float) -> bytes:
    """The first 12 bytes of an expiry index key: boot seq, expiry in that boot's frame."""
    return _SEQ.pack(seq) + _ID.pack(_ms(expires_at))


def _stamp_of(record: list, seq_at: int) -> Tuple[int, Optional[float]]:
    """(boot seq, boottime) of a record whose stamp fields start at `seq_at`; schema-1 records
    have none (the wall-clock rule)."""
    if len(record) > seq_at + 1:
        return record[seq_at], record[seq_at + 1]
    return LEGACY_SEQ, None


class Store:
    """One process's handle on the store. Not thread-safe: one per process, used by one thread.

    `write_wait` (seconds; None: no bound) bounds how long a write waits for LMDB's write lock,
    which is shared by every process: a process stopped inside a write transaction (a hung
    worker) holds it until it is killed. The supervisor uses it so that an API call cannot
    stall its loop, which is what kills hung workers. Such a write runs in a helper thread
    (LMDB's lock wait releases the GIL) and raises StoreBusy when the wait runs out."""

    def __init__(self, data_dir: Path, cap_bytes: int, when_full: str = "reject",
                 expire_seconds: Optional[float] = None, write_wait: Optional[float] = None,
                 clock: Optional[Clock] = None, check_pages: bool = False):
        if when_full not in POLICIES:
            raise ValueError(f"when_full must be one of {POLICIES}")
        self.path = Path(data_dir)
        self.cap_bytes = cap_bytes
        self.when_full = when_full
        self.expire_seconds = expire_seconds
        self.write_wait = write_wait
        self._waiting: Optional[threading.Thread] = None  # a called-off write, queued for the lock
        self._pid = os.getpid()
        self._packer = msgpack.Packer(use_bin_type=True)  # reused: packb builds one per call
        self.clock: Clock = clock or SystemClock()
        self.damage: Optional[str] = None  # why the store is read-only, once damage was met
        try:
            # before LMDB maps it: the meta pages (no SIGBUS), or every page (`check_pages`)
            check = storecheck.walk_pages if check_pages else storecheck.check_data_file
            check(self.path / "data.mdb")
        except storecheck.DataFileDamaged as exc:
            raise StoreDamaged(f"store in {self.path} is damaged: {exc};"
                               f" {storecheck.HINT}") from None
        try:
            paths.make_dir(self.path, paths.DATA_DIR_MODE)  # modes whatever the umask
            self._env = lmdb.open(str(self.path), map_size=cap_bytes + self.headroom(cap_bytes),
                                  max_dbs=8, sync=True, metasync=True, readahead=False,
                                  meminit=False, mode=0o600)
        except (OSError, lmdb.Error, paths.UnsafePath) as exc:
            raise StoreError(f"cannot open store in {self.path}: {exc}") from None
        try:
            self._env.reader_check()  # slots left by processes killed with SIGKILL
            self._open_databases()
        except DAMAGE_ERRORS as exc:
            self._env.close()
            raise StoreDamaged(f"store in {self.path} is damaged: {describe(exc)};"
                               f" {storecheck.HINT}") from None
        except lmdb.Error as exc:
            self._env.close()
            raise StoreError(f"cannot open store in {self.path}: {exc}") from None
        except BaseException:
            # A failed open must not leave its handle behind: a second handle on the same file
            # in one process breaks LMDB's locks when either is closed.
            self._env.close()
            raise

    def _open_databases(self) -> None:
        with self._env.begin(write=True) as txn:
            self._inbox = self._env.open_db(b"inbox", txn=txn)
            self._expiry = self._env.open_db(b"expiry", txn=txn)
            self._outbox = self._env.open_db(b"outbox", txn=txn)
            self._dead = self._env.open_db(b"dead", txn=txn)
            self._recent = self._env.open_db(b"recent", txn=txn)
            self._meta = self._env.open_db(b"meta", txn=txn)
            self._frames = BootFrames(self._meta, self.clock)
            schema = self._counter(txn, b"schema")
            if schema > SCHEMA_VERSION:
                raise StoreError(f"store in {self.path} has schema {schema}; this flashlexd reads "
                                 f"up to {SCHEMA_VERSION}: upgrade flashlexd or use another --data-dir")
            if schema == 1:
                self._migrate_expiry_index(txn)
            if schema < SCHEMA_VERSION:
                self._set_counter(txn, b"schema", SCHEMA_VERSION)
            self._frames.register(txn, (self._first_seq(txn, self._inbox, 7),
                                        self._first_seq(txn, self._outbox, 5)))
            self._back_the_map()  # under the write lock: no other process is growing the file
        self._page_size = self._env.stat()["psize"]

    def _back_the_map(self) -> None:
        """Extend data.mdb (sparsely: no disk space is used) to the size of the memory map.
        LMDB reads a damaged page's garbage node offsets as they are; past the end of the
        file such a read is a SIGBUS that kills the process, inside the file it is garbage
        that LMDB or our decoding reports. The file only grows here, so no page is cut."""
        data = self.path / "data.mdb"
        map_size = self._env.info()["map_size"]
        if data.stat().st_size < map_size:
            os.truncate(data, map_size)

    def _migrate_expiry_index(self, txn: lmdb.Transaction) -> None:
        """Schema 1 -> 2: expiry keys gain the boot seq; schema-1 keys are wall-clock times
        (seq 0). Records keep their layout: a record without stamp fields is a seq-0 record."""
        cursor = txn.cursor(db=self._expiry)
        old = [(bytes(key), bytes(value)) for key, value in cursor if len(key) == 16]
        for key, value in old:
            txn.delete(key, db=self._expiry)
        txn.cursor(db=self._expiry).putmulti((_SEQ.pack(LEGACY_SEQ) + key, value) for key, value in old)

    def _first_seq(self, txn: lmdb.Transaction, db: object, seq_at: int) -> Optional[int]:
        """The boot seq of the oldest record in `db` (seqs never decrease along the ids)."""
        cursor = txn.cursor(db=db)
        return _stamp_of(unpack_record(cursor.value(), seq_at), seq_at)[0] if cursor.first() else None

    @staticmethod
    def headroom(cap_bytes: int) -> int:
        """Map space beyond the cap, kept so deletes and acks still work in a full store."""
        return max(8 * 1024 * 1024, cap_bytes // 8)

    @classmethod
    def from_config(cls, store_config, write_wait: Optional[float] = None,
                    check_pages: bool = False) -> "Store":
        return cls(store_config.data_dir, store_config.cap_bytes, store_config.when_full,
                   store_config.expire_seconds, write_wait, check_pages=check_pages)

    def close(self) -> None:
        if os.getpid() == self._pid:
            if self._waiting is not None and self._waiting.is_alive():
                self._waiting.join(self.write_wait)  # a called-off write: let it abort first
                if self._waiting.is_alive():
                    return  # still queued for the lock: closing under it could crash; exit frees it
            self._env.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _damaged(self, detail: Optional[str]) -> StoreDamaged:
        """Remember the first damage met (logged once: every later call would meet it again);
        None: the refusal of a write to a store already known to be damaged."""
        if detail is None:
            return StoreDamaged(f"{self.damage} (read-only until recovered)")
        if self.damage is None:
            self.damage = f"store in {self.path} is damaged: {detail}"
            log.error("%s; the store is read-only now (nothing more is acknowledged to the broker);"
                      " %s", self.damage, storecheck.HINT)
        return StoreDamaged(self.damage)

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            raise StoreForkError("store used across fork(): open a new Store in each process")

    def _write(self, work: Callable[[lmdb.Transaction], object], bounded: bool = True):
        """Run `work` in one durable write transaction, with one-line errors."""
        self._check_pid()
        if bounded and self.write_wait is not None:
            return self._bounded_write(work)
        for _ in range(2):
            try:
                with self._env.begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)  # another process grew the map; adopt its size
            except lmdb.MapFullError:
                raise StoreFull(f"store in {self.path} is full (cap {self.cap_bytes} bytes)") from None
            except DAMAGE_ERRORS:
                raise  # named by `guarded`, which also makes the store read-only
            except lmdb.Error as exc:
                raise self._write_error(exc) from None
        raise StoreError(f"store in {self.path}: map resized repeatedly")

    def _write_error(self, exc: lmdb.Error) -> StoreError:
        """One line for a failed write. A commit that runs out of disk space fails with ENOSPC,
        or with EIO when LMDB's write was cut short (it reports short writes as EIO), which
        reads like a failing disk: an EIO on a (nearly) full filesystem is called what it is."""
        text = str(exc)
        if "No space left" in text:
            return DiskFull(f"store in {self.path}: no space left on device ({text})")
        if "Input/output error" in text:
            try:
                fs = os.statvfs(self.path)
                free = fs.f_bavail * fs.f_frsize
            except OSError:
                free = None
            if free is not None and free < _NEARLY_FULL_BYTES:
                return DiskFull(f"store in {self.path}: no space left on device ({free} bytes free; {text})")
        if isinstance(exc, lmdb.DiskError):
            return StoreError(f"store in {self.path}: disk error: {text}")
        return StoreError(f"store in {self.path}: {text}")

    def _bounded_write(self, work: Callable[[lmdb.Transaction], object]):
        """`_write` from a helper thread, waiting at most `write_wait` for it to get the lock.
        When the wait runs out the write is called off (should it get the lock later, it
        aborts instead of running `work`) and StoreBusy is raised; a write that got the lock
        in time is waited for to the end. While a called-off write is still queued for the
        lock, writes fail at once: one thread waits, not one per call."""
        if self._waiting is not None and self._waiting.is_alive():
            raise StoreBusy(f"store in {self.path} is busy: another process has held its write"
                            f" lock for over {self.write_wait:g}s (a hung worker?)")
        state = {"phase": "waiting"}  # -> "running" (got the lock) or "called off"
        phase_lock = threading.Lock()
        outcome: Dict[str, object] = {}

        def guarded(txn: lmdb.Transaction) -> object:
            with phase_lock:
                if state["phase"] == "called off":
                    raise StoreBusy("called off")  # aborts the transaction: nothing written
                state["phase"] = "running"
            return work(txn)

        def run() -> None:
            try:
                outcome["result"] = self._write(guarded, bounded=False)
            except BaseException as exc:  # handed to the caller
                outcome["error"] = exc

        helper = threading.Thread(target=run, name="store-write", daemon=True)
        helper.start()
        helper.join(self.write_wait)
        if helper.is_alive():
            with phase_lock:
                if state["phase"] == "waiting":
                    state["phase"] = "called off"
                    self._waiting = helper
                    raise StoreBusy(f"store in {self.path} is busy: its write lock was not free"
                                    f" within {self.write_wait:g}s (a hung worker?)")
            helper.join()  # it has the lock: the write is under way, wait for its outcome
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["result"]

    def _read(self):
        """A read transaction whose values are buffers over the map, not copies: `_checked`
        looks at a value's length before anything reads it."""
        self._check_pid()
        try:
            return self._env.begin(write=False, buffers=True)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)
            return self._env.begin(write=False, buffers=True)

    def _checked(self, raw: memoryview) -> memoryview:
        """`raw` unless its length cannot be real. A garbled node can claim gigabytes; reading
        them would run off the end of the memory map (SIGSEGV), so such a value is refused
        before it is read. (A claim that fits the map is read: the file is backed that far.)"""
        if len(raw) > self.cap_bytes + self.headroom(self.cap_bytes):
            raise CorruptRecord(f"a record claims {len(raw)} bytes, more than the whole store")
        return raw

    def _counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        raw = txn.get(name, db=self._meta)
        return _ID.unpack(raw)[0] if raw else 0

    def _set_counter(self, txn: lmdb.Transaction, name: bytes, value: int) -> None:
        txn.put(name, _ID.pack(value), db=self._meta)

    def _add_counter(self, txn: lmdb.Transaction, name: bytes, delta: int) -> None:
        if delta:
            self._set_counter(txn, name, self._counter(txn, name) + delta)

    def _used_bytes(self, txn: lmdb.Transaction) -> int:
        pages = 0
        for db in (self._inbox, self._expiry, self._outbox, self._dead, self._recent, self._meta):
            stat = txn.stat(db)
            pages += stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return pages * self._page_size

    def _make_room(self, txn: lmdb.Transaction, needed: int, what: str) -> None:
        """Apply the cap policy before adding `needed` bytes: only inbox messages are ever
        dropped (under dropOldest); outbox entries and dead letters are the application's."""
        excess = self._used_bytes(txn) + needed - self.cap_bytes
        if excess <= 0:
            return
        if self.when_full == "reject" or what == "outbox":
            raise StoreFull(f"store in {self.path} is full ({self.cap_bytes} byte cap,"
                            f" policy {self.when_full}): {what} append refused")
        dropped = 0
        cursor = txn.cursor(db=self._inbox)
        while excess > 0 and cursor.first():
            key, raw = cursor.key(), cursor.value()
            excess -= len(raw) + _RECORD_OVERHEAD
            cursor.delete()
            self._unindex(txn, key, raw)
            dropped += 1
        if excess > 0:
            raise StoreFull(f"store in {self.path} is full: nothing left to drop (the batch, the"
                            f" outbox and dead letters fill the {self.cap_bytes} byte cap)")
        self._add_counter(txn, b"dropped_full", dropped)

    def _unindex(self, txn: lmdb.Transaction, key: bytes, raw: bytes) -> None:
        """Keep the expiry index exact after inbox record `key` (`raw`) was deleted: if a range
        started at it, the range now starts at the next stored id, or goes if none is left."""
        record = unpack_record(raw, 7)
        expires_at = record[6]
        if expires_at is None:
            return
        entry = _expiry_prefix(_stamp_of(record, 7)[0], expires_at) + key
        last = txn.pop(entry, db=self._expiry)
        if last is None:
            return  # not the first id of its range, which still starts at a stored message
        last = last or key
        following = txn.cursor(db=self._inbox)
        if following.set_range(key) and following.key() <= last:
            txn.put(entry[:12] + following.key(), last, db=self._expiry)

    # -- inbox --------------------------------------------------------------------------------

    @guarded
    def append(self, messages: Sequence[Incoming], now: Optional[float] = None,
               settled: Sequence[DupMark] = ()) -> List[Optional[int]]:
        """Store a batch in ONE transaction (group commit). Returns each message's id, or None
        for a redelivery (DUP) of a message already stored. All or nothing.

        `settled` are the DUP marks (`dup_marks`) of earlier messages whose PUBACK the broker
        has processed (see workers/barrier.py): they can no longer be redelivered, so their
        marks are dropped in the same transaction, before this batch's marks are written."""
        reading = self._frames.reading(now)
        seq = self._frames.current.seq
        # in this boot's first frame: a later step does not move it (clock.py)
        expires_at = reading.boottime + self._frames.current.first + self.expire_seconds \
            if self.expire_seconds else None
        records, marks = self._prepare(messages, (reading.wall, seq, reading.boottime), expires_at)
        needed = sum(map(len, records)) + _RECORD_OVERHEAD * len(records)
        redelivered = any(m.dup for m in messages)

        def work(txn: lmdb.Transaction) -> List[Optional[int]]:
            self._frames.note(txn, reading)
            self._make_room(txn, needed, "inbox")
            for mid, digest in settled:
                if (txn.get(mid, db=self._recent) or b"")[:8] == digest:
                    txn.delete(mid, db=self._recent)
            first_id = self._counter(txn, b"inbox_last_id") + 1
            if redelivered:
                chosen = self._not_redelivered(txn, messages, marks)
                new_records = [records[i] for i in chosen]
                recent = [marks[i] for i in chosen if marks[i]]
            else:
                chosen, new_records = range(len(messages)), records
                recent = [mark for mark in marks if mark]
            last_id = first_id + len(new_records) - 1
            if new_records:
                keys = list(map(_ID.pack, range(first_id, last_id + 1)))
                _, added = txn.cursor(db=self._inbox).putmulti(zip(keys, new_records), append=True)
                if added != len(keys):
                    raise StoreError(f"store in {self.path}: inbox ids out of order (corrupt meta?)")
                if expires_at is not None:  # the batch expires together: one range entry
                    txn.put(_expiry_prefix(seq, expires_at) + keys[0], keys[-1], db=self._expiry)
                if recent:
                    txn.cursor(db=self._recent).putmulti(recent)
            self._set_counter(txn, b"inbox_last_id", last_id)
            self._add_counter(txn, b"received", len(new_records))
            self._add_counter(txn, b"duplicates", len(messages) - len(new_records))
            if not redelivered:
                return list(range(first_id, last_id + 1))
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
                         marks: List[Optional[Tuple[bytes, bytes]]]) -> List[int]:
        """Indexes of the messages to store: all but the DUPs whose mid was last used, in the
        store or earlier in this batch, by a message with the same topic and payload."""
        latest: Dict[bytes, bytes] = {}  # mid -> digest stored earlier in this batch
        chosen = []
        for i, (message, mark) in enumerate(zip(messages, marks)):
            if mark:
                mid, digest = mark
                if message.dup:
                    seen = latest.get(mid)
                    if seen is None:
                        seen = (txn.get(mid, db=self._recent) or b"")[:8]
                    if seen == digest:
                        continue
                latest[mid] = digest
            chosen.append(i)
        return chosen

    @guarded
    def messages(self, limit: int = 100, topic: Optional[str] = None,
                 after: Optional[int] = None) -> List[Message]:
        """Oldest first; `topic` is an MQTT filter (`+`/`#` allowed); `after` an exclusive id."""
        found: List[Message] = []
        if limit <= 0:
            return found
        with self._read() as txn:
            cursor = txn.cursor(db=self._inbox)
            positioned = _start(cursor, after)
            if not positioned:
                return found
            timeline = self._frames.timeline(txn)
            for key, raw in cursor:
                message = _decode_message(key, self._checked(raw), timeline)
                if topic is None or topic_matches(topic, message.topic):
                    found.append(message)
                    if len(found) >= limit:
                        break
        return found

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
            self._add_counter(txn, b"purged", count)
            return count

        return self._write(work)  # type: ignore[return-value]

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

    # -- outbox -------------------------------------------------------------------------------

    @guarded
    def outbox_append(self, entries: Sequence[Tuple[str, bytes, int, bool]],
                      max_entries: int = -1, now: Optional[float] = None) -> List[int]:
        """Queue (topic, payload, qos, retain) entries for the cloud; `max_entries` < 0 is
        unlimited. Refused (never dropped) when full: these are the application's data."""
        reading = self._frames.reading(now)
        stamp = (reading.wall, self._frames.current.seq, reading.boottime)
        needed = sum(len(p) + len(t) + _RECORD_OVERHEAD for t, p, _, _ in entries)

        def work(txn: lmdb.Transaction) -> List[int]:
            self._frames.note(txn, reading)
            if max_entries >= 0 and txn.stat(self._outbox)["entries"] + len(entries) > max_entries:
                raise StoreFull(f"outbox is full ({max_entries} entries, offlinePublishQueueing)")
            self._make_room(txn, needed, "outbox")
            last = self._counter(txn, b"outbox_last_id")
            ids = []
            for topic, payload, qos, retain in entries:
                last += 1
                txn.put(_key(last), msgpack.packb([stamp[0], topic, payload, qos, retain, *stamp[1:]],
                                                  use_bin_type=True), db=self._outbox, append=True)
                ids.append(last)
            self._set_counter(txn, b"outbox_last_id", last)
            self._add_counter(txn, b"queued", len(ids))
            return ids

        return self._write(work)  # type: ignore[return-value]

    @guarded
    def outbox_peek(self, limit: int = 100, after: Optional[int] = None) -> List[OutboxEntry]:
        """Oldest first; `after` is an exclusive id."""
        return self._scan(self._outbox, limit, after, _outbox_entry)

    def _scan(self, db, limit: int, after: Optional[int],
              decode: Callable[[bytes, list, Timeline], OutboxEntry]) -> list:
        """Up to `limit` records of `db` past id `after`, each decoded from (key, fields,
        the store's clock timeline)."""
        found: list = []
        if limit <= 0:
            return found
        with self._read() as txn:
            cursor = txn.cursor(db=db)
            if not _start(cursor, after):
                return found
            timeline = self._frames.timeline(txn)
            for key, raw in cursor:
                found.append(decode(key, unpack_record(self._checked(raw), 5), timeline))
                if len(found) >= limit:
                    break
        return found

    @guarded
    def outbox_remove(self, ids: Iterable[int]) -> int:
        keys = _keys_of(ids)

        def work(txn: lmdb.Transaction) -> int:
            removed = sum(1 for key in keys if txn.delete(key, db=self._outbox))
            self._add_counter(txn, b"sent", removed)
            return removed

        return self._write(work) if keys else 0  # type: ignore[return-value]

    @guarded
    def outbox_drop(self, ids: Iterable[int], dead: bool = False) -> int:
        """Delete outbox entries (or, with `dead`, dead letters) at an application's or an
        operator's request; ids not in that list are skipped. Returns how many were deleted.
        An outbox entry already handed to the broker may still be delivered."""
        keys = _keys_of(ids)
        db = self._dead if dead else self._outbox

        def work(txn: lmdb.Transaction) -> int:
            removed = sum(1 for key in keys if txn.delete(key, db=db))
            self._add_counter(txn, b"dead_dropped" if dead else b"outbox_dropped", removed)
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
        key, now = keys[0], self.clock.now().wall if now is None else now

        def work(txn: lmdb.Transaction) -> bool:
            raw = txn.pop(key, db=self._outbox)
            if raw is None:
                return False
            newest = txn.cursor(db=self._dead)
            in_order = not newest.last() or newest.key() < key  # the usual case: pack pages full
            # the outbox record whole, after the dead letter's own fields: its clock stamp
            # (any layout) keeps giving its real age, and a retry puts it back as it was
            txn.put(key, self._packer.pack([attempts, reason, now, *msgpack.unpackb(raw)]),
                    db=self._dead, append=in_order)
            self._add_counter(txn, b"dead_lettered", 1)
            return True

        return bool(self._write(work))

    @guarded
    def dead_letters(self, limit: int = 100, after: Optional[int] = None) -> List[DeadLetter]:
        """Oldest (lowest outbox id) first; `after` is an exclusive id."""
        return self._scan(self._dead, limit, after, _dead_letter)

    @guarded
    def dead_retry(self, ids: Iterable[int]) -> List[int]:
        """Move dead letters back to the outbox's tail (in id order, under new ids, attempts
        starting again; `created` stays the application's publish time). Ids that are not dead
        letters are skipped. Returns the new outbox ids. A move: not refused by the cap nor by
        offlinePublishQueueing."""
        keys = _keys_of(ids)

        def work(txn: lmdb.Transaction) -> List[int]:
            last = self._counter(txn, b"outbox_last_id")
            moved = []
            for key in keys:
                raw = txn.pop(key, db=self._dead)
                if raw is None:
                    continue
                last += 1
                txn.put(_key(last), self._packer.pack(msgpack.unpackb(raw)[_DEAD_FIELDS:]),
                        db=self._outbox, append=True)
                moved.append(last)
            self._set_counter(txn, b"outbox_last_id", last)
            self._add_counter(txn, b"dead_retried", len(moved))
            return moved

        return self._write(work) if keys else []  # type: ignore[return-value]

    @guarded
    def dead_count(self) -> int:
        with self._read() as txn:
            return txn.stat(self._dead)["entries"]

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

    @guarded
    def outbox_count(self) -> int:
        with self._read() as txn:
            return txn.stat(self._outbox)["entries"]


def dup_marks(messages: Sequence[Incoming]) -> List[Optional[DupMark]]:
    """Each message's `recent` entry (packed mid, digest), None for QoS 0 (never redelivered);
    digest = blake2b-64(topic + NUL + payload). The hash state of `topic + NUL` is made once
    per topic and copied: a batch is usually one topic."""
    pack_mid = _MID.pack
    prefixes: Dict[str, "hashlib._Hash"] = {}
    marks: List[Optional[DupMark]] = []
    for m in messages:
        if not m.qos:
            marks.append(None)
            continue
        prefix = prefixes.get(m.topic)
        if prefix is None:
            prefix = hashlib.blake2b(m.topic.encode() + b"\0", digest_size=8)
            prefixes[m.topic] = prefix
        state = prefix.copy()
        state.update(m.payload)
        marks.append((pack_mid(m.mid & 0xFFFF), state.digest()))
    return marks


def _decode_message(key: bytes, raw: bytes, timeline: Timeline) -> Message:
    if len(key) != _ID.size:
        raise CorruptRecord(f"an inbox key is {len(key)} bytes, not {_ID.size}")
    record = unpack_record(raw, 7)
    wall, topic, payload, qos, retain, mid, expires_at = record[:7]
    seq, boot = _stamp_of(record, 7)
    return Message(_ID.unpack(key)[0], timeline.arrival(wall, seq, boot), topic, payload, qos,
                   retain, mid, None if expires_at is None else timeline.expiry_wall(expires_at, wall, seq, boot),
                   timeline.age(wall, seq, boot))


def _outbox_entry(key: bytes, record: list, timeline: Timeline) -> OutboxEntry:
    if len(key) != _ID.size:
        raise CorruptRecord(f"an outbox key is {len(key)} bytes, not {_ID.size}")
    wall, topic, payload, qos, retain = record[:5]
    seq, boot = _stamp_of(record, 5)
    return OutboxEntry(_ID.unpack(key)[0], timeline.arrival(wall, seq, boot), topic, payload, qos,
                       retain, timeline.age(wall, seq, boot))


def _dead_letter(key: bytes, record: list, timeline: Timeline) -> DeadLetter:
    """A dead record is [attempts, reason, dead_at, *the outbox record it was]."""
    if len(record) < _DEAD_FIELDS + 5:
        raise CorruptRecord(f"a dead letter is not a {_DEAD_FIELDS + 5}-field array")
    attempts, reason, dead_at = record[:_DEAD_FIELDS]
    entry = _outbox_entry(key, record[_DEAD_FIELDS:], timeline)
    return DeadLetter(entry.id, entry.created, entry.topic, entry.payload, entry.qos, entry.retain,
                      entry.age, attempts, reason, dead_at)
