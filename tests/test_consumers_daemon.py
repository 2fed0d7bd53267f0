"""Named consumers through the whole daemon: the supervisor declares the configured ones at
start and again on SIGHUP, and two apps each get a message from the broker."""
from __future__ import annotations

import signal
import time

import pytest
import yaml

from flashlexd.client import connect
from tests.broker import INGRESS_TOPIC, PUBSUB_TOPIC, publish, wait_for
from tests.daemon import Daemon, NotifyListener


@pytest.fixture
def consumers_config(daemon_config):
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["app"]["consumers"] = {"display": {"filter": "ingress/#"}}
    daemon_config.write_text(yaml.safe_dump(document, sort_keys=False))
    return daemon_config


def reload_consumers(daemon, consumers_config, consumers) -> None:
    """Write `consumers` into the config and SIGHUP, returning once the reload is done."""
    document = yaml.safe_load(consumers_config.read_text())
    document["flashlex"]["app"]["consumers"] = consumers
    consumers_config.write_text(yaml.safe_dump(document, sort_keys=False))
    hup_at = time.monotonic()
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("READY=1", after=hup_at, timeout=10)


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

        reload_consumers(daemon, consumers_config, {"display": {"filter": "cmd/#"}})
        assert {c["name"]: c["filter"] for c in logger.consumers()}["display"] == "cmd/#"
        # every consumer matching it now has acked it
        wait_for(lambda: logger.status()["inbox"]["count"] == 0, 10, "the message to leave the inbox")


def test_a_reload_widening_a_filter_delivers_what_its_floor_passed(daemon, broker, consumers_config):
    """display's ack took its floor past a pubsub message (not its topic then) that logger
    holds: after a reload widening its filter to every topic it never got that message, though
    it is stored and matches (found by review)."""
    path = str(daemon.socket_path)
    with connect(path, consumer="display") as display, connect(path, consumer="logger") as logger:
        logger.messages()  # registers the dynamic consumer (every topic): it holds the message
        publish(broker, PUBSUB_TOPIC, b'{"n": 1}')
        wait_for(lambda: logger.wait(timeout=5), 15, "the pubsub message")
        publish(broker, INGRESS_TOPIC, b'{"n": 2}')
        assert display.ack(wait_for(lambda: display.wait(timeout=5), 15, "the message for display")) == 1
        assert {c["name"]: c for c in display.consumers()}["display"]["acked_through"] == 2  # past the pubsub message, unseen

        reload_consumers(daemon, consumers_config, {"display": {"filter": "#"}})
        assert [m.topic for m in display.messages()] == [PUBSUB_TOPIC]
