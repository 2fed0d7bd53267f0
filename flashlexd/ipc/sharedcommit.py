"""API acks of several apps that share one store commit (flashlex.app.db.apiCommitMs, issue 20).

A commit writes a few 4 KiB pages whether it removes one message or a hundred (docs/WEAR.md),
so an `ack` is parked (`Pending`) until its window ends: every ack that arrived in the window is
removed in ONE transaction at the window's end, and only then is each call answered, with its
own count: an ack is durable when the call returns, as without the window. The window opens
with the first ack after the last commit; a call that arrives after it ended opens the next.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Union

from flashlexd.ipc.protocol import Code, Pending, RpcFailure
from flashlexd.store import Store, StoreError


class _Window:
    """The acks of one window and, once committed, each one's count (or the shared failure)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.calls: List[List[int]] = []
        self.outcome: Union[None, List[int], RpcFailure] = None


class SharedAcks:
    def __init__(self, store: Callable[[], Store]):
        self._store = store  # read at commit time: a reload may have swapped it
        self._open: Optional[_Window] = None
        self.commits = 0  # store commits made for shared acks (figures for status and tests)

    def join(self, ids: List[int], window: float) -> Pending:
        """Park an ack of `ids` until the current window (opened now if none is) is committed."""
        now = time.monotonic()
        current = self._open
        if current is None or current.outcome is not None or now >= current.deadline:
            current = self._open = _Window(now + window)
        index = len(current.calls)
        current.calls.append(ids)
        return Pending(deadline=current.deadline, poll=lambda: None,
                       resolve=lambda: self._result(current, index))

    def _result(self, window: _Window, index: int) -> int:
        if window.outcome is None:
            try:
                window.outcome = self._store().ack_each(window.calls)
                self.commits += 1
            except StoreError as exc:
                window.outcome = RpcFailure(Code.STORE_ERROR, str(exc))
            if self._open is window:
                self._open = None
        if isinstance(window.outcome, RpcFailure):
            raise window.outcome
        return window.outcome[index]
