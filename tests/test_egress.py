"""The egress worker as a real process: the outbox drains to an independent subscriber
(mosquitto_sub, persistent session), every entry at least once and in order, and an entry
leaves the outbox only after the broker acknowledged it."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from flashlexd.config import load
from flashlexd.client.ctlview import health
from flashlexd.store import Store
from flashlexd.workers.egress import OUTBOX_RECHECK
from tests.broker import (BROKER_INFLIGHT, EGRESS_TOPIC, Broker, Proxy, Subscriber, open_store, wait_for,
                          write_config)
from tests.tmpfs import mounted_ext4, read_only


def fill_outbox(store: Store, count: int, start: int = 0, qos: int = 1) -> List[bytes]:
    payloads = [f"{i:06d}".encode() for i in range(start, start + count)]
    for at in range(0, count, 1000):
        store.outbox_append([(EGRESS_TOPIC, p, qos, False) for p in payloads[at:at + 1000]])
    return payloads


def assert_delivered_in_order(subscriber: Subscriber, sent: List[bytes], max_duplicates: int) -> None:
    try:
        wait_for(lambda: set(subscriber.lines()) >= set(sent), 30, "every entry at the subscriber")
    except AssertionError as exc:  # say what is missing, and whether the subscriber still runs
        got = set(subscriber.lines())
        missing = [i for i, p in enumerate(sent) if p not in got]
        alive = subscriber.process is not None and subscriber.process.poll() is None
        raise AssertionError(f"{exc}: {len(missing)} of {len(sent)} missing (sent positions"
                             f" {missing[:3]}...{missing[-3:]}), mosquitto_sub"
                             f" {'running' if alive else 'exited'}") from None
    received = subscriber.lines()
    assert list(dict.fromkeys(received)) == sent  # at least once; first copies in order
    assert len(received) - len(sent) <= max_duplicates


def test_outbox_drains_through_a_broker_restart(broker: Broker, tmp_path: Path, start_worker) -> None:
    config = write_config(tmp_path / "config", broker)
    store = open_store(config)
    subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
    sent = fill_outbox(store, 10_000)
    worker = start_worker("egress", config)
    wait_for(lambda: store.outbox_count() <= 7_000, 30, "the drain under way")
    broker.restart()  # clean stop: the broker keeps the subscriber's session and queue
    # mosquitto_sub was once seen (CI, 2 tests at a time) not to get every entry after the
    # restart although the outbox emptied; how, its output did not tell. It is started again
    # here, same id, so its session and queue come back whatever its own reconnect does; a loss
    # by the egress would still show as entries missing.
    subscriber.stop()
    subscriber.start()
    wait_for(lambda: store.outbox_count() == 0, 60, "the outbox empty")
    assert_delivered_in_order(subscriber, sent, max_duplicates=500)
    worker.wait(lambda w: w.counters.get("outbox_backlog") == 0 and w.counters.get("inflight") == 0
                and sum(1 for m in w.reports("mqtt") if m["connected"]) == 2, 10, "idle, reconnected")
    assert worker.stop() == 0
    subscriber.stop()


def test_outbox_drains_through_worker_kills(broker: Broker, tmp_path: Path, start_worker) -> None:
    config = write_config(tmp_path / "config", broker)
    store = open_store(config)
    subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
    sent = fill_outbox(store, 10_000)
    worker = start_worker("egress", config)
    for threshold in (8_000, 5_000, 2_000):
        wait_for(lambda: store.outbox_count() <= threshold, 30, f"{threshold} entries left")
        worker.kill()  # SIGKILL: acknowledged-but-not-deleted entries go out again
        worker = start_worker("egress", config)
    wait_for(lambda: store.outbox_count() == 0, 60, "the outbox empty")
    assert_delivered_in_order(subscriber, sent, max_duplicates=3 * 2 * 100)
    assert worker.stop() == 0
    subscriber.stop()


def test_qos0_entries_are_never_delivered_twice_through_worker_kills(broker: Broker, tmp_path: Path,
                                                                     start_worker) -> None:
    """README: a qos=0 entry is at most once, "deleted once it is handed to the connection". It
    was deleted in a later transaction: a SIGKILL in between sent it again from the next
    worker (found by review). Sized like the QoS 1 kill test above; the rate spreads the kills
    over the drain (about 3 s)."""
    config = write_config(tmp_path / "config", broker, mqtt={"publishRatePerSecond": 2000})
    store = open_store(config)
    subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
    sent = fill_outbox(store, 6_000, qos=0)
    worker = start_worker("egress", config)
    for threshold in (4_500, 3_000, 1_500):
        wait_for(lambda: store.outbox_count() <= threshold, 30, f"{threshold} entries left")
        worker.kill()  # SIGKILL
        worker = start_worker("egress", config)
    wait_for(lambda: store.outbox_count() == 0, 30, "the outbox empty")
    store.outbox_append([(EGRESS_TOPIC, b"end", 1, False)])  # in order behind every entry
    wait_for(lambda: b"end" in subscriber.lines(), 30, "the last entry at the subscriber")
    received = subscriber.lines()[:-1]
    assert len(received) == len(set(received)), f"{len(received) - len(set(received))} delivered twice"
    assert len(received) >= len(sent) - 3 * 100  # a kill loses at most what paho held: a window
    assert worker.stop() == 0
    subscriber.stop()


@pytest.mark.parametrize("protocol,window", [("5", BROKER_INFLIGHT), ("3.1.1", 50)])
def test_nothing_leaves_the_outbox_without_its_puback(broker: Broker, tmp_path: Path, start_worker,
                                                      protocol: str, window: int) -> None:
    """The window is maxInflight, bounded under MQTT 5 by the broker's Receive Maximum (mosquitto
    sends its max_inflight_messages)."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port,
                          mqtt={"maxInflight": 50, "protocol": protocol})
    store = open_store(config)
    subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
    worker = start_worker("egress", config)
    worker.wait_connected()
    proxy.swallow("down")  # PUBACKs from now on never reach the worker
    sent = fill_outbox(store, 500)
    worker.send("outbox")
    worker.wait(lambda w: w.counters.get("inflight") == window, 10, "a full window in flight")
    wait_for(lambda: len(subscriber.lines()) >= window, 10, "the broker got them")
    assert store.outbox_count() == 500 and worker.counters["sent"] == 0
    proxy.cut()  # reconnect: paho resends the unacknowledged window, then the rest follows
    wait_for(lambda: store.outbox_count() == 0, 30, "the outbox empty")
    assert_delivered_in_order(subscriber, sent, max_duplicates=window)
    assert worker.stop() == 0
    subscriber.stop()
    proxy.close()


def test_a_wake_up_sends_at_once_and_the_outbox_is_rechecked_without_one(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
    config = write_config(tmp_path / "config", broker)
    store = open_store(config)
    worker = start_worker("egress", config)
    worker.wait(lambda w: w.mqtt.get("connected") and "outbox_backlog" in w.counters, 10, "idle")
    for name, wake, within in (("woken", True, OUTBOX_RECHECK / 4), ("polled", False, OUTBOX_RECHECK + 2)):
        store.outbox_append([(EGRESS_TOPIC, name.encode(), 1, False)])
        queued = time.monotonic()
        if wake:
            worker.send("outbox")
        wait_for(lambda: store.outbox_count() == 0, within + 3, f"{name} entry sent")
        assert time.monotonic() - queued < within, name
    assert worker.stop() == 0
    wait_for(lambda: subscriber.lines() == [b"woken", b"polled"], 10, "both at the subscriber")
    subscriber.stop()


def test_entries_keep_their_topic_qos_and_retain(broker: Broker, tmp_path: Path, start_worker) -> None:
    config = write_config(tmp_path / "config", broker)
    store = open_store(config)
    subscriber = Subscriber(broker, "flashlex/#", tmp_path / "received", fmt="%t %q %r %p").start()
    store.outbox_append([("flashlex/a", b"one", 1, False), ("flashlex/b", b"two", 0, False),
                         ("flashlex/+", b"a wildcard topic cannot be published", 1, False),
                         ("flashlex/c", b"kept", 1, True), ("flashlex/a", b"\x00binary\xff", 1, False),
                         ("flashlex/#", b"nor at QoS 0", 0, False)])
    worker = start_worker("egress", config)
    wait_for(lambda: store.outbox_count() == 0, 10, "the outbox empty")
    wait_for(lambda: len(subscriber.lines()) == 4, 10, "four messages")
    assert subscriber.lines() == [b"flashlex/a 1 0 one", b"flashlex/b 0 0 two", b"flashlex/c 1 0 kept",
                                  b"flashlex/a 1 0 \x00binary\xff"]
    worker.wait(lambda w: w.counters.get("invalid") == 2 and w.counters.get("sent") == 4, 10, "counted")
    # never deleted unseen: kept for an operator to see and drop; a QoS 0 entry too, although
    # it leaves the store before paho gets it (a review found it deleted, and counted as sent)
    dead, dead0 = store.dead_letters()
    assert dead.topic == "flashlex/+" and dead.reason.startswith("not publishable")
    assert dead0.topic == "flashlex/#" and dead0.reason.startswith("not publishable")
    assert store.stats()["sent"] == 4
    retained = subprocess.run(["mosquitto_sub", *broker.client_args(), "-t", "flashlex/c", "-C", "1",
                               "-F", "%r %p", "-W", "5"], capture_output=True, timeout=10)
    assert retained.stdout == b"1 kept\n"
    assert "(topic flashlex/+, 46 bytes with its topic) moved to the dead letters" in worker.log_text()
    subscriber.stop()


def test_a_graceful_stop_reads_the_pubacks_in_flight_before_it_disconnects(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """A reload that restarts the egress, or `systemctl restart`: the stop sent DISCONNECT
    without reading the PUBACKs of what was in flight, so those entries stayed in the outbox
    and the next worker sent them all again (found by review: 19 duplicates of 20 behind a
    0.5 s return path). Duplicates are for crashes and outages only."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port)
    store = open_store(config)
    worker = start_worker("egress", config)
    worker.wait_connected()
    proxy.slow["down"] = 0.5  # a slow return path: the PUBACKs come half a second late
    fill_outbox(store, 20)
    worker.send("outbox")
    worker.wait(lambda w: w.counters.get("inflight", 0) > 0, 5, "entries in flight")
    assert worker.stop() == 0
    assert store.outbox_count() == 0, "entries whose PUBACK was on its way stayed, to be sent again"
    proxy.close()


def test_sent_counts_only_the_entries_the_egress_removed(broker: Broker, tmp_path: Path,
                                                        start_worker) -> None:
    """An entry an operator drops (`flashlexctl outbox drop`) while its PUBACK is on the way is
    `outbox_dropped` in the store's totals; the worker's `sent` counted it as well."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port)
    store = open_store(config)
    worker = start_worker("egress", config)
    worker.wait_connected()
    proxy.slow["down"] = 2.0
    [entry, kept] = store.outbox_append([(EGRESS_TOPIC, b"dropped in flight", 1, False),
                                         (EGRESS_TOPIC, b"sent", 1, False)])
    worker.send("outbox")
    worker.wait(lambda w: w.counters.get("inflight") == 2, 5, "both in flight")
    assert store.outbox_drop([entry]) == 1
    worker.wait(lambda w: w.counters.get("inflight") == 0 and w.counters.get("outbox_backlog") == 0, 10,
                "the PUBACKs read, the sent entry removed")  # `sent` is counted in the same step
    assert store.stats()["sent"] == 1 and store.stats()["outbox_dropped"] == 1
    assert worker.counters["sent"] == 1
    assert worker.stop() == 0
    proxy.close()


def test_an_offline_backlog_keeps_its_rate_across_a_graceful_egress_restart(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """A stop in the middle of a drainingFrequency drain saved the whole outbox as "queued
    online", so the next egress (a reload, a restart) sent the rest of the outage's backlog at
    publishRatePerSecond (found by review of this session's change: 58 of 58 in 3 s)."""
    config = write_config(tmp_path / "config", broker, mqtt={"drainingFrequency": 2, "publishRatePerSecond": 100})
    store = open_store(config)
    fill_outbox(store, 60)  # queued before any link: all of it is a backlog, drained at 2/s
    worker = start_worker("egress", config)
    worker.wait_connected()
    wait_for(lambda: store.outbox_count() <= 58, 10, "the drain under way")
    assert worker.stop() == 0
    assert store.outbox_count() >= 50  # at 2/s
    again = start_worker("egress", config)
    again.wait(lambda w: w.counters.get("connected") and w.counters.get("rate_limit") == 2.0, 15,
               "the new egress draining the rest at drainingFrequency, not publishRatePerSecond")
    assert store.outbox_count() >= 40
    assert again.stop() == 0


def test_entries_queued_online_after_a_backlog_keep_the_links_rate_across_a_graceful_restart(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """Review "compat": a stop in the middle of a drain noted the backlog's start as the end of
    what was queued online, so what apps queued online behind the backlog drained at
    drainingFrequency after the restart too (1,003 entries at 2/s behind a backlog of 400)."""
    config = write_config(tmp_path / "config", broker, mqtt={"drainingFrequency": 2, "publishRatePerSecond": 100})
    store = open_store(config)
    fill_outbox(store, 60)  # queued before any link: a backlog, drained at 2/s
    worker = start_worker("egress", config)
    worker.wait_connected()
    wait_for(lambda: store.outbox_count() <= 58, 10, "the drain under way")
    fill_outbox(store, 100)  # queued online, behind the backlog
    assert worker.stop() == 0
    again = start_worker("egress", config)
    again.wait(lambda w: w.counters.get("connected") and w.counters.get("eta_s") and
               w.counters.get("rate_limit") == 2.0, 15, "the backlog's rest draining at 2/s")
    counters = dict(again.counters)
    backlog_left = store.outbox_count() - 100
    assert backlog_left / 2 - 3 <= counters["eta_s"] <= backlog_left / 2 + 5, counters  # not all at 2/s
    assert again.stop() == 0


def test_the_backlog_marks_hold_across_a_kill_a_stop_offline_a_rollback_and_a_config_without_the_rate(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """Re-read 33: (1) an egress killed with its link up, restarted and stopped before its link
    came back, took what apps queued meanwhile for queued online (at the online rate); (2) the
    key an earlier release reads alone said "all queued online" mid-drain (a rollback sent the
    outage's rest at the online rate); (3) with drainingFrequency taken out, the ranges left
    drained at no rate at all."""
    import struct
    slow = write_config(tmp_path / "slow", broker, mqtt={"drainingFrequency": 2, "publishRatePerSecond": 20})
    store = open_store(slow)
    fill_outbox(store, 1)
    worker = start_worker("egress", slow)
    worker.wait_connected()
    wait_for(lambda: store.outbox_count() == 0, 10, "the outbox drained")
    worker.kill()  # its link noted up
    broker.stop()
    again = start_worker("egress", slow)
    again.wait(lambda w: "outbox_backlog" in w.counters, 10, "the egress running, its link down")
    fill_outbox(store, 40)  # queued while the link is down: an outage's backlog
    assert again.stop() == 0
    broker.start()
    third = start_worker("egress", slow)
    third.wait(lambda w: w.counters.get("connected") and w.counters.get("rate_limit") == 2.0, 15,
               "the outage's 40 at drainingFrequency")
    assert store.outbox_count() >= 35
    fill_outbox(store, 100)  # queued online behind the backlog
    assert third.stop() == 0
    with store._read() as txn:  # what 0.2.0 reads alone: from the backlog's start on, all slow
        (earlier_release_mark,) = struct.unpack(">Q", txn.get(b"queued_online", db=store._meta))
    assert earlier_release_mark <= 1, earlier_release_mark
    unlimited = write_config(tmp_path / "fast", broker, mqtt={"publishRatePerSecond": 20},  # the same store
                             db={"dataPath": str(load(str(slow)).store.data_dir)})
    fourth = start_worker("egress", unlimited)
    fourth.wait(lambda w: w.counters.get("connected") and w.counters.get("sent"), 15, "sending")
    started, before = time.monotonic(), store.outbox_count()
    fourth.wait(lambda w: time.monotonic() - started > 2, 5, "two seconds of sends")
    assert before - store.outbox_count() <= 2 * 20 + 10, (before, store.outbox_count())  # at 20/s, not unlimited
    assert fourth.stop() == 0


def test_a_store_gone_read_only_under_a_sent_entry_is_one_line_and_said_by_status(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """Found by review: an SD card remounted read-only (ext4 errors=remount-ro) under an entry
    in flight: the egress logged "cannot delete 1 sent outbox entries" at every retry, 5 a
    second for 12 minutes (4,104 lines), while `flashlexctl status` said healthy. One line a
    minute now, and `status` is degraded while it lasts. Real ext4 on a loop device."""
    with mounted_ext4(tmp_path / "sd") as device:
        config = write_config(tmp_path / "config", broker, db={"dataPath": str(tmp_path / "sd" / "data")})
        store = open_store(config)
        try:
            store.outbox_append([(EGRESS_TOPIC, b"in flight", 1, False)])
            broker.freeze()  # the entry goes out only once the disk has gone read-only
            try:
                worker = start_worker("egress", config)
                worker.wait(lambda w: w.counters.get("outbox_backlog") == 1, 15, "the egress running")
                Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("1")
                wait_for(lambda: read_only(tmp_path / "sd"), 10, "the remount read-only")
            finally:
                broker.thaw()
            error = worker.wait(lambda w: w.counters.get("delete_error"), 30, "the delete refused")
            retries_until = time.monotonic() + 2  # the egress retries every 0.2 s meanwhile
            worker.wait(lambda w: time.monotonic() > retries_until, 5, "retries")
            assert worker.log_text().count("cannot delete 1 sent outbox entries") == 1, worker.log_text()[-3000:]
            problems = health({"workers": [{"name": "egress", "state": "ready"}],
                               "mqtt": {"ingress": {"connected": True}, "egress": worker.counters}})
            assert problems == ["egress cannot delete sent entries from the store (a restart meanwhile sends"
                                f" them again): {error}"]
            worker.kill()
        finally:
            store.close()
