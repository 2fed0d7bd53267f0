"""The egress against what an MQTT 5 broker announces in its CONNACK and does mid-drain:
Maximum QoS, Retain Available, a DISCONNECT 0x97/0x96 from a throttling broker, and a Server
Keep Alive that must not outlive its link."""
from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import pytest

from tests.broker import EGRESS_TOPIC, Broker, Subscriber, open_store, wait_for, write_config
from tests.lax_broker import TlsTestBroker, mqtt_packet


class ListenerBroker(Broker):
    """mosquitto with more lines for the TLS listener itself (per_listener_settings: global
    `extra` lines would open a default listener on 1883 and apply there)."""

    def __init__(self, *args, listener_lines=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.listener_lines = list(listener_lines)

    def _write_conf(self) -> None:
        super()._write_conf()
        text = self.conf.read_text().splitlines()
        at = next(i for i, line in enumerate(text) if line.startswith("listener ")) + 1
        text[at:at] = self.listener_lines
        self.conf.write_text("\n".join(text) + "\n")


def connects(worker) -> int:
    worker.pump(0.05)
    return sum(1 for m in worker.reports("mqtt") if m["connected"])


def test_a_broker_with_maximum_qos_0_is_not_disconnected_over_and_over(certs, tmp_path: Path,
                                                                       start_worker) -> None:
    """The CONNACK says Maximum QoS 0 (mosquitto's max_qos 0): each QoS 1 entry sent anyway got
    DISCONNECT 0x9B, and only the poison search's 3+ reconnects per entry dead-lettered it
    (19 connections for 5 entries). It is dead-lettered without being sent, on one link."""
    broker = ListenerBroker(certs, tmp_path / "broker", listener_lines=["max_qos 0"]).start()
    try:
        config = write_config(tmp_path / "config", broker, mqtt={"protocol": "5"})
        store = open_store(config)
        store.outbox_append([(EGRESS_TOPIC, f"{i:03d}".encode(), 1, False) for i in range(5)])
        worker = start_worker("egress", config)
        try:
            wait_for(lambda: store.outbox_count() == 0, 20, "the outbox drained")
        except AssertionError:
            raise AssertionError(f"connects={connects(worker)} dead={len(store.dead_letters())}\n"
                                 + worker.log_text()[-3000:])
        dead = store.dead_letters()
        assert len(dead) == 5 and {d.reason for d in dead} == {"QoS 1 is over the broker's Maximum QoS (0)"}
        worker.wait(lambda w: w.counters.get("broker_maximum_qos") == 0, 5, "Maximum QoS in the counters")
        assert connects(worker) == 1, worker.log_text()[-3000:]
        assert "QoS not supported" not in broker.log_text() + worker.log_text()
        assert worker.stop() == 0
    finally:
        broker.close()


def test_a_retained_entry_to_a_broker_without_retain_is_not_disconnected_over_and_over(
        certs, tmp_path: Path, start_worker) -> None:
    """The CONNACK says Retain Available 0: a retained entry got DISCONNECT 0x9A four times
    (4 s of no drain per retained entry) before the poison search dead-lettered it."""
    broker = ListenerBroker(certs, tmp_path / "broker", listener_lines=["retain_available false"]).start()
    try:
        subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
        config = write_config(tmp_path / "config", broker, mqtt={"protocol": "5"})
        store = open_store(config)
        store.outbox_append([(EGRESS_TOPIC, b"kept", 1, True), (EGRESS_TOPIC, b"after", 1, False)])
        worker = start_worker("egress", config)
        try:
            wait_for(lambda: b"after" in subscriber.lines(), 20, "the entry behind it delivered")
        except AssertionError:
            raise AssertionError(f"connects={connects(worker)} dead={store.dead_letters()}\n"
                                 + worker.log_text()[-3000:])
        wait_for(lambda: store.outbox_count() == 0, 10, "the outbox drained")
        dead = store.dead_letters()
        assert [(d.payload, d.attempts) for d in dead] == [(b"kept", 0)]
        assert "Retain Available 0" in dead[0].reason
        assert connects(worker) == 1, worker.log_text()[-3000:]
        assert worker.stop() == 0
        subscriber.stop()
    finally:
        broker.close()


class KeepAliveBroker(TlsTestBroker):
    """An MQTT 5 broker over mutual TLS whose CONNACKs carry `connacks[i]` (properties) on
    connection i (the last one for the rest); it answers PINGREQ, and closes the first
    connection at its first PINGREQ (a dropped link)."""

    def __init__(self, certs, connacks: List[bytes]):
        self.connacks = connacks
        super().__init__(certs)

    def answer(self, tls: ssl.SSLSocket, first: int, body: bytes, number: Optional[int]) -> bool:
        kind = first >> 4
        if kind == 1:
            tls.sendall(mqtt_packet(0x20, b"\0\0" + self.connacks[min(number or 0, len(self.connacks) - 1)]))
        elif kind == 12:
            if number == 0:
                return False
            tls.sendall(mqtt_packet(0xD0, b""))
        return kind != 14


def test_a_server_keep_alive_of_an_earlier_connection_does_not_outlive_it(certs, tmp_path: Path,
                                                                          start_worker) -> None:
    """The first CONNACK says Server Keep Alive 2; the link drops and the next CONNACK says
    none, so paho's fresh client pings at our own keepalive (10 s). The link watch kept the
    old 2 s deadline (2 + 1 s): an idle, healthy link was closed as silent every 3 s."""
    broker = KeepAliveBroker(certs, [b"\x03\x13\x00\x02", b"\0"])
    try:
        config = write_config(tmp_path / "config", SimpleNamespace(certs=certs, port=broker.port),
                              mqtt={"protocol": "5", "keepAliveSeconds": 10, "mqttOperationTimeout": 1})
        worker = start_worker("egress", config)
        wait_for(lambda: broker.connects >= 2, 15, "the second connection")
        with pytest.raises(AssertionError):  # 3 s, the stale deadline, and more: no new connection
            wait_for(lambda: broker.connects > 2 or "no answer from" in worker.log_text(), 5, "a reconnect")
        assert worker.stop() == 0
    finally:
        broker.close()
