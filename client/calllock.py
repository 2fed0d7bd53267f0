"""The lock a `Client` holds for each call: one call at a time on its connection. Used as
`with lock.held():`.

The exclusion is `threading.RLock`'s, taken and released by the `with` statement in C: no
exception a signal handler raises (Ctrl-C) between two lines of Python can leave it held (a
lock written in Python could, and every thread sharing the Client hung; found by re-read).
Before Python 3.10 the interpreter itself may skip a `with` statement's exit when a handler
raises right then (bpo-29988), as it did for the plain lock before this one.
Its owner, set in C as it is taken, makes a call from the thread that holds it (a signal
handler, a callback) an error at once instead of a wait for itself (found by review: a
SIGTERM handler's goodbye hung the app). It is never taken twice.
"""
from __future__ import annotations

import threading

REENTERED = ("a flashlexd Client call from inside another call of the same Client on the same"
             " thread (a signal handler?): give that code a connection of its own (connect())")


class CallLock:
    def __init__(self) -> None:
        self._mutex = threading.RLock()

    def held(self) -> "threading.RLock":
        """The mutex, for the `with` statement; raises RuntimeError in the thread holding it."""
        if self._mutex._is_owned():  # type: ignore[attr-defined]  # C: set as it is taken
            raise RuntimeError(REENTERED)
        return self._mutex
