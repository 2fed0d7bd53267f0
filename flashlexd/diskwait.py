"""The supervisor's own disk writes, waited for without starving systemd's watchdog.

The supervisor answers an `ack` or a `publish` only once its write is durable: an LMDB commit
or an ack journal record, written while its loop waits. On a stalling SD card one such write
took 10-20 s (review "slowdisk": WATCHDOG=1 pings 31.5 s apart through an 18 s stall, past the
unit's WatchdogSec=30: systemd would have killed a healthy daemon). A loop waiting for the disk
is not hung, so the write runs in a helper thread (the write's syscalls release the GIL) and the
waiting thread is called back every BEAT seconds (`Beat`, given the seconds waited): there the
supervisor feeds the watchdog as its last pass would have, up to workerproc.DISK_WAIT_LIMIT, the
bound a worker waiting on the disk has. A write stalled longer is a dead disk: the pings stop.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Generic, Optional, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
Beat = Callable[[float], None]
BEAT = 1.0  # seconds between calls of a Beat (the watchdog wants a ping every WatchdogSec/2)


class Helper(Generic[T]):
    """`work()` in a daemon thread; its result, or what it raised, kept for the caller."""

    def __init__(self, work: Callable[[], T], name: str):
        self._work = work
        self._outcome: Dict[str, object] = {}
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._outcome["result"] = self._work()
        except BaseException as exc:  # handed to the caller by `result`
            self._outcome["error"] = exc

    def wait(self, began: float, beat: Optional[Beat], beat_first: bool = False) -> None:
        """Until the thread ends, calling `beat(seconds since began)` every BEAT seconds (and
        at once with `beat_first`; what one raises is logged, once: the write still runs, and
        is waited for all the same)."""
        failed = False
        while True:
            if not beat_first:
                self.thread.join(BEAT)
            beat_first = False
            if not self.thread.is_alive():
                return
            if beat is not None:
                try:
                    beat(time.monotonic() - began)
                except Exception:  # noqa: BLE001 - see above
                    if not failed:
                        log.exception("while waiting for a disk write")
                    failed = True

    def result(self) -> T:
        if "error" in self._outcome:
            raise self._outcome["error"]  # type: ignore[misc]
        return self._outcome["result"]  # type: ignore[return-value]
