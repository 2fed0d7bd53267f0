"""Latency of API calls with a topic filter that matches little, at 10k / 100k / 500k stored: the
`paged` calls (what `flashlexd.client` sends: each looks at <= SCAN_BUDGET records and answers a
cursor) against the unpaged call, which walks the whole inbox inside the supervisor's loop.

    .venv/bin/python bench/bench_scan.py [--sizes 10000 100000 500000] [--rounds 30]

For each size a store is filled with ~200-byte messages on `bench/N` topics plus one on
`rare/y` at the end, and served by `RpcServer` hosted the way the supervisor hosts it (its own
process, bench_rpc.py's loop). One client times each call, interleaved round by round: `status`,
`messages(limit=1)` (no filter), one `paged` `messages(topic="rare/#")` call and one `paged`
`wait(timeout=0)` and a paged read of a named consumer of `rare/#` (each one wire call, the
supervisor's loop is busy that long at most; `status` reports two named consumers, one of every
topic and that one, neither acking: their backlogs are counted up to a budget), an `ack` of
the rare message by its consumer (each moves the consumer's floor on over the noise), the
client's whole `messages(topic="rare/#")` (it follows the cursors to the match), and the
unpaged call (3 rounds), which the server walks one page per turn of its loop (ipc/walk.py):
its answer takes as long as the whole walk, but a second client's `status`, timed meanwhile,
waits for one page at most. Last, the consumer of every topic is reset to latest: the server
commits RESET_STEP records a call (storeconsumers.py), each call is timed, and a `status` is
timed beside it too.
Target: every single call < 5 ms at 500k stored (the status rows beside the walks and the reset
included; the whole walks and the whole reset are not single calls' work).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

from benchlib import ms, verdict
from benchlib import PAYLOAD_BYTES
from bench_rpc import connect_when_up, fill, rpc_loop, spawn
from flashlexd.consumers import ConsumerSpec
from flashlexd.ipc.methods import SCAN_BUDGET
from flashlexd.store import Incoming, Store

TARGET = 0.005  # seconds, every single call at the largest size
RARE = "rare/#"
CONSUMERS = (ConsumerSpec("all"), ConsumerSpec("rare", RARE))  # named consumers, never acking
STATUS_DURING_WALK = "status, while an unpaged call walks the whole inbox"
STATUS_DURING_RESET = "status, while a consumer's reset to latest passes the whole inbox"
RESET = "reset(consumer 'all', to='latest'), all its commits"
RESET_CALL = "reset(consumer 'all', to='latest'), one paged call (one commit)"


def timed(calls: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[float]]:
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return samples


def status_during(path: str, work: Callable[[], object], times: int) -> List[float]:
    """`status` round trips of a second client while `work` (a call of another client that the
    server does a page or a commit per turn of its loop) runs `times` times: other calls go
    between its steps."""
    samples: List[float] = []
    with connect_when_up(path) as other:
        for _ in range(times):
            done = threading.Event()
            thread = threading.Thread(target=lambda: (work(), done.set()))
            thread.start()
            while not done.is_set():
                start = time.perf_counter()
                other.call("status")
                samples.append(time.perf_counter() - start)
            thread.join()
    return samples


def measure(size: int, rounds: int, root: Path) -> Dict[str, List[float]]:
    data_dir = root / f"store-{size}"
    fill(str(data_dir), size, b"x" * PAYLOAD_BYTES)
    store = Store(data_dir, cap_bytes=512 << 20)
    store.consumer_declare(CONSUMERS, time.time())  # status reports their backlogs
    [rare] = store.append([Incoming("rare/y", b"the one")])
    store.close()
    path = str(root / f"api-{size}.sock")
    server = spawn(rpc_loop, path, str(data_dir))
    try:
        fx = connect_when_up(path)
        with fx:
            assert [m.id for m in fx.messages(topic=RARE)] == [rare]
            bounded = {
                "status": lambda: fx.call("status"),
                "messages(limit=1), no filter": lambda: fx.call("messages", limit=1),
                f"messages(topic={RARE!r}), one paged call": lambda: fx.call("messages", topic=RARE, paged=True),
                f"wait(topic={RARE!r}, timeout=0), one paged call":
                    lambda: fx.call("wait", topic=RARE, timeout=0, paged=True),
                "messages(consumer='rare'), one paged call":
                    lambda: fx.call("messages", consumer="rare", paged=True),
                "ack(consumer='rare'), its floor's walk": lambda: fx.call("ack", consumer="rare", ids=[rare]),
            }
            samples = timed(bounded, rounds)
            samples[STATUS_DURING_WALK] = status_during(path, lambda: fx.call("messages", topic=RARE), 3)
            samples.update(timed({
                f"client messages(topic={RARE!r}), all pages": lambda: fx.messages(topic=RARE),
                f"unpaged messages(topic={RARE!r}), one call walks all": lambda: fx.call("messages", topic=RARE),
            }, 3))
            # last: it removes every message but the rare one (no other consumer holds them)
            resets: List[float] = []
            steps: List[float] = []

            def reset_all() -> None:
                """`fx.reset("all", "latest")`, each of its wire calls timed."""
                start = time.perf_counter()
                going: Dict[str, object] = {}
                target: object = "latest"
                while True:
                    step = time.perf_counter()
                    answer = fx.call("reset", consumer="all", to=target, paged=True, **going)
                    steps.append(time.perf_counter() - step)
                    if answer["done"]:
                        break
                    target, going = answer["to"], {"way": answer["way"]}
                resets.append(time.perf_counter() - start)

            samples[STATUS_DURING_RESET] = status_during(path, reset_all, 1)
            samples[RESET_CALL] = steps
            samples[RESET] = resets
        return samples
    finally:
        os.kill(server, signal.SIGKILL)
        os.waitpid(server, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        for size in args.sizes:
            results[size] = measure(size, args.rounds, Path(tmp))
    names = list(results[args.sizes[0]])
    print(f"Median (slowest) of {args.rounds} rounds; the whole walks 3 rounds, the reset one; a"
          " status row beside walks or a reset: every call made meanwhile."
          f" SCAN_BUDGET = {SCAN_BUDGET} records per paged call.\n")
    print("| call | " + " | ".join(f"{size:,} stored" for size in args.sizes) + " |")
    print("|---|" + "---:|" * len(args.sizes))
    for name in names:
        cells = [f"{ms(statistics.median(results[s][name]))} ({ms(max(results[s][name]))})" for s in args.sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    largest = results[args.sizes[-1]]
    single = [n for n in names if "all pages" not in n and "walks all" not in n and n != RESET]
    worst = max(statistics.median(largest[n]) for n in single)
    slowest = max(max(largest[n]) for n in single)
    print(f"\ntarget every single call < 5 ms at {args.sizes[-1]:,} stored: slowest median"
          f" {ms(worst)}, slowest call {ms(slowest)}: {verdict(worst < TARGET)}")
    return 0 if worst < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
