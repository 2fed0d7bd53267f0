"""Run the daemon under libfaketime (Debian package `libfaketime`) with a wall clock the test
steps at run time.

The daemon's processes get LD_PRELOAD=libfaketime with FAKETIME_TIMESTAMP_FILE and
FAKETIME_NO_CACHE=1, so every clock read re-reads the offset file that `step_to` rewrites
(atomically, by rename). FAKETIME_DONT_FAKE_MONOTONIC=1, deliberately: a real clock step
(settimeofday, NTP) never moves CLOCK_MONOTONIC or CLOCK_BOOTTIME, and without it libfaketime
0.9.10 shifts both with the wall clock, which would hide the very thing under test. The price:
with it, libfaketime 0.9.10 breaks Python's `time.sleep` (EINVAL from clock_nanosleep with
TIMER_ABSTIME, libfaketime issue #426); the daemon never calls it (it waits in select() and
threading.Event), and `run_daemon` fails a test whose daemon logged a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime",
                "/usr/lib/arm-linux-gnueabihf/faketime", "/usr/lib/faketime", "/usr/local/lib/faketime")
DAY = 86400


def library() -> str:
    for directory in LIBRARY_DIRS:
        candidate = Path(directory) / "libfaketime.so.1"
        if candidate.exists():
            return str(candidate)
    raise AssertionError("libfaketime is not installed (make system-deps: apt-get install libfaketime)")


class FakeTime:
    """An offset file for libfaketime: the faked wall clock is the real one plus the offset."""

    def __init__(self, path: Path, offset: int = 0):
        self.path = path
        self.offset = 0
        self.step_to(offset)

    def env(self) -> Dict[str, str]:
        return {"LD_PRELOAD": library(), "FAKETIME_TIMESTAMP_FILE": str(self.path),
                "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def step_to(self, offset: int) -> None:
        """Set the faked clock to real time + `offset` seconds (a step, in whole seconds)."""
        temporary = self.path.with_suffix(".new")
        temporary.write_text(f"{int(offset):+d}\n")
        os.replace(temporary, self.path)
        self.offset = int(offset)
