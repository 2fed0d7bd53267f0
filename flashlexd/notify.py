"""systemd notification (sd_notify) for the supervisor, and the watchdog cadence.

Only the supervisor notifies: workers run with NOTIFY_SOCKET and WATCHDOG_* removed from their
environment (see `child_environment`) and none of its descriptors (`forkworker`). WATCHDOG=1 is sent from the supervisor's own loop,
never from a helper thread, so a hung loop stops the pings and systemd restarts the service.

A send never blocks that loop: the socket is non-blocking, and a notification that finds
systemd's queue full (net.unix.max_dgram_qlen datagrams, 10 without systemd's sysctl; PID 1
busy) waits in `pending` and goes at a later tick, in order. A newer STATUS line replaces a
waiting one and pings do not pile up, so what waits stays a handful of lines. At exit the
supervisor gives systemd a moment to take what still waits (STOPPING=1); a socket that refuses
(systemd gone) is retried every few seconds, not at every tick.
"""
from __future__ import annotations

import logging
import math
import os
import select
import socket
import time
from typing import Dict, List, Optional

import sdnotify

log = logging.getLogger(__name__)
UNHEALTHY_RECHECK = 0.1  # seconds; how soon to look again while a ping is withheld
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
START_EXTENSION = 30  # seconds of start-up time each `still_starting` call asks for
PENDING_RECHECK = 0.1  # seconds; how soon to try again while systemd's queue is full
REFUSED_RECHECK = 2.0  # seconds; how soon to try again while the socket refuses (systemd gone)
EXIT_WAIT = 2.0  # seconds the supervisor waits at exit for systemd to take what still waits
WATCHDOG_PING = "WATCHDOG=1"


def child_environment() -> Dict[str, str]:
    """The environment for worker processes: ours without systemd's notification variables."""
    return {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}


def watchdog_interval() -> Optional[float]:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None


def connect_notify_socket() -> Optional[socket.socket]:
    """A non-blocking datagram socket connected to NOTIFY_SOCKET (sdnotify reads the address,
    '@' for an abstract one), or None, said in one line, when it cannot be reached."""
    try:
        sock: socket.socket = sdnotify.SystemdNotifier(debug=True).socket
    except OSError as exc:
        log.error("cannot reach systemd's NOTIFY_SOCKET %r: %s; systemd will not hear READY,"
                  " STATUS or the watchdog pings", os.environ.get("NOTIFY_SOCKET"), exc.strerror or exc)
        return None
    sock.setblocking(False)
    return sock


class Notifier:
    """Sends READY/STATUS/WATCHDOG/RELOADING/STOPPING when NOTIFY_SOCKET is set; else no-op."""

    def __init__(self) -> None:
        self._socket = connect_notify_socket() if os.environ.get("NOTIFY_SOCKET") else None
        self.pending: List[str] = []  # in order, waiting for room in systemd's queue
        self._refused: Optional[str] = None  # the error last logged, so a stall is said once
        self._full = False  # the last failure was a full queue (not a refusal): retry soon
        self.watchdog_every = watchdog_interval()
        self._next_watchdog = 0.0
        self._next_extension = 0.0
        self._status: Optional[str] = None

    def _send(self, text: str) -> None:
        if self._socket is None:
            return
        if text == WATCHDOG_PING and text in self.pending:
            return
        if text.startswith("STATUS=") and "\n" not in text:
            self.pending = [t for t in self.pending if not (t.startswith("STATUS=") and "\n" not in t)]
        self.pending.append(text)
        self.flush()

    def flush(self) -> bool:
        """Send what waits, oldest first, until systemd's queue is full again; False when
        something still waits."""
        while self.pending and self._socket is not None:
            try:
                self._socket.send(self.pending[0].encode("utf-8", "replace"))
            except OSError as exc:  # BlockingIOError: full; others (ECONNREFUSED...) said once
                self._full = isinstance(exc, BlockingIOError)
                said = "its queue is full" if self._full else str(exc.strerror or exc)
                if said != self._refused:
                    self._refused = said
                    log.warning("systemd is not taking notifications (%s); %d wait and go when it"
                                " does", said, len(self.pending))
                return False
            self.pending.pop(0)
            if self._refused is not None:
                self._refused = None
                log.info("systemd takes notifications again")
        return True

    def flush_before_exit(self, timeout: float = EXIT_WAIT) -> None:
        """At exit, give systemd up to `timeout` seconds to take what still waits (STOPPING=1
        queued while it was not reading), then let it go: the exit itself tells systemd."""
        if self.flush() or self._socket is None:
            return
        log.info("waiting up to %g s for systemd to take %d notification(s)", timeout, len(self.pending))
        deadline = time.monotonic() + timeout
        while self._full and time.monotonic() < deadline:
            select.select([], [self._socket], [], max(0.0, deadline - time.monotonic()))
            if self.flush():
                return
        log.warning("exiting with %d notification(s) systemd did not take: %s", len(self.pending),
                    ", ".join(text.split("\n")[0] for text in self.pending))

    def ready(self) -> None:
        self._send("READY=1")

    def still_starting(self, status: str) -> None:
        """A long start-up step is under way and making progress (called as it goes): STATUS,
        and EXTEND_TIMEOUT_USEC so that systemd's TimeoutStartSec does not kill a daemon
        that is busy checking a large store; each extension lasts START_EXTENSION seconds, so
        a step that stops making progress still times out. At most one a second."""
        now = time.monotonic()
        if now < self._next_extension:
            return
        self._next_extension = now + 1.0
        self._send(f"EXTEND_TIMEOUT_USEC={START_EXTENSION * 1_000_000}\nSTATUS={status}")
        self._status = status

    def reloading(self) -> None:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self, budget: Optional[float] = None) -> None:
        """STOPPING=1, and with a `budget` (seconds the stop may take) EXTEND_TIMEOUT_USEC for
        it: systemd then waits that long even when the unit's TimeoutStopSec, rendered for an
        older stopTimeoutSeconds, is shorter (a longer TimeoutStopSec still holds)."""
        if budget is None:
            self._send("STOPPING=1")
        else:
            self._send(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={math.ceil(budget * 1_000_000)}")

    def status(self, text: str) -> None:
        """Send STATUS= only when the line changed."""
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def watchdog(self, now: float, healthy: bool) -> Optional[float]:
        """Called every tick: send what waits, then ping when due and healthy; returns seconds
        until this wants the next tick (a ping due, or notifications waiting), else None."""
        self.flush()
        if self.watchdog_every is not None and now >= self._next_watchdog:
            if not healthy:
                return min(self.watchdog_every, UNHEALTHY_RECHECK)
            self._send(WATCHDOG_PING)
            self._next_watchdog = now + self.watchdog_every
        wants = [PENDING_RECHECK if self._full else REFUSED_RECHECK] if self.pending else []
        if self.watchdog_every is not None:
            wants.append(self._next_watchdog - now)
        return min(wants) if wants else None
