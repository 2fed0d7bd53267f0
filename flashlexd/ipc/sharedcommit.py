"""API writes of several apps that share one store commit (flashlex.app.db.apiCommitMs, issue 20).

A commit writes a few 4 KiB pages whether it removes one message or a hundred (docs/WEAR.md),
so an `ack` (or a `publish`) is parked (`Pending`) until its window ends: every call of that
kind that arrived in the window is written in ONE transaction at the window's end, and only
then is each call answered, with its own result: a write is durable when the call returns, as
without the window. The window opens with the first call after the last commit; a call that
arrives after it ended opens the next. A call whose app hangs up before the window ends is
still written if other calls share its window, and not written if it was alone (it never
returned, so nothing was promised).
"""
from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Union

from flashlexd.ipc.protocol import Code, Pending, RpcFailure, store_busy
from flashlexd.store import DiskFull, StoreBusy, StoreError, StoreFull


class _Window:
    """The calls of one window and, once committed, each one's result (or the shared failure)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.calls: List[Any] = []
        self.outcome: Union[None, List[Any], RpcFailure] = None


class SharedCommits:
    """Calls of one kind; `commit(calls)` writes them all in one transaction and returns each
    call's result, in order. `full_code`: the error code of a store at its cap (StoreFull)."""

    def __init__(self, commit: Callable[[List[Any]], List[Any]], full_code: str = Code.STORE_ERROR):
        self._commit = commit
        self._full_code = full_code
        self._open: Optional[_Window] = None
        self.commits = 0  # transactions made (figures for tests and benchmarks)

    def join(self, call: Any, window: float,
             answer: Callable[[Any], Any] = lambda result: result) -> Pending:
        """Park `call` until the current window (opened now if none is) is committed; the
        call is then answered with `answer(its result)`, which may raise RpcFailure."""
        now = time.monotonic()
        current = self._open
        if current is None or current.outcome is not None or now >= current.deadline:
            current = self._open = _Window(now + window)
        index = len(current.calls)
        current.calls.append(call)
        return Pending(deadline=current.deadline, poll=lambda: None,
                       resolve=lambda: answer(self._result(current, index)))

    def _result(self, window: _Window, index: int) -> Any:
        if window.outcome is None:
            try:
                window.outcome = self._commit(window.calls)
                self.commits += 1
            except (StoreFull, DiskFull) as exc:
                window.outcome = RpcFailure(self._full_code, str(exc))
            except StoreBusy as exc:
                window.outcome = store_busy(exc)
            except StoreError as exc:
                window.outcome = RpcFailure(Code.STORE_ERROR, str(exc))
            if self._open is window:
                self._open = None
        if isinstance(window.outcome, RpcFailure):
            raise window.outcome
        return window.outcome[index]
