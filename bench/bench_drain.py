"""Drain rate of the real egress worker (outbox oldest first, delete after PUBACK, one delete
transaction per loop pass) against a bare paho QoS 1 publisher with the same in-flight window
(paho's own loop and queue, nothing read or deleted) on the same broker, in the same run.

    .venv/bin/python bench/bench_drain.py [--entries 50000] [--runs 7]

Broker: mosquitto with mutual TLS on loopback (tests/broker.py), nobody subscribed. Payloads
~200 bytes, window `maxInflight` 100 (the default) on both sides. The worker's outbox is filled before it
starts; its time runs from its `mqtt connected` report until the outbox is empty. The bare
publisher's time runs from its CONNACK until its last PUBACK. Both use the client built by
flashlexd.mqtt. The table (from bench_ingest) shows medians, the median of the per-run
ratios and the CPU time per message. Target: worker >= 0.8x bare.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_ingest import PAYLOAD_BYTES, Sample, alternate, report  # noqa: E402
from flashlexd import config as config_module  # noqa: E402
from flashlexd.mqttclient import build_client  # noqa: E402
from flashlexd.mqttv5 import first_protocol  # noqa: E402
from tests.broker import EGRESS_TOPIC, Broker, make_certs, open_store, wait_for, write_config  # noqa: E402
from tests.worker_process import WorkerUnderTest, cpu_seconds  # noqa: E402

WINDOW = 100  # maxInflight, the default


def payloads(count: int):
    return (f"{i:08d} ".encode().ljust(PAYLOAD_BYTES, b"x") for i in range(count))


def bare_publisher(config_path: str, count: int) -> None:
    """Child process: connect, queue `count` QoS 1 publishes (paho sends `maxInflight` at a
    time), run paho's loop until the last PUBACK; print seconds and CPU seconds."""
    config = config_module.load(config_path)
    client = build_client(config.thing, config.thing.mqtt.client_id, 10,
                          protocol=first_protocol(config.thing.mqtt.protocol))
    acked = 0

    def on_publish(c, userdata, mid, reason, properties) -> None:
        nonlocal acked
        acked += 1
        if acked == count:
            c.disconnect()

    client.on_publish = on_publish
    client.reconnect()
    while not client.is_connected():
        client.loop(1)
    started, cpu = time.monotonic(), time.process_time()
    for payload in payloads(count):
        client.publish(EGRESS_TOPIC, payload, 1)
    client.loop_forever()
    print(time.monotonic() - started, time.process_time() - cpu, flush=True)


def run_worker(broker: Broker, config: Path, count: int) -> Sample:
    store = open_store(config)
    batch = []
    for payload in payloads(count):
        batch.append((EGRESS_TOPIC, payload, 1, False))
        if len(batch) == 5000:
            store.outbox_append(batch)
            batch = []
    store.outbox_append(batch)
    worker = WorkerUnderTest("egress", config, config.parent / "egress.log").start()
    try:
        worker.wait_connected()
        cpu, started = cpu_seconds(worker.pid), time.monotonic()
        wait_for(lambda: store.outbox_count() == 0, 300, "outbox drained", interval=0.002)
        return time.monotonic() - started, cpu_seconds(worker.pid) - cpu
    finally:
        worker.stop()
        store.close()


def run_bare(config: Path, count: int) -> Sample:
    done = subprocess.run([sys.executable, __file__, "--bare", str(config), str(count)],
                          capture_output=True, text=True, check=True, timeout=300)
    seconds, cpu = map(float, done.stdout.split())
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                        help="MQTT version of both sides (the daemon's default, auto, speaks 5)")
    parser.add_argument("--bare", nargs=2, metavar=("CONFIG", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_publisher(args.bare[0], int(args.bare[1]))
        return
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        root = Path(tmp)
        # its Receive Maximum (MQTT 5) as wide as our window: both protocols drain 100 in flight
        broker = Broker(make_certs(root / "certs"), root / "broker", extra=[f"max_inflight_messages {WINDOW}"]).start()

        def config(client_id: str) -> Path:
            return write_config(root / client_id, broker, mqtt={"clientId": client_id, "maxInflight": WINDOW,
                                                               "protocol": args.protocol})

        try:
            samples = alternate(args.runs, {
                "egress worker (durable deletes)": lambda cid: run_worker(broker, config(cid), args.entries),
                "bare paho publisher": lambda cid: run_bare(config(cid), args.entries),
            })
        finally:
            broker.close()
    report(f"Drain: {args.entries} QoS 1 entries of {PAYLOAD_BYTES} bytes over TLS, {WINDOW} in flight,"
           f" MQTT {args.protocol}",
           args.entries, samples, 0.8)


if __name__ == "__main__":
    main()
