"""The egress against a broker that acknowledges out of order, behind a slow uplink.

RabbitMQ's MQTT plugin acknowledges a QoS 1 publish once its queues have it: one that no queue
takes at once, one routed to a persistent session's queue once written, so about half its
PUBACKs overtake an earlier one, by up to ~0.4 s (measured with 512 KB messages; mosquitto
never reorders). The link watch's overtaken rule (a broker that dropped a publish) must not
take that for a drop, even when the window waited in the uplink longer than the timeout."""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, List

from tests.broker import EGRESS_TOPIC, HOST, Subscriber, open_store, wait_for, write_config


class SlowUplink:
    """A TCP relay (TLS passes through) carrying client -> broker bytes at `rate` a second in
    bursts of up to `burst` (a radio link's scheduling); broker -> client is not limited."""

    def __init__(self, broker: Any, rate: float, burst: int):
        self.broker, self.rate, self.burst = broker, rate, burst
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._socks: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection((HOST, self.broker.port), timeout=5)
            except OSError:
                if self.listener.fileno() < 0:
                    return
                continue
            upstream.settimeout(None)
            self.connections += 1
            self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, self.rate, self.burst), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, 0.0, 65536), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, rate: float, burst: int) -> None:
        started, carried = time.monotonic(), 0
        try:
            while True:
                data = src.recv(burst)
                if not data:
                    break
                if rate:
                    carried += len(data)
                    ahead = started + carried / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)  # pacing, not synchronisation
                    else:
                        started, carried = time.monotonic(), 0  # no credit for idle time
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for sock in self._socks:
            sock.close()


def test_rabbitmqs_reordered_pubacks_behind_a_slow_uplink_close_no_link(
        rabbitmq: Any, tmp_path: Path, start_worker) -> None:
    """A window of 100 entries of 1.5 kB waits ~10 s in a 15 kB/s uplink, twice the timeout;
    every other entry goes to a topic no queue takes. Nothing is dropped, so the link stays up
    and nothing is sent twice (the grace counted from the publish: a close every ~6 s, the
    first while that one window is still in the uplink: one window is enough)."""
    uplink = SlowUplink(rabbitmq, rate=15_000, burst=16384)
    subscriber = Subscriber(rabbitmq, EGRESS_TOPIC, tmp_path / "received").start()
    config = write_config(tmp_path / "config", rabbitmq, port=uplink.port,
                          mqtt={"protocol": "3.1.1", "keepAliveSeconds": 60, "mqttOperationTimeout": 5})
    store = open_store(config)
    entries = [(EGRESS_TOPIC if i % 2 == 0 else f"{EGRESS_TOPIC}/nobody", f"{i:06d} ".encode().ljust(1500, b"x"),
                1, False) for i in range(100)]
    store.outbox_append(entries)
    routed = {payload for topic, payload, _, _ in entries if topic == EGRESS_TOPIC}
    worker = start_worker("egress", config)
    wait_for(lambda: store.outbox_count() == 0, 120, "the outbox drained")
    wait_for(lambda: set(subscriber.lines()) >= routed, 30, "every routed entry delivered")
    worker.wait(lambda w: w.counters.get("outbox_backlog") == 0, 10, "the latest counters")
    duplicates = sum(n - 1 for n in Counter(subscriber.lines()).values())
    closes = [line for line in worker.log_text().splitlines() if "acknowledged later publishes" in line]
    assert worker.stop() == 0
    uplink.close()
    subscriber.stop()
    assert (worker.counters["throttled"], uplink.connections, duplicates) == (0, 1, 0), closes[:1]
