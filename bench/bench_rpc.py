"""Local API benchmark: RPC latency against a bare msgpack echo server, and fetch+ack throughput.

Each server runs in a forked child process (its own GIL, its own Store opened after fork), on
the same kind of selector loop the supervisor runs; the client is flashlexd.client in this
process, used unchanged against both servers, so the difference is the daemon's own work.
Everything is pinned to one CPU by default (--cpu), and the calls are interleaved round by
round, so the ratios hold up on a busy or virtual machine.

    .venv/bin/python bench/bench_rpc.py [--rounds 3000] [--messages 50000] [--cpu N]

Prints a markdown table. Targets: status and messages(limit=1) within 2x of the echo
round trip; fetch+ack in batches of 100 at >= 50,000 messages/s. `status` answers ~2.4 KB
(bench/status_sample.json, captured from a running daemon; the supervisor's part of it is what
the server here is given), so it is also compared with the same bare loop answering that
sample: the difference is the daemon's own work, not the answer's size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import msgpack

from flashlexd.client import Client
from flashlexd.client.wire import HEADER
from flashlexd.ipc import Limits, RpcServer
from flashlexd.ipc.methods import Methods
from flashlexd.runtime import ApiRules
from flashlexd.topics import DEFAULT_MAX_TOPIC_BYTES
from flashlexd.store import COUNTERS, Incoming, Store
from flashlexd.supervisor import STORE_WRITE_WAIT

MAX_PAYLOAD = 256 * 1024
# `status` as a running daemon answers it (captured from one: every worker's counters and link
# report, rates, wear, API counters; ~2.4 KB of msgpack)
STATUS_SAMPLE = Path(__file__).with_name("status_sample.json")
STORE_PARTS = ("inbox", "outbox", "store", "consumers")  # what the `status` method adds
SAMPLE = "sample"  # the echo server's canned status answer


def echo_loop(path: str) -> None:
    """The baseline: frame in, unpack, pack, frame out; nothing else. A call of SAMPLE is
    answered with the status sample instead: the same bare loop, with status's answer size."""
    sample = json.loads(STATUS_SAMPLE.read_text())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    buffers: Dict[socket.socket, bytearray] = {}
    while True:
        for key, _ in selector.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                buffers[conn] = bytearray()
                selector.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            data = conn.recv(65536)
            if not data:
                selector.unregister(conn)
                conn.close()
                del buffers[conn]
                continue
            buf = buffers[conn]
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + HEADER.unpack_from(buf)[0]:
                end = 4 + HEADER.unpack_from(buf)[0]
                request = msgpack.unpackb(bytes(buf[4:end]), raw=False)
                if request.get("method") == SAMPLE:
                    request = {"id": request["id"], "result": sample}
                body = msgpack.packb(request, use_bin_type=True)
                del buf[:end]
                conn.sendall(HEADER.pack(len(body)) + body)


def supervisor_status(sample: Dict[str, Any]) -> Dict[str, Any]:
    """The supervisor's part of a `status` answer (Supervisor.status): what the `status` method
    adds from the store taken out again, so that the store's figures are this bench's own."""
    part = {key: value for key, value in sample.items() if key not in STORE_PARTS}
    part["counters"] = {k: v for k, v in sample["counters"].items() if k not in COUNTERS}
    part["wear"] = {k: v for k, v in sample["store"].items() if k.startswith("written_")}
    return part


def rpc_loop(path: str, data_dir: str) -> None:
    """RpcServer hosted the way the supervisor hosts it."""
    store = Store(Path(data_dir), cap_bytes=512 << 20, write_wait=STORE_WRITE_WAIT)
    store.on_disk_wait = lambda seconds: None  # as the supervisor's: its writes in helper threads
    store.open_ack_journal()  # as the supervisor does: an ack is a journal record (docs/WEAR.md)
    started = time.monotonic()
    supervisor_part = supervisor_status(json.loads(STATUS_SAMPLE.read_text()))

    def status() -> dict:
        return dict(supervisor_part, uptime=round(time.monotonic() - started, 1))
    rules = ApiRules("things/bench/egress", -1, MAX_PAYLOAD, DEFAULT_MAX_TOPIC_BYTES, MAX_PAYLOAD)
    methods = Methods(lambda: store, status, lambda: None, lambda: True, lambda: rules)
    selector = selectors.DefaultSelector()
    server = RpcServer(path, methods, Limits.for_payload(MAX_PAYLOAD), selector)
    while True:
        for key, mask in selector.select(max(0.0, server.next_deadline() - time.monotonic())):
            if server.owns(key):
                server.dispatch(key, mask)
        server.tick()


def spawn(target: Callable[..., None], *args: str) -> int:
    pid = os.fork()
    if pid == 0:  # child: serve until killed
        try:
            target(*args)
        finally:
            os._exit(0)
    return pid


def connect_when_up(path: str) -> Client:
    deadline = time.monotonic() + 10
    while True:
        try:
            return Client(path)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def latencies(calls: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[float]]:
    """Round-trip times of each call, interleaved round by round so that load from anything
    else on the machine falls on every row alike (the ratios stay fair)."""
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for round_number in range(rounds + 300):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            if round_number >= 300:  # warm-up rounds are not counted
                samples[name].append(elapsed)
    return samples


def fill(data_dir: str, count: int, payload: bytes) -> None:
    store = Store(Path(data_dir), cap_bytes=512 << 20)
    for start in range(0, count, 1000):
        store.append([Incoming(f"bench/{i % 10}", payload) for i in range(start, min(count, start + 1000))])
    store.close()


def filesystem(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[1].split()[1]
    except Exception:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--dir", default=None, help="where the store goes (default: a temp dir)")
    parser.add_argument("--cpu", type=int, default=0,
                        help="pin client and servers to this CPU (default 0; -1: no pinning)")
    args = parser.parse_args()
    if args.cpu >= 0:  # children inherit it. One CPU: a round trip is two context switches,
        os.sched_setaffinity(0, {args.cpu})  # not wake-ups of idle (virtual) CPUs, which vary a lot
    root = tempfile.mkdtemp(prefix="flashlexd-bench-", dir=args.dir)
    data_dir = os.path.join(root, "data")
    payload = b'{"sensor": "bench", "value": 21.5, "seq": 12345}'
    fill(data_dir, args.messages, payload)

    echo_path, rpc_path = os.path.join(root, "echo.sock"), os.path.join(root, "rpc.sock")
    children = [spawn(echo_loop, echo_path), spawn(rpc_loop, rpc_path, data_dir)]
    try:
        echo, rpc = connect_when_up(echo_path), connect_when_up(rpc_path)
        rows = latencies({"echo": lambda: echo.call("status"), SAMPLE: lambda: echo.call(SAMPLE),
                          "status": rpc.status, "messages(limit=1)": lambda: rpc.messages(limit=1)},
                         args.rounds)
        start = time.perf_counter()
        moved = 0
        while True:
            batch = rpc.messages(limit=100)
            if not batch:
                break
            moved += rpc.ack(batch)
        elapsed = time.perf_counter() - start
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

    base, same_size = statistics.median(rows["echo"]), statistics.median(rows[SAMPLE])
    pinning = f"all pinned to CPU {args.cpu}" if args.cpu >= 0 else "not pinned"
    print(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs ({pinning}), "
          f"store on {filesystem(root)}, {args.rounds} interleaved round trips per call\n")
    print("| call | median | p99 | vs bare msgpack echo |")
    print("|---|---:|---:|---:|")
    labels = {"echo": "bare msgpack echo (baseline)",
              SAMPLE: "bare msgpack loop answering the status sample (baseline of the same size)"}
    for name, samples in rows.items():
        median = statistics.median(samples)
        p99 = sorted(samples)[int(len(samples) * 0.99)]
        label = labels.get(name, f"`{name}`")
        print(f"| {label} | {median * 1e6:.0f} µs | {p99 * 1e6:.0f} µs | {median / base:.2f}x |")
    print(f"\n`status` vs the bare loop answering the same {len(msgpack.packb(json.loads(STATUS_SAMPLE.read_text()))):,}"
          f" bytes: {statistics.median(rows['status']) / same_size:.2f}x")
    print("\n| fetch + ack, batches of 100 | messages | seconds | messages/s |")
    print("|---|---:|---:|---:|")
    print(f"| `messages(limit=100)` + `ack(ids)` | {moved} | {elapsed:.2f} | {moved / elapsed:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
