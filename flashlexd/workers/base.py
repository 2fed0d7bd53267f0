"""What every worker process shares: its life after exec, its loop, its heartbeat.

A worker is started by the supervisor with fork + exec (`python -m flashlexd.workers NAME ...`),
so it begins with a clean interpreter: no inherited LMDB environment, no paho threads, no
sd_notify socket. Its end of the supervisor link is fd 3.

The loop is single-threaded (a helper thread only beats for it while it waits for the store's
write lock): it waits on the link, a signal wake-up pipe and whatever the worker
asks for (`wait_fds`), then lets the worker run (`on_ready`, `tick`). The heartbeat is sent from
this loop, so a heartbeat proves the worker's real work is making progress (or that it waits
for the store's write lock held by another process: `lockwait`). It carries the
worker's counters, and is sent early (at most every COUNTERS_EVERY seconds) when they changed:
`status` shows them next to the store's totals, which it reads live, so counters a whole
heartbeat period old would contradict them.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time
from typing import Any, Dict, List, Sequence, Tuple

from flashlexd.channel import Channel
from flashlexd.mallocs import QuietTrim
from flashlexd.config import Config
from flashlexd.linkmsg import Heartbeat, LinkMessage, StateReport, Stop, build, decode
from flashlexd.workers.lockwait import LockWaitBeat

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # could not start (store, config): the supervisor backs off
COUNTERS_EVERY = 0.05  # seconds: the least time between two heartbeats sent for changed counters


class Worker:
    """Base class: subclasses override `setup`, `wait_fds`, `on_ready`, `tick`, `shutdown`."""

    name = "worker"

    def __init__(self, config: Config, channel: Channel):
        self.config = config
        self.channel = channel
        self.stopping = False
        self.counters: Dict[str, Any] = {}
        self._next_heartbeat = 0.0
        self._sent_counters: Dict[str, Any] = {}
        self._sent_at = float("-inf")

    # -- for subclasses ---------------------------------------------------------------------

    def setup(self) -> None:
        """Open the store, build clients. Runs after exec, before the first heartbeat."""

    def wait_fds(self) -> Tuple[Sequence[Any], Sequence[Any]]:
        """Objects with fileno() to watch for reading and for writing."""
        return (), ()

    def on_ready(self, readable: List[Any], writable: List[Any]) -> None:
        """Some of the watched objects are ready."""

    def tick(self, now: float) -> float:
        """Periodic work; returns the seconds until the worker next wants to run."""
        return self.config.supervision.heartbeat_seconds

    def on_command(self, message: LinkMessage) -> None:
        """A message from the supervisor other than `Stop`."""

    def shutdown(self) -> None:
        """Finish the current batch (commit or leave unacknowledged, never half) and let go."""

    def link_stop_budget(self) -> float:
        """Seconds a graceful stop may spend on its MQTT link (a wait for the broker's answers,
        then the close: half each), inside the supervisor's stop budget."""
        return min(self.config.thing.mqtt.connect_timeout, self.config.supervision.stop_timeout / 2)

    # -- the loop -----------------------------------------------------------------------------

    def report(self, kind: str, **fields: Any) -> None:
        """Send the `linkmsg` message of `kind` (its type constant) to the supervisor."""
        self.channel.send(build(kind, **fields))

    def run(self) -> int:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the supervisor's business
        self.report(StateReport.kind, state="starting")
        supervision = self.config.supervision  # beating from before `setup`: it opens the store
        LockWaitBeat(self.channel, supervision.heartbeat_seconds, 2 * supervision.heartbeat_timeout,
                     lambda: self._sent_counters).start()
        self.setup()
        self.report(StateReport.kind, state="ready")
        quiet = QuietTrim(time.monotonic())  # freed heap pages back to the kernel after traffic
        timeout = 0.0
        while not self.stopping:
            reads, writes = self.wait_fds()
            ready_r, ready_w, _ = select.select([self.channel, wake_read, *reads], list(writes), [],
                                                max(0.0, timeout))
            if wake_read in ready_r:
                _drain(wake_read)
            if self.channel in ready_r:
                self._handle_link()
            if self.stopping:
                break
            traffic = [r for r in ready_r if r in reads]
            self.on_ready(traffic, ready_w)
            now = time.monotonic()
            if traffic or ready_w:
                quiet.busy(now)
            # the time after `tick`: a store write in it that the disk stalled, and then failed,
            # must not leave the heartbeat waiting its period again (re-read 26)
            timeout = min(self.tick(now), self._heartbeat(time.monotonic()), quiet.tick(now))
        self.report(StateReport.kind, state="stopping")
        self.shutdown()
        return EXIT_OK

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _handle_link(self) -> None:
        messages = self.channel.receive()
        if messages is None:
            log.warning("supervisor went away; stopping")
            self.stopping = True
            return
        for raw in messages:
            message = decode(raw)
            if isinstance(message, Stop):
                self.stopping = True
            elif message is not None:
                self.on_command(message)

    def _heartbeat(self, now: float) -> float:
        """Send a heartbeat when due, or early when the counters changed; returns the seconds
        until the next one may be needed."""
        changed = self.counters != self._sent_counters
        if now >= self._next_heartbeat or (changed and now >= self._sent_at + COUNTERS_EVERY):
            self.report(Heartbeat.kind, counters=self.counters)
            self._sent_counters, self._sent_at = dict(self.counters), now
            self._next_heartbeat = now + self.config.supervision.heartbeat_seconds
            changed = False
        due = self._next_heartbeat - now
        return min(due, self._sent_at + COUNTERS_EVERY - now) if changed else due


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
