"""Named consumers through the whole daemon: the supervisor declares the configured ones at
start and again on SIGHUP, and two apps each get a message from the broker."""
from __future__ import annotations

import signal
import threading
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


def start_daemon(consumers_config, workdir, name: str = "notify") -> Daemon:
    """A daemon once it said READY=1 and its ingress subscribed (READY=1 does not wait for the
    broker: a test publishing at once could publish before the thing had a subscription), its
    NotifyListener as `notify`."""
    notify = NotifyListener(workdir / f"{name}.sock")
    running = Daemon(consumers_config, workdir, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    notify.wait_for("READY=1", timeout=15)
    with connect(str(running.socket_path)) as fx:
        wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 20, "the ingress subscribed")
    running.notify = notify
    return running


@pytest.fixture
def daemon(consumers_config, tmp_path):
    running = start_daemon(consumers_config, tmp_path)
    yield running
    running.stop()
    running.notify.close()


@pytest.fixture
def restart(daemon, consumers_config, tmp_path):
    """Restarts `daemon` as `systemctl restart` does: SIGTERM, then a new daemon on the same
    socket and store (returned; stopped at the end)."""
    started = []

    def restart_now() -> Daemon:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(20) == 0
        started.append(start_daemon(consumers_config, tmp_path, f"notify-{len(started)}"))
        return started[-1]
    yield restart_now
    for running in started:
        running.stop()
        running.notify.close()


@pytest.fixture
def display_stream(daemon, broker):
    """display's stream() that yielded three messages (none acked) in a run that replayed
    display once (the daemon's count of its replays: 1)."""
    path = str(daemon.socket_path)
    for n in range(3):
        publish(broker, INGRESS_TOPIC, b'{"n": %d}' % n)
    with connect(path) as other:
        wait_for(lambda: other.status()["inbox"]["count"] == 3, 20, "three stored")
        other.reset("display", to="earliest")
    with connect(path, consumer="display") as fx:
        stream = fx.stream(timeout_per_wait=2)
        assert [next(stream).json()["n"] for _ in range(3)] == [0, 1, 2]
        yield stream


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


def test_a_stream_gets_what_a_widening_reload_delivers_to_its_consumer(daemon, broker, consumers_config):
    """README's display.py (`for msg in fx.stream(): ...; fx.ack([msg])`) across a reload widening
    its filter: README says a stored message the new filter matches is delivered to it, but the
    stream read on from its last message and never yielded it (found by review)."""
    path = str(daemon.socket_path)
    got, stop = [], threading.Event()

    def display_app() -> None:
        with connect(path, consumer="display") as fx:
            for msg in fx.stream(timeout_per_wait=1):
                got.append(msg.topic)
                fx.ack([msg])
                if stop.is_set():
                    return
    with connect(path, consumer="logger") as logger:
        logger.messages()  # a dynamic consumer of every topic: it holds the pubsub message
        publish(broker, PUBSUB_TOPIC, b'{"n": 1}')
        wait_for(lambda: logger.wait(timeout=5), 15, "the pubsub message stored")
    app = threading.Thread(target=display_app, daemon=True)
    app.start()
    publish(broker, INGRESS_TOPIC, b'{"n": 2}')
    wait_for(lambda: got == [INGRESS_TOPIC], 15, "display's message through stream()")
    reload_consumers(daemon, consumers_config, {"display": {"filter": "#"}})
    try:
        wait_for(lambda: PUBSUB_TOPIC in got, 10, "the widened filter's message through stream()")
    finally:
        stop.set()
        publish(broker, INGRESS_TOPIC, b'{"n": 3}')  # lets the app's loop end
        app.join(10)


def test_a_stream_does_not_start_over_after_a_daemon_restart(display_stream, broker, restart):
    """README's display.py across `systemctl restart`: its stream() yielded every message it had
    yielded (unacked) again, as after a replay, since the new daemon counts replays from 0
    and the stream took the count's change for one (found by review)."""
    restart()
    publish(broker, INGRESS_TOPIC, b'{"n": 3}')
    assert next(display_stream).json()["n"] == 3  # its next call reconnects and goes on
    publish(broker, INGRESS_TOPIC, b'{"n": 4}')
    assert next(display_stream).json()["n"] == 4  # each message once: not 0, 1, 2 again


def test_a_replay_on_a_restarted_daemon_before_a_streams_first_call_to_it_starts_it_over(
        display_stream, broker, restart):
    """A reset of display on the new daemon after a restart, before its stream()'s first call
    to it: the new daemon's count (1) equalled the old one's, and the stream read on past the
    replayed messages (found by review)."""
    second = restart()
    with connect(str(second.socket_path)) as other:
        other.reset("display", to="earliest")
        publish(broker, INGRESS_TOPIC, b'{"n": 3}')
        wait_for(lambda: other.status()["inbox"]["count"] == 4, 20, "the fourth stored")
    assert next(display_stream).json()["n"] == 3  # its first call: the new message, and the replay
    publish(broker, INGRESS_TOPIC, b'{"n": 4}')  # what a stream that missed the replay yields next
    assert next(display_stream).json()["n"] == 0  # from the earliest again
