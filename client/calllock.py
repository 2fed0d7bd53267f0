"""The lock a `Client` holds for each call: one call at a time on its connection.

First come, first served: `threading.Lock` alone is not fair, and a thread looping on `wait()`
took it back before an acking thread had woken (acks waited 2-7 s, an asyncio app's for
minutes; found by review): the thread of the last call gives way while others wait. A call
made by a thread already inside a call or queued for one (a signal handler, a callback) is
refused at once: it would wait for itself for ever.

The exclusion itself stays `threading.Lock`'s, taken and released by a `with` statement: an
exception a signal handler raises (Ctrl-C) between two lines of Python must not leave it held
(a lock of Python code did, and every thread sharing the Client hung; found by re-read).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Optional, Set

REENTERED = ("a flashlexd Client call from inside another call of the same Client on the same"
             " thread (a signal handler?): give that code a connection of its own (connect())")
GIVE_WAY_SECONDS = 0.05  # the most the thread of the last call waits for a queued one to go first
GIVE_WAY_POLL = 0.0002


class CallLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: Optional[int] = None  # the thread inside a call
        self._last: Optional[int] = None  # the thread of the last call
        self._queued: Set[int] = set()  # threads waiting for the mutex

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        me = threading.get_ident()
        if me in self._queued or (self._owner == me and self._mutex.locked()):
            raise RuntimeError(REENTERED)
        if self._last == me and self._queued:
            self._give_way(me)
        try:  # every change inside a try: a signal's exception may come after any line
            self._queued.add(me)
            with self._mutex:
                try:
                    self._queued.discard(me)
                    self._owner = self._last = me
                    yield
                finally:
                    self._owner = None
        finally:
            self._queued.discard(me)

    def _give_way(self, me: int) -> None:
        """Let a thread already waiting take the mutex before this one takes it again."""
        deadline = time.monotonic() + GIVE_WAY_SECONDS
        while self._queued and self._last == me and time.monotonic() < deadline:
            time.sleep(GIVE_WAY_POLL)
