"""Ingest rate of the real ingress worker (durable group commits, PUBACK after commit) against
a bare paho subscriber (QoS 1, paho's own loop, auto-ack, nothing stored) on the same broker,
fed by the same publisher, in the same run.

    .venv/bin/python bench/bench_ingest.py [--messages 30000] [--runs 7]

Broker: mosquitto on loopback (tests/broker.py), default settings; the subscribers use its
mutual-TLS listener, the publisher (mosquitto_pub, QoS 1, ~200-byte payloads, 100 in flight)
its plain one, so the broker spends less CPU on the side that is not measured. Each run, the
subscriber (worker or bare) connects and subscribes first; the time runs from the publisher's
start until the subscriber has the last message (for the worker: committed, as its
`committed` reports say). Both subscribers use the client built by flashlexd.mqtt (same TLS,
same session flags). The sides alternate; the table shows medians, the median of the per-run
ratios (each worker run against the bare run right after it, so both saw the same machine
load) and the subscriber's CPU time per message. Target: worker >= 0.9x bare.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlexd import config as config_module  # noqa: E402
from flashlexd.mqttclient import build_client  # noqa: E402
from flashlexd.mqttv5 import first_protocol  # noqa: E402
from tests.broker import (INGRESS_TOPIC, Broker, make_certs, publish_lines,  # noqa: E402
                          write_config, write_lines)
from tests.worker_process import WorkerUnderTest, cpu_seconds  # noqa: E402

PAYLOAD_BYTES = 200
Sample = Tuple[float, float]  # (seconds, CPU seconds of the side under test)


def bare_subscriber(config_path: str, count: int) -> None:
    """Child process: subscribe, say `ready`, count messages, say `done` at the last one, then
    stay alive until stdin closes (so its CPU time can be read)."""
    config = config_module.load(config_path)
    client = build_client(config.thing, config.thing.mqtt.client_id, 10,
                          protocol=first_protocol(config.thing.mqtt.protocol))
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
    sys.stdin.read()


def run_worker(broker: Broker, config: Path, lines: Path, count: int, client_id: str) -> Sample:
    worker = WorkerUnderTest("ingress", config, config.parent / "ingress.log").start()
    try:
        worker.wait(lambda w: broker.subscriptions(client_id, INGRESS_TOPIC), 20, "subscribed")
        cpu, started = cpu_seconds(worker.pid), time.monotonic()
        publisher = publish_lines(broker, INGRESS_TOPIC, lines, client_id=f"{client_id}-pub", plain=True)
        worker.wait(lambda w: w.counters.get("stored", 0) >= count, 120, "all committed")
        sample = time.monotonic() - started, cpu_seconds(worker.pid) - cpu
        publisher.wait(30)
        return sample
    finally:
        worker.stop()


def run_bare(broker: Broker, config: Path, lines: Path, count: int, client_id: str) -> Sample:
    child = subprocess.Popen([sys.executable, __file__, "--bare", str(config), str(count)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        cpu, started = cpu_seconds(child.pid), time.monotonic()
        publisher = publish_lines(broker, INGRESS_TOPIC, lines, client_id=f"{client_id}-pub", plain=True)
        assert child.stdout.readline().strip() == "done"
        sample = time.monotonic() - started, cpu_seconds(child.pid) - cpu
        publisher.wait(30)
        return sample
    finally:
        child.stdin.close()
        child.wait(30)


def wipe_session(broker: Broker, client_id: str) -> None:
    """Connect once with a clean session: an offline persistent session left subscribed would
    make the broker queue every later message for it too."""
    subprocess.run(["mosquitto_pub", *broker.client_args(), "-i", client_id, "-t", "bench/wipe", "-n"],
                   check=True, timeout=30)


def report(title: str, count: int, samples: Dict[str, List[Sample]], target: float) -> None:
    """A markdown table of medians: rate, CPU per message, and the paired ratio (first side
    against the second, run by run)."""
    print(f"\n{title}, median of {len(next(iter(samples.values())))} runs\n")
    print("| side | msg/s | CPU µs/msg | msg/s of each run |")
    print("|---|---:|---:|---|")
    rates = {side: [count / seconds for seconds, _ in runs] for side, runs in samples.items()}
    for side, runs in samples.items():
        cpu = statistics.median(cpu / count * 1e6 for _, cpu in runs)
        print(f"| {side} | {statistics.median(rates[side]):,.0f} | {cpu:.1f} |"
              f" {', '.join(f'{r:,.0f}' for r in rates[side])} |")
    ours, theirs = rates.values()
    paired = statistics.median(a / b for a, b in zip(ours, theirs))
    print(f"\nratio (median of per-run ratios): **{paired:.2f}x**;"
          f" ratio of medians: {statistics.median(ours) / statistics.median(theirs):.2f}x"
          f" (target >= {target}x)")


def alternate(runs: int, sides: Dict[str, Callable[[str], Sample]]) -> Dict[str, List[Sample]]:
    """Run each side `runs` times, alternating, each with a fresh client id."""
    samples: Dict[str, List[Sample]] = {side: [] for side in sides}
    for run in range(runs):
        for index, (side, measure) in enumerate(sides.items()):
            samples[side].append(measure(f"bench-{index}-{run}"))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                        help="MQTT version of both sides (the daemon's default, auto, speaks 5)")
    parser.add_argument("--bare", nargs=2, metavar=("CONFIG", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_subscriber(args.bare[0], int(args.bare[1]))
        return
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        broker = Broker(make_certs(root / "certs"), root / "broker", plain=True).start()
        lines = root / "lines"
        write_lines(lines, args.messages, width=PAYLOAD_BYTES)

        def side(run: Callable[..., Sample]) -> Callable[[str], Sample]:
            def measure(client_id: str) -> Sample:
                config = write_config(root / client_id, broker,
                                      mqtt={"clientId": client_id, "protocol": args.protocol})
                try:
                    return run(broker, config, lines, args.messages, client_id)
                finally:
                    wipe_session(broker, client_id)
            return measure

        try:
            samples = alternate(args.runs, {"ingress worker (durable)": side(run_worker),
                                            "bare paho (auto-ack)": side(run_bare)})
        finally:
            broker.close()
    report(f"Ingest: {args.messages} QoS 1 messages of {PAYLOAD_BYTES} bytes over TLS, MQTT {args.protocol}",
           args.messages, samples, 0.9)


if __name__ == "__main__":
    main()
