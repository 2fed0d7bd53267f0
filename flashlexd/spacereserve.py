"""The space reserve: a file of real disk blocks in the data dir, kept for the writes that free
space in the store.

LMDB copies every page a transaction changes, so deleting records takes fresh pages too. A
store that filled its filesystem to the last block could then apply no ack and expire nothing,
and ingest, which waits for the pages those free, would never resume. So every append first
tops the reserve up (it meets the full disk before the reserve is touched), and a write that is
not an append, refused for a full disk, releases a chunk of the reserve and is tried again
(and again, until it fits or nothing is left). Both happen inside LMDB write transactions:
the processes sharing the store never race over the file.

What the reserve cannot do: space taken by other files is theirs; when deletes have used the
whole reserve (each use costs only the pages the file had to grow by), a full disk stops acks
again until space is freed, as before."""
from __future__ import annotations

import os
from pathlib import Path

FILE_NAME = "space.reserve"
RESERVE_BYTES = 1024 * 1024  # enough for a step of deletes (storeacks.STEP_IDS) many times over
FILESYSTEM_SHARE = 16  # ... but at most this share of a (tiny) filesystem
CHUNK_BYTES = 4096  # taken back or given up a page at a time: a delete uses no more than it needs


class SpaceReserve:
    """One process's handle on the reserve file; every method runs under LMDB's write lock."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME
        try:
            found = os.statvfs(directory)
            self.size = min(RESERVE_BYTES, found.f_blocks * found.f_frsize // FILESYSTEM_SHARE)
        except OSError:
            self.size = RESERVE_BYTES

    def top_up(self) -> None:
        """Before an append: give the file its blocks back (posix_fallocate: real blocks, not a
        sparse size), a chunk at a time, so that a nearly full disk still gives what it has."""
        try:
            held = os.stat(self.path).st_size
        except FileNotFoundError:
            held = 0
        except OSError:
            return  # the data dir's own trouble: the write itself reports it
        if held >= self.size:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError:
            return
        try:
            while held < self.size:
                held = min(self.size, held + CHUNK_BYTES)
                os.posix_fallocate(fd, 0, held)
        except OSError:
            pass  # the disk is full: the append that follows meets it; topped up again later
        finally:
            os.close(fd)

    def release(self) -> int:
        """Give a chunk of blocks to the filesystem (the write about to be retried takes them);
        the bytes released, 0 when none are left."""
        try:
            held = os.stat(self.path).st_size
            if held:
                os.truncate(self.path, max(0, held - CHUNK_BYTES))
        except OSError:
            return 0
        return min(held, CHUNK_BYTES)
