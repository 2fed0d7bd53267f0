"""The store's plumbing: opening (and migrating) the LMDB environment, durable writes with
one-line errors and a bounded wait for the write lock, reads, counters, the cap, the expiry
index's upkeep and the one cursor walk every listing uses. See store.py for the databases.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import struct
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Generic, List, Optional, Set, Tuple, Type, TypeVar

import lmdb
import msgpack
from flashlexd import __version__, ackjournal, paths, storecheck, storelock
from flashlexd.bootframes import BootFrames
from flashlexd.diskwait import Beat, Helper
from flashlexd.clock import LEGACY_SEQ, Clock, SystemClock, Timeline
from flashlexd.logs import LineThrottle
from flashlexd.redelivery import Redeliveries
from flashlexd.storemsgexpiry import DB_NAME as MSG_EXPIRY_DB, MessageExpiry
from flashlexd.storedamage import DAMAGE_ERRORS, IMPOSSIBLE_VALUES, CorruptRecord, describe, unpack_record
from flashlexd.spacereserve import SpaceReserve
from flashlexd.storerecords import (_DEAD_FIELDS, _ID, _RECORD_OVERHEAD, DiskFull, Message, StoreBusy,
                                    StoreDamaged, StoreError, StoreForkError, StoreFull, _decode_message,
                                    _expiry_prefix, _stamp_of, _start)
from flashlexd.wire import FULL_POLICIES

if TYPE_CHECKING:  # storeconsumers imports this module
    from flashlexd.storeconsumers import BacklogCount

log = logging.getLogger("flashlexd.store")
# why another process may hold the write lock past a bounded write's wait: both are passing
# (the supervisor kills a hung worker after heartbeatTimeoutSeconds), so StoreBusy says retry
BUSY_CAUSES = "a long commit on a busy device, or a hung worker"
T = TypeVar("T")
S = TypeVar("S", bound="StoreBase")


def lock_holders(lock_file: Path) -> List[int]:
    """Pids, other than ours, of the processes with the LMDB environment of `lock_file` open:
    each holds a shared POSIX lock on it (LMDB's own). Read from /proc/locks: opening the file
    to ask would drop this process's own locks on it when closed (POSIX)."""
    try:
        info = lock_file.stat()
        with open("/proc/locks", encoding="ascii") as table:
            lines = table.read().splitlines()
    except OSError:
        return []
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    pids = {int(fields[4]) for fields in (line.split() for line in lines)
            if len(fields) > 5 and fields[1] == "POSIX" and fields[5] == where and fields[4].isdigit()}
    return sorted(pids - {os.getpid()})


class Taken:
    """The bytes of the records a walk found, against the answer's size: a read of
    `limit=1000` over 256 KiB messages decoded all 1000 (240 MB in the supervisor) for an
    answer that holds 4 (found by review). A walk stops before the first record that would
    take it past `size` (None: no bound), not decoded: the answer would cut it (one 33 MB
    payload copied for nothing, review "lowmem"); the first record found is always taken."""

    def __init__(self, size: Optional[int]):
        self.size, self.used = size, 0

    def past(self, value: memoryview) -> bool:
        return self.size is not None and self.used + len(value) > self.size

    def took(self, value: memoryview) -> None:
        self.used += len(value)


@dataclass
class ScanPage(Generic[T]):
    """What one bounded walk found. `cursor`: the id to pass as `after` to go on, set only when
    the scan budget or the answer's size ran out before the end and before `limit` records were
    found (None: there is nothing more to look at now). `last`: the last id looked at (None: none)."""
    found: List[T]
    cursor: Optional[int]
    last: Optional[int] = None


SCHEMA_VERSION = 7  # 2: boot frames, stamps with boot seq and boottime, boot seq in expiry keys;
#                   3: DUP marks by content with a count (`unconfirmed`), app dedupe keys;
#                   4: no expiry index (inbox order is expiry order), `acked` derived (wear),
#                      named consumers (`consumers`, `cacks`), MQTT 5 properties at the end
#                      of records and the `msgexpiry` index;
#                   5: a DUP mark also counts the copies its connection accounted for (an
#                      older 12-byte mark reads as none: nothing to convert);
#                   6: a DUP mark may end with its copies' packet ids (MQTT 5): a schema-5
#                      reader calls such a mark damage, so it must refuse the store instead
#                      (a 24-byte mark reads as ids unknown: nothing to convert);
#                   7: up to 8,192 packet ids per mark, where 6 read more than 32 as damage
_SIGNED = struct.Struct(">q")
_RETRIED = b"retried"  # meta: the (boot seq, outbox id) mark of `_mark_retried`
_RETRIED_MARK = struct.Struct(">IQ")
POLICIES = FULL_POLICIES  # flashlex.app.db.whenFull
MAKE_ROOM_STEP = 64  # pages' worth of records dropped before the pages are counted again
NEARLY_FULL_BYTES = 1024 * 1024  # free space under which a write's EIO means a full disk
_MAX_READERS = 126  # LMDB's default, passed to it: lock.mdb's size follows from it
_LOCK_FILE_BYTES = (_MAX_READERS + 2) * 64  # mdb_env_setup_locks: two 64-byte header lines + a slot per reader
_WITH_PROPERTIES = b"\x9a"  # msgpack's header of a 10-item array: an inbox record with properties


ADDRESS_MARGIN = 64 * 1024 * 1024  # address space a process keeps beside its map: heap, thread stacks
_USER_SPACE_32BIT = 3 * 1024 ** 3  # what a 32-bit process (armhf: the 3G/1G split) may map in all
_USER_SPACE_32BIT_ON_64BIT = 4 * 1024 ** 3  # the same process under a 64-bit kernel (a Pi 4's default)


def address_space_left() -> Optional[int]:
    """Bytes of address space this process may still map, or None when unbounded (64-bit,
    no RLIMIT_AS): a 32-bit Pi gives a process ~3 GB, of which the interpreter holds some."""
    bounds = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        bounds.append(soft)
    if struct.calcsize("P") == 4:
        bounds.append(_USER_SPACE_32BIT_ON_64BIT if os.uname().machine in ("aarch64", "x86_64")
                      else _USER_SPACE_32BIT)
    if not bounds:
        return None
    try:
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None
    return min(bounds) - used


class NewerSchema(StoreError):
    """A store a later release wrote (a rollback): `run` exits 2, as a restart cannot mend it
    (exit 1 was retried every 2 s for good: review "upgrade")."""


class OlderSchema(StoreError):
    """A store of an earlier schema opened with `migrate=False` (flashlexd check)."""


_lock_wait_since: Optional[float] = None  # when this process's wait for the write lock began


def lock_wait_since() -> Optional[float]:
    """When (monotonic) this process began to wait for LMDB's write lock, None when it does
    not wait: read by another thread (workers/lockwait.py), so that a worker waiting behind a
    process stopped inside a write is not taken for hung. One per process: a worker's store,
    or the one it is opening."""
    return _lock_wait_since


def begin_write(env: lmdb.Environment) -> lmdb.Transaction:
    """A write transaction; the wait for the write lock (the GIL let go) is noted meanwhile."""
    global _lock_wait_since
    _lock_wait_since = time.monotonic()
    try:
        return env.begin(write=True)
    finally:
        _lock_wait_since = None


class StoreBase:
    """The plumbing of one process's handle on the store (`store.Store` adds the inbox,
    `storeoutbox.OutboxStore` the outbox and dead letters). Not thread-safe: one per process, used by one thread.

    `write_wait` (seconds; None: no bound) bounds how long a write waits for LMDB's write lock,
    which is shared by every process: a process stopped inside a write transaction (a hung
    worker) holds it until it is killed. The supervisor uses it so that an API call cannot
    stall its loop, which is what kills hung workers. Such a write runs in a helper thread
    (LMDB's lock wait releases the GIL) and raises StoreBusy when the wait runs out."""

    def __init__(self, data_dir: Path, cap_bytes: int, when_full: str = "reject",
                 expire_seconds: Optional[float] = None, write_wait: Optional[float] = None,
                 clock: Optional[Clock] = None, check_pages: bool = False,
                 check_progress: Optional[Callable[[int, int], None]] = None, create: bool = True,
                 migrate: bool = True):
        """`create`: make the data dir if it is missing (a worker's store never does: the
        supervisor made it, and one that vanished must not come back empty beside it).
        `migrate`: False refuses a store of an earlier schema (OlderSchema) instead of
        converting it: `flashlexd check` must not make a store the running (or the previous)
        version can no longer open."""
        if when_full not in POLICIES:
            raise ValueError(f"when_full must be one of {POLICIES}")
        self.path = Path(data_dir)
        self.cap_bytes = cap_bytes
        self._map_bytes = cap_bytes + self.headroom(cap_bytes)  # no value is longer than the map
        self.when_full = when_full
        self.expire_seconds = expire_seconds
        self.write_wait = write_wait
        self._waiting: Optional[threading.Thread] = None  # a called-off write, queued for the lock
        self.on_disk_wait: Optional[Beat] = None  # called while a bounded write waits on the disk
        self._pid = os.getpid()
        self._lock_fd: Optional[int] = None  # lock.mdb, read by write_lock_left_by
        self._migrate = migrate
        self._packer = msgpack.Packer(use_bin_type=True)  # reused: packb builds one per call
        self.clock: Clock = clock or SystemClock()
        self.damage: Optional[str] = None  # why the store is read-only, once damage was met
        self._hidden: Set[int] = set()  # inbox ids acked but not yet applied (storeacks.py)
        self._backlog_counts: Dict[str, BacklogCount] = {}  # maxBacklog counts under way (storeconsumers.py)
        self._snapshots: Dict[str, Tuple[Tuple[int, int], object]] = {}  # `_per_snapshot`'s
        self._indexed_txn, self._indexed = -1, False  # a write's look at the msgexpiry index
        self._dropped_in_txn = 0  # inbox messages the cap's dropOldest took in this write
        self._dropped_unsaid, self._drop_lines, self._drops_said = 0, LineThrottle(), False
        self._told_offset: Optional[float] = None  # the clock's offset `note_clock` last told of
        try:
            # before LMDB maps it: the meta pages (no SIGBUS), or every page (`check_pages`)
            if check_pages:
                storecheck.walk_pages(self.path / "data.mdb", check_progress)
            meta = storecheck.check_data_file(self.path / "data.mdb")
            if meta is not None:  # a store over a cap lowered since: deletes still need headroom
                self._map_bytes = max(self._map_bytes, meta.bytes_in_use + self.headroom(cap_bytes))
        except storecheck.DataFileDamaged as exc:
            raise StoreDamaged(f"store in {self.path} is damaged: {exc};"
                               f" {storecheck.HINT}") from None
        try:
            if create:
                paths.make_dir(self.path, paths.DATA_DIR_MODE)  # modes whatever the umask
            elif not self.path.is_dir():
                raise StoreError(f"cannot open store in {self.path}: the directory is gone")
            _refuse_a_journal_without_store(self.path)
            _back_the_lock_file(self.path)
            self._check_address_space()
            self._env = lmdb.open(str(self.path), map_size=self._map_bytes, max_readers=_MAX_READERS,
                                  max_dbs=16, sync=True, metasync=True, readahead=False,
                                  meminit=False, mode=0o600)
            self._reserve = SpaceReserve(self.path)
            try:
                self._identity = self._data_file()
            except OSError:  # the file went between LMDB's open and this stat
                self._env.close()  # no handle left behind (see below)
                raise
        except (OSError, lmdb.Error, paths.UnsafePath, OverflowError) as exc:
            if meta is None:  # a first open: LMDB was to make the store
                self._drop_unfinished_data_file()
            raise StoreError(f"cannot open store in {self.path}: {self._open_problem(exc)}") from None
        try:
            self._env.reader_check()  # slots left by processes killed with SIGKILL
            self._open_databases()  # reads the oldest records' stamps too (clock frames)
        except DAMAGE_ERRORS + IMPOSSIBLE_VALUES as exc:
            self._env.close()
            raise StoreDamaged(f"store in {self.path} is damaged: {describe(exc)};"
                               f" {storecheck.HINT}") from None
        except lmdb.Error as exc:
            self._env.close()
            raise StoreError(f"cannot open store in {self.path}: {self._open_problem(exc)}") from None
        except BaseException:
            # A failed open must not leave its handle behind: a second handle on the same file
            # in one process breaks LMDB's locks when either is closed.
            self._env.close()
            raise

    def _drop_unfinished_data_file(self) -> None:
        """After a failed first open (a full disk): a data.mdb whose meta pages LMDB could not
        complete holds nothing, yet every later start would call it damaged, even once space
        was freed. It goes, and the next start makes it afresh."""
        data = self.path / "data.mdb"
        try:
            storecheck.check_data_file(data)
        except storecheck.DataFileDamaged:
            try:
                data.unlink()
            except OSError:
                pass  # then the next start names the damage, as it would have

    def _open_problem(self, exc: Exception) -> str:
        """Why an open failed, a full disk in the words the daemon's writes use for it, a map
        that does not fit (mmap's ENOMEM, a 32-bit size_t's overflow) naming capMegabytes."""
        if isinstance(exc, (lmdb.MemoryError, OverflowError)):
            return self._map_problem(str(exc))
        return full_disk(str(exc), self.path) or str(exc)

    def _map_problem(self, detail: str) -> str:
        return (f"its {self._map_bytes}-byte memory map (flashlex.app.db.capMegabytes"
                f" {self.cap_bytes // (1024 * 1024)}, plus headroom) does not fit this process's"
                f" address space with {ADDRESS_MARGIN >> 20} MiB to spare ({detail}; a 32-bit"
                " system gives a process ~3 GB); lower capMegabytes")

    def _check_address_space(self) -> None:
        """A map that fits but leaves too little beside it fails later and elsewhere (a thread
        that cannot start, workers' lookups failing for memory): refused here, in one line."""
        left = address_space_left()
        if left is not None and self._map_bytes + ADDRESS_MARGIN > left:
            raise StoreError(f"cannot open store in {self.path}:"
                             f" {self._map_problem(f'{max(left, 0)} bytes left')}")

    def _open_databases(self) -> None:
        with begin_write(self._env) as txn:
            self._inbox = self._env.open_db(b"inbox", txn=txn)
            self._expiry = self._env.open_db(b"expiry", txn=txn)
            self._outbox = self._env.open_db(b"outbox", txn=txn)
            self._dead = self._env.open_db(b"dead", txn=txn)
            self._recent = self._env.open_db(b"recent", txn=txn)
            self._redeliveries = Redeliveries(self._env.open_db(b"unconfirmed", txn=txn),
                                              self._env.open_db(b"dedupe", txn=txn))
            self._meta = self._env.open_db(b"meta", txn=txn)
            self._open_consumer_databases(txn)
            self._msg_expiry = MessageExpiry(self._env.open_db(MSG_EXPIRY_DB, txn=txn))
            self._frames = BootFrames(self._meta, self.clock)
            schema = self._counter(txn, b"schema")
            if schema > SCHEMA_VERSION:
                raise NewerSchema(f"store in {self.path} has schema {schema}; this flashlexd"
                                 f" ({__version__}) reads up to {SCHEMA_VERSION}: upgrade flashlexd"
                                 f" or use another --data-dir")
            if 0 < schema < SCHEMA_VERSION and not self._migrate:
                raise OlderSchema(f"store in {self.path} has schema {schema}, written by an earlier"
                                  f" flashlexd; this one ({SCHEMA_VERSION}) migrates it at its start"
                                  f" (the earlier one cannot open it from then on)")
            if 0 < schema < SCHEMA_VERSION:
                self._refuse_if_open_elsewhere(schema)
            if 0 < schema < 3:
                self._migrate_dup_marks(txn)
            if 0 < schema < 4:
                self._migrate_to_inbox_order(txn)
            if schema < SCHEMA_VERSION:
                self._set_counter(txn, b"schema", SCHEMA_VERSION)
                if schema:
                    log.info("store in %s migrated from schema %d to %d (earlier flashlexd releases"
                             " cannot open it any more)", self.path, schema, SCHEMA_VERSION)
            self._frames.register(txn, self._oldest_seqs(txn))
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
            try:
                os.truncate(data, map_size)
            except OSError as exc:  # EFBIG: a file system with a file size limit (FAT32: 4 GiB)
                raise StoreError(f"cannot open store in {self.path}: data.mdb cannot grow to the"
                                 f" {map_size}-byte map of flashlex.app.db.capMegabytes"
                                 f" {self.cap_bytes // (1024 * 1024)} (plus headroom) here:"
                                 f" {exc.strerror}; lower capMegabytes") from None

    def _open_consumer_databases(self, txn: lmdb.Transaction) -> None:
        """Schema 3 -> 4: named consumers' state (storeconsumers.py). Nothing to convert: a
        schema-3 store gains the two empty databases, and its inbox is the default consumer's."""
        self._consumer_db = self._env.open_db(b"consumers", txn=txn)
        self._consumer_acks = self._env.open_db(b"cacks", txn=txn)

    def _refuse_if_open_elsewhere(self, schema: int) -> None:
        """A migration is one-way, and a release before the data dir lock (flashlexd.lock)
        takes none: started beside a running one, this one migrated the store under it (the
        two then fought over the client id; the earlier one could never start again). So a
        store another live process holds open is not migrated."""
        others = lock_holders(self.path / "lock.mdb")
        if others:
            raise StoreError(f"store in {self.path} (schema {schema}, an earlier flashlexd's) is open"
                             f" in pid {', '.join(map(str, others))}: stop that flashlexd first; this"
                             f" one migrates the store to schema {SCHEMA_VERSION}, which the earlier"
                             " one cannot read")

    def _migrate_dup_marks(self, txn: lmdb.Transaction) -> None:
        """Schema 2 -> 3: the per-mid DUP marks become counted content marks; none is lost."""
        old = [(bytes(key), bytes(value)) for key, value in txn.cursor(db=self._recent)]
        txn.cursor(db=self._redeliveries.unconfirmed).putmulti(Redeliveries.migrated(old))
        txn.drop(self._recent, delete=False)

    def _migrate_to_inbox_order(self, txn: lmdb.Transaction) -> None:
        """Schema 3 -> 4: the expiry index goes (each record keeps its expiry time and the sweep
        walks the inbox, whose key order is the expiry order under one TTL), and `acked`
        becomes a figure derived from the other totals, continuing from its stored value."""
        txn.drop(self._expiry, delete=False)
        stored = self._counter(txn, b"acked")
        txn.delete(b"acked", db=self._meta)
        self._set_signed(txn, b"acked_offset", stored - self._acked_derived(txn))

    def _acked_derived(self, txn: lmdb.Transaction) -> int:
        """Every stored message leaves the inbox by exactly one way: acked is what the
        others do not account for. Derived, so that an ack writes the inbox and nothing else."""
        gone = sum(self._counter(txn, name) for name in (b"released", b"expired", b"dropped_full", b"purged"))
        return self._counter(txn, b"received") - txn.stat(self._inbox)["entries"] - gone

    def _acked_total(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"acked_offset", db=self._meta)
        return self._acked_derived(txn) + (_SIGNED.unpack(raw)[0] if raw else 0)

    def _set_signed(self, txn: lmdb.Transaction, name: bytes, value: int) -> None:
        txn.put(name, _SIGNED.pack(value), db=self._meta)

    def _oldest_seqs(self, txn: lmdb.Transaction) -> Tuple[Optional[int], ...]:
        """The boot seqs whose frames stored records may still need: the oldest record's of
        each tree, and the oldest of the entries dead_retry moved out of that order."""
        return (self._first_seq(txn, self._inbox, 7), self._first_seq(txn, self._outbox, 5),
                self._first_dead_seq(txn), self._retried_seq(txn))

    def _first_dead_seq(self, txn: lmdb.Transaction) -> Optional[int]:
        """The boot seq of the oldest dead letter; LEGACY_SEQ (every frame kept) when it does
        not decode: such a dead letter fails its listing and `store verify`, not the open."""
        try:
            return self._first_seq(txn, self._dead, _DEAD_FIELDS + 5)
        except CorruptRecord:
            return LEGACY_SEQ

    def _mark_retried(self, txn: lmdb.Transaction, seq: int, last_id: int) -> None:
        """Note that outbox ids up to `last_id` may hold a stamp of boot `seq`, older than the
        outbox's first: a retried dead letter goes to the tail with its old boot's stamp."""
        raw = txn.get(_RETRIED, db=self._meta)
        if raw is not None:
            seq = min(seq, _RETRIED_MARK.unpack(raw)[0])
        txn.put(_RETRIED, _RETRIED_MARK.pack(seq, last_id), db=self._meta)

    def _retried_seq(self, txn: lmdb.Transaction) -> Optional[int]:
        """The mark of `_mark_retried` while an outbox entry or dead letter it covers is still
        there (a dead letter keeps its outbox id); else None, and the mark goes."""
        raw = txn.get(_RETRIED, db=self._meta)
        if raw is None:
            return None
        seq, last_id = _RETRIED_MARK.unpack(raw)
        for db in (self._outbox, self._dead):
            cursor = txn.cursor(db=db)
            if cursor.first() and _ID.unpack(cursor.key())[0] <= last_id:
                return seq
        txn.delete(_RETRIED, db=self._meta)
        return None

    def _first_seq(self, txn: lmdb.Transaction, db: object, seq_at: int) -> Optional[int]:
        """The boot seq of the oldest record in `db` (seqs never decrease along the ids)."""
        cursor = txn.cursor(db=db)
        return _stamp_of(unpack_record(cursor.value(), seq_at), seq_at)[0] if cursor.first() else None

    @staticmethod
    def headroom(cap_bytes: int) -> int:
        """Map space beyond the cap, kept so deletes and acks still work in a full store."""
        return max(8 * 1024 * 1024, cap_bytes // 8)

    @classmethod
    def from_config(cls: Type[S], store_config, write_wait: Optional[float] = None,
                    check_pages: bool = False,
                    check_progress: Optional[Callable[[int, int], None]] = None, create: bool = True,
                    migrate: bool = True) -> S:
        """`check_pages`: read every page before LMDB maps the file (storecheck.walk_pages,
        which calls `check_progress(pages read, pages)` as it goes)."""
        return cls(store_config.data_dir, store_config.cap_bytes, store_config.when_full,
                   store_config.expire_seconds, write_wait, check_pages=check_pages,
                   check_progress=check_progress, create=create, migrate=migrate)

    def close(self) -> None:
        if os.getpid() == self._pid and self._dropped_unsaid:  # the log's account ends complete
            self._say_drops()
        if os.getpid() == self._pid and self.can_close():
            self._env.close()  # else: closing under a write queued for the lock could crash; exit frees it
            if self._lock_fd is not None:  # only now: see write_lock_left_by
                os.close(self._lock_fd)
                self._lock_fd = None

    def write_lock_left_by(self, pid: int) -> bool:
        """storelock.write_lock_left_by, read through a descriptor of lock.mdb kept open until
        the environment is closed. Opening one to read the file and closing it dropped every
        POSIX lock this process held on it, LMDB's own: the lock by which other processes see
        this one's reader slots as alive, and the shared one that keeps a new process from
        setting the lock file up afresh under it (review "deps": the supervisor's were gone
        after each worker killed by a signal; py-lmdb 1.4-1.7.0's LMDB then broke its reads,
        MDB_BAD_RSLOT)."""
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(self.path / storelock.LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return storelock.write_lock_left_by(self._lock_fd, pid)

    def can_close(self) -> bool:
        """False while a called-off write still waits for LMDB's write lock (held by a process
        stopped in a commit); it is given `write_wait` to abort first."""
        if self._waiting is not None and self._waiting.is_alive():
            self._waiting.join(self.write_wait)
        return self._waiting is None or not self._waiting.is_alive()

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

    def _data_file(self) -> Tuple[int, int]:
        identity = os.stat(self.path / "data.mdb")
        return identity.st_dev, identity.st_ino

    def clock_steps_recorded(self) -> List[float]:
        """Seconds the wall clock stepped forward (negative: back) as boot frames recorded them,
        this boot's first, then the previous boot's if the store keeps it: a step an earlier
        daemon run or boot saw, which a consumer's last use (a bare wall time) may predate
        (consumerkeeper.py). Only that one: a dead letter keeps every frame since its boot, and
        each boot's step (fake-hwclock's nightly ones) would add up for every consumer."""
        current = self._frames.current
        with self._read() as txn:
            frames = self._frames.snapshot_timeline(txn).frames
        earlier = [f for seq, f in sorted(frames.items()) if seq < current.seq]
        return [f.last - f.first for f in [current] + earlier[-1:]]

    def vanished(self) -> Optional[str]:
        """Why the store's file is no longer at its path (the data dir removed or replaced under
        the daemon), else None. LMDB goes on writing to the open, unlinked file: whatever is
        committed to it from then on is gone at the next start."""
        try:
            if self._data_file() == self._identity:
                return None
        except FileNotFoundError:
            return f"store in {self.path} was removed while in use (no data.mdb there any more)"
        except OSError as exc:
            return f"store in {self.path} cannot be found any more: {exc.strerror or exc}"
        return f"store in {self.path} was replaced while in use (data.mdb is another file)"

    def _write(self, work: Callable[[lmdb.Transaction], object], reserve: bool = True):
        """`_write_reserving`, then a check that the commit went to the store's file: a commit
        to a removed one is refused (a caller acknowledges nothing it did not keep)."""
        def counting_drops(txn: lmdb.Transaction) -> object:
            self._dropped_in_txn = 0  # each try afresh: only the committed one's count is told
            return work(txn)

        result = self._write_reserving(counting_drops, reserve)
        gone = self.vanished()
        if gone is not None:
            raise StoreError(gone)
        if self._dropped_in_txn:
            self._tell_drops(self._dropped_in_txn)
        return result

    def _tell_drops(self, count: int) -> None:
        """dropOldest discards messages no app has read: a WARNING at the first, then at most
        one a minute (at a later drop) with how many since, and the rest when the store closes
        (4,311 were dropped with no line at all, only the `dropped_full` counter; found by review)."""
        self._dropped_unsaid += count
        if self._drop_lines.due(time.monotonic()):
            self._say_drops()

    def _say_drops(self) -> None:
        log.warning("store in %s is at its cap (%d bytes, whenFull: dropOldest): %d oldest inbox"
                    " messages dropped to make room%s (the store's dropped_full counts them all)",
                    self.path, self.cap_bytes, self._dropped_unsaid,
                    " since the last line about it" if self._drops_said else "")
        self._drops_said, self._dropped_unsaid = True, 0

    def _write_reserving(self, work: Callable[[lmdb.Transaction], object], reserve: bool):
        """Run `work` in one durable write transaction, with one-line errors. Refused for a
        full disk, a write that may use the `reserve` (every one but appends and a batch of
        acks that goes in steps when refused) is tried again with a chunk of the space reserve
        released, until it fits or none is left (spacereserve.py): acks and expiry must be
        able to free space."""
        try:
            return self._write_once(work)
        except DiskFull:
            if not reserve:
                raise
        released = [0, 0]  # by the last try, in all

        def releasing(txn: lmdb.Transaction) -> object:
            released[0] = self._reserve.release()
            released[1] += released[0]
            return work(txn)

        try:
            while True:
                try:
                    return self._write_once(releasing)
                except DiskFull:
                    if not released[0]:
                        raise
        finally:
            if released[1]:
                log.warning("store in %s: the disk is full; %d bytes of the space reserve"
                            " released so that acks and expiry can free space", self.path,
                            released[1])

    def _write_once(self, work: Callable[[lmdb.Transaction], object], bounded: bool = True):
        self._check_pid()
        if bounded and self.write_wait is not None:
            return self._bounded_write(work)
        for _ in range(2):
            try:
                with begin_write(self._env) as txn:
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
        full = full_disk(text, self.path)
        if full:
            return DiskFull(f"store in {self.path}: {full}")
        if "Read-only file system" in text:  # raw LMDB words told no way out (review "rocard")
            return StoreError(f"store in {self.path}: the disk is read-only ({text}; the kernel remounts"
                              f" a file system so after an I/O error: a failing SD card? see dmesg, fsck)")
        if isinstance(exc, lmdb.DiskError) or "Input/output error" in text:
            return StoreError(f"store in {self.path}: disk error ({text}: a failing SD card? see dmesg)")
        return StoreError(f"store in {self.path}: {text}")

    def _bounded_write(self, work: Callable[[lmdb.Transaction], object]):
        """`_write` from a helper thread, waiting at most `write_wait` for it to get the lock.
        When the wait runs out the write is called off (should it get the lock later, it
        aborts instead of running `work`) and StoreBusy is raised; a write that got the lock
        in time is waited for to the end, calling `on_disk_wait` meanwhile (diskwait.py).
        While a called-off write is still queued for the lock, writes fail at once: one
        thread waits, not one per call."""
        if self._waiting is not None and self._waiting.is_alive():
            raise StoreBusy(f"store in {self.path} is busy: another process has held its write"
                            f" lock for over {self.write_wait:g}s ({BUSY_CAUSES})")
        state = {"phase": "waiting"}  # -> "running" (got the lock) or "called off"
        phase_lock = threading.Lock()

        def guarded(txn: lmdb.Transaction) -> object:
            with phase_lock:
                if state["phase"] == "called off":
                    raise StoreBusy("called off")  # aborts the transaction: nothing written
                state["phase"] = "running"
            return work(txn)

        began = time.monotonic()
        helper = self._started(Helper(lambda: self._write_once(guarded, bounded=False), "store-write"))
        helper.thread.join(self.write_wait)
        if helper.thread.is_alive():
            with phase_lock:
                if state["phase"] == "waiting":
                    state["phase"] = "called off"
                    self._waiting = helper.thread
                    raise StoreBusy(f"store in {self.path} is busy: its write lock was not free"
                                    f" within {self.write_wait:g}s ({BUSY_CAUSES})")
            helper.wait(began, self.on_disk_wait, beat_first=True)  # it has the lock: the write is under way
        return helper.result()

    def _started(self, helper: Helper[T]) -> Helper[T]:
        try:
            helper.thread.start()
        except RuntimeError as exc:  # no room for its stack: see _check_address_space
            raise StoreError(f"store in {self.path}: {exc} (too little address space beside the"
                             " store's map: lower flashlex.app.db.capMegabytes)") from None
        return helper

    def _read(self):
        """A read transaction whose values are buffers over the map, not copies: `_checked`
        looks at a value's length before anything reads it."""
        self._check_pid()
        try:
            return self._env.begin(write=False, buffers=True)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)
            return self._env.begin(write=False, buffers=True)

    def _per_snapshot(self, txn: lmdb.Transaction, what: str, read: Callable[[lmdb.Transaction], T]) -> T:
        """`read(txn)`, read again only after a commit (by any process: a new snapshot id) or
        an ack journaled since (it hides a message without a commit). For `status`, which is
        polled, and whose figures take dozens of database reads and walks."""
        state = (txn.id(), len(self._hidden))
        kept = self._snapshots.get(what)
        if kept is None or kept[0] != state:
            kept = self._snapshots[what] = (state, read(txn))
        return kept[1]  # type: ignore[return-value]

    def _checked(self, raw: memoryview) -> memoryview:
        """`raw` unless its length cannot be real. A garbled node can claim gigabytes; reading
        them would run off the end of the memory map (SIGSEGV), so such a value is refused
        before it is read. (A claim that fits the map is read: the file is backed that far.)"""
        if len(raw) > self._map_bytes:
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
        for db in (self._inbox, self._expiry, self._outbox, self._dead, self._recent, self._meta,
                   self._redeliveries.unconfirmed, self._redeliveries.dedupe, self._consumer_db,
                   self._consumer_acks, self._msg_expiry.db):
            stat = txn.stat(db)
            pages += stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return pages * self._page_size

    def _make_room(self, txn: lmdb.Transaction, needed: int, what: str) -> None:
        """Before an append of `needed` bytes: top up the space reserve (the append meets a full
        disk first), then apply the cap policy: only inbox messages are ever dropped (under
        dropOldest, for an outbox append too: an inbox the policy keeps at the cap must not
        refuse every publish for good); outbox entries and dead letters are the application's."""
        self._reserve.top_up()
        excess = self._used_bytes(txn) + needed - self.cap_bytes
        if excess <= 0:
            return
        if self.when_full == "reject":
            raise StoreFull(f"store in {self.path} is full ({self.cap_bytes} byte cap,"
                            f" policy {self.when_full}): {what} append refused")
        if not self._drop_to_fit(txn, needed, None, MAKE_ROOM_STEP * self._page_size):
            raise StoreFull(f"store in {self.path} is full ({self.cap_bytes} byte cap, policy"
                            f" {self.when_full}): {what} append refused, nothing left to drop (the"
                            f" batch, the outbox, dead letters and indexes fill the cap)")

    def _settle_cap(self, txn: lmdb.Transaction, below: int) -> None:
        """After an append under dropOldest: `needed` was an estimate, blind to the
        batch's index entries (DUP marks, dedupe keys, expiry) and to page splits, so drop
        inbox messages older than id `below` until the pages used are within the cap again, a
        page's worth at a time (a leaf page is freed only once emptied, so dropping the whole
        excess at once could drop a lot more than needed)."""
        self._drop_to_fit(txn, 0, _ID.pack(below), self._page_size)

    def _drop_to_fit(self, txn: lmdb.Transaction, needed: int, below: Optional[bytes], step: int) -> bool:
        """Drop the oldest inbox messages (keys under `below`, None: any), at most `step` bytes
        of records at a time, counting the pages again after each (the excess is in pages, the
        drops in record bytes), until `needed` more bytes fit in the cap; False when nothing
        is left to drop first."""
        while True:
            excess = self._used_bytes(txn) + needed - self.cap_bytes
            if excess <= 0:
                return True
            step_now = min(excess, step)
            if self._drop_oldest(txn, step_now, below) == step_now:
                return False

    def _drop_oldest(self, txn: lmdb.Transaction, excess: int, below: Optional[bytes]) -> int:
        """Drop the oldest inbox messages (keys under `below`, None: any) until their bytes
        reach `excess`, counted in `dropped_full` and per consumer; returns the excess left."""
        dropped = []
        cursor = txn.cursor(db=self._inbox)
        while excess > 0 and cursor.first():
            key, raw = bytes(cursor.key()), bytes(cursor.value())
            if below is not None and key >= below:
                break
            excess -= len(raw) + _RECORD_OVERHEAD
            cursor.delete()
            dropped.append((key, raw))
        if dropped:
            self._count_drops(txn, dropped)
            self._add_counter(txn, b"dropped_full", len(dropped))
            self._dropped_in_txn += len(dropped)
            if self._msg_expiry.pending(txn):
                self._msg_expiry.forget(txn, self._expiry_entries(txn, dropped))
        return excess

    def _delete_inbox(self, txn: lmdb.Transaction, key: bytes) -> bool:
        """An ack's delete of inbox message `key` (True if it was stored), with its MQTT 5
        expiry entry: left behind, such entries counted toward the cap until due, a day's worth
        or more of them at a steady rate. Only a write that finds the index non-empty reads the
        record it deletes. The look is once a transaction: a write id LMDB gives again follows
        no commit, and no write adds entries before it deletes (`append`, the one that adds
        them, deletes none through here)."""
        if self._indexed_txn != txn.id():
            self._indexed_txn, self._indexed = txn.id(), bool(self._msg_expiry.pending(txn))
        if not self._indexed:
            return txn.delete(key, db=self._inbox)
        raw = txn.pop(key, db=self._inbox)
        if raw is None:
            return False
        self._msg_expiry.forget(txn, self._expiry_entries(txn, [(key, raw)]))
        return True

    def _message(self, key: bytes, raw: bytes, timeline: Timeline) -> Message:
        """Inbox record `key` as a Message, its expiry by the expireSeconds configured now."""
        return _decode_message(key, raw, timeline, self.expire_seconds)

    def _expiry_entries(self, txn: lmdb.Transaction, records: List[Tuple[bytes, bytes]]) -> List[bytes]:
        """The per-message expiry index keys of the inbox `records` that carry an MQTT 5 expiry
        interval, as `append` wrote them. Only records of ten fields (a fixarray header:
        properties) are decoded; one whose fields do not make a key (damage) has none, its
        entry, if any, left to the sweep: an ack or a drop must not fail on it."""
        entries = []
        firsts: Dict[int, Optional[float]] = {}
        for key, raw in records:
            if raw[:1] != _WITH_PROPERTIES:
                continue
            try:
                entry = self._expiry_key(txn, key, unpack_record(raw, 10), firsts)
            except CorruptRecord:
                continue
            if entry is not None:
                entries.append(entry)
        return entries

    def _expiry_key(self, txn: lmdb.Transaction, key: bytes, record: list,
                    firsts: Dict[int, Optional[float]]) -> Optional[bytes]:
        """The expiry index key of one decoded inbox record, or None (no interval, or fields
        that do not make a time). `firsts` caches each boot's frame offset across calls."""
        properties = record[9] if len(record) > 9 and isinstance(record[9], dict) else {}
        interval, seq, boottime = properties.get("message_expiry_interval"), record[7], record[8]
        if not interval or not isinstance(seq, int):
            return None
        if seq not in firsts:
            firsts[seq] = self._frames.first_of(txn, seq)
        first = firsts[seq]
        try:
            return None if first is None else _expiry_prefix(seq, boottime + first + interval) + key
        except (TypeError, ValueError, OverflowError, struct.error):  # not a time: damage
            return None

    def _count_drops(self, txn: lmdb.Transaction, dropped: List[Tuple[bytes, bytes]]) -> None:
        """Per-consumer drop counts (storeconsumers.py); the outbox-only handle has none."""

    def _scan(self, db: object, limit: int, after: Optional[int],
              decode: Callable[[bytes, memoryview, Timeline], T],
              keep: Optional[Callable[[T], bool]] = None, size: Optional[int] = None) -> List[T]:
        """Up to `limit` records of `db` past id `after` (None: from the first), oldest first,
        each decoded from (key, its checked value, the store's clock timeline) and kept when
        `keep` (None: all) says so. The walk is unbounded: see `_scan_page` for a bounded one."""
        return self._scan_page(db, limit, after, decode, keep, size=size).found

    def _scan_page(self, db: object, limit: int, after: Optional[int],
                   decode: Callable[[bytes, memoryview, Timeline], T],
                   keep: Optional[Callable[[T], bool]] = None,
                   budget: Optional[int] = None,
                   select: Optional[Callable[[memoryview], bool]] = None,
                   size: Optional[int] = None) -> ScanPage[T]:
        """The one cursor walk (`_scan`'s), looking at no more than `budget` records (None: no
        bound): a filter that matches little then costs a bounded time per call, however long
        the inbox, and the page says where to go on (`ScanPage.cursor`). `select` sees a
        record's raw value first: one it refuses is not decoded (the cheap part of a filter).
        `size`: stop before the records found would hold more than that many bytes (`Taken`)."""
        page: ScanPage[T] = ScanPage([], None)
        if limit <= 0:
            return page
        with self._read() as txn:
            cursor = txn.cursor(db=db)
            if not _start(cursor, after):
                return page
            timeline = self._frames.snapshot_timeline(txn)
            looked = 0
            taken = Taken(size)
            hidden = self._hidden if db is self._inbox else ()
            for key, raw in cursor:
                if budget is not None and looked >= budget:
                    page.cursor = page.last  # not looked at yet: the next call starts here
                    break
                looked += 1
                previous, page.last = page.last, _ID.unpack(key)[0]
                if page.last in hidden:
                    continue
                value = self._checked(raw)
                if select is not None and not select(value):
                    continue
                if page.found and taken.past(value):
                    page.cursor = page.last = previous  # the next call starts at it
                    break
                record = decode(key, value, timeline)
                if keep is None or keep(record):
                    page.found.append(record)
                    taken.took(value)
                    if len(page.found) >= limit:
                        break
        return page


def full_disk(text: str, directory: Path) -> Optional[str]:
    """`text`, a failed write's error, named a full disk when it is one (else None). LMDB
    reports a write cut short as EIO, which reads like a failing disk: an EIO on a (nearly)
    full filesystem is called what it is."""
    if "No space left" in text:
        try:  # ENOSPC for want of inodes, the disk half empty: said so (review "diskfull")
            inodes = os.statvfs(directory)
            no_inodes = inodes.f_files > 0 and inodes.f_favail == 0
        except OSError:
            no_inodes = False
        if no_inodes:
            return f"no free inodes on its filesystem (df -i; its blocks are not all used: {text})"
        return f"no space left on device ({text}): free some on its filesystem (df -h)"
    if "Input/output error" in text:
        try:
            fs = os.statvfs(directory)
            free: Optional[int] = fs.f_bavail * fs.f_frsize
        except OSError:
            free = None
        if free is not None and free < NEARLY_FULL_BYTES:
            return f"no space left on device ({free} bytes free; {text}): free some on its filesystem (df -h)"
    return None


def _refuse_a_journal_without_store(directory: Path) -> None:
    """An ack journal with no data.mdb beside it is what a `store recover` into a mount point
    leaves when cut off while moving the new store's files up (data.mdb goes last): no store,
    not a fresh one to make there, which would start the daemon on an empty store."""
    if (directory / ackjournal.FILE_NAME).exists() and not (directory / "data.mdb").exists():
        raise StoreError(f"no store in {directory} (no data.mdb, yet an ack journal: a store recover"
                         " into it was cut off? empty it and run the recover again)")


def _back_the_lock_file(directory: Path) -> None:
    """Give lock.mdb its blocks before LMDB maps it. LMDB makes the file sparse and writes it
    through the map, so on a full disk its first write was a SIGBUS that killed the process
    without a word (a crash loop under systemd); here a full disk is ENOSPC, one line. A file
    already larger is backed whole (LMDB reads its size as more reader slots)."""
    lock = directory / "lock.mdb"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(os.fstat(fd).st_size, _LOCK_FILE_BYTES))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # those: a file system that
            raise OSError(exc.errno, exc.strerror, str(lock)) from None  # cannot; LMDB as before
    finally:
        os.close(fd)
