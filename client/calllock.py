"""The lock a `Client` holds for each call: one call at a time on its connection. Used as
`with lock.held(), lock.inside():`.

The exclusion is `threading.RLock`'s, taken and released by the `with` statement in C: no
exception a signal handler raises (Ctrl-C) between two lines of Python can leave it held (a
lock written in Python could, and every thread sharing the Client hung; found by re-read).
Python only keeps notes beside it, which such an exception can at worst leave stale for a call.

- A call from the thread that holds it (a signal handler, a callback) is an error at once
  instead of a wait for itself (found by review: a SIGTERM handler's goodbye hung the app).
  The RLock knows its owner from the moment it is taken: a note of ours set a line later
  let a handler in between through (found by re-read). It is never taken twice.
- `threading.Lock` is not fair: a thread looping on `wait()` took it back before an acking
  thread had woken (acks waited 2-7 s; found by review). The thread of the last call, asking
  again while another waits, lets that one take it first.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Optional

REENTERED = ("a flashlexd Client call from inside another call of the same Client on the same"
             " thread (a signal handler?): give that code a connection of its own (connect())")
GIVE_WAY_SECONDS = 0.005  # the most a thread waits for a woken waiter to take the lock first
GIVE_WAY_POLL = 0.0001


class CallLock:
    def __init__(self) -> None:
        self._mutex = threading.RLock()
        self._waiting = 0  # threads between `held()` and `inside()`: waiting for the mutex
        self._last: Optional[int] = None  # the thread of the last call

    def held(self) -> "threading.RLock":
        """The mutex, for the `with` statement; raises RuntimeError in the thread holding it."""
        if self._mutex._is_owned():  # type: ignore[attr-defined]  # C: set as it is taken
            raise RuntimeError(REENTERED)
        if self._waiting > 0 and self._last == threading.get_ident():
            self._give_way()
        self._waiting += 1
        return self._mutex

    def _give_way(self) -> None:
        me, deadline = self._last, time.monotonic() + GIVE_WAY_SECONDS
        while self._last == me:
            if time.monotonic() >= deadline:
                self._waiting = 0  # a note left by an interrupted wait: nobody is coming
                return
            time.sleep(GIVE_WAY_POLL)

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Within the mutex: this thread no longer waits, and made the last call."""
        self._waiting = max(0, self._waiting - 1)
        self._last = threading.get_ident()
        yield
