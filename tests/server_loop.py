"""`ServerLoop`: one RpcServer on its own single-threaded selector loop in a thread, for tests.

It hosts the server the way the supervisor's loop does (register, dispatch, tick by
next_deadline), so it is also the reference host of `RpcServer`.
"""
from __future__ import annotations

import queue
import selectors
import socket
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional, Tuple

from flashlexd.ipc.server import RpcServer


class ServerLoop:
    """One RpcServer on its own single-threaded selector loop, in a thread.

    This is the shape the supervisor's loop has (register, dispatch, tick by next_deadline), so
    it doubles as the reference host. `call(fn)` runs `fn` inside the loop thread, the way the
    supervisor runs its own work there (store writes, `notify_inbox`), and returns its result."""

    def __init__(self, make_server: Callable[[selectors.BaseSelector], RpcServer]):
        self._make_server = make_server
        self._calls: "queue.SimpleQueue[Tuple[Callable[[], Any], Future]]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="flashlexd-api", daemon=True)
        self._started: Future = Future()
        self._stopping = False
        self.server: Optional[RpcServer] = None

    def start(self) -> "ServerLoop":
        self._thread.start()
        self._started.result(timeout=30)  # re-raises ServerError from binding
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        future: Future = Future()
        self._calls.put((fn, future))
        self._wake_w.send(b"\0")
        return future.result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stopping = True
            self._wake_w.send(b"\0")
            self._thread.join(30)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "ServerLoop":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            server = self.server = self._make_server(selector)
        except BaseException as exc:
            self._started.set_exception(exc)
            selector.close()
            return
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._started.set_result(None)
        try:
            while not self._stopping:
                timeout = max(0.0, server.next_deadline() - time.monotonic())
                for key, mask in selector.select(timeout):
                    if key.data is None:
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                        self._run_calls()
                    elif server.owns(key):
                        server.dispatch(key, mask)
                server.tick()
        finally:
            server.close()
            self._run_calls()
            selector.close()
