"""PUBLISH packets read straight out of the socket's bytes (publishread.py) give the ingress
exactly what paho gives for the same bytes, whatever the reads cut and whatever other packets
come in between; paho still reads everything else."""
from __future__ import annotations

import random
import socket
import struct
from typing import Any, List, Optional, Tuple

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flashlexd.dialer import READ_CHUNK, DialedClient
from flashlexd.mqttv5 import properties_of
from flashlexd.publishread import Publish, message_fields, parse_publishes
from tests.lax_broker import mqtt_packet, mqtt_string

PINGRESP = bytes([0xD0, 0x00])


def publish(topic: bytes, payload: bytes, qos: int = 1, mid: int = 1, retain: bool = False, dup: bool = False,
            properties: Optional[Properties] = None, v5: bool = True) -> bytes:
    body = mqtt_string(topic) + (struct.pack(">H", mid) if qos else b"")
    if v5:
        body += properties.pack() if properties is not None else b"\x00"
    return mqtt_packet(0x30 | dup << 3 | qos << 1 | retain, body + payload)


def suback(mid: int, v5: bool) -> bytes:
    return mqtt_packet(0x90, struct.pack(">H", mid) + (b"\x00" if v5 else b"") + b"\x01")


def user_properties() -> Properties:
    found = Properties(PacketTypes.PUBLISH)
    found.UserProperty = [("tenant", "a"), ("tenant", "b"), ("ünï", "✓")]
    found.ContentType = "application/json"
    found.CorrelationData = b"\x00\x01"
    found.MessageExpiryInterval = 60
    found.PayloadFormatIndicator = 1
    found.ResponseTopic = "reply/here"
    return found


def stream(v5: bool) -> bytes:
    """Every case, with a PINGRESP and a SUBACK in between."""
    packets = [publish(b"a/b", b"qos1", mid=1, v5=v5),
               publish(b"a/b", b"qos0", qos=0, v5=v5),
               publish(b"a/b", b"", mid=2, dup=True, v5=v5),
               publish(b"a/b", b"retained", qos=0, retain=True, v5=v5),
               PINGRESP,
               publish(b"\xff not utf-8", b"bad topic", mid=3, v5=v5),
               suback(9, v5),
               publish(b"big", bytes(range(256)) * 80, mid=4, v5=v5),  # 20 KiB: over one read
               publish(b"a/" + b"x" * 300, b"y" * 200, mid=65535, v5=v5)]  # two-byte lengths
    if v5:
        packets += [publish(b"a/props", b"{}", mid=5, properties=user_properties()),
                    publish(b"a/empty-props", b"p", mid=6, properties=Properties(PacketTypes.PUBLISH))]
    packets += [publish(b"m/%d" % i, b"p%d" % i, mid=100 + i, v5=v5) for i in range(50)]
    return b"".join(packets)


Seen = Tuple[bytes, bytes, int, bool, int, bool, Any]


def comparable(fields: Publish) -> Seen:
    """The fields, with the properties as the ingress keeps them."""
    return fields[:6] + (properties_of(fields[6]),)


class Reader:
    """A DialedClient on one end of a socketpair, read as `Connection.on_ready` reads it
    (`straight`), or by paho alone."""

    def __init__(self, v5: bool, straight: bool):
        self.ours, self.broker = socket.socketpair()
        self.ours.setblocking(False)
        self.client = DialedClient(CallbackAPIVersion.VERSION2, client_id="t",
                                   protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
        self.client.manual_ack_set(True)
        self.straight = straight
        self.seen: List[Seen] = []
        self.taken_straight = 0
        self.subacks: List[int] = []
        self.client.on_message = lambda _c, _u, m: self.seen.append(comparable(message_fields(m)))
        self.client.on_subscribe = lambda _c, _u, mid, _codes, _p: self.subacks.append(mid)
        self.client.dialed = self.ours
        self.client._sock = self.client._create_socket()

    def read(self) -> None:
        """Everything that is readable now."""
        while True:
            if self.straight:
                found = self.client.take_publishes(1000)
                if found is None:
                    return
                if found:
                    self.seen.extend(map(comparable, found))
                    self.taken_straight += len(found)
                    continue
            before = len(self.seen) + len(self.subacks)
            assert self.client.loop_read() == paho.MQTT_ERR_SUCCESS
            if len(self.seen) + len(self.subacks) == before and not self.client.buffered():
                return

    def close(self) -> None:
        self.ours.close()
        self.broker.close()


def read_in_pieces(data: bytes, v5: bool, straight: bool, cuts: List[int]) -> Reader:
    reader = Reader(v5, straight)
    try:
        for start, stop in zip([0] + cuts, cuts + [len(data)]):
            reader.broker.sendall(data[start:stop])
            reader.read()
    finally:
        reader.close()
    return reader


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_straight_reads_give_what_paho_gives_however_the_reads_cut_the_packets(v5: bool) -> None:
    data = stream(v5)
    pace = random.Random(14)
    cutting = {"whole": [], "every 7 bytes": list(range(7, len(data), 7)),
               "random": sorted(pace.sample(range(1, len(data)), 60))}
    for how, cuts in cutting.items():
        by_paho = read_in_pieces(data, v5, straight=False, cuts=cuts)
        straight = read_in_pieces(data, v5, straight=True, cuts=cuts)
        assert straight.seen == by_paho.seen, how
        assert straight.subacks == by_paho.subacks == [9], how
        assert len(by_paho.seen) == (59 if v5 else 57)
        assert straight.taken_straight > 0 or how == "every 7 bytes", how  # that one cuts them all
    whole = read_in_pieces(data, v5, straight=True, cuts=[])
    assert whole.taken_straight == len(whole.seen) - 1  # all but the one cut by the 16 KiB read
    assert len(stream(v5)) > READ_CHUNK


def test_the_keepalive_clock_advances_with_a_straight_read() -> None:
    reader = Reader(v5=True, straight=True)
    try:
        attribute = reader.client._received_at
        setattr(reader.client, attribute, 0.0)
        reader.broker.sendall(publish(b"a", b"p"))
        reader.read()
        assert reader.taken_straight == 1 and getattr(reader.client, attribute) > 0
    finally:
        reader.close()


def test_the_end_of_the_connection_met_by_a_straight_read_still_reaches_paho() -> None:
    reader = Reader(v5=True, straight=True)
    try:
        reader.broker.sendall(publish(b"a", b"last"))
        reader.broker.close()
        assert reader.client.take_publishes(10) == [(b"a", b"last", 1, False, 1, False, None)]
        assert reader.client.take_publishes(10) == []  # the end: paho's to see
        assert reader.client.buffered()  # so the loop does not wait on select() for it
        assert reader.client.loop_read() == paho.MQTT_ERR_CONN_LOST
    finally:
        reader.ours.close()


@pytest.mark.parametrize("packet, v5", [
    (publish(b"q2", b"p", qos=2), True),                          # QoS 2: paho's PUBREC/PUBREL
    (mqtt_packet(0x36, mqtt_string(b"q3") + b"\x00\x01\x00"), True),  # QoS 3: malformed
    (publish(b"", b"p", v5=False), False),                         # empty topic under 3.1.1
    (mqtt_packet(0x32, mqtt_string(b"t")), False),                 # QoS 1 without a packet id
    (mqtt_packet(0x30, b"\x00"), False),                           # shorter than a topic length
    (mqtt_packet(0x30, mqtt_string(b"t")), True),                  # MQTT 5 without property length
    (mqtt_packet(0x32, mqtt_string(b"t") + b"\x00\x01\x05\x26"), True),  # properties cut short
    (bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]), False),          # a five-byte remaining length
    (bytes([0x20, 0x02, 0x00, 0x00]), False),                      # another packet (CONNACK)
], ids=["qos2", "qos3", "empty-topic-311", "no-packet-id", "short", "no-property-length",
        "cut-properties", "long-length", "connack"])
def test_what_paho_must_judge_is_left_to_paho(packet: bytes, v5: bool) -> None:
    found: List[Publish] = []
    data = publish(b"before", b"p", v5=v5) + packet + publish(b"after", b"p", v5=v5)
    assert parse_publishes(data, 0, v5, 100, found) == len(data) - len(packet) - len(publish(b"after", b"p", v5=v5))
    assert [f[0] for f in found] == [b"before"]


def test_a_property_block_over_the_limit_is_left_to_paho_as_at_any_read_boundary() -> None:
    """The straight read decoded a block paho's path drops undecoded (over maxPayloadBytes):
    whether a message was stored or dropped hung on where a socket read cut the stream."""
    many = Properties(PacketTypes.PUBLISH)
    many.UserProperty = [("a", "")] * 400  # a 2,400-byte block, whole in one read
    big, after = publish(b"many", b"p", mid=2, properties=many), publish(b"after", b"p", mid=3)
    data = publish(b"before", b"p") + big + after
    found: List[Publish] = []
    assert parse_publishes(data, 0, True, 100, found, properties_limit=1024) == len(data) - len(big) - len(after)
    assert [f[0] for f in found] == [b"before"]
    found.clear()
    assert parse_publishes(data, 0, True, 100, found, properties_limit=4096) == len(data)
