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

import logging
import os
import stat
from pathlib import Path
from typing import Optional

FILE_NAME = "space.reserve"
RESERVE_BYTES = 1024 * 1024  # enough for a step of deletes (storeacks.STEP_IDS) many times over
FILESYSTEM_SHARE = 16  # ... but at most this share of a (tiny) filesystem
CHUNK_BYTES = 4096  # taken back or given up a page at a time: a delete uses no more than it needs

log = logging.getLogger("flashlexd")


class SpaceReserve:
    """One process's handle on the reserve file; every method runs under LMDB's write lock."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME
        try:
            found = os.statvfs(directory)
            self.size = min(RESERVE_BYTES, found.f_blocks * found.f_frsize // FILESYSTEM_SHARE)
        except OSError:
            self.size = RESERVE_BYTES
        self.refused = False  # said once: not a regular file, or not made

    def _held(self) -> Optional[int]:
        """The reserve's bytes; None when it cannot be used. A link planted in its place is
        never followed: a full disk had a daemon run as root truncate its target."""
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            return 0
        except OSError:
            return None  # the data dir's own trouble: the write itself reports it
        if stat.S_ISREG(found.st_mode):
            return found.st_size
        if not self.refused:
            self.refused = True
            log.error("space reserve %s is not a regular file (a symlink?): not used; remove it"
                      " (a full disk may then stop acks and expiry until space is freed)", self.path)
        return None

    def top_up(self) -> None:
        """Before an append: give the file its blocks back (posix_fallocate: real blocks, not a
        sparse size), a chunk at a time, so that a nearly full disk still gives what it has."""
        held = self._held()
        if held is None or held >= self.size:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:  # no inode for it (review "diskfull"): said once
            if not self.refused:
                self.refused = True
                log.warning("space reserve %s cannot be made (%s): a full disk may stop acks and"
                            " expiry until space is freed", self.path, exc.strerror or exc)
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
        held = self._held()
        if not held:
            return 0
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.ftruncate(fd, max(0, held - CHUNK_BYTES))
            finally:
                os.close(fd)
        except OSError:
            return 0
        return min(held, CHUNK_BYTES)
