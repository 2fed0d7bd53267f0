"""Check an LMDB data file's meta pages BEFORE LMDB maps it.

LMDB maps `data.mdb` and trusts it: a file shorter than what its meta page says is in use makes
the first read past the end a SIGBUS (the process dies with no message), and a garbled meta page
sends LMDB to garbage roots. So before opening, `check_data_file` reads the two meta pages with
plain reads (no mmap) and compares them with the file: both must be LMDB meta pages of this
build's layout, their roots and last page inside the file. Anything else is `DataFileDamaged`,
named in one line that points at `flashlexd store recover`.

The layout is LMDB's (mdb.c, 0.9.x): a page starts with `MDB_page` (pgno, pad, flags,
lower, upper); a meta page's body is `MDB_meta` (magic, version, address, mapsize, the free and
main `MDB_db`, last_pg, txnid), where the free db's `md_pad` holds the page size. The sizes are
native (`size_t` is 4 bytes on 32-bit Raspberry Pi OS, 8 on 64-bit), like the library's.
"""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional, Tuple

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_META = 0x08
P_INVALID = 2 ** (8 * struct.calcsize("N")) - 1  # ~(pgno_t)0: an empty tree's root
PAGE_HEADER = struct.Struct("@NHHHH")            # mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper
_DB = "IHHNNNNN"                                 # md_pad, flags, depth, branch, leaf, overflow, entries, root
DB = struct.Struct("@" + _DB)
META = struct.Struct("@IIPN" + _DB + _DB + "NN")  # magic, version, address, mapsize, dbs[2], last_pg, txnid
MIN_PAGE, MAX_PAGE = 512, 65536
DEFAULT_PAGE = 4096  # LMDB uses the OS page size: what to assume when meta page 0 is unreadable
HINT = "see flashlexd store recover"


class DataFileDamaged(Exception):
    """The store's data file is damaged; opening it could crash the process."""


@dataclass(frozen=True)
class Meta:
    """What one meta page says."""
    number: int
    page_size: int
    last_page: int
    txnid: int
    free_root: int
    main_root: int

    @property
    def bytes_in_use(self) -> int:
        return (self.last_page + 1) * self.page_size


def read_meta(page: bytes, number: int) -> Tuple[Optional[Meta], str]:
    """Meta page `number` parsed, or (None, what is wrong with it)."""
    if len(page) < PAGE_HEADER.size + META.size:
        return None, f"meta page {number} is cut short"
    pgno, _, flags, _, _ = PAGE_HEADER.unpack_from(page, 0)
    fields = META.unpack_from(page, PAGE_HEADER.size)
    magic, version = fields[0], fields[1]
    free_db, main_db = fields[4:12], fields[12:20]
    last_page, txnid = fields[20], fields[21]
    page_size = free_db[0]
    if magic != MAGIC:
        return None, f"meta page {number} has no LMDB magic number (0x{magic:08x})"
    if version != DATA_VERSION:
        return None, f"meta page {number} has LMDB data version {version}, not {DATA_VERSION}"
    if pgno != number or not flags & P_META:
        return None, f"meta page {number} has a bad page header (page {pgno}, flags 0x{flags:x})"
    if not (MIN_PAGE <= page_size <= MAX_PAGE and page_size & (page_size - 1) == 0):
        return None, f"meta page {number} has an impossible page size {page_size}"
    if last_page < 1:
        return None, f"meta page {number} has an impossible last page {last_page}"
    roots = (free_db[7], main_db[7])
    for name, root in zip(("free-page", "main"), roots):
        if root != P_INVALID and not 2 <= root <= last_page:
            return None, (f"meta page {number}: the {name} tree's root page {root} is outside"
                          f" pages 2..{last_page}")
    return Meta(number, page_size, last_page, txnid, *roots), ""


def readable_metas(data: BinaryIO) -> List[Meta]:
    """The intact meta pages of an open data file (for recovery: any that is readable)."""
    head = os.pread(data.fileno(), MAX_PAGE + PAGE_HEADER.size + META.size, 0)
    first, _ = read_meta(head, 0)
    second, _ = read_meta(head[first.page_size if first else DEFAULT_PAGE:], 1)
    return [meta for meta in (first, second) if meta is not None]


def check_data_file(path: Path) -> Optional[Meta]:
    """Raise DataFileDamaged unless `path` (a data.mdb) is safe for LMDB to map. Returns the meta
    page LMDB will use (the newer one), or None when there is no file yet or it is empty (LMDB
    initialises those)."""
    try:
        with open(path, "rb") as data:
            size = os.fstat(data.fileno()).st_size
            if size == 0:
                return None
            head = data.read(MAX_PAGE + PAGE_HEADER.size + META.size)
    except OSError as exc:
        if exc.errno == errno.EIO:  # the disk fails to read it back
            raise DataFileDamaged(f"{path} cannot be read: {exc.strerror}") from None
        return None  # no file, or no access: opening it names that problem
    first, problem = read_meta(head, 0)
    if first is None:
        raise DataFileDamaged(f"{path}: {problem}")
    second, problem = read_meta(head[first.page_size:], 1)
    if second is None:
        raise DataFileDamaged(f"{path}: {problem}")
    if second.page_size != first.page_size:
        raise DataFileDamaged(f"{path}: the meta pages disagree on the page size"
                           f" ({first.page_size} and {second.page_size})")
    for meta in (first, second):
        if size < meta.bytes_in_use:
            raise DataFileDamaged(f"{path} is {size} bytes but meta page {meta.number} uses"
                               f" {meta.bytes_in_use} (pages 0..{meta.last_page}): truncated")
    return max((first, second), key=lambda meta: meta.txnid)




# -- every page of every tree, read without mmap ----------------------------------------------

P_BRANCH, P_LEAF, P_OVERFLOW, P_LEAF2 = 0x01, 0x02, 0x04, 0x20
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
KINDS = F_SUBDATA | F_DUPDATA  # node flags that say what a record is: LMDB acts on them
NODE = struct.Struct("@HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize
PGNO = struct.Struct("@N")
INDEX = struct.Struct("@H")
MAX_DEPTH = 32  # LMDB's CURSOR_STACK
PROGRESS_PAGES = 1024  # pages between two progress calls of a walk (4 MiB of 4 KiB pages)
Record = Tuple[bytes, bytes, int]  # key, value (an MDB_db for a named database), node flags


class TreeReader:
    """LMDB's B+trees read with pread, checking every page header and node on the way: a
    garbled page can point anywhere, never past the file, and cannot crash the reader.

    strict: the first damage raises DataFileDamaged (verify). Otherwise a damaged page or
    record is noted in `problems` and skipped with everything under it (recover).

    The store keeps nothing but named databases in the main tree and makes every database a
    plain one (no DUPSORT, no key order of its own), and LMDB acts on what the node and
    database flags say: a record flagged as another kind is MDB_INCOMPATIBLE when deleted or
    overwritten, MDB_CORRUPTED when read, a database's stray flags refuse its opening or its
    reads. Strict readers report such flags; recover, whose copies get fresh flags, reads the
    record's key and value as they are."""

    def __init__(self, fd: int, meta: Meta, strict: bool,
                 progress: Optional[Callable[[int, int], None]] = None):
        """`progress(pages read, pages in the file)` is called every PROGRESS_PAGES pages."""
        self.fd, self.meta, self.strict = fd, meta, strict
        self.problems: List[str] = []
        self.pages = 0
        self.progress = progress
        self._next_progress = PROGRESS_PAGES

    def records(self, root: int, tree: str, kind: int = 0) -> Iterator[Record]:
        """Every record of the tree at `root`, in key order (as far as the pages say); `kind`:
        the KINDS flags each of its records has (F_SUBDATA: the main tree's databases)."""
        if root != P_INVALID:
            yield from self._walk(root, tree, 0, kind)

    def databases(self) -> Iterator[Tuple[str, Tuple[int, ...]]]:
        """(name, MDB_db fields) of every named database in the main tree."""
        for key, value, _ in self.records(self.meta.main_root, "main tree", F_SUBDATA):
            name = key.decode("utf-8", "replace")
            if len(value) < DB.size:
                self._damage(f"main tree: database {key!r}'s record is too short")
                continue
            db = DB.unpack_from(value, 0)
            if self.strict and db[1]:
                raise DataFileDamaged(f"database {name} has flags 0x{db[1]:x},"
                                      " not a plain database")
            yield name, db

    def _damage(self, problem: str) -> None:
        if self.strict:
            raise DataFileDamaged(problem)
        self.problems.append(problem)

    def _read(self, pgno: int, length: int, what: str) -> bytes:
        if not 2 <= pgno <= self.meta.last_page:
            raise DataFileDamaged(f"{what} points to page {pgno}, outside pages 2..{self.meta.last_page}")
        data = os.pread(self.fd, length, pgno * self.meta.page_size)
        if len(data) < length:
            raise DataFileDamaged(f"{what}: page {pgno} is past the end of the file")
        return data

    def _walk(self, pgno: int, tree: str, depth: int, kind: int) -> Iterator[Record]:
        try:
            page, flags, offsets = self._tree_page(pgno, tree, depth)
        except DataFileDamaged as exc:
            self._damage(str(exc))
            return
        for index, offset in enumerate(offsets):
            try:
                low, high, node_flags, key_size = NODE.unpack_from(page, offset)
                body = offset + NODE.size + key_size
                where = f"{tree}, page {pgno}, node {index}"
                if flags & P_BRANCH:
                    if body > len(page):
                        raise DataFileDamaged(f"{where}: its key runs past the page")
                    child = low | high << 16 | node_flags << 32
                    yield from self._walk(child, tree, depth + 1, kind)
                    continue
                if self.strict and node_flags & KINDS != kind:
                    raise DataFileDamaged(f"{where}: node flags 0x{node_flags:x}, not a"
                                          f" {'named database' if kind else 'plain record'}")
                size = low | high << 16
                if body + (PGNO.size if node_flags & F_BIGDATA else size) > len(page):
                    raise DataFileDamaged(f"{where}: the record runs past the page")
                value = (self._overflow(PGNO.unpack_from(page, body)[0], size, where)
                         if node_flags & F_BIGDATA else page[body:body + size])
            except DataFileDamaged as exc:
                self._damage(str(exc))
                continue
            yield page[offset + NODE.size:body], value, node_flags

    def _tree_page(self, pgno: int, tree: str, depth: int) -> Tuple[bytes, int, List[int]]:
        if depth >= MAX_DEPTH:
            raise DataFileDamaged(f"{tree} is deeper than {MAX_DEPTH} levels (a page loop?)")
        page = self._read(pgno, self.meta.page_size, tree)
        self.pages += 1
        if self.progress is not None and self.pages >= self._next_progress:
            self._next_progress = self.pages + PROGRESS_PAGES
            self.progress(self.pages, self.meta.last_page + 1)
        found, _, flags, lower, upper = PAGE_HEADER.unpack_from(page, 0)
        where = f"{tree}, page {pgno}"
        if found != pgno:
            raise DataFileDamaged(f"{where}: the page says it is page {found}")
        if not flags & (P_BRANCH | P_LEAF) or flags & (P_OVERFLOW | P_LEAF2 | P_META):
            raise DataFileDamaged(f"{where}: not a tree page (flags 0x{flags:x})")
        if not PAGE_HEADER.size <= lower <= upper <= len(page) or (lower - PAGE_HEADER.size) % 2:
            raise DataFileDamaged(f"{where}: bad free-space bounds ({lower}, {upper})")
        offsets = [INDEX.unpack_from(page, PAGE_HEADER.size + 2 * i)[0]
                   for i in range((lower - PAGE_HEADER.size) // 2)]
        for index, offset in enumerate(offsets):
            if not upper <= offset <= len(page) - NODE.size:
                raise DataFileDamaged(f"{where}: node {index} at offset {offset}, outside the page")
        return page, flags, offsets

    def _overflow(self, pgno: int, size: int, where: str) -> bytes:
        header = self._read(pgno, PAGE_HEADER.size, where)
        found, _, flags = PAGE_HEADER.unpack_from(header, 0)[:3]
        count = struct.unpack_from("@I", header, PAGE_HEADER.size - 4)[0]
        needed = -(-(PAGE_HEADER.size + size) // self.meta.page_size)
        if found != pgno or not flags & P_OVERFLOW or count < needed \
                or pgno + count - 1 > self.meta.last_page:
            raise DataFileDamaged(f"{where}: overflow page {pgno} is not what the record says")
        data = os.pread(self.fd, size, pgno * self.meta.page_size + PAGE_HEADER.size)
        if len(data) < size:
            raise DataFileDamaged(f"{where}: overflow page {pgno} runs past the end of the file")
        self.pages += count
        return data


def walk_pages(path: Path, progress: Optional[Callable[[int, int], None]] = None) -> int:
    """`check_data_file`, then every page of every tree (the free-page tree, the main tree,
    each named database, overflow pages) through a strict TreeReader: a damaged page raises
    DataFileDamaged before LMDB can follow it. Schema-agnostic: records are not decoded.
    Returns the pages read (0: no file yet). A large store on an SD card takes a while
    (~1 s per 100 MB here, several times that on a Pi): `progress` hears how far it got."""
    meta = check_data_file(path)
    if meta is None:
        return 0
    with open(path, "rb") as data:
        reader = TreeReader(data.fileno(), meta, strict=True, progress=progress)
        for _ in reader.records(meta.free_root, "free-page tree"):
            pass
        for name, db in list(reader.databases()):
            for _ in reader.records(db[-1], f"database {name}"):
                pass
    return reader.pages
