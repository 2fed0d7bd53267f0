"""The daemon's paho client dispatches a received message straight to `on_message` while no
per-topic callback exists, and with paho's own matcher once one is added."""
from __future__ import annotations

import socket
import struct

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from flashlexd.dialer import DialedClient


def message(topic: bytes) -> paho.MQTTMessage:
    found = paho.MQTTMessage(mid=7, topic=topic)
    found.payload = b"p"
    return found


def test_on_message_gets_every_message_without_the_matcher_and_per_topic_callbacks_still_work():
    client = DialedClient(CallbackAPIVersion.VERSION2, client_id="t")
    seen, filtered = [], []
    client.on_message = lambda _c, _u, m: seen.append(m)
    bad = message(b"\xff bad utf-8")  # reaches on_message too: the worker counts and drops it
    client._handle_on_message(message(b"a/b"))
    client._handle_on_message(bad)
    assert seen[0].topic == "a/b" and seen[1] is bad
    client.message_callback_add("x/#", lambda _c, _u, m: filtered.append(m.topic))
    client._handle_on_message(message(b"x/1"))
    client._handle_on_message(message(b"a/c"))
    assert filtered == ["x/1"] and [m.topic for m in seen[2:]] == ["a/c"]  # a match skips on_message


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH, QoS 0 (remaining length < 128: one byte)."""
    body = struct.pack(">H", len(topic)) + topic + payload
    return bytes([0x30, len(body)]) + body


def test_one_socket_read_serves_several_packets_and_select_is_not_needed_for_the_rest():
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = DialedClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=paho.MQTTv311)
    seen = []
    client.on_message = lambda _c, _u, m: seen.append((m.topic, m.payload))
    client._read = b"\x30\x05left over from the last connection"
    client.dialed = ours
    client._sock = client._create_socket()
    assert not client.buffered()  # a new connection starts with nothing read
    try:
        broker.sendall(b"".join(publish_packet(b"a/%d" % i, b"p%d" % i) for i in range(3)))
        assert client.loop_read() == paho.MQTT_ERR_SUCCESS and len(seen) == 1
        assert client.buffered()  # the other two were read with the first: select() would not say
        client.loop_read()
        client.loop_read()
        assert seen == [("a/0", b"p0"), ("a/1", b"p1"), ("a/2", b"p2")] and not client.buffered()
        broker.sendall(publish_packet(b"a/3", b"p3")[:3])  # half a packet: paho waits for the rest
        client.loop_read()
        assert len(seen) == 3
        broker.sendall(publish_packet(b"a/3", b"p3")[3:])
        client.loop_read()
        assert seen[-1] == ("a/3", b"p3")
        broker.close()
        assert client.loop_read() == paho.MQTT_ERR_CONN_LOST  # EOF still reaches paho
    finally:
        ours.close()
