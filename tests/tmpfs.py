"""Small file systems mounted for one test (we are root): a tmpfs to fill a disk for real, an
ext4 on a loop device to have the kernel remount it read-only for real, and writes to that
device stalled for real (a blkio cgroup)."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size_mb: int, options: str = "") -> Iterator[Path]:
    """`mount_point` (made here) with a `size_mb` tmpfs on it (more mount `options`:
    `nr_inodes=N`) until the block ends; the test is skipped where it cannot be mounted (not
    root, no mount rights)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700{',' + options if options else ''}", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A junk file that fills `disk` to its last block but for `leave` bytes (whole pages on a
    tmpfs), so that a test meets a full disk for real; delete it to free the space."""
    junk = disk / "junk"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\xa5" * 4096)
    except OSError:  # ENOSPC: the disk is full
        pass
    finally:
        os.close(fd)
    os.truncate(junk, max(0, junk.stat().st_size - leave))
    return junk


@contextlib.contextmanager
def mounted_ext4(mount_point: Path, size_mb: int = 64) -> Iterator[str]:
    """`mount_point` (made here) with a `size_mb` ext4 on a loop device, mounted
    errors=remount-ro as Raspberry Pi OS mounts its root, until the block ends; yields the
    device's name under /sys/fs/ext4 (its trigger_fs_error makes the kernel remount it
    read-only). Unmounted and detached however the block ends; skipped only without root or
    loop devices."""
    if os.geteuid() != 0:
        pytest.skip("a loop device needs root")
    image = mount_point.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    attached = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if attached.returncode != 0:
        pytest.skip(f"no loop device: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        mount_point.mkdir()
        subprocess.run(["mount", "-t", "ext4", "-o", "errors=remount-ro", device, str(mount_point)],
                       check=True, capture_output=True)
        try:
            yield Path(device).name
        finally:
            if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


def read_only(directory: Path) -> bool:
    """Whether a write there fails as on a filesystem remounted read-only (the remount comes
    with the next write to the journal, not with the trigger)."""
    try:
        (directory / "probe").touch()
    except OSError as exc:
        return exc.errno == errno.EROFS
    return False


class WriteStall:
    """A cgroup v1 blkio group throttling writes to one block device: processes that `join` it
    (as a preexec) find every write to the device blocked while `stall` lasts, as on an SD card
    stalling for seconds. Made and removed by `stalled_writes`."""

    def __init__(self, group: Path, device: str):
        self.group = group
        self.device = device  # "major:minor"

    def join(self) -> None:
        (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def _limit(self, bytes_per_second: int) -> None:
        (self.group / "blkio.throttle.write_bps_device").write_text(f"{self.device} {bytes_per_second}")

    def stall(self) -> None:
        self._limit(1)  # a byte a second: a write of a block waits until `resume`

    def resume(self) -> None:
        self._limit(0)  # no limit; writes held back go at once


@contextlib.contextmanager
def stalled_writes(device_name: str, group_name: str) -> Iterator[WriteStall]:
    """A WriteStall for the block device `device_name` (e.g. "loop3", from `mounted_ext4`),
    removed (with its limit) however the block ends, once the processes that joined it are gone;
    skipped only where cgroup v1's blkio controller is not mounted."""
    root = Path("/sys/fs/cgroup/blkio")
    if not (root / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 blkio controller at /sys/fs/cgroup/blkio")
    group = root / group_name
    group.mkdir()
    stall = WriteStall(group, (Path("/sys/block") / device_name / "dev").read_text().strip())
    try:
        yield stall
    finally:
        stall.resume()
        for _ in range(100):  # the daemon's last processes may still be exiting
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
