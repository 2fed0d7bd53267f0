"""`settle_ingress`, the barrier that ends the chaos scenarios: it waits as long as a backlog is
still being stored, and fails only when nothing is stored for its `stall` seconds.

It used to wait a fixed 30 s: a full-size power-cut run on RabbitMQ leaves ~170,000 messages
queued for the daemon, over a minute of draining, and failed there with the daemon healthy (the
marker was stored, last, 74 s after the publisher stopped).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.broker import INGRESS_TOPIC, Broker, Certs, open_store, publish_lines, write_lines
from tests.chaos.conftest import Daemons, chaos_config, inbox_payloads, settle_ingress

STALL = 2.0  # seconds without a message stored that count as a stall here
COMMIT_MS = 100  # ingestCommitMs: with one message in flight (slow_broker), one commit per window
BACKLOG = 50  # so at least 5 s of draining, on any machine, and a commit every 0.1 s


@pytest.fixture
def slow_broker(certs: Certs, tmp_path: Path) -> Iterator[Broker]:
    """mosquitto sending one message at a time (in-flight window 1): the daemon's batch never
    fills, so each message waits out its commit window, a steady drain of ~10 a second."""
    running = Broker(certs, tmp_path / "broker", extra=["max_inflight_messages 1"]).start()
    yield running
    running.close()


def test_settle_waits_while_a_backlog_drains(slow_broker: Broker, tmp_path: Path,
                                             daemons: Daemons) -> None:
    """A backlog queued while the daemon was down takes longer than `stall` to drain: the
    marker, behind it, is waited for, and every message of the backlog is stored before it."""
    broker = slow_broker
    config = chaos_config(broker, tmp_path / "etc", db={"ingestCommitMs": COMMIT_MS})
    store = open_store(config)
    daemons.start(config).stop()  # the session and its subscription stay at the broker
    sent = write_lines(tmp_path / "backlog", BACKLOG)
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "backlog").wait(60) == 0
    daemons.start(config)
    waited = settle_ingress(broker, store, stall=STALL)
    assert waited > STALL, f"the backlog drained in {waited:.1f}s: too small to test the wait"
    assert inbox_payloads(store) == sent


def test_settle_fails_when_nothing_is_stored(broker: Broker, tmp_path: Path,
                                            daemons: Daemons) -> None:
    """The daemon's session is at the broker but nothing takes the marker: the wait fails
    after `stall` seconds and says nothing was stored."""
    config = chaos_config(broker, tmp_path / "etc")
    store = open_store(config)
    daemons.start(config).stop()
    with pytest.raises(AssertionError, match=f"nothing stored for {STALL:g}s"):
        settle_ingress(broker, store, stall=STALL)
