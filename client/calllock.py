"""The lock a `Client` holds for each call: one call at a time on its connection.

First come, first served: `threading.Lock` is not fair, and a thread looping on `wait()` took it
back before an acking thread had woken (acks waited 2-7 s, an asyncio app's for minutes; found
by review). A call made by a thread already inside a call or queued for one (a signal handler,
a callback) is refused at once: it would wait for itself for ever.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Deque, Optional, Tuple

REENTERED = ("a flashlexd Client call from inside another call of the same Client on the same"
             " thread (a signal handler?): give that code a connection of its own (connect())")


class CallLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: Optional[int] = None  # the thread inside a call
        self._queue: Deque[Tuple[int, threading.Lock]] = collections.deque()  # waiting, in order

    def __enter__(self) -> "CallLock":
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me or any(waiter == me for waiter, _ in self._queue):
                raise RuntimeError(REENTERED)
            if self._owner is None:
                self._owner = me
                return self
            turn = threading.Lock()
            turn.acquire()
            self._queue.append((me, turn))
        try:
            turn.acquire()  # released by the call before, which made this thread the owner
        except BaseException:  # interrupted (KeyboardInterrupt): leave the queue, or the lock
            with self._mutex:
                if (me, turn) in self._queue:
                    self._queue.remove((me, turn))
                    raise
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._mutex:
            if self._queue:
                self._owner, turn = self._queue.popleft()
                turn.release()
            else:
                self._owner = None
