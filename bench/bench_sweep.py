"""The named consumers' sweep on a large store, step by step: what each step of
`Store.consumers_upkeep` costs the supervisor's loop (it runs one step per turn), how many commits
the sweep makes and how many bytes it writes (SD-card wear).

    .venv/bin/python bench/bench_sweep.py [--sizes 100000 500000]

For each size a store is filled with ~200-byte messages on `bench/N` topics, one in 100 on
`rare/x`, with three consumers that never ack: `rare` (`rare/#`, maxBacklog 500), `all` (every
topic) and `gone`, a dynamic consumer idle for longer than consumerIdleDays. The first sweep
removes `gone` (the messages only it held: none, `all` holds them all) and trims `rare` to 500;
a later sweep only counts `rare`'s backlog. Each step is timed; commits are LMDB transaction ids
used; bytes are those written to the device under the store, a fresh ext4 on a loop device
(loopdisk.py, as root: data, metadata and the journal, what an SD card would be sent), beside
this process's write_bytes (/proc/self/io), which counts whole page-cache folios here. The
steps are timed in a second run on /var/tmp (a loop device's fsync costs twice).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import loopdisk
from benchlib import PAYLOAD_BYTES, ms
from flashlexd.consumers import ConsumerSpec
from flashlexd.storeconsumers import COMMIT_STEP, COUNT_STEP
from flashlexd.store import Incoming, Store

IDLE_SECONDS = 7 * 86400
CAP = 4 << 30
DISK_MB = 2048  # the loop device's filesystem: a 500,000-message store takes ~300 MB


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def fill(store: Store, size: int) -> None:
    payload = b"x" * PAYLOAD_BYTES
    for start in range(0, size, 1000):
        store.append([Incoming("rare/x" if i % 100 == 0 else f"bench/{i % 10}", payload)
                      for i in range(start, min(size, start + 1000))])


def sweep(store: Store, now: float, device_written: Callable[[], int] = lambda: 0) -> Dict[str, object]:
    """One whole sweep, a step at a time as the supervisor runs it."""
    steps: List[float] = []
    commits, written, device = store._env.info()["last_txnid"], written_bytes(), device_written()
    upkeep = store.consumers_upkeep(now, IDLE_SECONDS)
    while True:
        start = time.perf_counter()
        try:
            next(upkeep)
        except StopIteration:
            break
        steps.append(time.perf_counter() - start)
    return {"steps": steps, "commits": store._env.info()["last_txnid"] - commits,
            "written": written_bytes() - written, "device": device_written() - device}


def measure(size: int, root: Path, device_written: Callable[[], int] = lambda: 0) -> Dict[str, Dict[str, object]]:
    now = time.time()
    store = Store(root / f"store-{size}", CAP)
    try:
        store.consumer_declare([ConsumerSpec("rare", "rare/#", max_backlog=500), ConsumerSpec("all")], now)
        store.consumer_register("gone", now - 2 * IDLE_SECONDS)
        fill(store, size)
        first = sweep(store, now, device_written)
        assert store.consumer_state("gone") is None, "the idle consumer was not removed"
        return {"first sweep (removal of the idle consumer, trim of `rare` to 500)": first,
                "a later sweep (the count only)": sweep(store, now, device_written)}
    finally:
        store.close()


def row(label: str, timed: Dict[str, object], on_device: Dict[str, object]) -> str:
    steps: List[float] = timed["steps"]  # type: ignore[assignment]
    return (f"| {label} | {len(steps):,} | {ms(statistics.median(steps))} | {ms(max(steps))} |"
            f" {ms(sum(steps))} | {timed['commits']:,} | {on_device['device'] / 1e6:.1f} MB |"
            f" {timed['written'] / 1e6:.1f} MB |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 500_000])
    args = parser.parse_args()
    print(f"Steps of at most COMMIT_STEP = {COMMIT_STEP} records a commit or COUNT_STEP ="
          f" {COUNT_STEP} records a read; the supervisor runs one a turn of its loop.\n")
    if not loopdisk.available():
        print("bench_sweep.py: the device's bytes need root (a loop device); run it as root", file=sys.stderr)
        return 2
    print("| stored, sweep | steps | median step | slowest step | all steps | commits |"
          " written to the device | write_bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        with loopdisk.loop_disk(DISK_MB) as (disk, device_written):
            on_device = measure(size, disk, device_written)
        with tempfile.TemporaryDirectory(prefix="bench-sweep-", dir="/var/tmp") as tmp:
            timed = measure(size, Path(tmp))
        for label in timed:
            print(row(f"{size:,}: {label}", timed[label], on_device[label]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
