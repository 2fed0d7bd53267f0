"""The daemon's paho client dispatches a received message straight to `on_message` while no
per-topic callback exists, and with paho's own matcher once one is added."""
from __future__ import annotations

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
