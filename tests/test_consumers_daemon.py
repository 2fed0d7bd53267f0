"""Named consumers through the whole daemon: the supervisor declares the configured ones at
start and again on SIGHUP, and two apps each get a message from the broker."""
from __future__ import annotations

import signal
import time

import pytest
import yaml

from flashlexd.client import connect
from tests.broker import INGRESS_TOPIC, publish, wait_for
from tests.daemon import Daemon, NotifyListener


@pytest.fixture
def consumers_config(daemon_config):
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["app"]["consumers"] = {"display": {"filter": "ingress/#"}}
    daemon_config.write_text(yaml.safe_dump(document, sort_keys=False))
    return daemon_config


@pytest.fixture
def daemon(consumers_config, tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    running = Daemon(consumers_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    notify.wait_for("READY=1", timeout=15)
    running.notify = notify
    yield running
    running.stop()
    notify.close()


def test_two_apps_get_a_message_and_a_reload_declares_consumers(daemon, broker, consumers_config):
    path = str(daemon.socket_path)
    with connect(path, consumer="display") as display, connect(path, consumer="logger") as logger:
        assert [c["name"] for c in display.consumers()] == ["display"]  # declared at start
        logger.messages()  # registers the dynamic consumer
        publish(broker, INGRESS_TOPIC, b'{"temp": 21.5}')
        seen = wait_for(lambda: display.wait(timeout=5), 15, "the message for display")
        assert [m.json() for m in logger.wait(timeout=5)] == [{"temp": 21.5}]
        display.ack(seen)
        assert logger.status()["inbox"]["count"] == 1  # logger has not acked it
        logger.ack(logger.messages())
        assert logger.status()["inbox"]["count"] == 0

        document = yaml.safe_load(consumers_config.read_text())
        document["flashlex"]["app"]["consumers"] = {"actuator": {"filter": "cmd/#", "maxBacklog": 5}}
        consumers_config.write_text(yaml.safe_dump(document, sort_keys=False))
        hup_at = time.monotonic()
        daemon.signal(signal.SIGHUP)
        daemon.notify.wait_for("READY=1", after=hup_at, timeout=10)
        listed = {c["name"]: c for c in display.consumers()}
    assert listed["actuator"]["filter"] == "cmd/#" and listed["actuator"]["max_backlog"] == 5
    assert not listed["actuator"]["dynamic"] and listed["display"]["dynamic"] and listed["logger"]["dynamic"]


def test_a_reload_narrowing_a_filter_releases_what_the_others_acked(daemon, broker, consumers_config):
    """display held a message its new filter no longer matches, and logger (the only consumer
    matching it now) had acked it: after the reload it leaves the inbox, as an ack would make it."""
    path = str(daemon.socket_path)
    with connect(path, consumer="logger") as logger:
        logger.messages()  # registers the dynamic consumer (every topic)
        publish(broker, INGRESS_TOPIC, b'{"temp": 21.5}')
        seen = wait_for(lambda: logger.wait(timeout=5), 15, "the message for logger")
        assert logger.ack(seen) == 1
        assert logger.status()["inbox"]["count"] == 1  # display has not acked it

        document = yaml.safe_load(consumers_config.read_text())
        document["flashlex"]["app"]["consumers"] = {"display": {"filter": "cmd/#"}}
        consumers_config.write_text(yaml.safe_dump(document, sort_keys=False))
        hup_at = time.monotonic()
        daemon.signal(signal.SIGHUP)
        daemon.notify.wait_for("READY=1", after=hup_at, timeout=10)
        assert {c["name"]: c["filter"] for c in logger.consumers()}["display"] == "cmd/#"
        # every consumer matching it now has acked it
        wait_for(lambda: logger.status()["inbox"]["count"] == 0, 10, "the message to leave the inbox")
