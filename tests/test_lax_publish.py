"""Malformed or out-of-contract packets a lax broker sends to the ingress: one bad message must
never stop ingest (it is stored as-is, or refused/acknowledged with one log line), and a valid
message sent after it on every new connection is stored."""
from __future__ import annotations

import ssl
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from tests.broker import INGRESS_TOPIC, open_store, wait_for, write_config
from tests.lax_broker import TlsTestBroker, mqtt_packet, mqtt_string

Packet = Callable[[bool, bool], bytes]  # (dup, v5) -> the PUBLISH's bytes


class RawLaxBroker(TlsTestBroker):
    """A session-keeping broker over mutual TLS that answers CONNECT in the client's protocol
    and, after each SUBACK, sends every raw delivery (mid, builder) not PUBACKed yet, in order,
    as a broker keeping our session resends them first on each new connection. With
    `unsubacks`, it answers an MQTT 3.1.1 UNSUBSCRIBE (the ack barrier's)."""

    def __init__(self, certs, deliveries: List[Tuple[int, Packet]], connack_props: bytes = b"\0",
                 unsubacks: bool = False):
        self.deliveries = deliveries
        self.connack_props = connack_props
        self.unsubacks = unsubacks
        self.other: List[Tuple[int, bytes]] = []
        self.v5 = False  # the protocol of the last CONNECT (one client at a time here)
        super().__init__(certs)

    def answer(self, tls: ssl.SSLSocket, first: int, body: bytes, number: Optional[int]) -> bool:
        kind = first >> 4
        if kind == 1:
            self.v5 = body[6] == 5
            tls.sendall(mqtt_packet(0x20, b"\0\0" + (self.connack_props if self.v5 else b"")))
        elif kind == 8:
            at = 2
            if self.v5:
                plen, n = _varint(body, at)
                at += n + plen
            filters = 0
            while at < len(body):
                at += 2 + struct.unpack_from(">H", body, at)[0] + 1
                filters += 1
            tls.sendall(mqtt_packet(0x90, body[:2] + (b"\0" if self.v5 else b"") + b"\1" * filters))
            for mid, build in self.deliveries:
                if mid not in self.acked:
                    tls.sendall(build(mid in self.sent, self.v5))
                    self.sent.add(mid)
        elif kind == 4:
            self.acked.append(struct.unpack(">H", body[:2])[0])
        elif kind == 10 and self.unsubacks and not self.v5:
            tls.sendall(mqtt_packet(0xB0, body[:2]))
        elif kind == 12:
            tls.sendall(mqtt_packet(0xD0, b""))
        elif kind == 14:
            return False
        else:
            self.other.append((first, body))
        return True


def _varint(data: bytes, at: int) -> Tuple[int, int]:
    value, shift, n = 0, 0, 0
    while True:
        byte = data[at + n]
        n += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, n


def publish(topic: bytes, payload: bytes, mid: int, qos: int = 1, props: bytes = b"\0",
            first: Optional[int] = None) -> Packet:
    def build(dup: bool, v5: bool) -> bytes:
        body = mqtt_string(topic) + (struct.pack(">H", mid) if qos else b"") + (props if v5 else b"")
        return mqtt_packet(first if first is not None else (0x30 | dup << 3 | qos << 1), body + payload)
    return build


def raw(data: bytes) -> Packet:
    return lambda dup, v5: data


GOOD = b"the good one"
T = INGRESS_TOPIC.encode()
# name -> (the bad PUBLISH given its packet id, protocol, whether that id can be read: then it is
# acknowledged); the raw ones cannot carry one
MALFORMED: Dict[str, Tuple[Callable[[int], Packet], str, bool]] = {
    "topic-length-lies": (lambda mid: raw(mqtt_packet(0x32, struct.pack(">H", 400) + b"t\0\1x")), "3.1.1", False),
    "topic-length-lies-v5": (lambda mid: raw(mqtt_packet(0x32, struct.pack(">H", 400) + b"t\0\1\0x")), "5", False),
    "empty-topic-311": (lambda mid: publish(b"", b"empty", mid), "3.1.1", True),
    "no-packet-id": (lambda mid: raw(mqtt_packet(0x32, mqtt_string(T))), "3.1.1", False),
    "qos3": (lambda mid: publish(T, b"q3", mid, first=0x36), "3.1.1", False),
    "bad-property-id": (lambda mid: publish(T, b"badprop", mid, props=b"\x02\xFF\x00"), "5", True),
    "duplicate-property": (lambda mid: publish(T, b"dupprop", mid, props=b"\x04\x01\x01\x01\x01"), "5", True),
    "bad-utf8-user-property": (lambda mid: publish(T, b"badutf", mid, props=b"\x09\x26\x00\x01\xff\x00\x03abc"),
                               "5", True),
    "nul-in-content-type": (lambda mid: publish(T, b"nulct", mid, props=b"\x05\x03\x00\x02a\x00"), "5", True),
    "subscription-id-0": (lambda mid: publish(T, b"subid0", mid, props=b"\x02\x0b\x00"), "5", True),
    # a Topic Alias for the topic: our CONNECT allows none (it was stored under the topic '')
    "empty-topic-alias-v5": (lambda mid: publish(b"", b"alias", mid, props=b"\x03\x23\x00\x01"), "5", True),
    "empty-topic-v5": (lambda mid: publish(b"", b"noalias", mid), "5", True),
}


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_malformed_publishes_resent_first_on_each_connection_do_not_stop_ingest(
        certs, tmp_path: Path, start_worker, protocol: str) -> None:
    """paho drops the link at a malformed PUBLISH; a broker keeping our session resends it
    first on every new connection: the ingress reconnected forever and stored nothing more.
    Now each is dropped with one WARNING line (acknowledged when its packet id is readable),
    all on the first connection, and the valid message after them is stored."""
    cases = [name for name, (_, version, _) in MALFORMED.items() if version == protocol]
    bad = [(mid, MALFORMED[name][0](mid)) for mid, name in enumerate(cases, 1)]
    good = len(cases) + 1
    lax = RawLaxBroker(certs, bad + [(good, publish(T, GOOD, good))])
    try:
        config = write_config(tmp_path / "config", SimpleNamespace(certs=certs, port=lax.port),
                              mqtt={"protocol": protocol})
        store = open_store(config)
        worker = start_worker("ingress", config)
        try:
            wait_for(lambda: any(m.payload == GOOD for m in store.messages(limit=100)), 15,
                     "the valid message after the bad ones stored")
        except AssertionError:
            raise AssertionError(f"connects={lax.connects} acked={lax.acked}; log:\n"
                                 f"{worker.log_text()[-3000:]}")
        worker.wait(lambda w: w.counters.get("dropped_malformed") == len(cases), 10, "the malformed ones counted")
        assert lax.connects == 1
        assert [m.payload for m in store.messages(limit=10)] == [GOOD]
        wait_for(lambda: good in lax.acked, 10, "the valid one acknowledged")
        ackable = {mid for mid, name in enumerate(cases, 1) if MALFORMED[name][2]}
        assert set(lax.acked) == ackable | {good}, (lax.acked, cases)
        assert worker.log_text().count("dropped a malformed message") == len(cases)
        assert worker.stop() == 0
    finally:
        lax.close()


def test_server_keep_alive_0_does_not_make_an_idle_link_look_dead(certs, tmp_path: Path,
                                                                    start_worker) -> None:
    """A CONNACK with Server Keep Alive 0 turns paho's pings off (MQTT 5 3.2.2.3.14): an idle
    link then hears nothing, and must not be closed as silent over and over."""
    lax = RawLaxBroker(certs, [], connack_props=b"\x03\x13\x00\x00")
    try:
        config = write_config(tmp_path / "config", SimpleNamespace(certs=certs, port=lax.port),
                              mqtt={"protocol": "5", "keepAliveSeconds": 2, "mqttOperationTimeout": 1})
        worker = start_worker("ingress", config)
        worker.wait_connected()
        with pytest.raises(AssertionError):  # 1.5 x keepalive and more: no new connection
            wait_for(lambda: lax.connects > 1, 4.5, "a reconnect")
        assert "no answer from" not in worker.log_text(), worker.log_text()
        assert worker.stop() == 0
    finally:
        lax.close()
