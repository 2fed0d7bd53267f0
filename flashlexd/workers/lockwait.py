"""Heartbeats while a worker waits for LMDB's write lock held by another process.

The heartbeat is sent from the worker's loop, so silence means the loop is stuck, and the
supervisor aborts a worker silent for `heartbeatTimeoutSeconds`. A worker stopped inside a
write transaction (SIGSTOP, a stuck disk) holds the store's write lock, and a worker that
wanted to write (or to open the store, at its start) waited on it in silence too: both were
aborted as hung, the waiting one's stack logged and a restart counted against it. While the
loop's thread is inside that wait (`storebase.lock_wait_since`; the wait lets go of the GIL)
this thread sends the heartbeat for it, so only the holder goes silent; its abort frees the
lock within `heartbeatTimeoutSeconds` and a second. A wait past twice that (the beat's
`timeout`) has a holder outside the daemon (a paused `flashlexd store` command, another
program with the data dir open) or a worker of the daemon blocked on a stalling disk: one ERROR
says so and the beats stop, so the worker is aborted and restarted, as any stuck worker is,
rather than the daemon looking healthy while it stores nothing (unless the supervisor sees a
worker waiting on the disk: `workerproc.disk_waits`). A loop stuck anywhere else is silent as
before.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict

from flashlexd.channel import Channel
from flashlexd.linkmsg import Heartbeat, build
from flashlexd.storebase import lock_wait_since

log = logging.getLogger(__name__)


class LockWaitBeat:
    """A daemon thread beating for the loop while it waits on the write lock, up to `timeout`."""

    def __init__(self, channel: Channel, period: float, timeout: float,
                 counters: Callable[[], Dict[str, Any]]):
        self._channel, self._period, self._timeout, self._counters = channel, period, timeout, counters
        self._thread = threading.Thread(target=self._run, name="lock-wait-beat", daemon=True)
        self._pacing = threading.Event()  # never set: its wait paces the beat

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        told = None  # the wait the ERROR was said for
        seen, ticks = None, 0  # the wait looked at, and how many ticks it has lasted
        while True:
            # the beat is due every `period`; not time.sleep, which libfaketime breaks (EINVAL),
            # so the clock-step tests would run without this thread
            self._pacing.wait(self._period / 2)
            since = lock_wait_since()
            seen, ticks = since, (ticks + 1 if since is not None and since == seen else 0)
            # counted in ticks, not clock time: a pause of the whole daemon (SIGSTOP of its group,
            # `systemctl freeze`) is one late tick, not a wait (the supervisor discounts it too)
            waited = ticks * self._period / 2
            if not ticks:
                continue
            if waited < self._timeout:
                # a SOCK_SEQPACKET send is one whole message: no interleaving with the loop's
                self._channel.send(build(Heartbeat.kind, counters=self._counters()))
            elif told != since:
                told = since
                log.error("waiting over %.0fs for the store's write lock: a paused `flashlexd store`"
                          " command, another program with the data dir open, or a worker of this"
                          " daemon stuck on the disk holds it; heartbeats stop, so this worker is"
                          " restarted unless the supervisor sees a worker waiting on the disk", waited)
