"""The egress under AWS IoT Core's publish quota, and how fast a frozen broker is noticed.

    .venv/bin/python bench/bench_egress_quota.py [--entries 3000] [--runs 3]

Drain: the real egress worker drains an outbox of ~200-byte entries to mosquitto over mutual TLS
through tests/quota_proxy.py (100 PUBLISHes per second per connection, the excess dropped
without a PUBACK, as AWS IoT Core does). Rows: the AWS profile (the defaults:
publishRatePerSecond 100, publishBytesPerSecond 524288) through the enforcing proxy; unlimited
(publishRatePerSecond 0) through the same proxy counting instead of dropping (how far over the
quota an unlimited drain goes: on AWS those publishes would be dropped); unlimited through the
enforcing proxy with the default operation timeout, stopped after a fixed time (what is
delivered, stalled). Time runs from the worker's `connected` report to an empty outbox.

Poison: the same worker, unlimited, drains the outbox to a mosquitto that disconnects a client
sending a packet over `max_packet_size` (as AWS IoT Core does past 128 KB), once with no poison
entry and once with POISON oversize entries spread through it: every good entry delivered, each
poison entry dead-lettered after `poisonAttempts` drops; time from `connected` to an empty outbox.

Detection: mosquitto is SIGSTOPped under an egress drain and under an idle ingress link, with
keepAliveSeconds 5 and the seed's mqttOperationTimeout 120 (bound: max(120, 1.5 x 5) = 120 s;
the silence rule alone gives 7.5 s); time from SIGSTOP to the worker's `disconnected` report.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.broker import EGRESS_TOPIC, Broker, make_certs, open_store, wait_for, write_config  # noqa: E402
from tests.quota_proxy import QuotaProxy  # noqa: E402
from tests.worker_process import WorkerUnderTest  # noqa: E402

QUOTA = 100
PAYLOAD_BYTES = 200
STALL_WINDOW = 15.0  # seconds the unlimited drain into the enforcing proxy is given
KEEPALIVE = 5
POISON = 3
MAX_PACKET = 10_000


def fill(config: Path, count: int) -> None:
    store = open_store(config)
    payloads = [f"{i:08d} ".encode().ljust(PAYLOAD_BYTES, b"x") for i in range(count)]
    for at in range(0, count, 5000):
        store.outbox_append([(EGRESS_TOPIC, p, 1, False) for p in payloads[at:at + 5000]])
    store.close()


def drain(root: Path, broker: Broker, name: str, count: int, mqtt: Dict, enforce: bool,
          limit: float) -> Tuple[float, int, int]:
    """(seconds, entries delivered, publishes over the quota)."""
    proxy = QuotaProxy(broker, QUOTA, enforce=enforce)
    config = write_config(root / name, broker, port=proxy.port, mqtt=dict(mqtt, clientId=name))
    fill(config, count)
    store = open_store(config)
    worker = WorkerUnderTest("egress", config, root / f"{name}.log").start()
    try:
        worker.wait_connected()
        started = time.monotonic()
        try:
            wait_for(lambda: store.outbox_count() == 0, limit, "drained", interval=0.01)
        except AssertionError:
            pass  # the stalled row: reported as delivered-so-far
        return time.monotonic() - started, count - store.outbox_count(), proxy.over_quota
    finally:
        worker.stop()
        store.close()
        proxy.close()


def poison_drain(root: Path, broker: Broker, name: str, count: int, poison: int) -> Tuple[float, int]:
    """(seconds to an empty outbox, dead letters) for `count` good entries and `poison` oversize
    ones spread evenly through them."""
    config = write_config(root / name, broker, mqtt={
        "publishRatePerSecond": 0, "publishBytesPerSecond": 0, "clientId": name})
    store = open_store(config)
    good = [f"{i:08d} ".encode().ljust(PAYLOAD_BYTES, b"x") for i in range(count)]
    step = -(-count // (poison + 1))  # poison + 1 chunks of good entries, a poison one between
    for index, at in enumerate(range(0, count, step)):
        if index:
            store.outbox_append([(EGRESS_TOPIC, b"p" * (2 * MAX_PACKET), 1, False)])
        store.outbox_append([(EGRESS_TOPIC, p, 1, False) for p in good[at:at + step]])
    worker = WorkerUnderTest("egress", config, root / f"{name}.log").start()
    try:
        worker.wait_connected()
        started = time.monotonic()
        wait_for(lambda: store.outbox_count() == 0, 300, "drained", interval=0.01)
        return time.monotonic() - started, store.dead_count()
    finally:
        worker.stop()
        store.close()


def detection(root: Path, certs, name: str, kind: str) -> float:
    broker = Broker(certs, root / f"broker-{name}").start()
    config = write_config(root / name, broker, mqtt={
        "keepAliveSeconds": KEEPALIVE, "mqttOperationTimeout": 120, "publishRatePerSecond": 200,
        "clientId": name})
    if kind == "egress":
        fill(config, 20_000)
    worker = WorkerUnderTest(kind, config, root / f"{name}.log").start()
    try:
        worker.wait_connected()
        if kind == "egress":
            worker.wait(lambda w: w.counters.get("sent", 0) > 200, 20, "draining")
        broker.freeze()
        frozen = time.monotonic()
        worker.wait(lambda w: not w.mqtt.get("connected"), 200, "noticed")
        return time.monotonic() - frozen
    finally:
        broker.thaw()
        worker.stop()
        broker.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows: Dict[str, List[Tuple[float, int, int]]] = {}
    detections: Dict[str, List[float]] = {"egress link, draining": [], "ingress link, idle": []}
    poisoned: Dict[int, List[Tuple[float, int]]] = {}
    profiles = [
        ("AWS profile (100/s, 512 KiB/s), quota enforced", {}, True, 120.0),
        ("unlimited, quota only counted", {"publishRatePerSecond": 0, "publishBytesPerSecond": 0}, False, 120.0),
        (f"unlimited, quota enforced (stopped after {STALL_WINDOW:g} s)",
         {"publishRatePerSecond": 0, "publishBytesPerSecond": 0, "mqttOperationTimeout": 30}, True, STALL_WINDOW),
    ]
    defaults = {"publishRatePerSecond": QUOTA, "publishBytesPerSecond": 524288}
    with tempfile.TemporaryDirectory(prefix="bench-quota-") as tmp:
        root = Path(tmp)
        certs = make_certs(root / "certs")
        # AWS IoT Core's MQTT 5 Receive Maximum is 100, our default window: the same here
        broker = Broker(certs, root / "broker", plain=True, extra=["max_inflight_messages 100"]).start()
        try:
            for run in range(args.runs):
                for index, (label, mqtt, enforce, limit) in enumerate(profiles):
                    rows.setdefault(label, []).append(
                        drain(root, broker, f"d{run}-{index}", args.entries, dict(defaults, **mqtt), enforce, limit))
        finally:
            broker.close()
        strict = Broker(certs, root / "strict-broker", extra=[f"max_packet_size {MAX_PACKET}"]).start()
        try:
            for run in range(args.runs):
                for poison in (0, POISON):
                    poisoned.setdefault(poison, []).append(
                        poison_drain(root, strict, f"p{run}-{poison}", args.entries, poison))
        finally:
            strict.close()
        for run in range(args.runs):
            detections["egress link, draining"].append(detection(root, certs, f"fe{run}", "egress"))
            detections["ingress link, idle"].append(detection(root, certs, f"fi{run}", "ingress"))
    print(f"### Drain of {args.entries} entries of {PAYLOAD_BYTES} bytes through a {QUOTA}/s quota"
          f" (median of {args.runs})\n")
    print("| egress | seconds | delivered | entries/s | publishes over the quota |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, samples in rows.items():
        seconds = statistics.median(s for s, _, _ in samples)
        delivered = int(statistics.median(d for _, d, _ in samples))
        over = int(statistics.median(o for _, _, o in samples))
        print(f"| {label} | {seconds:.1f} | {delivered} | {delivered / seconds:.0f} | {over} |")
    print(f"\n### Drain of {args.entries} entries with poison entries (oversize: the broker drops the"
          f" link), unlimited, median of {args.runs}\n")
    print("| outbox | seconds | entries/s | dead letters | vs no poison |")
    print("| --- | ---: | ---: | ---: | ---: |")
    clean = statistics.median(s for s, _ in poisoned[0])
    for poison, samples in poisoned.items():
        seconds = statistics.median(s for s, _ in samples)
        dead = int(statistics.median(d for _, d in samples))
        print(f"| {args.entries} good + {poison} poison | {seconds:.2f} | {args.entries / seconds:.0f} | {dead}"
              f" | {clean / seconds:.2f}x |")
    print(f"\n### Frozen broker (SIGSTOP) noticed, keepAliveSeconds {KEEPALIVE}, mqttOperationTimeout 120"
          f" (silence bound {1.5 * KEEPALIVE:g} s)\n")
    print("| link | median s | max s |")
    print("| --- | ---: | ---: |")
    for label, values in detections.items():
        print(f"| {label} | {statistics.median(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
