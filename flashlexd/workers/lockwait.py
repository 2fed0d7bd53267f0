"""Heartbeats while a worker waits for LMDB's write lock held by another process.

The heartbeat is sent from the worker's loop, so silence means the loop is stuck, and the
supervisor aborts a worker silent for `heartbeatTimeoutSeconds`. A worker stopped inside a
write transaction (SIGSTOP, a stuck disk) holds the store's write lock, and a worker that
wanted to write waited on it in silence too: both were aborted as hung, the waiting one's
stack logged and a restart counted against it. While the loop's thread is inside that wait
(`Store.lock_wait_since`; the wait lets go of the GIL) this thread sends the heartbeat for
it, so only the holder stays silent; its abort frees the lock. A loop stuck anywhere else is
still silent.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Optional

from flashlexd.channel import Channel
from flashlexd.linkmsg import Heartbeat, build


class LockWaitBeat:
    """A daemon thread beating for the loop while `waiting_since()` says it waits on the lock."""

    def __init__(self, channel: Channel, period: float, waiting_since: Callable[[], Optional[float]],
                 counters: Callable[[], Dict[str, Any]]):
        self._channel, self._period = channel, period
        self._waiting_since, self._counters = waiting_since, counters
        self._thread = threading.Thread(target=self._run, name="lock-wait-beat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._period / 2)  # pacing: the beat is due every `period`
            since = self._waiting_since()
            if since is not None and time.monotonic() - since >= self._period / 2:
                # a SOCK_SEQPACKET send is one whole message: no interleaving with the loop's
                self._channel.send(build(Heartbeat.kind, counters=self._counters()))
