"""systemd notification (sd_notify) for the supervisor, and the watchdog cadence.

Only the supervisor notifies: workers run with NOTIFY_SOCKET and WATCHDOG_* removed from their
environment (see `child_environment`) and none of its descriptors (`forkworker`). WATCHDOG=1 is sent from the supervisor's own loop,
never from a helper thread, so a hung loop stops the pings and systemd restarts the service.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional

import sdnotify

log = logging.getLogger(__name__)
UNHEALTHY_RECHECK = 0.1  # seconds; how soon to look again while a ping is withheld
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
START_EXTENSION = 30  # seconds of start-up time each `still_starting` call asks for


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


class Notifier:
    """Sends READY/STATUS/WATCHDOG/RELOADING/STOPPING when NOTIFY_SOCKET is set; else no-op."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_every = watchdog_interval()
        self._next_watchdog = 0.0
        self._next_extension = 0.0
        self._status: Optional[str] = None

    def _send(self, text: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(text)

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

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """Send STATUS= only when the line changed."""
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def watchdog(self, now: float, healthy: bool) -> Optional[float]:
        """Ping when due and healthy; returns seconds until the next ping is due."""
        if self.watchdog_every is None:
            return None
        if now < self._next_watchdog:
            return self._next_watchdog - now
        if not healthy:
            return min(self.watchdog_every, UNHEALTHY_RECHECK)
        self._send("WATCHDOG=1")
        self._next_watchdog = now + self.watchdog_every
        return self.watchdog_every
