"""glibc malloc settings for the daemon's processes: one arena, and freed heap pages handed back.

- One arena (M_ARENA_MAX = 1): glibc gives each new thread an arena of its own, whose touched
  pages stay private to the process for good. The daemon's threads are rare and short (the
  workers' name resolver, the supervisor's store-write helper), so they share the main arena;
  they never contend for it in earnest. Set in the supervisor before it forks: the setting is
  plain process memory, inherited by the fork server and every worker.
- `trim()` (malloc_trim(0)) returns the free pages inside the heap to the kernel; glibc itself
  only gives back the top of the heap. The ingress worker calls it once a burst is over.

Neither is essential: on a libc without these functions (musl) both do nothing.
"""
from __future__ import annotations

import ctypes
from typing import Any, Optional

M_ARENA_MAX = -8


def _libc() -> Optional[Any]:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def one_arena() -> bool:
    """Threads share the main malloc arena from now on (in this process and its forks)."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, 1))


def trim() -> bool:
    """Give the free pages of the heap back to the kernel; True if some were."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))
