"""The local API through the whole daemon: supervisor, real workers, real TLS broker."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashlexd.client import connect
from tests.broker import EGRESS_TOPIC, INGRESS_TOPIC, Subscriber, publish
from tests.daemon import Daemon, NotifyListener
from tests.broker import wait_for

FLASHLEXCTL = str(Path(sys.executable).parent / "flashlexctl")


@pytest.fixture
def daemon(daemon_config, tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    running = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    notify.wait_for("READY=1", timeout=15)
    yield running
    running.stop()
    notify.close()


def connected(fx) -> bool:
    mqtt = fx.status()["mqtt"]
    return mqtt["ingress"].get("connected") and mqtt["egress"].get("connected")


def test_a_message_from_the_cloud_reaches_wait_and_ack_removes_it(daemon, broker):
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: connected(fx), 15, "both MQTT connections")
        publish(broker, INGRESS_TOPIC, b'{"temp": 21.5}')
        batch = wait_for(lambda: fx.wait(timeout=5), 15, "the message through wait()")
        assert [m.json() for m in batch] == [{"temp": 21.5}]
        assert batch[0].topic == INGRESS_TOPIC and batch[0].qos == 1
        assert fx.ack([m.pk for m in batch]) == 1
        assert fx.ack([m.pk for m in batch]) == 0  # idempotent
        assert fx.messages() == []
        status = fx.status()
        assert status["inbox"]["count"] == 0
        assert {w["name"] for w in status["workers"]} == {"ingress", "egress", "expiry"}
        assert set(status["rates"]) >= {"ingest_per_s", "drain_per_s"}
        assert status["counters"]["received"] == 1 and status["counters"]["acked"] == 1
        # the store's commits, summed over the daemon's processes (flashlexd/wear.py)
        store = wait_for(lambda: (lambda s: s if (s["written_bytes"] or 0) > 0 else None)(
            fx.status()["store"]), 10, "bytes written sampled")
        assert store["written_per_message"] is None or store["written_per_message"] > 0


def test_publish_reaches_an_independent_subscriber(daemon, broker, tmp_path):
    subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
    try:
        with connect(str(daemon.socket_path)) as fx:
            outbox_id = fx.publish({"temp": 22})
            assert isinstance(outbox_id, int)
            wait_for(lambda: subscriber.lines(), 20, "the subscriber to receive it")
            assert [json.loads(line) for line in subscriber.lines()] == [{"temp": 22}]
            wait_for(lambda: fx.outbox()["count"] == 0, 10, "the outbox to empty")
    finally:
        subscriber.stop()


def test_flashlexctl_status_is_zero_when_healthy_and_two_when_not_running(daemon, tmp_path):
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: connected(fx), 15, "both MQTT connections")
    healthy = subprocess.run([FLASHLEXCTL, "--socket", str(daemon.socket_path), "status"],
                             capture_output=True, text=True, timeout=30)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "ingress" in healthy.stdout
    missing = subprocess.run([FLASHLEXCTL, "--socket", str(tmp_path / "none.sock"), "status"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
