"""A device moved to another broker (thing.endpoint changed: a reload restarts the workers with
the new config, as here) and back: what the ingress remembers of its session is the old
broker's, and must not be held against the new one. Two mosquitto brokers with one CA, reached
under two names of their certificate (A as 127.0.0.1, B as localhost): a port alone does not
make another broker (`Thing.broker_identity`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

import pytest
import yaml

from flashlexd.config import load
from tests.broker import INGRESS_TOPIC, HOST, THING, Broker, Certs, Proxy, open_store, publish, wait_for, write_config


@pytest.fixture
def two(certs: Certs, tmp_path: Path) -> Iterator[Tuple[Broker, Broker]]:
    first, second = Broker(certs, tmp_path / "broker-a").start(), Broker(certs, tmp_path / "broker-b").start()
    yield first, second
    second.close()
    first.close()


A, B = HOST, "localhost"  # both in the test server certificate; localhost resolves to HOST


def move(config: Path, endpoint: Optional[str] = None, port: Optional[int] = None) -> None:
    """The device's config now names the broker `endpoint` on `port` (same CA; None: as was)."""
    document = yaml.safe_load(config.read_text())
    if endpoint is not None:
        document["flashlex"]["thing"]["endpoint"] = endpoint
    if port is not None:
        document["flashlex"]["thing"]["mqtt"]["port"] = port
    config.write_text(yaml.safe_dump(document, sort_keys=False))


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_dup_marks_of_one_broker_never_drop_another_brokers_message(
        two: Tuple[Broker, Broker], tmp_path: Path, start_worker, protocol: str) -> None:
    """Found by review: A's mark of an unconfirmed "on" was kept when B (which held our session)
    took over, and B's own "on", its first transmission lost, came as a DUP and was dropped."""
    a, b = two
    via_a, via_b = Proxy(a), Proxy(b)
    config = write_config(tmp_path / "config", a, endpoint=B, port=via_b.port, mqtt={"protocol": protocol})
    store = open_store(config)
    try:
        on_b = start_worker("ingress", config)
        on_b.wait_connected()  # B holds a session for us from now on
        assert on_b.stop() == 0
        move(config, A, via_a.port)
        back = a_mark_on_a_then_a_dup_from_b(
            (a, via_a), (b, via_b), lambda: start_worker("ingress", config),
            lambda: move(config, B, via_b.port) or start_worker("ingress", config))
        assert (back.counters["stored"], back.counters["duplicates"]) == (1, 0)
        assert store.inbox_count() == 2
        assert back.stop() == 0
    finally:
        via_a.close()
        via_b.close()
        store.close()


def a_mark_on_a_then_a_dup_from_b(a: Tuple[Broker, Proxy], b: Tuple[Broker, Proxy],
                                  on_a: Callable[[], Any], moved_to_b: Callable[[], Any]) -> Any:
    """A's "on" stored with our PUBACK lost (its DUP mark unconfirmed), the worker killed; then
    on B (`moved_to_b` edits the config and starts the worker) B's own "on", its first
    transmission lost, comes again as a DUP. Returns B's worker, once it has had it."""
    (broker_a, via_a), (broker_b, via_b) = a, b
    first = on_a()
    first.wait_connected()
    via_a.swallow("up")  # A never gets our PUBACK: the mark of "on" stays unconfirmed
    publish(broker_a, INGRESS_TOPIC, b"on")
    first.wait(lambda w: w.counters.get("stored") == 1, 15, "A's on stored")
    first.kill()
    back = moved_to_b()
    back.wait_connected()
    via_b.swallow("down")
    publish(broker_b, INGRESS_TOPIC, b"on")  # B's own "on", its first transmission lost
    wait_for(lambda: via_b.swallowed["down"], 10, "B's on sent and lost")
    via_b.cut()  # the next link gets it again, DUP=1
    back.wait(lambda w: w.counters.get("stored", 0) + w.counters.get("duplicates", 0) >= 1, 20, "B's on again")
    return back


def moved_lines(log: str) -> list:
    return [line for line in log.splitlines() if "stay there until the device goes back" in line]


def test_a_move_to_another_broker_is_not_a_lost_session(two: Tuple[Broker, Broker], tmp_path: Path,
                                                        start_worker) -> None:
    """Found by review: each move logged "the broker ... lost the session" and counted it in
    `sessions_lost`; the old broker still holds it. What it queued stays there: said once."""
    a, b = two
    config = write_config(tmp_path / "config", a)
    client_id = load(str(config)).thing.mqtt.client_id
    first = start_worker("ingress", config)
    first.wait_connected()
    assert first.stop() == 0
    move(config, B, b.port)
    on_b = start_worker("ingress", config)
    on_b.wait_connected()
    assert on_b.counters["sessions_lost"] == 0 and "lost the session" not in on_b.log_text()
    said = moved_lines(on_b.log_text())
    assert len(said) == 1 and f"its last link was to {A} (thing.endpoint changed): if it is another broker," \
        f" the messages it queued for client id {client_id!r} stay there" in said[0], said
    assert on_b.stop() == 0
    b.restart(kill=True)  # never saved: B lost the session it held for us, that is said
    again = start_worker("ingress", config)
    again.wait(lambda w: w.counters.get("sessions_lost") == 1 and w.mqtt.get("connected"), 20,
               "the session lost on B said")
    assert again.log_text().count("lost the session") == 1 and len(moved_lines(again.log_text())) == 1
    assert again.stop() == 0


def test_a_fallback_to_3_1_1_stays_with_its_broker(rabbitmq, broker: Broker, tmp_path: Path,
                                                   start_worker) -> None:
    """Found by review: the fallback remembered per client id followed a move to a broker that
    speaks MQTT 5 (3.1.1 there until the daemon restarted). Per broker: a move probes again,
    and a move back to the 3.1.1 broker starts on 3.1.1 at once."""
    rabbitmq.forget([THING])
    config = write_config(tmp_path / "config", rabbitmq, endpoint=B, mqtt={"protocol": "auto"})
    first = start_worker("ingress", config)
    first.wait(lambda w: w.counters.get("protocol") == "3.1.1", 20, "connected after the fallback")
    first.kill()
    move(config, A, broker.port)
    moved = start_worker("ingress", config)
    moved.wait(lambda w: w.counters.get("protocol"), 20, "connected to mosquitto")
    assert moved.counters["protocol"] == "5"
    moved.kill()
    move(config, B, rabbitmq.port)
    back = start_worker("ingress", config)
    back.wait(lambda w: w.counters.get("protocol"), 20, "connected to RabbitMQ again")
    assert back.counters["protocol"] == "3.1.1" and back.log_text().count("does not speak MQTT 5") == 1
    back.kill()
