"""An entry the broker will not take does not stop the outbox: it goes to the dead letters,
named in one WARNING, and everything behind it is delivered in order."""
from __future__ import annotations

import ssl
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from flashlexd.client import connect
from flashlexd.mqttv5 import publish_packet_size
from flashlexd.store import Store
from tests.broker import EGRESS_TOPIC, THING, Broker, Certs, Proxy, Subscriber, open_store, wait_for, write_config
from tests.daemon import Daemon
from tests.lax_broker import TlsTestBroker, mqtt_packet
from tests.quota_proxy import QuotaProxy
from tests.test_egress import assert_delivered_in_order

MAX_PACKET = 10_000  # mosquitto disconnects a client that sends a bigger packet


@pytest.fixture
def strict_broker(certs: Certs, tmp_path: Path) -> Iterator[Broker]:
    running = Broker(certs, tmp_path / "broker", extra=[f"max_packet_size {MAX_PACKET}"]).start()
    yield running
    running.close()


def queue(store: Store, good: int, poison_at: int, poison_topic: str, poison_payload: bytes) -> List[bytes]:
    payloads = [f"{i:06d}".encode() for i in range(good)]
    store.outbox_append([(EGRESS_TOPIC, p, 1, False) for p in payloads[:poison_at]])
    store.outbox_append([(poison_topic, poison_payload, 1, False)])
    store.outbox_append([(EGRESS_TOPIC, p, 1, False) for p in payloads[poison_at:]])
    return payloads


OVERSIZE_SHOWN = f"topic {EGRESS_TOPIC}, {2 * MAX_PACKET + len(EGRESS_TOPIC)} bytes"


@pytest.mark.parametrize("topic, payload, shown, protocol, attempts, reason", [
    # MQTT 5: the CONNACK's Maximum Packet Size says it before anything is sent
    (EGRESS_TOPIC, b"x" * (2 * MAX_PACKET), OVERSIZE_SHOWN, "5", 0, f"Maximum Packet Size ({MAX_PACKET} bytes)"),
    # MQTT 3.1.1: found by the drops it causes, alone in flight
    (EGRESS_TOPIC, b"x" * (2 * MAX_PACKET), OVERSIZE_SHOWN, "3.1.1", 3, "127.0.0.1"),
    ("dev/a\nb", b"control character in the topic", "topic dev/a\\x0ab, ", "auto", 3, "127.0.0.1"),
], ids=["oversize-mqtt5", "oversize-mqtt311", "control-char-topic"])
def test_a_poison_entry_is_dead_lettered_and_the_rest_delivered_in_order(
        strict_broker: Broker, tmp_path: Path, start_worker, topic: str, payload: bytes, shown: str,
        protocol: str, attempts: int, reason: str) -> None:
    config = write_config(tmp_path / "config", strict_broker, mqtt={"protocol": protocol})
    store = open_store(config)
    subscriber = Subscriber(strict_broker, EGRESS_TOPIC, tmp_path / "received").start()
    sent = queue(store, 1000, 500, topic, payload)  # written straight in: no publish-time checks
    poison_id = store.outbox_peek(limit=1, after=store.outbox_peek(limit=500)[-1].id)[0].id
    worker = start_worker("egress", config)
    wait_for(lambda: store.outbox_count() == 0, 60, "the outbox empty")
    assert_delivered_in_order(subscriber, sent, max_duplicates=300)
    dead = store.dead_letters()
    assert [(d.id, d.topic, d.payload, d.attempts) for d in dead] == [(poison_id, topic, payload, attempts)]
    assert reason in dead[0].reason
    warnings = [line for line in worker.log_text().splitlines() if "dead letters" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert f"outbox entry {poison_id} ({shown}" in warnings[0]
    worker.wait(lambda w: w.counters.get("dead_lettered") == 1 and not w.counters.get("one_at_a_time")
                and w.counters.get("oldest_inflight_age") is None, 10, "back to full speed, counted")
    assert worker.stop() == 0
    subscriber.stop()


def test_through_the_daemon_a_retried_poison_entry_comes_back_and_a_drop_ends_it(
        strict_broker: Broker, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config", strict_broker)
    subscriber = Subscriber(strict_broker, EGRESS_TOPIC, tmp_path / "received").start()
    daemon = Daemon(config, tmp_path / "daemon").start()
    try:
        daemon.wait_api(20)
        with connect(str(daemon.socket_path)) as fx:
            poison = fx.publish(b"p" * (2 * MAX_PACKET))  # under maxPayloadBytes, over the broker's limit
            fx.publish(b"after")
            wait_for(lambda: subscriber.lines() == [b"after"], 30, "the entry behind the poison")
            wait_for(lambda: fx.status()["outbox"]["dead"] == 1, 10, "the poison dead-lettered")
            assert [e.id for e in fx.outbox(dead=True)["entries"]] == [poison]
            wait_for(lambda: fx.status()["outbox"]["oldest_inflight_age"] is None, 10, "nothing in flight")
            again = fx.retry([poison])[0]
            wait_for(lambda: [e.id for e in fx.outbox(dead=True)["entries"]] == [again], 30,
                     "the retried entry refused again")
            assert fx.drop([again], dead=True) == 1
            assert fx.status()["outbox"]["dead"] == 0 and fx.outbox()["count"] == 0
        assert subscriber.lines() == [b"after"]
    finally:
        daemon.stop()
        subscriber.stop()


def test_a_qos0_entry_is_measured_without_a_packet_id(strict_broker: Broker, tmp_path: Path,
                                                     start_worker) -> None:
    """A QoS 0 PUBLISH has no packet id: an entry that fits the broker's Maximum Packet Size only
    without one is sent, not dead-lettered."""
    payload = b"x" * (MAX_PACKET - 100)
    while publish_packet_size(EGRESS_TOPIC, payload, {}, None, qos=1) <= MAX_PACKET:
        payload += b"x"
    assert publish_packet_size(EGRESS_TOPIC, payload, {}, None, qos=0) <= MAX_PACKET
    subscriber = Subscriber(strict_broker, EGRESS_TOPIC, tmp_path / "received").start()
    config = write_config(tmp_path / "config", strict_broker, mqtt={"protocol": "5"})
    store = open_store(config)
    store.outbox_append([(EGRESS_TOPIC, payload, 0, False), (EGRESS_TOPIC, b"after", 1, False)])
    worker = start_worker("egress", config)
    wait_for(lambda: store.outbox_count() == 0, 15, "the outbox drained")
    wait_for(lambda: b"after" in subscriber.lines(), 15, "the entry behind it delivered")
    assert store.dead_letters() == [] and payload in subscriber.lines()
    assert worker.stop() == 0


POISON_ATTEMPTS = 2


@contextmanager
def entry_held_in_flight(certs: Certs, tmp_path: Path, start_worker,
                         protocol: str) -> Iterator[Tuple[Broker, QuotaProxy, Store, Any]]:
    """One healthy entry that never gets its PUBACK (a proxy before the broker drops every
    PUBLISH), so it is alone in flight at every drop: (broker, proxy, store, egress worker).
    `poisonAttempts` is 2 (POISON_ATTEMPTS drops counted in full dead-letter it), so each test
    needs one drop fewer than at the default 3."""
    broker = Broker(certs, tmp_path / "broker", plain=True).start()
    proxy = QuotaProxy(broker, rate=0.001)
    try:
        config = write_config(tmp_path / "config", broker, port=proxy.port,
                              mqtt={"protocol": protocol, "mqttOperationTimeout": 60,
                                    "poisonAttempts": POISON_ATTEMPTS})
        store = open_store(config)
        store.outbox_append([(EGRESS_TOPIC, b"precious", 1, False)])
        yield broker, proxy, store, start_worker("egress", config)
    finally:
        proxy.close()
        broker.close()


@pytest.mark.parametrize("reason, name", [(0x8E, "Session taken over"), (0x97, "Quota exceeded")])
def test_a_drop_the_broker_gives_its_own_cause_for_is_not_counted_as_poison(
        certs: Certs, tmp_path: Path, start_worker, reason: int, name: str) -> None:
    """MQTT 5: a broker's DISCONNECT that names a cause of its own says nothing about the entry
    alone in flight, so three of them do not dead-letter it: Session taken over (0x8E, AWS IoT
    Core's answer to another connection with our client id), and a throttling broker's Quota
    exceeded (0x97, AWS IoT Core over a quota; 0x96 Message rate too high is in the same set),
    which dead-lettered a healthy entry (found by review)."""
    with entry_held_in_flight(certs, tmp_path, start_worker, "5") as (_, proxy, store, worker):
        for sent in range(1, POISON_ATTEMPTS + 1):
            wait_for(lambda: proxy.over_quota >= sent, 15, f"the entry sent on connection {sent}")
            proxy.drop_connections(reason=reason)
        wait_for(lambda: proxy.over_quota >= POISON_ATTEMPTS + 1, 15, "the entry sent on one more connection")
        assert store.dead_letters() == [] and store.outbox_count() == 1
        assert name in worker.log_text()
        assert worker.stop() == 0


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_an_outage_while_an_entry_waits_for_its_puback_is_not_counted_as_poison(
        certs: Certs, tmp_path: Path, start_worker, protocol: str) -> None:
    """A broker restarting (or a path going down) while a healthy entry waited alone for its
    PUBACK counted as that entry's drop: three such outages dead-lettered it, to stay there
    until an operator retried it, out of order (found by review). A broker that refuses an entry
    takes the next CONNECT at once; one that is down does not, and such a drop is not counted."""
    with entry_held_in_flight(certs, tmp_path, start_worker, protocol) as (broker, proxy, store, worker):
        for outage in range(1, POISON_ATTEMPTS + 1):
            wait_for(lambda: proxy.over_quota >= outage, 15, f"the entry sent on connection {outage}")
            failures = worker.log_text().count("retrying in")
            broker.stop()  # the proxy's upstream closes: the link drops, no DISCONNECT
            wait_for(lambda: worker.log_text().count("retrying in") >= failures + 2, 20,
                     "the drop and an attempt the stopped broker failed")
            broker.start()
        wait_for(lambda: proxy.over_quota >= POISON_ATTEMPTS + 1, 20, "the entry sent on one more connection")
        assert store.dead_letters() == [] and store.outbox_count() == 1
        assert worker.stop() == 0


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_path_resets_while_an_entry_waits_for_its_puback_count_as_a_third_of_a_drop(
        certs: Certs, tmp_path: Path, start_worker, protocol: str) -> None:
    """A reset path (a NAT rebinding, Wi-Fi roaming, a handover) while a healthy entry waited
    alone for its PUBACK, the broker taking the next CONNECT at once, counted as the entry's
    drop: three such resets dead-lettered it ("closed by the broker with one entry in flight
    (refused?)"; found by review behind a 0.3 s path). A broker closing a link over a publish
    sends TLS's close first; a link ended without one counts as a third of a drop."""
    with entry_held_in_flight(certs, tmp_path, start_worker, protocol) as (_, proxy, store, worker):
        for cut in range(1, POISON_ATTEMPTS + 1):  # as many drops counted in full dead-letter it
            wait_for(lambda: proxy.over_quota >= cut, 15, f"the entry sent on connection {cut}")
            proxy.drop_connections()  # no TLS close: a path's reset
        wait_for(lambda: proxy.over_quota >= POISON_ATTEMPTS + 1, 15, "the entry sent on one more connection")
        assert store.dead_letters() == [] and store.outbox_count() == 1
        assert worker.stop() == 0


def test_a_link_cut_mid_upload_is_not_counted_as_poison(broker: Broker, tmp_path: Path,
                                                        start_worker) -> None:
    """MQTT 5: a path that resets while a large entry is still uploading and comes straight
    back (Wi-Fi roaming, a NAT reset) counted as the entry's drop: three such cuts moved a
    healthy entry to the dead letters ("closed by the broker with one entry in flight
    (refused?)"), status degraded, the entry waiting for `outbox retry` (found by review). An
    MQTT 5 broker judges a publish once it has it whole; a cut before that is the path's."""
    proxy = Proxy(broker)
    proxy.stall_up(links=3, after=64 * 1024)  # the TLS handshake, CONNECT and part of the entry
    try:
        config = write_config(tmp_path / "config", broker, port=proxy.port, mqtt={"protocol": "5"})
        store = open_store(config)
        subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
        entry = b"E" * 1_000_000  # far more than the proxy's TCP takes in unread
        store.outbox_append([(EGRESS_TOPIC, entry, 1, False)])
        worker = start_worker("egress", config)
        for cut in range(1, 4):
            worker.wait(lambda w: proxy.stalled >= cut, 30, f"upload {cut} stuck mid-way")
            proxy.cut()
        worker.wait(lambda w: store.outbox_count() == 0, 60, "the entry acknowledged")
        assert store.dead_letters() == [], worker.log_text()[-2000:]
        wait_for(lambda: subscriber.lines() == [entry], 20, "the entry at the subscriber")
        assert worker.stop() == 0
        subscriber.stop()
    finally:
        proxy.close()


class AwsTopicLevelsBroker(TlsTestBroker):
    """As AWS IoT Core: closes the link on a PUBLISH whose topic has more than 7 slashes (under
    MQTT 5 after a DISCONNECT 0x90 Topic Name invalid); PUBACKs the rest."""

    def __init__(self, certs: Certs, protocol: str):
        self.v5 = protocol == "5"
        super().__init__(certs)

    def answer(self, tls: ssl.SSLSocket, first: int, body: bytes, number: Optional[int]) -> bool:
        kind = first >> 4
        if kind == 1:  # CONNECT: CONNACK, no session (under MQTT 5 no properties)
            tls.sendall(mqtt_packet(0x20, b"\0\0\0" if self.v5 else b"\0\0"))
        elif kind == 3:
            end = 2 + int.from_bytes(body[:2], "big")
            if body[2:end].count(b"/") > 7:
                if self.v5:
                    tls.sendall(mqtt_packet(0xE0, b"\x90\0"))
                return False
            if first & 0x06:  # QoS 1: PUBACK its packet id
                tls.sendall(mqtt_packet(0x40, body[end:end + 2]))
        elif kind == 12:
            tls.sendall(mqtt_packet(0xD0, b""))
        return kind != 14  # DISCONNECT


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_refused_entries_behind_acknowledged_ones_are_found_at_the_base_quiet_time(
        certs: Certs, tmp_path: Path, start_worker, protocol: str) -> None:
    """An outbox alternating good topics and ones over AWS's 7 slashes stalled: a drop after a
    PUBACK on that link was no poison evidence and doubled the reconnect wait, so each refused
    entry began with longer and longer waits (30 s and more: 3 left after 90 s; found by review)."""
    deep = "a/b/c/d/e/f/g/h/i"
    broker = AwsTopicLevelsBroker(certs, protocol)
    try:
        # poisonAttempts 2: 5 drops in all (the second entry's first drop after a PUBACK), not 7;
        # doubling, the waits would still reach 4 s
        config = write_config(tmp_path / "config", SimpleNamespace(certs=certs, port=broker.port), mqtt={
            "protocol": protocol, "poisonAttempts": 2,
            "autoReconnectBackoffTime": {"baseReconnectQuietTimeSecond": 1, "maxReconnectQuietTimeSecond": 32}})
        store = open_store(config)
        store.outbox_append([(topic, f"{topic}{i}".encode(), 1, False) for i in range(2)
                             for topic in (EGRESS_TOPIC, deep)] + [(EGRESS_TOPIC, b"last", 1, False)])
        worker = start_worker("egress", config)
        worker.wait(lambda w: store.outbox_count() == 0, 25, "the outbox empty")
        assert [d.topic for d in store.dead_letters()] == [deep, deep]
        reports = worker.reports("mqtt")
        waits = [up["received_at"] - down["received_at"] for down, up in zip(reports, reports[1:])
                 if not down["connected"] and up["connected"]]
        assert waits and max(waits) < 3, waits  # ~1 s each; doubling, they reach 4 s and more
        assert worker.stop() == 0
    finally:
        broker.close()


@pytest.mark.parametrize("ahead", [20, 1])
def test_an_entry_over_rabbitmqs_max_message_size_is_named_and_can_be_dropped(
        rabbitmq: Any, tmp_path: Path, start_worker, ahead: int) -> None:
    """RabbitMQ 3.10 takes a publish over its max_message_size without a word: the channel
    under the MQTT link dies, the socket stays open and answers pings, nothing later on that
    link is acknowledged. A slow or throttling broker looks the same, so such links do not
    dead-letter the entry (a healthy one would go behind a slow broker); the egress sent it
    again for good, the log blaming a quota (found by review). Now one WARNING names it and
    how to give it up; dropped, the rest is delivered."""
    rabbitmq.forget([f"{THING}-egress", "test-sub"])
    limit = 65_536
    # one rabbitmqctl call (an Erlang VM start each) for the default and the limit (new channels)
    default = rabbitmq.ctl("eval", "Default = application:get_env(rabbit, max_message_size),"
                           f" application:set_env(rabbit, max_message_size, {limit}), Default.").strip()
    try:
        subscriber = Subscriber(rabbitmq, EGRESS_TOPIC, tmp_path / "received").start()
        config = write_config(tmp_path / "config", rabbitmq, mqtt={"poisonAttempts": 2, "mqttOperationTimeout": 2})
        store = open_store(config)
        sent = queue(store, 40, ahead, EGRESS_TOPIC, b"x" * (2 * limit))
        big = store.outbox_peek(limit=1, after=store.outbox_peek(limit=ahead)[-1].id)[0].id
        worker = start_worker("egress", config)
        named = f"outbox entry {big} (topic {EGRESS_TOPIC}, "
        worker.wait(lambda w: named in w.log_text(), 60, "the stuck entry named")
        assert f"if it stays so, `flashlexctl outbox drop {big}` gives it up" in worker.log_text()
        assert store.dead_letters() == [] and big in [e.id for e in store.outbox_peek(limit=100)]
        worker.wait(lambda w: w.counters.get("stalled_entry") == big, 10, "status to say it")
        assert store.outbox_drop([big]) == 1
        wait_for(lambda: store.outbox_count() == 0, 60, "the outbox empty")
        worker.wait(lambda w: w.counters.get("stalled_entry") is None, 10, "status healthy again")
        # the channel died before it confirmed the entries ahead of it: they went again once,
        # one at a time (each link sent them all again, and the WARNING named the oldest of
        # them, a healthy entry delivered already: found by review)
        assert_delivered_in_order(subscriber, sent, max_duplicates=len(sent))
        assert worker.log_text().count(named) == 1
        assert worker.log_text().count("was not acknowledged on") == 1, worker.log_text()
        assert worker.stop() == 0
        subscriber.stop()
    finally:
        value = default.split(",")[-1].strip(" {}") if default.startswith("{ok") else "134217728"
        rabbitmq.ctl("eval", f"application:set_env(rabbit, max_message_size, {value}).")
