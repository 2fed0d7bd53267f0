"""Ingest rate of the real ingress worker (durable group commits, PUBACK after commit) against
a bare paho subscriber (QoS 1, paho's own loop, auto-ack, nothing stored) on the same broker,
fed by the same publisher, in the same run.

    .venv/bin/python bench/bench_ingest.py [--messages 20000] [--runs 5]

Broker: mosquitto with mutual TLS on loopback (tests/broker.py), default settings. Publisher:
mosquitto_pub, QoS 1, ~200-byte payloads, 100 in flight. Each run, the subscriber (worker or
bare) connects and subscribes first; the time runs from the publisher's start until the
subscriber has the last message (for the worker: committed, as its `committed` reports say).
Both subscribers use the same client built by flashlexd.mqtt (same TLS, same session flags).
The sides alternate; the table shows medians. Target: worker >= 0.9x bare.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlexd import config as config_module  # noqa: E402
from flashlexd.mqtt import build_client  # noqa: E402
from tests.broker import (INGRESS_TOPIC, THING, Broker, make_certs, publish_lines,  # noqa: E402
                          write_config, write_lines)
from tests.worker_process import WorkerProcess  # noqa: E402

PAYLOAD_BYTES = 200


def bare_subscriber(config_path: str, count: int) -> None:
    """Child process: subscribe, say `ready`, count messages, say `done` at the last one."""
    config = config_module.load(config_path)
    client = build_client(config.thing, config.thing.mqtt.client_id, 10)
    received = 0

    def on_connect(c, userdata, flags, reason, properties) -> None:
        c.subscribe(INGRESS_TOPIC, 1)

    def on_subscribe(c, userdata, mid, reasons, properties) -> None:
        print("ready", flush=True)

    def on_message(c, userdata, message) -> None:
        nonlocal received
        received += 1
        if received == count:
            print("done", flush=True)
            c.disconnect()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.loop_forever()


def run_worker(broker: Broker, config: Path, lines: Path, count: int, run: int, work: Path) -> float:
    worker = WorkerProcess("ingress", config, work / "ingress.log").start()
    try:
        before = broker.subscriptions(f"bench-{run}", INGRESS_TOPIC)
        worker.wait(lambda w: broker.subscriptions(f"bench-{run}", INGRESS_TOPIC) > before, 20, "subscribed")
        started = time.monotonic()
        publisher = publish_lines(broker, INGRESS_TOPIC, lines, client_id=f"bench-pub-{run}")
        worker.wait(lambda w: sum(m["count"] for m in w.reports("committed")) >= count, 120, "all committed")
        elapsed = time.monotonic() - started
        publisher.wait(30)
        return elapsed
    finally:
        worker.stop()


def run_bare(broker: Broker, config: Path, lines: Path, count: int, run: int) -> float:
    child = subprocess.Popen([sys.executable, __file__, "--bare", str(config), str(count)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        started = time.monotonic()
        publisher = publish_lines(broker, INGRESS_TOPIC, lines, client_id=f"bench-pub-{run}")
        assert child.stdout.readline().strip() == "done"
        elapsed = time.monotonic() - started
        publisher.wait(30)
        return elapsed
    finally:
        child.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bare", nargs=2, metavar=("CONFIG", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_subscriber(args.bare[0], int(args.bare[1]))
        return
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        broker = Broker(make_certs(root / "certs"), root / "broker").start()
        lines = root / "lines"
        write_lines(lines, args.messages, width=PAYLOAD_BYTES)
        rates: Dict[str, List[float]] = {"ingress worker (durable)": [], "bare paho (auto-ack)": []}
        try:
            for run in range(args.runs):
                for side in rates:
                    work = root / f"{run}-{side.split()[0]}"
                    config = write_config(work, broker, mqtt={"clientId": f"bench-{run}"})
                    if side.startswith("ingress"):
                        elapsed = run_worker(broker, config, lines, args.messages, run, work)
                    else:
                        elapsed = run_bare(broker, config, lines, args.messages, run)
                    rates[side].append(args.messages / elapsed)
                    # a fresh client id per side and run: no session left over from another
                    write_config(work, broker, mqtt={"clientId": f"bench-{run}-done"})
        finally:
            broker.kill()
    print_table(rates, args.messages, args.runs)


def print_table(rates: Dict[str, List[float]], messages: int, runs: int) -> None:
    medians = {side: statistics.median(values) for side, values in rates.items()}
    worker, bare = medians.values()
    print(f"\n{messages} QoS 1 messages of {PAYLOAD_BYTES} bytes, TLS, median of {runs} runs\n")
    print("| subscriber | msg/s (median) | runs |")
    print("|---|---:|---|")
    for side, values in rates.items():
        print(f"| {side} | {medians[side]:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} |")
    print(f"\nratio worker / bare: **{worker / bare:.2f}x** (target >= 0.9x)")


if __name__ == "__main__":
    main()
