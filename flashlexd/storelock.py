"""LMDB's write lock left held by a worker that died inside a write.

LMDB keeps its write lock in lock.mdb as a robust POSIX mutex: when the holder dies, the
kernel marks the lock "owner died" and the next writer takes it over. The kernel does so from
the dying process's own memory (its robust futex list), and a process the OOM killer took may
have had that memory reaped first: the lock then names a dead thread for good and every
writer waits on it forever (found by review in a memory cgroup: 2 of 5 bursts at 54 MB, the
daemon restarting its waiting workers every 15 s, storing nothing). Only a fresh start of
every process that has the store open makes LMDB set the lock file up again.

Read from the lock file's header as LMDB 0.9 lays it out (its magic first, the write mutex
one 64-byte cache line in, glibc's mutex word first: the owner's thread id, and 0x40000000
once the kernel marked its death); another layout is never taken for a stuck lock.
"""
from __future__ import annotations

import os
import struct

LOCK_FILE = "lock.mdb"
_MAGIC = 0xBEEFC0DE  # MDB_MAGIC, the lock file's first word
_WRITE_MUTEX = 64    # MDB_txninfo's write mutex: after the reader mutex's cache line
_OWNER_TID = 0x3FFFFFFF  # FUTEX_TID_MASK
_OWNER_DIED = 0x40000000  # FUTEX_OWNER_DIED: the kernel released it for the next writer


def write_lock_left_by(data_dir: str, pid: int) -> bool:
    """Whether the store's write lock is still held by `pid`, a worker already reaped (its
    writes run in its main thread, whose id is its pid)."""
    try:
        with open(os.path.join(data_dir, LOCK_FILE), "rb") as lock:
            head = lock.read(_WRITE_MUTEX + 4)
    except OSError:
        return False
    if len(head) < _WRITE_MUTEX + 4 or struct.unpack_from("=I", head, 0)[0] != _MAGIC:
        return False
    word = struct.unpack_from("=I", head, _WRITE_MUTEX)[0]
    return not word & _OWNER_DIED and word & _OWNER_TID == pid
