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

    .venv/bin/python bench/bench_ingest.py --backlog [--messages 100000] [--runs 3]

With `--backlog`, the drain of a backlog instead: each side's persistent session is made
(subscribed, then the side stops), the messages are published into it while nobody listens
(in chunks of 20,000 lines, each mosquitto_pub run waited for: the broker holds them all), then
the side starts and drains them. Three sides over the same TLS listener: the ingress worker,
bare paho, and `mosquitto_sub` (C, libmosquitto: the anchor, writing one short line per message
to a pipe). Time and CPU run from the side's first message to its last (the worker: committed;
its first is seen through its heartbeat, at most 50 ms late). Targets: drain >= 1.2x bare paho,
ingress CPU per message <= 0.8x bare paho.
"""
from __future__ import annotations

import argparse
import os
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
CHUNK = 20_000  # lines per mosquitto_pub -l run (one run loses lines past ~50k)
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
        if received == 1:
            print("first", flush=True)
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
        while (line := child.stdout.readline().strip()) != "done":
            assert line == "first", line
        sample = time.monotonic() - started, cpu_seconds(child.pid) - cpu
        publisher.wait(30)
        return sample
    finally:
        child.stdin.close()
        child.wait(30)


def publish_backlog(broker: Broker, chunks: List[Path], client_id: str) -> None:
    """Publish every chunk into the broker (nobody connected to the session), each run waited for."""
    for chunk in chunks:
        publisher = publish_lines(broker, INGRESS_TOPIC, chunk, client_id=f"{client_id}-pub", plain=True)
        assert publisher.wait(300) == 0, f"mosquitto_pub exited {publisher.returncode}"


def drain_worker(broker: Broker, config: Path, chunks: List[Path], count: int, client_id: str) -> Sample:
    for drain in (False, True):  # first only to make the session, then the drain
        if drain:
            publish_backlog(broker, chunks, client_id)
        worker = WorkerUnderTest("ingress", config, config.parent / "ingress.log").start()
        try:
            if not drain:
                worker.wait(lambda w: broker.subscriptions(client_id, INGRESS_TOPIC), 20, "subscribed")
                continue
            worker.wait(lambda w: w.counters.get("received", 0) > 0, 60, "the first message")
            cpu, started = cpu_seconds(worker.pid), time.monotonic()
            worker.wait(lambda w: w.counters.get("stored", 0) >= count, 300, "all committed")
            return time.monotonic() - started, cpu_seconds(worker.pid) - cpu
        finally:
            worker.stop()
    raise AssertionError("unreachable")


def drain_bare(broker: Broker, config: Path, chunks: List[Path], count: int, client_id: str) -> Sample:
    subscribe_offline(broker, client_id)  # the same session paho resumes (clean_start False)
    publish_backlog(broker, chunks, client_id)
    child = subprocess.Popen([sys.executable, __file__, "--bare", str(config), str(count)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        line = child.stdout.readline().strip()
        while line == "ready":  # the SUBACK may come before or after the first message
            line = child.stdout.readline().strip()
        assert line == "first", line
        cpu, started = cpu_seconds(child.pid), time.monotonic()
        while line != "done":
            line = child.stdout.readline().strip()
            assert line, "the bare subscriber exited early"
        return time.monotonic() - started, cpu_seconds(child.pid) - cpu
    finally:
        child.stdin.close()
        child.wait(30)


def _sub_argv(broker: Broker, client_id: str) -> List[str]:
    return ["mosquitto_sub", *broker.client_args(), "-i", client_id, "-c", "-q", "1", "-V", "5",
            "-x", "3600", "-t", INGRESS_TOPIC]


def subscribe_offline(broker: Broker, client_id: str) -> None:
    """A persistent MQTT 5 session (expiry 1 h) subscribed at QoS 1, left offline."""
    subprocess.run([*_sub_argv(broker, client_id), "-E"], check=True, timeout=30, capture_output=True)


def drain_mosquitto_sub(broker: Broker, config: Path, chunks: List[Path], count: int,
                        client_id: str) -> Sample:
    """mosquitto_sub, persistent session (MQTT 5, session expiry 1 h), QoS 1, one `%l` line
    (the payload's length) per message."""
    subscribe_offline(broker, client_id)
    publish_backlog(broker, chunks, client_id)
    child = subprocess.Popen([*_sub_argv(broker, client_id), "-C", str(count), "-F", "%l"], stdout=subprocess.PIPE)
    assert child.stdout is not None
    try:
        assert child.stdout.readline(), "mosquitto_sub exited before the first message"
        cpu, started = cpu_seconds(child.pid), time.monotonic()
        seen = 1
        for _ in child.stdout:
            seen += 1
        elapsed = time.monotonic() - started
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        assert seen == count and child.returncode == 0, (seen, child.returncode)
        return elapsed, usage.ru_utime + usage.ru_stime - cpu
    finally:
        if child.returncode is None:
            child.kill()
            child.wait(10)


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
    names = list(samples)
    ours = rates[names[0]]
    for other in names[1:]:
        theirs = rates[other]
        paired = statistics.median(a / b for a, b in zip(ours, theirs))
        cpu_ratio = statistics.median(a[1] / b[1] for a, b in zip(samples[names[0]], samples[other]))
        print(f"\n{names[0]} against {other}: ratio (median of per-run ratios): **{paired:.2f}x**"
              f" (runs: {', '.join(f'{a / b:.2f}' for a, b in zip(ours, theirs))});"
              f" ratio of medians: {statistics.median(ours) / statistics.median(theirs):.2f}x;"
              f" CPU per message {cpu_ratio:.2f}x" + (f" (target >= {target}x)" if other == names[1] else ""))


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
    parser.add_argument("--backlog", action="store_true",
                        help="drain a backlog held by the broker (three sides: worker, bare paho, mosquitto_sub)")
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
        chunks = []
        for first in range(0, args.messages, CHUNK):
            chunks.append(root / f"lines-{first}")
            write_lines(chunks[-1], min(CHUNK, args.messages - first), width=PAYLOAD_BYTES, start=first)

        def side(run: Callable[..., Sample]) -> Callable[[str], Sample]:
            def measure(client_id: str) -> Sample:
                config = write_config(root / client_id, broker,
                                      mqtt={"clientId": client_id, "protocol": args.protocol})
                try:
                    return run(broker, config, chunks if args.backlog else lines, args.messages, client_id)
                finally:
                    wipe_session(broker, client_id)
            return measure

        sides = {"ingress worker (durable)": side(drain_worker), "bare paho (auto-ack)": side(drain_bare),
                 "mosquitto_sub (C)": side(drain_mosquitto_sub)} if args.backlog else \
            {"ingress worker (durable)": side(run_worker), "bare paho (auto-ack)": side(run_bare)}
        try:
            samples = alternate(args.runs, sides)
        finally:
            broker.close()
    if args.backlog:
        report(f"Drain of a backlog of {args.messages} QoS 1 messages of {PAYLOAD_BYTES} bytes over TLS,"
               f" MQTT {args.protocol}", args.messages, samples, 1.2)
        return
    report(f"Ingest: {args.messages} QoS 1 messages of {PAYLOAD_BYTES} bytes over TLS, MQTT {args.protocol}",
           args.messages, samples, 0.9)


if __name__ == "__main__":
    main()
