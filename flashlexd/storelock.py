"""LMDB's write lock left held by a worker that died inside a write.

LMDB keeps its write lock in lock.mdb as a robust POSIX mutex: when the holder dies, the
kernel marks the lock "owner died" and the next writer takes it over. The kernel does so from
the dying process's own memory (its robust futex list), and a process the OOM killer took may
have had that memory reaped first: the lock then names a dead thread for good and every
writer waits on it forever (found by review in a memory cgroup: 2 of 5 bursts at 54 MB, the
daemon restarting its waiting workers every 15 s, storing nothing). Only a fresh start of
every process that has the store open makes LMDB set the lock file up again.

Read from the lock file's header as LMDB 0.9 lays it out (its magic first; the reader mutex,
the last transaction id and the reader count padded to 64-byte cache lines; then the write
mutex, whose first word in glibc is the owner's thread id, with 0x40000000 once the kernel
marked its death). The mutex's size is the platform's; on one not known here, nothing is said.
"""
from __future__ import annotations

import os
import platform
import struct
from typing import Optional

LOCK_FILE = "lock.mdb"
_MAGIC = 0xBEEFC0DE  # MDB_MAGIC, the lock file's first word
_CACHE_LINE = 64     # LMDB's CACHELINE
_MUTEX_SIZE = {"x86_64": 40, "aarch64": 48}  # glibc's pthread_mutex_t on 64-bit userlands
_MUTEX_SIZE_32 = 24  # on every 32-bit one (armhf, i686), under a 64-bit kernel too
_OWNER_TID = 0x3FFFFFFF  # FUTEX_TID_MASK
_OWNER_DIED = 0x40000000  # FUTEX_OWNER_DIED: the kernel released it for the next writer


def write_mutex_offset(machine: str, pointer_bytes: int) -> Optional[int]:
    """Where MDB_txninfo's write mutex starts: after magic and format (8 bytes), the reader
    mutex, the transaction id (a size_t) and the reader count, rounded up to a cache line (64
    on x86_64 and 32-bit userlands, 128 on a 64-bit Raspberry Pi OS). `machine` is the
    kernel's: a 32-bit Raspberry Pi OS under a 64-bit kernel says aarch64."""
    size = _MUTEX_SIZE_32 if pointer_bytes == 4 else _MUTEX_SIZE.get(machine)
    if size is None:
        return None
    body = -(-(8 + size) // pointer_bytes) * pointer_bytes + pointer_bytes + 4
    return -(-body // _CACHE_LINE) * _CACHE_LINE


def write_lock_left_by(lock_fd: int, pid: int) -> bool:
    """Whether the store's write lock is still held by `pid`, a worker already reaped (its
    writes run in its main thread, whose id is its pid). `lock_fd`: lock.mdb, open for as long
    as the process's environment is (storebase.StoreBase.write_lock_left_by says why)."""
    at = write_mutex_offset(platform.machine(), struct.calcsize("P"))
    if at is None:
        return False
    try:
        head = os.pread(lock_fd, at + 4, 0)
    except OSError:
        return False
    if len(head) < at + 4 or struct.unpack_from("=I", head, 0)[0] != _MAGIC:
        return False
    word = struct.unpack_from("=I", head, at)[0]
    return not word & _OWNER_DIED and word & _OWNER_TID == pid
