"""What /proc/PID/io's write_bytes says a small LMDB commit writes, against the bytes its disk
is sent (a fresh ext4 on a loop device, loopdisk.py; root only): on a fresh file, with 100,000
records stored, and after they were deleted. The wear benchmarks report both figures because
they part ways on kernels that cache a file in large folios (write_bytes counts a dirtied
folio whole).

    .venv/bin/python bench/bench_write_accounting.py [--commits 200]
"""
from __future__ import annotations

import argparse
import os
import struct
import sys

import lmdb

import loopdisk
from bench_sweep import written_bytes

RECORDS, RECORD_BYTES = 100_000, 250


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=200)
    args = parser.parse_args()
    if not loopdisk.available():
        print("bench_write_accounting.py: needs root (a loop device)", file=sys.stderr)
        return 2
    print(f"A commit of one small put into a named database, {args.commits} commits a row"
          f" (LMDB {'.'.join(map(str, lmdb.version()))}, sync on, ext4 on a loop device,"
          f" kernel {os.uname().release}).\n")
    print("| the file | write_bytes a commit | sent to the device a commit |")
    print("|---|---:|---:|")
    with loopdisk.loop_disk(512) as (disk, device_written):
        env = lmdb.open(str(disk / "store"), map_size=1 << 30, max_dbs=4, sync=True)
        inbox, small = env.open_db(b"inbox"), env.open_db(b"small")

        def row(label: str) -> None:
            process, device = written_bytes(), device_written()
            for i in range(args.commits):
                with env.begin(write=True) as txn:
                    txn.put(b"k", b"%d" % i, db=small)
            print(f"| {label} | {(written_bytes() - process) / args.commits / 1024:.1f} KiB |"
                  f" {(device_written() - device) / args.commits / 1024:.1f} KiB |", flush=True)

        row("fresh")
        for start in range(0, RECORDS, 1000):
            with env.begin(write=True) as txn:
                for i in range(start, start + 1000):
                    txn.put(struct.pack(">Q", i), os.urandom(RECORD_BYTES), db=inbox)
        row(f"{RECORDS:,} records of {RECORD_BYTES} bytes stored")
        for start in range(0, RECORDS, 200):
            with env.begin(write=True) as txn:
                for i in range(start, start + 200):
                    txn.delete(struct.pack(">Q", i), db=inbox)
        row(f"after they were deleted, 200 a commit ({os.path.getsize(disk / 'store' / 'data.mdb') >> 20} MB file)")
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
