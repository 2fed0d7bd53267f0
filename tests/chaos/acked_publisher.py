"""An independent QoS 1 publisher (paho, its own process) that logs every PUBACK it gets.

    python tests/chaos/acked_publisher.py --port P --cafile CA --cert C --key K --topic T \
        --log FILE [--rate N] [--count N] [--width W]

It publishes "0000000 xxx..." numbered payloads (`--width` bytes) at up to `--rate` messages a
second, with up to `--inflight` unacknowledged, until `--count` were published or it gets
SIGTERM; then it waits (a few seconds at most) for the PUBACKs still due and exits 0.

The log says exactly what the broker acknowledged, with times on the machine-wide monotonic
clock (the same `time.monotonic()` as the test's):
    C <connection> <time>               a connection came up
    P <connection> <time> <payload>     <payload> was handed to the connection (sent once)
    A <connection> <time> <payload>     the broker acknowledged <payload> on that connection
When a connection drops, its unacknowledged messages are abandoned, never sent again: a message
reaches the broker at most once, so a duplicate downstream is never the publisher's doing.
"""
from __future__ import annotations

import argparse
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import paho.mqtt.client as paho
from flashlexd.config import Keys
from flashlexd.mqttclient import tls_context
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--port", "--count", "--width", "--inflight"):
        parser.add_argument(name, type=int, default={"--port": None, "--count": 0, "--width": 32,
                                                     "--inflight": 50}[name])
    for name in ("--cafile", "--cert", "--key", "--topic", "--log"):
        parser.add_argument(name, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: as fast as acked")
    parser.add_argument("--client-id", default="chaos-acked-pub")
    args = parser.parse_args()

    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    log = open(args.log, "a", buffering=1)
    context = tls_context(Keys(Path(args.cafile), Path(args.cert), Path(args.key)))  # as the daemon's

    index = 0           # the next payload number
    connection = 0      # how many connections came up
    pending: Dict[int, bytes] = {}  # mid -> payload, on the current connection
    next_due = time.monotonic()  # when the next message may go (--rate); no catching up
    drain_until: Optional[float] = None

    def payload(i: int) -> bytes:
        return f"{i:07d} ".encode().ljust(args.width, b"x")

    while True:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id,
                             clean_session=True, protocol=paho.MQTTv311, reconnect_on_failure=False)
        client.tls_set_context(context)
        client.max_inflight_messages_set(args.inflight)
        state = {"up": False, "down": False}

        def on_connect(c, userdata, flags, reason, properties) -> None:
            nonlocal connection
            if not reason.is_failure:
                connection += 1
                state["up"] = True
                log.write(f"C {connection} {time.monotonic():.6f}\n")

        def on_disconnect(c, userdata, flags, reason, properties) -> None:
            state["down"] = True

        def on_publish(c, userdata, mid, reason, properties) -> None:
            done = pending.pop(mid, None)
            if done is not None:
                log.write(f"A {connection} {time.monotonic():.6f} {done.decode()}\n")

        client.on_connect, client.on_disconnect, client.on_publish = on_connect, on_disconnect, on_publish
        try:
            client.connect(args.host, args.port, keepalive=10)
        except (OSError, ssl.SSLError):
            if stopping:
                return 0
            time.sleep(0.1)  # the broker is down: try again
            continue
        pending.clear()
        while not state["down"]:
            now = time.monotonic()
            if stopping and drain_until is None:
                drain_until = now + 5
            if drain_until is not None and (not pending or now > drain_until):
                client.disconnect()
                client.loop(0.1)
                return 0
            done_all = args.count and index >= args.count
            if state["up"] and drain_until is None and not done_all and len(pending) < args.inflight \
                    and now >= next_due:
                body = payload(index)
                info = client.publish(args.topic, body, qos=1)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break  # the link is gone; this one was not sent
                pending[info.mid] = body  # single thread: its PUBACK is handled in loop() below
                log.write(f"P {connection} {now:.6f} {body.decode()}\n")
                index += 1
                if args.rate:
                    next_due = max(next_due, now - 0.05) + 1 / args.rate
                continue
            if done_all and not pending:
                stopping = True
                continue
            wait = 0.05 if not args.rate else max(0.0, min(0.05, next_due - now))
            if client.loop(wait) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        client.loop_stop()
        if stopping:
            return 0


if __name__ == "__main__":
    sys.exit(main())
