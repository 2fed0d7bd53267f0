"""A fresh ext4 filesystem on a loop device, and the bytes written to that device: what an SD
card under the store would be sent (data, metadata, the journal), for wear benchmarks.

/proc/PID/io's `write_bytes` is not that figure on this kernel (6.18): it counts whole
page-cache folios when a page in one is dirtied, so on a large LMDB file a commit that
pwrite()s 3 KiB and sends ~25 KiB to the disk (journal included) counts ~150 KiB.
Root only (mount); the benchmarks say which figure they report.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

SECTOR = 512  # /sys/block/*/stat counts 512-byte sectors whatever the device's own


def available() -> bool:
    return os.geteuid() == 0


@contextmanager
def loop_disk(size_mb: int, options: str = "", parent: Optional[str] = "/var/tmp") -> Iterator[Tuple[Path, Callable[[], int]]]:
    """(a directory on a fresh ext4 of `size_mb` MB mounted with `options` (e.g. "lazytime"),
    a function returning the bytes written to its device so far, after a sync). Unmounted and
    deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-disk-", dir=parent) as tmp:
        image, mount = Path(tmp) / "disk.img", Path(tmp) / "mnt"
        mount.mkdir()
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        # inode tables and journal written now: lazy init would write them in the background, counted
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
                       check=True)
        subprocess.run(["mount", "-o", ",".join(["loop"] + ([options] if options else [])), str(image),
                        str(mount)], check=True)
        try:
            device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mount)], check=True,
                                    capture_output=True, text=True).stdout.strip()
            stat = Path("/sys/block") / Path(device).name / "stat"

            def written() -> int:
                os.sync()  # the journal's commit and any writeback held back: counted now
                return int(stat.read_text().split()[6]) * SECTOR

            yield mount, written
        finally:
            subprocess.run(["umount", str(mount)], check=True)
