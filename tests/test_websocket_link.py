"""MQTT over websockets (`useWebsocket: true`) with the client certificate, on mosquitto's
websockets listener: both links carry messages, the HTTP upgrade waits for a slow path as long
as `connectDisconnectTimeout` allows without stopping the worker's heartbeat, and a port that
is not a websockets listener is said to be so."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.broker import (EGRESS_TOPIC, INGRESS_TOPIC, Broker, Certs, Proxy, Subscriber, open_store, publish,
                          write_config)
from tests.lax_broker import TlsTestBroker
from tests.test_check import run_check
from tests.test_egress import assert_delivered_in_order, fill_outbox

ROUND_TRIP = 1.5  # seconds each broker -> device read is held: a slow cellular path


@pytest.fixture
def ws_broker(certs: Certs, tmp_path: Path) -> Iterator[Broker]:
    running = Broker(certs, tmp_path / "broker", websockets=True).start()
    try:
        yield running
    finally:
        running.close()


def test_messages_flow_both_ways_over_websockets(ws_broker: Broker, tmp_path: Path, start_worker) -> None:
    config = write_config(tmp_path / "config", ws_broker, port=ws_broker.ws_port, mqtt={"useWebsocket": True})
    store = open_store(config)
    subscriber = Subscriber(ws_broker, EGRESS_TOPIC, tmp_path / "received").start()
    try:
        sent = fill_outbox(store, 50)
        ingress, egress = start_worker("ingress", config), start_worker("egress", config)
        ingress.wait_connected()
        publish(ws_broker, INGRESS_TOPIC, b"in by websocket")
        ingress.wait(lambda w: w.counters.get("stored", 0) >= 1, 15, "the message stored")
        assert [m.payload for m in store.messages(limit=5)] == [b"in by websocket"]
        assert_delivered_in_order(subscriber, sent, max_duplicates=0)
        assert ingress.stop() == 0 and egress.stop() == 0
    finally:
        store.close()


def test_the_upgrade_waits_for_a_slow_path(
        ws_broker: Broker, tmp_path: Path, start_worker) -> None:
    """The upgrade was paho's blocking one, cut at 1 s to keep the heartbeat: a path whose
    round trip is longer never connected, each attempt said "timed out after 10s"."""
    slow = Proxy(ws_broker, port=ws_broker.ws_port)
    slow.slow["down"] = ROUND_TRIP
    config = write_config(tmp_path / "config", ws_broker, port=slow.port, mqtt={
        "useWebsocket": True, "connectDisconnectTimeout": 12, "mqttOperationTimeout": 8})
    store = open_store(config)
    try:
        worker = start_worker("ingress", config)
        worker.wait_connected(timeout=40)
        publish(ws_broker, INGRESS_TOPIC, b"over a slow path")
        worker.wait(lambda w: w.counters.get("stored", 0) >= 1, 20, "the message stored")
        assert [m.payload for m in store.messages(limit=5)] == [b"over a slow path"]
        assert worker.stop() == 0
    finally:
        slow.close()
        store.close()


def test_a_port_that_is_no_websockets_listener_is_named(ws_broker: Broker, tmp_path: Path,
                                                        start_worker) -> None:
    config = write_config(tmp_path / "config", ws_broker, mqtt={"useWebsocket": True})  # the plain MQTT port
    worker = start_worker("ingress", config)
    error = worker.wait(lambda w: w.mqtt.get("error"), 15, "the failure reported")
    assert f"is port {ws_broker.port} a websockets listener? useWebsocket is true" in error, error
    assert worker.stop() == 0



def test_a_websockets_listener_given_mqtt_is_named(ws_broker: Broker, tmp_path: Path, start_worker) -> None:
    """mosquitto's websockets listener closes an MQTT CONNECT without a word, as a broker
    refusing our certificate does: the line blamed only the certificate or the client id."""
    config = write_config(tmp_path / "config", ws_broker, port=ws_broker.ws_port)
    worker = start_worker("ingress", config)
    error = worker.wait(lambda w: w.mqtt.get("error"), 15, "the failure reported")
    assert f"or port {ws_broker.ws_port} is a websockets listener: see useWebsocket" in error, error
    assert worker.stop() == 0


@pytest.mark.parametrize("websocket", [True, False])
def test_check_names_the_transport(ws_broker: Broker, tmp_path: Path, websocket: bool) -> None:
    """`flashlexd check` with the transport the other listener speaks."""
    port = ws_broker.port if websocket else ws_broker.ws_port
    config = write_config(tmp_path / "config", ws_broker, port=port, mqtt={"useWebsocket": websocket})
    result = run_check(config)
    hint = (f"is port {port} a websockets listener? useWebsocket is true" if websocket
            else f"or port {port} is a websockets listener: see useWebsocket")
    assert result.returncode == 1 and hint in result.stdout, result.stdout + result.stderr


class UpgradeAnswering(TlsTestBroker):
    """A websockets server (mutual TLS) that answers every upgrade with `answer`, or holds it
    unanswered (None) until the client closes."""

    def __init__(self, certs: Certs, answer: Optional[bytes]):
        self.answer_bytes = answer
        super().__init__(certs)

    def _serve(self, conn) -> None:
        with self.context.wrap_socket(conn, server_side=True) as tls:
            request = b""
            while b"\r\n\r\n" not in request:
                data = tls.recv(4096)
                if not data:
                    return
                request += data
            if self.answer_bytes is None:
                while tls.recv(4096):  # until the client gives up
                    pass
                return
            tls.sendall(self.answer_bytes)


@pytest.mark.parametrize("answer, said, hint", [
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
     "websocket upgrade: refused: HTTP/1.1 404 Not Found (path /mqtt)", False),
    (None, "websocket upgrade: no answer within", True)])
def test_a_refused_or_unanswered_upgrade_is_named_by_the_daemon_and_by_check(
        certs: Certs, broker: Broker, tmp_path: Path, start_worker, answer: Optional[bytes], said: str,
        hint: bool) -> None:
    """paho's own upgrade (then `check`'s) said "WebSocket handshake error" for a refused path
    as for a plain MQTT port (found by re-read); an upgrade with no answer said "connecting to
    H:P timed out", though TCP and TLS were done."""
    server = UpgradeAnswering(certs, answer)
    try:
        config = write_config(tmp_path / "config", broker, port=server.port,
                              mqtt={"useWebsocket": True, "connectDisconnectTimeout": 2})
        listener = f"is port {server.port} a websockets listener? useWebsocket is true"
        result = run_check(config)
        assert result.returncode == 1 and said in result.stdout, result.stdout
        assert (listener in result.stdout) == hint, result.stdout
        worker = start_worker("ingress", config)
        error = worker.wait(lambda w: w.mqtt.get("error"), 15, "the failure reported")
        assert said in error and (listener in error) == hint, error
        assert worker.stop() == 0
    finally:
        server.closed = True
        server.listener.close()
