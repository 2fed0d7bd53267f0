"""`flashlexd store verify` and `flashlexd store recover`: read a possibly damaged store.

Neither maps the file. Both read it with `storecheck.TreeReader` (pread, every page header
and node checked), so no damage can crash them the way it can crash LMDB (SIGBUS past the end
of a truncated file, garbage offsets in a garbled page).

verify: the meta pages, then every page of every tree (the free-page tree, the main tree and
each named database), then every record decoded as the store wrote it (key width, msgpack
shape, key order) and counted against its database's entry count. Exit 0 when all of that
holds, 1 otherwise.

recover: reads the newest intact meta page's trees, skipping damaged pages (and what hangs
under them) and records that do not decode, and writes what it read into a fresh store, as it
was: every database (those it does not check too), the expiry ranges each moved to start at a
message still there, the id counters raised to the highest id copied (ids must keep growing).
It reports per database how many records it copied and how many the database counted but were
not readable.

Run both with the daemon stopped: these readers do not take LMDB's reader slots, so a running
daemon could reuse pages under them (`recover` refuses while the daemon holds the data dir).
"""
from __future__ import annotations

import bisect
import errno
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Tuple

import lmdb

from flashlexd import __version__, ackjournal, paths, redelivery, storecheck
from flashlexd.storecheck import DataFileDamaged, TreeReader
from flashlexd.consumers import ConsumerState
from flashlexd.store import Store, StoreError
from flashlexd.storebase import SCHEMA_VERSION, full_disk
from flashlexd.storedamage import CorruptRecord, unpack_record

DATABASES = ("inbox", "expiry", "outbox", "recent", "meta")  # checked record by record
# What is checked is what every schema so far writes: later schemas add fields at the end of a
# record and bytes at the front of an expiry key, so those are lower bounds; other databases
# and other meta entries are walked page by page and copied as they are.
MIN_KEY = {"inbox": 8, "expiry": 16, "outbox": 8, "recent": 2, "dead": 8}
EXACT_KEY = {"inbox": 8, "outbox": 8, "recent": 2, "dead": 8}
MIN_FIELDS = {"inbox": 7, "outbox": 5, "dead": 8}  # msgpack array length of a record
DEAD_FIELDS = 3  # a dead letter: attempts, reason, dead_at, then the outbox record
COUNTERS = frozenset({b"schema", b"inbox_last_id", b"outbox_last_id", b"received", b"duplicates",
                      b"acked", b"acked_offset", b"released", b"expired", b"dropped_full", b"purged", b"queued",
                      b"sent"})
_ID = struct.Struct(">Q")
ENTRIES = 6  # index of md_entries in an MDB_db
UNKNOWN = -1  # records lost: the database's own record is unreadable
PARTIAL = ".partial-"  # NEWDIR.partial-XXXX, NEWDIR/.partial-XXXX on a mount point: the store until whole


_TIME = (int, float)
# (timestamp, topic, payload, qos, retain, mid, expires_at) and (created, topic, payload, qos, retain)
INBOX_TYPES = (_TIME, (str,), (bytes,), (int,), (bool,), (int,), _TIME + (type(None),))
OUTBOX_TYPES = (_TIME, (str,), (bytes,), (int,), (bool,))
_LATEST = 2 ** 63 / 1000  # seconds: times are stored as milliseconds in 64-bit keys


def _field_problem(record: list, types: Tuple[tuple, ...]) -> Optional[str]:
    for index, (value, expected) in enumerate(zip(record, types)):
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            return f"field {index} is a {type(value).__name__}"
        if isinstance(value, float) and not 0 <= value < _LATEST:
            return f"field {index} is an impossible time ({value!r})"
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < _LATEST:
            return f"field {index} is out of range ({value})"
    return None


def record_problem(name: str, key: bytes, value: bytes) -> Optional[str]:
    """Why this record is not one the store writes, or None."""
    if len(key) < MIN_KEY.get(name, 1) or len(key) != EXACT_KEY.get(name, len(key)):
        return f"a {len(key)}-byte key"
    if name in MIN_FIELDS:
        try:
            record = unpack_record(value, MIN_FIELDS[name])
        except CorruptRecord as exc:
            return str(exc)
        if name == "dead":
            dead_at = record[2]
            if not (isinstance(dead_at, _TIME) or (isinstance(dead_at, list) and len(dead_at) == 3)):
                return "a dead letter's time is not a time or a 3-field stamp"
            record = record[DEAD_FIELDS:]
        stamp = 7 if name == "inbox" else 5  # boot seq, boottime, then the MQTT 5 properties
        if len(record) > stamp + 1 and (type(record[stamp]) is not int
                                        or type(record[stamp + 1]) not in (int, float)):
            return "its clock stamp is not a boot seq and a boottime"
        if len(record) > stamp + 2 and not isinstance(record[stamp + 2], dict):
            return "its properties are not a map"
        return _field_problem(record, INBOX_TYPES if name == "inbox" else OUTBOX_TYPES)
    if name == "expiry" and len(value) not in (0, 8):
        return f"an expiry entry of {len(value)} bytes"
    if name == "recent" and len(value) < 8:
        return f"a DUP mark of {len(value)} bytes"
    if name == "meta" and key in COUNTERS and len(value) != 8:
        return f"a counter of {len(value)} bytes"
    try:  # what the store itself decodes, by its own decoders
        if name == "unconfirmed":
            redelivery.decode_mark(value)
        elif name == "dedupe" and key[:1] == b"k":
            redelivery.decode_stamp(value)
        elif name == "consumers":
            ConsumerState.unpack(key, value)
    except CorruptRecord as exc:
        return str(exc)
    return None


# -- verify ---------------------------------------------------------------------------------------

def verify(data_dir: Path) -> Tuple[bool, List[str]]:
    """(ok, report lines; the last one the verdict) for the store in `data_dir`."""
    data_file = data_dir / "data.mdb"
    if not data_file.is_file():
        return False, [f"no store in {data_dir} (no data.mdb)"]
    lines: List[str] = []
    try:
        meta = storecheck.check_data_file(data_file)
        if meta is None:
            return True, [f"store in {data_dir} is empty"]
        with open(data_file, "rb") as data:
            reader = TreeReader(data.fileno(), meta, strict=True)
            for key, value, _ in reader.records(meta.free_root, "free-page tree"):
                _check_free_list(key, value, meta.last_page)
            found = dict(reader.databases())
            for name in DATABASES:
                if name not in found:
                    raise DataFileDamaged(f"database {name} is missing")
            newer = _newer_schema(reader, found, data_dir)
            if newer:
                return False, [newer]
            for name in list(DATABASES) + sorted(set(found) - set(DATABASES)):
                lines.append(f"{name}: {_verify_records(reader, name, found[name])} records")
    except DataFileDamaged as exc:
        return False, lines + [f"store in {data_dir} is damaged: {exc}"]
    return True, lines + [f"store in {data_dir}: every page and record reads back"
                          f" ({reader.pages} pages)"]


def _newer_schema(reader: TreeReader, databases: Dict[str, Tuple[int, ...]], data_dir: Path) -> Optional[str]:
    """Why a store written by a newer flashlexd is not read here (None: this schema or older).
    Its records are that schema's: read with this one's decoders, they would be called damage
    (verify) or dropped as records that do not decode (recover)."""
    if "meta" not in databases:
        return None
    for key, value, _ in reader.records(databases["meta"][-1], "database meta"):
        if key == b"schema" and len(value) == _ID.size:
            schema = _ID.unpack(value)[0]
            if schema > SCHEMA_VERSION:
                return (f"store in {data_dir} has schema {schema}; this flashlexd ({__version__})"
                        f" reads up to {SCHEMA_VERSION}: use the flashlexd that wrote it (upgrade flashlexd)")
            return None
    return None


def _check_free_list(key: bytes, value: bytes, last_page: int) -> None:
    """A free-page record: a count, then that many page numbers, in descending order."""
    word = storecheck.PGNO.size
    count = storecheck.PGNO.unpack_from(value, 0)[0] if len(value) >= word else -1
    pages = [storecheck.PGNO.unpack_from(value, word * (1 + i))[0] for i in range(max(count, 0))] \
        if len(value) == word * (count + 1) else None
    if pages is None or any(not 2 <= p <= last_page for p in pages) or pages != sorted(pages, reverse=True):
        raise DataFileDamaged(f"free-page tree: the list of transaction {key.hex()} is garbled")


def _verify_records(reader: TreeReader, name: str, db: Tuple[int, ...]) -> int:
    count, previous = 0, None
    for key, value, _ in reader.records(db[-1], f"database {name}"):
        problem = record_problem(name, key, value)
        if problem is None and previous is not None and key <= previous:
            problem = "keys out of order"
        if problem:
            raise DataFileDamaged(f"database {name}, record {count + 1}: {problem}")
        previous, count = key, count + 1
    if count != db[ENTRIES]:
        raise DataFileDamaged(f"database {name}: {count} records read, it counts {db[ENTRIES]}")
    return count


# -- recover --------------------------------------------------------------------------------------

def recover(data_dir: Path, to_dir: Path, cap_bytes: int) -> Tuple[bool, List[str]]:
    """Copy what is readable from the store in `data_dir` into a new store in `to_dir`. A
    failure past the checks (unreadable source, a target that cannot be written or fills its
    disk) is one line, and leaves `to_dir` as it was (absent or empty) so that the same command
    can be run again."""
    data_file = data_dir / "data.mdb"
    if data_file.is_symlink():  # never followed: see _read_regular
        return False, [f"{data_file} is a symlink: refused (recover copies what a data dir holds, and"
                       " whoever made the link would choose what it copies to the data dir's owner)"]
    if not data_file.is_file():
        return False, [f"no store in {data_dir} (no data.mdb)"]
    try:
        if to_dir.exists() and set(to_dir.iterdir()) - set(_partials_inside(to_dir)):
            return False, [f"{to_dir} is not empty: recover writes a fresh store into a new directory"]
    except OSError as exc:  # a file, or a directory that cannot be listed
        return False, [f"{to_dir}: {exc.strerror}: recover writes a fresh store into a new directory"]
    partial: Optional[Path] = None
    try:
        lines = _clear_partials(to_dir)
        inside = _own_disk(to_dir)
        partial = Path(tempfile.mkdtemp(prefix=PARTIAL if inside else to_dir.name + PARTIAL,
                                        dir=to_dir if inside else to_dir.parent))
        ok, copy_lines = _recover_into(data_file, partial, to_dir, cap_bytes)
        lines += copy_lines
        if ok:
            (_move_up if inside else _put_in_place)(data_dir, partial, to_dir)
    except (OSError, lmdb.Error, StoreError, paths.UnsafePath) as exc:
        ok, lines = False, [f"cannot recover {data_dir} into {to_dir}: {exc}"]
    if not ok and partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    return ok, lines


def _clear_partials(to_dir: Path) -> List[str]:
    """Remove the partial stores an earlier recover into `to_dir` left when it was cut off
    (a kill, a power cut): never a store, and they would fill the disk the rerun needs."""
    paths.make_dir(to_dir.parent, paths.PARENT_MODE)
    lines = []
    for leftover in sorted(to_dir.parent.glob(to_dir.name + PARTIAL + "*")) + _partials_inside(to_dir):
        shutil.rmtree(leftover)
        lines.append(f"removed {leftover}: left by a recover that was cut off")
    return lines


def _own_disk(to_dir: Path) -> bool:
    """`to_dir` is a mount point (a new disk): it cannot be renamed onto (EBUSY), and its
    parent's disk may have no room for the store, so the store is built inside it."""
    return to_dir.is_dir() and (os.path.ismount(to_dir) or
                                to_dir.stat().st_dev != to_dir.parent.stat().st_dev)


def _partials_inside(to_dir: Path) -> List[Path]:
    """The partial stores a recover cut off left inside `to_dir`, a mount point: the only
    entries that do not make it count as not empty."""
    if not _own_disk(to_dir):
        return []
    return sorted(path for path in to_dir.glob(PARTIAL + "*") if path.is_dir() and not path.is_symlink())


def _put_in_place(data_dir: Path, partial: Path, to_dir: Path) -> None:
    """The new store, whole (owner, files and names on disk), renamed to `to_dir` in one step:
    a recover cut off before leaves `to_dir` absent or empty, never a store missing records or
    its ack journal that `verify` would pass and the switch-over would put in place."""
    _make_whole(data_dir, partial)
    os.rename(partial, to_dir)  # onto a missing or empty directory; `recover` checked which
    _fsync(to_dir.parent)


def _move_up(data_dir: Path, partial: Path, to_dir: Path) -> None:
    """The new store, whole, moved from `partial` up into `to_dir` (a mount point) file by
    file, data.mdb last: a recover cut off meanwhile leaves no data.mdb in `to_dir`, so no
    store that `verify` would pass or `run` would open with messages missing (`run` refuses
    the ack journal alone). lock.mdb stays behind: LMDB makes it afresh, and a `to_dir` with
    only it would be opened as a new, empty store."""
    _make_whole(data_dir, partial)
    if os.geteuid() == 0:
        _give_to_owner_of(data_dir, to_dir)  # the mount point is the store's directory
    moving = [path for path in partial.iterdir() if path.name != "lock.mdb"]
    for path in sorted(moving, key=lambda path: path.name == "data.mdb"):
        os.rename(path, to_dir / path.name)
        _fsync(to_dir)  # each name on disk before the next: data.mdb's after all the others
    shutil.rmtree(partial)
    _fsync(to_dir)


def _make_whole(data_dir: Path, partial: Path) -> None:
    """The new store in `partial` owned as the damaged one is and synced to disk."""
    if os.geteuid() == 0:  # only root can (and, under sudo, must) give it away
        _give_to_owner_of(data_dir, partial)
    for path in (*partial.iterdir(), partial):
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _give_to_owner_of(data_dir: Path, to_dir: Path) -> None:
    """The new store (its dir and files) owned as the damaged one is: `recover` runs as root
    (sudo), and a store left root's 0700/0600 cannot be opened by a service running as another
    user once moved into place (systemd re-owns only a StateDirectory)."""
    owner = os.stat(data_dir)
    for path in (to_dir, *to_dir.iterdir()):
        info = os.lstat(path)
        if (info.st_uid, info.st_gid) != (owner.st_uid, owner.st_gid):
            os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def _recover_into(data_file: Path, build_dir: Path, to_dir: Path, cap_bytes: int) -> Tuple[bool, List[str]]:
    """The copy itself, into `build_dir`: (written, lines naming `to_dir`, the store's name once
    whole); `recover` removes `build_dir` when it was not written."""
    with _read_regular(data_file) as data:
        metas = storecheck.readable_metas(data)
        if not metas:
            return False, [f"store in {data_file.parent}: neither meta page is readable; nothing to recover"]
        meta = max(metas, key=lambda m: m.txnid)
        reader = TreeReader(data.fileno(), meta, strict=False)
        databases = dict(reader.databases())
        try:
            newer = _newer_schema(reader, databases, data_file.parent)
        except DataFileDamaged:
            newer = None  # an unreadable meta database: the copy reports it
        if newer:
            return False, [newer]
        lines = [f"read meta page {meta.number} (transaction {meta.txnid})"]
        names = list(DATABASES) + sorted(set(databases) - set(DATABASES))  # others: as they are
        Store(build_dir, cap_bytes).close()  # the fresh store: its databases and schema
        if reader.problems:  # the main tree is damaged: every database the schema makes may
            names += sorted(set(_databases_of(build_dir)) - set(names))  # be behind it: each reported
        # room for all that was stored, even over a cap lowered since (the daemon then rejects
        # or drops, as for any store over its cap)
        room = max(cap_bytes, os.fstat(data.fileno()).st_size)
        target = lmdb.open(str(build_dir), map_size=room + Store.headroom(room), max_dbs=len(names) + 4,
                           mode=0o600)
        copied: List[str] = []  # reported once committed: a commit refused copied nothing
        try:
            with target.begin(write=True) as txn:
                copy = _Copy(reader, databases, txn,
                             {name: target.open_db(name.encode(), txn=txn) for name in names})
                losses = [copy.database(name, copied) for name in names if name != "expiry"]
                losses.append(copy.expiry(copied))
                copy.fix_counters()
        except lmdb.Error as exc:  # a full disk in the daemon's words, not LMDB's EIO
            cause = full_disk(str(exc), build_dir) or str(exc)
            return False, lines + [f"cannot write the new store in {to_dir}: {cause}"]
        finally:
            target.close()
        lines += copied
    lines += _copy_ack_journal(data_file.parent, build_dir)
    for problem in reader.problems[:10]:
        lines.append(f"skipped: {problem}")
    if len(reader.problems) > 10:
        lines.append(f"skipped: ... {len(reader.problems) - 10} more damaged pages or records")
    lost = ("an unknown number of records lost" if UNKNOWN in losses else
            f"{sum(losses)} records lost" if any(losses) else "nothing was lost")
    lines.append(f"new store written to {to_dir}; {lost}")
    return True, lines


def _databases_of(store_dir: Path) -> List[str]:
    """The names of the databases in a sound store's main tree."""
    env = lmdb.open(str(store_dir), readonly=True, lock=False, max_dbs=1)
    try:
        with env.begin() as txn:
            return [key.decode() for key, _ in txn.cursor()]
    finally:
        env.close()


def _copy_ack_journal(data_dir: Path, to_dir: Path) -> List[str]:
    """The acks the journal holds beyond what the store applied (a kill or power cut before the
    apply) returned to their apps: the recovered store applies them when next opened, as the
    old one would have (its applied-through mark came with `meta`)."""
    journal = data_dir / ackjournal.FILE_NAME
    try:
        with _read_regular(journal) as source:
            content = source.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        why = "it is a symlink, not followed" if exc.errno == errno.ELOOP else exc.strerror
        return [f"{ackjournal.FILE_NAME}: cannot read it ({why}): acks it held since the"
                " last apply may show their messages again"]
    fd = os.open(to_dir / ackjournal.FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as copy:
        copy.write(content)
        copy.flush()
        os.fsync(copy.fileno())
    return [f"{ackjournal.FILE_NAME}: copied ({len(content)} bytes): the acks it holds are applied"
            " when the new store is opened"]


def _read_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, never through a symlink, and only a regular file: recover runs
    as root and gives what it writes to the data dir's owner, the service user, who could plant
    `acks.journal -> /etc/shadow` or `data.mdb -> another thing's store` (review "security":
    both copied, 3 of 3). OSError (ELOOP for a link) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def _inbox_id_named(database: str, key: bytes, value: bytes) -> int:
    """The inbox id a named consumer's record names (its floor, or an ack entry's id), else 0.
    A floor may stand above the newest stored message (ids past it were given out and are
    gone): the recovered store must not give them out again, or that consumer would never see
    the new messages."""
    try:
        if database == "consumers":
            return ConsumerState.unpack(key, value).floor
        if database == "cacks" and b"\0" in key:
            return _ID.unpack(key[key.index(b"\0") + 1:])[0]
    except (CorruptRecord, struct.error):
        pass  # copied as it is; the consumer's record speaks for itself
    return 0


class _Copy:
    """One recovery's copying, into one write transaction of the fresh store."""

    def __init__(self, reader: TreeReader, databases: Dict[str, Tuple[int, ...]],
                 txn: lmdb.Transaction, targets: Dict[str, object]):
        self.reader, self.databases, self.txn, self.targets = reader, databases, txn, targets
        self.highest = {"inbox": 0, "outbox": 0}  # ids copied: the counters must not go below
        self.inbox_ids: set = set()

    def database(self, name: str, lines: List[str]) -> int:
        """Copy `name`'s well-formed records as they are (the store's own schema, whatever its
        version); records lost, or UNKNOWN."""
        db = self.databases.get(name)
        if db is None:
            lines.append(f"{name}: its database record is unreadable: nothing copied, losses unknown")
            return UNKNOWN
        copied = bad = 0
        for key, value, _ in self.reader.records(db[-1], f"database {name}"):
            if record_problem(name, key, value):
                bad += 1
                continue
            self.txn.put(key, value, db=self.targets[name])
            copied += 1
            if name in self.highest:
                self.highest[name] = max(self.highest[name], _ID.unpack(key)[0])
            self.highest["inbox"] = max(self.highest["inbox"], _inbox_id_named(name, key, value))
            if name == "inbox":
                self.inbox_ids.add(key)
        lost = max(db[ENTRIES] - copied, bad)
        lines.append(f"{name}: copied {copied}, lost {lost}" + (f" ({bad} did not decode)" if bad else ""))
        return lost

    def expiry(self, lines: List[str]) -> int:
        """Copy the expiry ranges (key: a time prefix, then the first id; value: the last id,
        or empty for just the first), each one starting at its first message still copied, so
        that every range starts at a stored message as the store expects."""
        db = self.databases.get("expiry")
        if db is None:
            lines.append("expiry: its database record is unreadable: nothing copied, losses unknown")
            return UNKNOWN
        kept, ids = 0, sorted(self.inbox_ids)
        for key, value, _ in self.reader.records(db[-1], "database expiry"):
            if record_problem("expiry", key, value):
                continue
            prefix, first, last = key[:-8], key[-8:], value or key[-8:]
            at = bisect.bisect_left(ids, first)
            if at < len(ids) and ids[at] <= last:
                self.txn.put(prefix + ids[at], last, db=self.targets["expiry"])
                kept += 1
        lines.append(f"expiry: {kept} ranges kept for the messages copied")
        return 0

    def fix_counters(self) -> None:
        meta = self.targets["meta"]
        for counter, source in ((b"inbox_last_id", "inbox"), (b"outbox_last_id", "outbox")):
            current = _ID.unpack(self.txn.get(counter, db=meta) or _ID.pack(0))[0]
            self.txn.put(counter, _ID.pack(max(current, self.highest[source])), db=meta)
