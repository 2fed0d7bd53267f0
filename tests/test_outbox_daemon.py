"""Outbox management through the whole daemon (supervisor, real workers, real TLS mosquitto):
publish refusals with the default limits, dead letters made in a stopped daemon's store and then
listed, retried (delivered at the tail) and dropped through the API and flashlexctl, and
`status` numbers that agree with each other."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import yaml

from flashlexd.client import RpcError, connect
from flashlexd.client.wire import Code
from tests.broker import EGRESS_TOPIC, INGRESS_TOPIC, PUBSUB_TOPIC, Subscriber, open_store, publish, wait_for
from tests.daemon import Daemon, NotifyListener

FLASHLEXCTL = str(Path(sys.executable).parent / "flashlexctl")


class Running:
    """The daemon started and stopped (by PID) as often as a test needs, one at a time."""

    def __init__(self, config: Path, workdir: Path):
        self.config, self.workdir = config, workdir
        self.notify = NotifyListener(workdir / "notify.sock")
        self.daemon = Daemon(config, workdir, env={"NOTIFY_SOCKET": str(self.notify.path)})

    def start(self) -> Daemon:
        self.daemon = Daemon(self.config, self.workdir, env={"NOTIFY_SOCKET": str(self.notify.path)})
        since = time.monotonic()
        self.daemon.start()
        self.notify.wait_for("READY=1", timeout=15, after=since)
        return self.daemon

    def ctl(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([FLASHLEXCTL, "--socket", str(self.daemon.socket_path), *argv],
                              capture_output=True, text=True, timeout=30)

    def close(self) -> None:
        self.daemon.stop()
        self.notify.close()


@pytest.fixture
def running(daemon_config, tmp_path):
    handle = Running(daemon_config, tmp_path)
    yield handle
    handle.close()


def egress_connected(fx) -> bool:
    return bool(fx.status()["mqtt"]["egress"].get("connected"))


def test_publish_refuses_what_no_broker_takes_with_the_default_limits(running, broker, tmp_path):
    subscriber = Subscriber(broker, "#", tmp_path / "received", fmt="%t %p").start()
    daemon = running.start()
    try:
        with connect(str(daemon.socket_path)) as fx:
            for topic, rule in (("dev/a\nb", "control character U+000A"), ("dev/\uffff", "U+FFFF"),
                                ("dev/+", "wildcard"), ("d" * 257, "over maxTopicBytes (256)")):
                with pytest.raises(RpcError) as info:
                    fx.publish(b"x", topic=topic)
                assert info.value.code == Code.BAD_PARAMS and rule in info.value.message
            with pytest.raises(RpcError) as info:
                fx.publish(b"x" * 131073)
            assert info.value.code == Code.PAYLOAD_TOO_LARGE and "(131072)" in info.value.message
            refused = running.ctl("publish", "--topic", "dev/a\x7fb", "x")
            assert refused.returncode == 1 and "U+007F" in refused.stderr
            assert fx.status()["counters"]["queued"] == 0  # nothing of the refused ones
            fx.publish(b"y" * 131072, topic="d" * 256)  # the limits themselves pass
            wait_for(lambda: subscriber.lines(), 20, "the largest allowed publish at the broker")
            assert subscriber.lines() == [b"d" * 256 + b" " + b"y" * 131072]
    finally:
        subscriber.stop()


def _make_dead_letters(config: Path) -> List[int]:
    """In the stopped daemon's store: good, poison, poison, good; the poisons dead-lettered as
    the egress worker would. Returns the dead letters' ids."""
    store = open_store(config)
    try:
        ids = store.outbox_append([(EGRESS_TOPIC, payload, 1, False)
                                   for payload in (b"good-1", b"poison-1", b"poison-2", b"good-2")])
        for entry_id in ids[1:3]:
            assert store.outbox_dead_letter(entry_id, "link dropped 3 times with it alone in flight", 3)
        return ids[1:3]
    finally:
        store.close()


def test_dead_letters_are_listed_retried_to_the_tail_and_dropped(running, broker, daemon_config,
                                                                 tmp_path):
    subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
    try:
        daemon = running.start()
        with connect(str(daemon.socket_path)) as fx:
            fx.publish(b"before")
            wait_for(lambda: subscriber.lines() == [b"before"], 20, "the first run's publish")
            wait_for(lambda: fx.outbox()["count"] == 0, 10, "the outbox to empty")
        daemon.stop()

        poison_1, poison_2 = _make_dead_letters(daemon_config)
        daemon = running.start()
        with connect(str(daemon.socket_path)) as fx:
            wait_for(lambda: subscriber.lines() == [b"before", b"good-1", b"good-2"], 20,
                     "the good entries, past the dead letters")
            dead = fx.outbox(dead=True)["entries"]
            assert [(e.id, e.payload, e.attempts) for e in dead] == [
                (poison_1, b"poison-1", 3), (poison_2, b"poison-2", 3)]
            assert fx.status()["outbox"]["dead"] == 2
            listed = running.ctl("outbox", "--dead")
            assert listed.returncode == 0 and "link dropped 3 times" in listed.stdout
            status = running.ctl("status")
            assert status.returncode == 1 and "degraded: 2 dead letters" in status.stdout
            wait_for(lambda: any(f.startswith("STATUS=") and "outbox 0 (2 dead letters)" in f
                                 for _, f in running.notify.lines()), 5, "STATUS= naming them")

            new_ids = fx.retry([poison_1])
            assert new_ids[0] > poison_2
            wait_for(lambda: subscriber.lines()[3:] == [b"poison-1"], 20, "the retried entry, at the tail")
            dropped = running.ctl("outbox", "drop", "--dead", str(poison_2))
            assert dropped.returncode == 0 and dropped.stdout == "dropped 1 of 1 dead letters\n"
            wait_for(lambda: fx.outbox()["count"] == 0, 10, "the outbox to empty")
            assert fx.status()["outbox"]["dead"] == 0 and running.ctl("status").returncode == 0
            assert subscriber.lines() == [b"before", b"good-1", b"good-2", b"poison-1"]
    finally:
        subscriber.stop()


def test_status_says_connected_with_the_subscriptions_granted(running, daemon_config):
    """README: the ingress reports itself connected only once the broker granted its
    subscriptions, which `subscriptions` lists; `status` took "connected" from the report and the
    list from the next heartbeat, so a script reading it at "connected" got [] (found by review)."""
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["app"]["supervisor"].update(heartbeatSeconds=10, heartbeatTimeoutSeconds=30)
    daemon_config.write_text(yaml.safe_dump(document, sort_keys=False))
    daemon = running.start()
    with connect(str(daemon.socket_path)) as fx:
        seen: List[dict] = []
        wait_for(lambda: seen.append(fx.status()["mqtt"]["ingress"]) or seen[-1].get("connected"), 15,
                 "ingress connected")
        assert [topic for topic, _qos in seen[-1]["subscriptions"]] == [INGRESS_TOPIC, PUBSUB_TOPIC], seen[-1]


def test_status_worker_counters_keep_up_with_the_store_totals(running, broker, daemon_config):
    """Heartbeats every 10 s: the ingress worker's counters must still reach `status` as soon
    as they change, or they contradict the store's totals shown below them."""
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["app"]["supervisor"].update(heartbeatSeconds=10, heartbeatTimeoutSeconds=30)
    daemon_config.write_text(yaml.safe_dump(document, sort_keys=False))
    daemon = running.start()
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 15, "ingress connected")
        for n in range(3):
            publish(broker, INGRESS_TOPIC, b"m%d" % n)
        wait_for(lambda: fx.status()["counters"]["received"] == 3, 15, "3 messages stored")
        wait_for(lambda: fx.status()["mqtt"]["ingress"].get("stored") == 3, 1.0,
                 "the ingress counters in status (well before the next heartbeat)")
    shown = running.ctl("status").stdout
    assert "(since the worker started: received 3, stored 3," in shown
    assert "totals    received 3," in shown and "window_s" not in shown
