"""A CPU share for chosen processes of a test (we are root): a cgroup v1 cpu group with a CFS
quota, as a Pi Zero busy with other apps gives a daemon a sliver of a slow core."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_USEC = 200_000  # quotas go down to 1 ms: 0.5 % of a core


class CpuShare:
    def __init__(self, group: Path):
        self.group = group

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the group."""
        (self.group / "cgroup.procs").write_text(str(pid))


@contextlib.contextmanager
def cpu_share(group_name: str, percent: float) -> Iterator[CpuShare]:
    """A CpuShare of `percent` of one core, removed however the block ends (its processes moved
    back to the root group first); skipped only where cgroup v1's cpu controller is not mounted."""
    if not (ROOT / "cpu.cfs_quota_us").exists():
        pytest.skip("no cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    group = ROOT / group_name
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_USEC))
        (group / "cpu.cfs_quota_us").write_text(str(int(PERIOD_USEC * percent / 100)))
        yield CpuShare(group)
    finally:
        deadline = time.monotonic() + 5
        while True:
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # gone meanwhile
                    (ROOT / "cgroup.procs").write_text(pid)
            try:
                group.rmdir()
                break
            except OSError:  # EBUSY: a process still on its way in or out
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
