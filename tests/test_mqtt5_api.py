"""The API's MQTT 5 side through the client, against a real server, Methods and LMDB store
(tests/test_ipc_server.Harness): publish with properties and an expiry, the broker's Maximum
Packet Size at the door, and messages/wait filtered by a user property."""
from __future__ import annotations

import threading

import msgpack
import pytest

from flashlexd.client import RpcError, connect
from flashlexd.client.wire import Code
from flashlexd.store import Incoming
from tests.test_ipc_server import harness  # noqa: F401 (fixture)


@pytest.fixture
def fx(harness):
    with connect(harness.path) as client:
        yield client


def test_publish_keeps_properties_and_the_expiry(harness, fx):
    entry_id = fx.publish(b"p", topic="out/t", properties={
        "user_properties": [("k", "v"), ("k", "w")], "content_type": "text/plain",
        "response_topic": "reply/t", "correlation_data": b"\x01"}, expiry=60)
    (entry,) = fx.outbox()["entries"]
    assert entry.id == entry_id
    assert entry.properties == {"user_properties": [["k", "v"], ["k", "w"]], "content_type": "text/plain",
                                "response_topic": "reply/t", "correlation_data": b"\x01",
                                "message_expiry_interval": 60}


@pytest.mark.parametrize("properties, expiry", [
    ({"user_properties": [("k",)]}, None), ({"colour": "red"}, None), ({"response_topic": "a/#"}, None),
    ({"payload_format_indicator": 2}, None), ("text", None), ({}, 0), ({}, 2 ** 32),
    # what paho cannot pack (it crashed the egress at every start) or a broker closes the link for
    ({"payload_format_indicator": 1.0}, None), ({"content_type": "a" * 65536}, None),
    ({"content_type": "é" * 32768}, None), ({"user_properties": [("k", "v" * 65536)]}, None),
    ({"correlation_data": b"x" * 65536}, None), ({"content_type": "text\0plain"}, None),
    ({"message_expiry_interval": 0}, None), ({"message_expiry_interval": 1.5}, None),
    ({"message_expiry_interval": 60}, 30),
])
def test_publish_refuses_properties_mqtt5_cannot_carry(harness, fx, properties, expiry):
    with pytest.raises(RpcError) as refused:
        fx.call("publish", payload=b"p", properties=properties, **({} if expiry is None else {"expiry": expiry}))
    assert refused.value.code == Code.BAD_PARAMS
    assert fx.outbox()["count"] == 0


def test_publish_refuses_a_payload_that_is_not_the_utf8_its_properties_say(harness, fx):
    """payload_format_indicator 1 with bytes that are not UTF-8 was queued, and a broker
    refuses it (AWS IoT Core: 0x99), a dead letter far from the call (review "mqtt5")."""
    with pytest.raises(RpcError) as refused:
        fx.call("publish", payload=b"\xff\xfe", properties={"payload_format_indicator": 1})
    assert refused.value.code == Code.BAD_PARAMS and "the payload is not UTF-8" in refused.value.message
    assert fx.outbox()["count"] == 0
    fx.call("publish", payload="texte é".encode(), properties={"payload_format_indicator": 1})
    fx.call("publish", payload=b"\xff\xfe", properties={"payload_format_indicator": 0})
    assert fx.outbox()["count"] == 2


def test_a_received_messages_properties_can_be_published_back(harness, fx):
    """`publish(..., properties=m.properties)` of a received message was refused: its
    message_expiry_interval "is not one" (publish took it only as `expiry=`). It is the
    expiry now, as a received message has it (found by review)."""
    received = {"user_properties": [["k", "v"]], "content_type": "text/plain", "payload_format_indicator": 1,
                "response_topic": "reply/t", "correlation_data": b"\x01", "message_expiry_interval": 600}
    fx.publish(b"p", topic="out/t", properties=received)
    fx.publish(b"p", topic="out/t", properties=received, expiry=600)
    assert [e.properties for e in fx.outbox()["entries"]] == [received, received]


@pytest.mark.parametrize("properties, said", [
    ({"payload_format_indicator": 2}, "a payload_format_indicator of the integer 0 or 1"),
    ({"correlation_data": 5}, "a correlation_data of bytes"),
    ({"colour": "red"}, "'colour' is not one"),
])
def test_a_bad_property_value_is_named_by_its_property(harness, fx, properties, said):
    """A known property with a wrong value was refused as if its name were unknown ("... or
    payload_format_indicator (the integer 0 or 1); 'payload_format_indicator' is not one")."""
    with pytest.raises(RpcError) as refused:
        fx.call("publish", payload=b"p", properties=properties)
    assert refused.value.code == Code.BAD_PARAMS and said in str(refused.value)
    assert "is not one" not in str(refused.value) or "colour" in properties


@pytest.mark.parametrize("properties, rule", [
    ({"user_properties": [("k", "a\x01b")]}, "control character U+0001"),
    ({"user_properties": [("k\n", "v")]}, "control character U+000A"),
    ({"content_type": "text/\x7fplain"}, "control character U+007F"),
    ({"content_type": "text\ufffe"}, "Unicode non-character U+FFFE"),
    ({"response_topic": "reply/\x85"}, "control character U+0085"),
], ids=["value-U+0001", "name-U+000A", "content-type-U+007F", "content-type-U+FFFE", "response-topic-U+0085"])
def test_publish_refuses_property_strings_a_broker_closes_the_link_for(harness, fx, properties, rule):
    """Only NUL was refused: a control character or a Unicode non-character in a property
    string was queued, and mosquitto closes the link over it (MQTT 5 1.5.4), so the entry
    dropped the egress link at each attempt until it was dead-lettered. Refused now, the rule
    named, like the same characters in a topic (found by review)."""
    with pytest.raises(RpcError) as refused:
        fx.call("publish", payload=b"p", properties=properties)
    assert refused.value.code == Code.BAD_PARAMS and rule in str(refused.value)
    assert fx.outbox()["count"] == 0


def test_publish_refuses_user_properties_given_as_a_dict(harness, fx):
    """The client read {"id": "42"} as pairs of its keys' characters and queued [["i", "d"]]
    silently, the value lost; the dict now reaches the daemon, which refuses it with bad_params
    (found by review)."""
    with pytest.raises(RpcError) as refused:
        fx.publish(b"p", topic="out/t", properties={"user_properties": {"id": "42"}})
    assert refused.value.code == Code.BAD_PARAMS
    assert fx.outbox()["count"] == 0


def test_publish_refuses_a_packet_over_the_brokers_maximum_while_connected(harness, fx):
    harness.mqtt["egress"] = {"connected": True, "broker_max_packet": 100}
    with pytest.raises(RpcError) as refused:
        fx.publish(b"x" * 100, topic="out/t")
    assert refused.value.code == Code.BAD_PARAMS and "Maximum Packet Size (100 bytes)" in str(refused.value)
    fx.publish(b"x" * 50, topic="out/t")
    harness.mqtt["egress"] = {"connected": False, "broker_max_packet": 100}  # the egress checks it later
    fx.publish(b"x" * 100, topic="out/t")
    assert fx.outbox()["count"] == 2


@pytest.mark.parametrize("char", ["v", "\U0001F600"], ids=["ascii", "4-byte-utf8"])
def test_an_outbox_answer_counts_the_entries_properties_in_its_budget(harness, fx, char):
    """Only payload and topic were counted: entries each carrying a request frame's worth of
    user properties made one `outbox` answer ~8x the response budget, built in the supervisor;
    then characters were counted, not bytes (found by reviews)."""
    budget = harness.rules.response_budget
    pairs = [(f"k{i}", char * (20000 // len(char.encode()))) for i in range(budget // 100000)]  # ~1/5 of it each
    for _ in range(12):
        fx.publish(b"x", topic="out/t", properties={"user_properties": pairs})
    answer = fx.call("outbox", limit=12)
    assert 1 <= len(answer["entries"]) < 12
    assert len(msgpack.packb(answer, use_bin_type=True)) <= budget


def test_messages_and_wait_filter_by_a_user_property(harness, fx):
    harness.ingest(Incoming("t", b"a", properties={"user_properties": [["tenant", "a"]]}), Incoming("t", b"none"))
    assert [m.payload for m in fx.messages(user_property=("tenant", "a"))] == [b"a"]
    assert fx.messages(user_property=("tenant", "b")) == []
    timer = threading.Timer(0.2, lambda: harness.ingest(
        Incoming("t", b"b", properties={"user_properties": [["tenant", "b"]]})))
    timer.start()
    (found,) = fx.wait(timeout=10, user_property=("tenant", "b"))
    timer.join()
    assert found.payload == b"b" and found.user_property("tenant") == "b"
    with pytest.raises(RpcError) as refused:
        fx.call("messages", user_property="tenant")
    assert refused.value.code == Code.BAD_PARAMS
    # stream() too: it had no such parameter (review "mqtt5")
    streamed = fx.stream(timeout_per_wait=1, user_property=("tenant", "b"))
    assert next(streamed).payload == b"b"


def test_messages_past_their_expiry_are_walked_a_bounded_page_at_a_time(harness, fx):
    """Every read leaves out a message past its own expiry until the sweep removes it; an
    unfiltered read then passed them all in one turn of the loop (0.6-0.9 s at 200,000, every
    call; re-read 31). It passes EXPIRED_PAST at most a page, and a look over fewer still finds
    what follows (a SCAN_BUDGET page answered [] with messages behind: re-read 32)."""
    import time
    from flashlexd.ipc.methods import EXPIRED_PAST
    expired = [Incoming("t", b"old", properties={"message_expiry_interval": 1}) for _ in range(EXPIRED_PAST + 300)]
    harness.call(lambda: harness.store.append(expired[:300], now=time.time() - 5))
    harness.ingest(("t", b"live"))
    assert [m.payload for m in fx.wait(timeout=0, limit=10)] == [b"live"]  # a look over 300
    fx.ack(fx.messages())
    harness.call(lambda: harness.store.append(expired, now=time.time() - 5))
    harness.ingest(("t", b"live again"))
    first = fx.call("messages", limit=10, paged=True)
    assert first["messages"] == [] and first["cursor"] is not None  # a page's walk, then where to go on
    assert [m.payload for m in fx.messages(limit=10)] == [b"live again"]  # the client goes on from it
    assert [m.payload for m in fx.wait(timeout=5, limit=10)] == [b"live again"]
