"""Poison entries under load: an application keeps publishing through the client API while
entries the broker will not take (payloads over mosquitto's max_packet_size, which closes the
connection, as AWS IoT Core does over 128 KB) are published at random moments. Every good entry
must reach the subscriber, every poison one must end in the dead letters, nothing is lost or
left in the outbox."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List

import pytest

from flashlexd.client import connect
from tests.broker import EGRESS_TOPIC, Broker, Certs, Subscriber, open_store
from tests.chaos.conftest import (Daemons, OutboxFeeder, chaos_config, chaos_timeout,
                                  eventually, rng, scale, tally)
from tests.chaos.results import Result

MAX_PACKET = 10_000


@pytest.fixture
def strict_broker(certs: Certs, tmp_path: Path) -> Iterator[Broker]:
    running = Broker(certs, tmp_path / "broker", extra=[f"max_packet_size {MAX_PACKET}"]).start()
    yield running
    running.close()


@chaos_timeout(150, 900)
def test_poison_entries_under_load(strict_broker: Broker, tmp_path: Path, daemons: Daemons) -> None:
    poisons = scale(3, 20)
    good = scale(1500, 20_000)
    random = rng("poison entries")
    result = Result("poison entries")
    # MQTT 3.1.1: the poison search; under MQTT 5 `publish` refuses an entry over the broker's
    # Maximum Packet Size at the door (tests/test_mqtt5_api.py, tests/test_poison_entries.py)
    config = chaos_config(strict_broker, tmp_path / "etc", mqtt={"protocol": "3.1.1"})
    store = open_store(config)
    subscriber = Subscriber(strict_broker, EGRESS_TOPIC, tmp_path / "received").start()
    daemon = daemons.start(config)
    feeder = OutboxFeeder(daemon.socket_path, prefix="good", count=good)
    feeder.start()
    poison_ids: List[int] = []
    with connect(str(daemon.socket_path)) as app:
        for number in range(poisons):
            target = (number + random.random()) * good / poisons
            eventually(lambda: feeder.progress >= target or not feeder.is_alive(), 120)
            payload = f"poison-{number}-".encode().ljust(MAX_PACKET + 1 + random.randrange(5000), b"p")
            poison_ids.append(app.publish(payload))
    feeder.join(scale(120, 800))
    feeder.stop()
    drained = eventually(lambda: store.outbox_count() == 0, scale(90, 600))
    sent = [payload for payload, _ in feeder.returned]
    eventually(lambda: set(sent) <= set(subscriber.lines()), 30)
    received = [line for line in subscriber.lines() if line.startswith(b"good-")]
    figures = tally(sent, received)
    dead = store.dead_letters(limit=1000)
    result.set(good=len(sent), poison=poisons, received=len(set(received)), lost=figures["lost"],
               duplicated=figures["duplicated"], out_of_order=figures["out_of_order"],
               dead_lettered=len(dead), outbox_left=store.outbox_count())
    line = result.emit()
    assert drained and figures["lost"] == 0 and figures["unknown"] == 0, line
    assert figures["out_of_order"] == 0, line
    assert sorted(d.id for d in dead) == sorted(poison_ids), line
    assert all(d.attempts == 3 and d.payload.startswith(b"poison-") for d in dead), line
    assert not any(line.startswith(b"poison-") for line in subscriber.lines()), line
    subscriber.stop()
    store.close()
