"""The ack journal: an `ack` made durable with one small write instead of an LMDB commit (wear).

A durable LMDB commit writes ~21 KiB (a leaf, its branch, the main database's page, the free
list, a meta page: docs/WEAR.md), whatever it removes; an app that acks one message per call
paid that per message. Here an ack is one record written into a file beside data.mdb and
synced; the supervisor (the only writer of acks) applies the records to the inbox later, many
in one LMDB commit that also stores the applied-through sequence number (storeacks.py), so
replaying after a crash is idempotent.

Layout: a file of FILE_BYTES, preallocated by writing zeros (not fallocate: an overwrite of an
unwritten extent converts it, which is a metadata write per sync; an overwrite of written
blocks is not). Each record starts on a block boundary and takes whole blocks, so a write never
touches a block that holds an earlier record (a torn rewrite of a shared page could lose an
ack already confirmed): MAGIC, seq (8), id count (4), ids (8 each), CRC32 of all that. Blocks
are SECTOR bytes with O_DIRECT|O_DSYNC where the filesystem takes it (one 512-byte write per
ack), else PAGE bytes written and fdatasync'ed. Records are written from the start of the file
again once everything was applied; a record whose seq is at or below the applied-through
sequence is old and ignored, one whose CRC does not match (a torn last write) too.
"""
from __future__ import annotations

import errno
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

FILE_NAME = "acks.journal"
FILE_BYTES = 256 * 1024  # 512 records of a sector; 64 of a page (APPLY_IDS: 256)
SECTOR = 512
PAGE = 4096
MAGIC = b"FXAJ"
_HEAD = struct.Struct(">4sQI")  # magic, seq, id count
_ID = struct.Struct(">Q")
_CRC = struct.Struct(">I")


class JournalError(OSError):
    """The journal could not be written or read (the message names the file)."""


class Record(NamedTuple):
    seq: int
    ids: List[int]
    end: int  # byte offset just past its last block


def encode(seq: int, ids: Sequence[int]) -> bytes:
    body = _HEAD.pack(MAGIC, seq, len(ids)) + b"".join(map(_ID.pack, ids))
    return body + _CRC.pack(zlib.crc32(body))


def _decode_at(data: bytes, offset: int) -> Optional[Record]:
    """The record starting at `offset`, or None (zeros, an old torn write, garbage)."""
    if data[offset:offset + 4] != MAGIC or offset + _HEAD.size > len(data):
        return None
    _, seq, count = _HEAD.unpack_from(data, offset)
    end = offset + _HEAD.size + count * _ID.size
    if end + _CRC.size > len(data) or _CRC.unpack_from(data, end)[0] != zlib.crc32(data[offset:end]):
        return None
    ids = [_ID.unpack_from(data, offset + _HEAD.size + i * _ID.size)[0] for i in range(count)]
    return Record(seq, ids, end + _CRC.size)


def scan(data: bytes) -> List[Record]:
    """Every intact record in `data`, by position. Records start on SECTOR boundaries (a PAGE
    block is a whole number of sectors, so one scan reads either layout)."""
    records, offset = [], 0
    while offset < len(data):
        record = _decode_at(data, offset)
        if record is None:
            offset += SECTOR
        else:
            records.append(record)
            offset = -(-record.end // SECTOR) * SECTOR
    return records


class AckJournal:
    """The open journal file. `append` returns once the record is on the device."""

    def __init__(self, path: Path):
        self.path = path
        self.position = 0  # where the next record goes
        self.direct = True
        self._fd: Optional[int] = None
        try:
            self._fd = self._open(path)
        except OSError as exc:
            self.close()
            raise JournalError(exc.errno, f"ack journal {path}: {exc.strerror or exc}") from None

    def _open(self, path: Path) -> int:
        """O_DIRECT|O_DSYNC where the filesystem takes it (tmpfs and some others refuse it at
        open, others refuse a SECTOR-sized transfer: EINVAL either way), else buffered."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW  # a planted link is not written through
        try:
            fd = os.open(path, flags | os.O_DIRECT | os.O_DSYNC, 0o600)
            try:
                self._ready(fd)
                os.preadv(fd, [mmap.mmap(-1, SECTOR)], 0)
                return fd
            except OSError:
                os.close(fd)
                raise
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
        self.direct = False
        fd = os.open(path, flags, 0o600)
        try:
            self._ready(fd)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _ready(self, fd: int) -> None:
        """Preallocate a new (or wrongly sized) file by writing zeros, durably."""
        if os.fstat(fd).st_size == FILE_BYTES:
            return
        zeros = mmap.mmap(-1, 64 * 1024)  # page-aligned, as O_DIRECT wants
        os.ftruncate(fd, 0)
        for offset in range(0, FILE_BYTES, len(zeros)):
            os.pwritev(fd, [zeros], offset)
        os.fsync(fd)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @property
    def block(self) -> int:
        return SECTOR if self.direct else PAGE

    def fits(self, count: int) -> bool:
        return self.position + self._size(count) <= FILE_BYTES

    def _size(self, count: int) -> int:
        raw = _HEAD.size + count * _ID.size + _CRC.size
        return -(-raw // self.block) * self.block

    def append(self, seq: int, ids: Sequence[int]) -> None:
        """Write one record at `position` and wait until it is durable (the caller checked
        `fits`). On an error the position still moves on: the record may be partly on disk."""
        record = encode(seq, ids)
        size = self._size(len(ids))
        buffer = mmap.mmap(-1, size)
        buffer.write(record)
        at, self.position = self.position, self.position + size
        try:
            written = os.pwritev(self._fd, [buffer], at)
            if written != size:
                raise OSError(errno.EIO, f"short write ({written} of {size} bytes)")
            if not self.direct:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise JournalError(exc.errno, f"ack journal {self.path}: {exc.strerror or exc}") from None

    @property
    def used(self) -> float:
        """The share of the file written since the last rewind."""
        return self.position / FILE_BYTES

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
