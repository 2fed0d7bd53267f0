"""Named consumers: fetch+ack throughput with 1 and with 5 consumers, and store growth per consumer.

    .venv/bin/python bench/bench_consumers.py [--messages 20000] [--runs 5] [--cpu 0]

Throughput: the daemon's `RpcServer` hosted as bench/bench_rpc.py hosts it (a forked child, its
own Store), `flashlexd.client` in this process, all pinned to one CPU. Each run fills a fresh
store with `--messages` ~50-byte messages, then drains it with `messages(limit=100)` + `ack(ids)`:
once by the unnamed default consumer (today's path), once by one named consumer, once by five
named consumers served round-robin (each reads and acks every message; a message leaves the
inbox with the fifth ack). Rate per consumer = messages each consumer fetched and acked per
second of API time: CPU time of the server and the client together (other jobs on a shared
machine move it little), and wall time. With five consumers the server does five times the
deliveries, so the ratio 5-consumer / 1-consumer per consumer is what each extra consumer
costs. The three alternate in order run by run; the table shows medians and the median of the
per-run ratios. Target: 5 consumers >= 0.7x the single consumer's rate (CPU time), per consumer.

Growth: the bytes of the consumer databases once five consumers each acked half of `--messages`
stored messages, in order (the floor moves; nothing is kept per message) or every other one
(the worst case: one acks-ahead entry per message acked above the floor), while a sixth acks
nothing (so the messages stay, as behind a slow app). No payload is ever copied per consumer.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_rpc import connect_when_up, fill, filesystem, rpc_loop, spawn  # noqa: E402
from flashlexd.client import Client  # noqa: E402
from flashlexd.consumers import ConsumerSpec  # noqa: E402
from flashlexd.store import Store  # noqa: E402
from tests.worker_process import cpu_seconds  # noqa: E402

PAYLOAD = b'{"sensor": "bench", "value": 21.5, "seq": 12345}'
TARGET = 0.7
NAMES = [f"app{i}" for i in range(5)]


def drain(clients: List[Client], server: int) -> Tuple[float, float]:
    """Fetch+ack in batches of 100 until every client's view is empty, round-robin; (seconds,
    CPU seconds of the server and this client together)."""
    start, cpu = time.perf_counter(), time.process_time() + cpu_seconds(server)
    active = list(clients)
    while active:
        for client in list(active):
            batch = client.messages(limit=100)
            if not batch:
                active.remove(client)
                continue
            client.ack(batch)
    return time.perf_counter() - start, time.process_time() + cpu_seconds(server) - cpu


def one_run(root: str, count: int, consumers: Optional[int]) -> Tuple[float, float]:
    """Deliveries per consumer per second of wall time and of CPU time: `consumers` named
    (None: the default consumer)."""
    data_dir = os.path.join(root, "data")
    shutil.rmtree(data_dir, ignore_errors=True)
    fill(data_dir, count, PAYLOAD)
    if consumers:  # declared before the run: registration is not what is measured
        store = Store(Path(data_dir), cap_bytes=512 << 20)
        store.consumer_declare([ConsumerSpec(n) for n in NAMES[:consumers]], time.time())
        store.close()
    path = os.path.join(root, "rpc.sock")
    child = spawn(rpc_loop, path, data_dir)
    try:
        first = connect_when_up(path)
        first.close()
        names = NAMES[:consumers] if consumers else [None]
        clients = [Client(path, consumer=name) for name in names]
        seconds, cpu = drain(clients, child)
        left = Client(path).messages(limit=1)
        assert not left, f"{len(left)} message(s) left in the inbox"
        for client in clients:
            client.close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.unlink(path)
    return count * len(names) / seconds, count * len(names) / cpu


def consumer_bytes(store: Store) -> int:
    """Bytes of the two consumer databases (their B-tree pages)."""
    with store._read() as txn:
        stats = [txn.stat(db) for db in (store._consumer_db, store._consumer_acks)]
    pages = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)
    return pages * store._page_size


def growth(root: str, count: int) -> Dict[str, float]:
    """Bytes the consumer state takes for five consumers that acked half the messages in order
    (the floor moves) or every other one (acks-ahead entries). A sixth consumer acks nothing, so
    every message stays and the acks-ahead entries are kept, as they are behind a slow app."""
    figures: Dict[str, float] = {}
    for how in ("in order", "every other"):
        data_dir = os.path.join(root, f"growth-{how.replace(' ', '-')}")
        fill(data_dir, count, PAYLOAD)
        store = Store(Path(data_dir), cap_bytes=512 << 20)
        try:
            store.consumer_declare([ConsumerSpec(n) for n in NAMES + ["holder"]], time.time())
            ids = list(range(1, count // 2 + 1)) if how == "in order" else list(range(2, count + 1, 2))
            for name in NAMES:
                for start in range(0, len(ids), 1000):
                    store.consumer_ack(name, ids[start:start + 1000], time.time())
            assert store.inbox_count() == count
            figures[how] = consumer_bytes(store)
            figures[f"{how} acked"] = len(ids)
        finally:
            store.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    parser.add_argument("--cpu", type=int, default=0, help="pin to this CPU (default 0; -1: no pinning)")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    root = tempfile.mkdtemp(prefix="flashlexd-bench-consumers-", dir=args.dir)
    rates: Dict[str, List[Tuple[float, float]]] = {"default": [], "1": [], "5": []}
    ratios: List[float] = []
    wall_ratios: List[float] = []
    try:
        for _ in range(args.runs):
            for key, consumers in (("default", None), ("1", 1), ("5", 5)):
                rates[key].append(one_run(root, args.messages, consumers))
            ratios.append(rates["5"][-1][1] / rates["1"][-1][1])
            wall_ratios.append(rates["5"][-1][0] / rates["1"][-1][0])
        grown = growth(root, args.messages)
        fs = filesystem(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = statistics.median(ratios)
    pinning = f"pinned to CPU {args.cpu}" if args.cpu >= 0 else "not pinned"
    print(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs ({pinning}),"
          f" store on {fs}, {args.messages:,} messages, {args.runs} runs\n")
    print("| fetch + ack, batches of 100 | per consumer, per CPU second (median) | min | max |"
          " per wall second (median) | min | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, label in (("default", "unnamed default consumer (today's path)"),
                       ("1", "1 named consumer (baseline)"), ("5", "5 named consumers, each")):
        cells = []
        for values in ([cpu for _, cpu in rates[key]], [wall for wall, _ in rates[key]]):
            cells += [f"{statistics.median(values):,.0f}", f"{min(values):,.0f}", f"{max(values):,.0f}"]
        print(f"| {label} | {' | '.join(cells)} |")
    verdict = "ok" if ratio >= TARGET else "missed"
    print(f"\n5 consumers / 1 consumer, per consumer (median of per-run ratios, CPU time): **{ratio:.2f}x**"
          f" (runs {', '.join(f'{r:.2f}' for r in ratios)}; target >= {TARGET}x): {verdict}")
    print(f"the same by wall time: {statistics.median(wall_ratios):.2f}x"
          f" (runs {', '.join(f'{r:.2f}' for r in wall_ratios)})")
    print("\n| consumer state, 5 consumers (+1 acking nothing) | messages acked each | bytes | per consumer |"
          " per acked message |")
    print("|---|---:|---:|---:|---:|")
    for how in ("in order", "every other"):
        acked = grown[f"{how} acked"]
        print(f"| acked {how} | {acked:,.0f} | {grown[how]:,.0f} | {grown[how] / 5:,.0f} |"
              f" {grown[how] / 5 / acked:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
