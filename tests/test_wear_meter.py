"""The bytes-written figures of `status()["store"]` (flashlexd/wear.py) from real processes'
/proc/PID/io, and how `flashlexctl status` shows them."""
from __future__ import annotations

import os
import time
import subprocess
import sys
from pathlib import Path

from flashlexd.client import ctlview
from flashlexd.wear import DAY, GIB, WriteMeter, written_bytes

WRITER = """
import os, sys
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(b"x" * 4096); f.flush(); os.fsync(f.fileno())
sys.stdin.read()  # stay alive until the test closes stdin
"""


def start_writer(path: Path, pages: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(pages)],
                            stdin=subprocess.PIPE)


def wait_written(pid: int, at_least: int) -> None:
    deadline = time.monotonic() + 10
    while (written_bytes(pid) or 0) < at_least:
        assert time.monotonic() < deadline, f"pid {pid} wrote {written_bytes(pid)} bytes"
        time.sleep(0.01)


def test_the_meter_sums_live_processes_and_keeps_those_that_went_away(tmp_path: Path):
    meter = WriteMeter(window=10)
    first = start_writer(tmp_path / "a", 0)
    meter.sample(0.0, [first.pid], received=100)  # the baseline: nothing counted yet
    assert meter.figures()["written_bytes"] == 0 and meter.figures()["written_per_message"] is None
    first.stdin.close()
    first.wait(10)
    second = start_writer(tmp_path / "b", 25)  # 100 KiB
    try:
        wait_written(second.pid, 25 * 4096)
        meter.sample(10.0, [first.pid, second.pid], received=110)  # the first is gone
        figures = meter.figures()
        assert 25 * 4096 <= figures["written_bytes"] < 40 * 4096  # a started process counts whole
        assert figures["written_per_message"] == round(figures["written_bytes"] / 10)
        assert figures["written_gib_per_day"] == round(figures["written_bytes"] / 10 * DAY / GIB, 3)
    finally:
        second.stdin.close()
        second.wait(10)
    meter.sample(20.0, [], received=110)
    assert meter.figures()["written_bytes"] == figures["written_bytes"]  # kept after it ended


def test_no_daily_rate_before_a_whole_window_was_measured():
    """Found by review: 5 s after start `status` said 0.98 GiB/day, the start's own writes
    (creating the store) projected to a day."""
    meter = WriteMeter(window=60)
    meter.sample(0.0, [os.getpid()], received=0)
    meter.sample(5.0, [os.getpid()], received=0)
    assert meter.figures()["written_gib_per_day"] is None
    meter.sample(60.0, [os.getpid()], received=0)
    assert meter.figures()["written_gib_per_day"] is not None


def test_an_unreadable_process_counts_nothing():
    assert written_bytes(2 ** 22 + 12345) is None
    assert written_bytes() is not None and written_bytes(os.getpid()) is not None


def test_ctl_status_shows_the_projection():
    line = ctlview.wear_text({"written_bytes": 3 * 1024 * 1024, "written_per_message": 9216,
                              "written_gib_per_day": 0.742})
    assert line == "written 3.0 MiB since start (9.0 KiB a stored message), 0.74 GiB/day at the current rate"
