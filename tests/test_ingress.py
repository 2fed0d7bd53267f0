"""The ingress worker as a real process against a real broker, fed by an independent publisher
(mosquitto_pub): what the broker delivers ends up in the inbox exactly once and in order, and
is acknowledged only once it is there, whatever gets killed."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import yaml

from flashlexd.client.ctlview import health
from flashlexd.store import Incoming, Store
from tests.broker import (BROKER_INFLIGHT, INGRESS_TOPIC, PUBSUB_TOPIC, THING, Broker, Certs, Proxy, open_store, publish,
                          publish_lines, wait_for, write_config, write_lines)
from tests.lax_broker import LaxBroker
from tests.test_lax_publish import MALFORMED, RawLaxBroker, publish as publish_packet
from tests.quota_proxy import QuotaProxy
from tests.test_egress_quota import plain_broker  # noqa: F401 (fixture)
from tests.tmpfs import mounted_ext4, read_only
from tests.worker_process import rss_kb


def payloads(store: Store) -> List[bytes]:
    return [m.payload for m in store.messages(limit=1_000_000)]


def start_subscribed(start_worker, config: Path, broker: Broker):
    """Start the ingress worker and wait until the broker has its subscription."""
    before = broker.subscriptions(THING, INGRESS_TOPIC)
    worker = start_worker("ingress", config)
    wait_for(lambda: broker.subscriptions(THING, INGRESS_TOPIC) > before, 15, "ingress subscribed")
    return worker


def test_flood_arrives_exactly_once_in_order_while_the_worker_is_killed(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    config = write_config(tmp_path / "config", broker)
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    lines = write_lines(tmp_path / "flood", 10_000, width=200)
    publisher = publish_lines(broker, INGRESS_TOPIC, tmp_path / "flood")
    for threshold in (1_000, 4_000, 7_000):
        wait_for(lambda: store.inbox_count() >= threshold, 30, f"{threshold} messages stored")
        worker.kill()  # SIGKILL, at whatever point of a batch it is
        worker = start_worker("ingress", config)
    assert publisher.wait(30) == 0, publisher.stderr.read()
    wait_for(lambda: store.inbox_count() >= len(lines), 30, "the whole flood stored")
    assert worker.stop() == 0  # anything still redelivered would be committed by now
    assert payloads(store) == lines


def test_redelivery_of_a_committed_message_whose_ack_was_lost_is_not_stored_again(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port)
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    proxy.swallow("up")  # from now on our PUBACKs never reach the broker
    lines = write_lines(tmp_path / "lines", 200, width=50)
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "lines").wait(30) == 0
    wait_for(lambda: store.inbox_count() >= 10, 15, "a window of messages committed")
    proxy.cut()  # the broker never got those acks: it redelivers them (DUP) after the reconnect
    wait_for(lambda: store.inbox_count() >= len(lines), 20, "everything stored")
    worker.wait(lambda w: w.counters.get("duplicates", 0) >= 10, 10, "the redeliveries recognised")
    assert worker.stop() == 0
    assert payloads(store) == lines
    proxy.close()


def test_broker_crash_mid_flood_loses_nothing_it_kept(broker: Broker, tmp_path: Path,
                                                      start_worker) -> None:
    config = write_config(tmp_path / "config", broker)
    store = open_store(config)
    start_subscribed(start_worker, config, broker).stop()  # offline: the broker queues for us
    queued = write_lines(tmp_path / "queued", 1_000, width=200)
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "queued").wait(30) == 0
    broker.save()  # the session, its subscription and its queue are on the broker's disk

    worker = start_worker("ingress", config)
    flood = write_lines(tmp_path / "flood", 5_000, width=200, start=1_000)
    publisher = publish_lines(broker, INGRESS_TOPIC, tmp_path / "flood")
    wait_for(lambda: store.inbox_count() >= 2_000, 30, "the flood under way")
    broker.kill()
    publisher.kill()  # it would go on after the restart; what it had not sent is not our concern
    broker.start()
    worker.wait(lambda w: sum(1 for m in w.reports("mqtt") if m["connected"]) >= 2, 20, "reconnected")
    after = write_lines(tmp_path / "after", 2_000, width=200, start=6_000)
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "after").wait(30) == 0
    wait_for(lambda: set(after) <= set(payloads(store)), 30, "everything published after the restart")
    assert worker.stop() == 0

    stored = payloads(store)
    assert set(queued) <= set(stored)  # the broker restored them from its save: redelivered
    assert [p for p in stored if p >= after[0]] == after  # exactly once, in order
    assert set(stored) <= set(queued + flood + after)


def test_payloads_are_stored_as_is(broker: Broker, tmp_path: Path, start_worker) -> None:
    config = write_config(tmp_path / "config", broker, mqtt={"subscriptions": ["extra/#"]})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    sent = [(INGRESS_TOPIC, bytes(range(256))), (INGRESS_TOPIC, b""), (INGRESS_TOPIC, b"not json {"),
            (INGRESS_TOPIC, "ünïcødé ✓".encode()), (INGRESS_TOPIC, b"\x00\r\n\x00"),
            (PUBSUB_TOPIC, b'{"json": true}'), ("extra/a/b", b"\xff\xfe")]
    for topic, payload in sent:
        publish(broker, topic, payload)
    wait_for(lambda: store.inbox_count() >= len(sent), 15, "every payload stored")
    messages = store.messages(limit=100)
    assert [(m.topic, m.payload) for m in messages] == sent
    assert all(m.qos == 1 and not m.retain for m in messages)
    # each came alone in its TLS record, so each was read straight out of the socket's bytes
    worker.wait(lambda w: w.counters.get("received") == len(sent), 15, "the counters of every message")
    assert worker.counters["received_straight"] == len(sent)


def test_oversize_is_dropped_counted_and_acknowledged(broker: Broker, tmp_path: Path,
                                                      start_worker) -> None:
    config = write_config(tmp_path / "config", broker, db={"maxPayloadBytes": 1000})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    publish(broker, INGRESS_TOPIC, b"x" * 1001)
    publish(broker, INGRESS_TOPIC, b"fits")
    worker.wait(lambda w: w.counters.get("stored") == 1 and w.counters.get("dropped_oversize") == 1,
                15, "one stored, one dropped")
    assert payloads(store) == [b"fits"]
    assert "dropped a 1001-byte message" in worker.log_text()
    assert worker.stop() == 0

    worker = start_subscribed(start_worker, config, broker)
    publish(broker, INGRESS_TOPIC, b"marker")
    worker.wait(lambda w: w.counters.get("stored") == 1, 15, "the marker stored")
    assert worker.counters["received"] == 1  # the oversize one was acked: no redelivery
    assert payloads(store) == [b"fits", b"marker"]


def test_full_store_stops_acking_and_resumes_when_space_frees(broker: Broker, tmp_path: Path,
                                                              start_worker) -> None:
    config = write_config(tmp_path / "config", broker, db={"capMegabytes": 1, "whenFull": "reject"})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    lines = write_lines(tmp_path / "big", 40, width=60_000)  # 2.4 MB for a 1 MB store
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "big").wait(30) == 0
    worker.wait(lambda w: w.counters.get("store_full"), 20, "store_full reported")
    held = store.inbox_count()
    assert 0 < held < len(lines)
    beats = len(worker.reports("hb"))
    worker.wait(lambda w: len(w.reports("hb")) >= beats + 8, 10, "retries while full")  # > 1.5 s
    assert store.inbox_count() == held and worker.counters["store_full"]

    got: List[bytes] = []

    def make_room() -> bool:
        messages = store.messages(limit=100)
        got.extend(m.payload for m in messages)
        store.ack([m.id for m in messages])
        return len(got) >= len(lines)

    # Nothing was acked and dropped: as space frees, the same worker stores everything.
    wait_for(make_room, 30, "all messages through the full store")
    assert got == lines
    worker.wait(lambda w: w.counters.get("stored") == len(lines) and not w.counters["store_full"],
                10, "store_full cleared")
    assert "store full" in worker.log_text()
    # the end told, here as the worker stops; told after RESUMED_QUIET_SECONDS of storing without
    # a refusal: test_a_store_refusing_again_after_the_log_said_resuming_is_logged_again ("first")
    assert worker.stop() == 0
    assert "resuming" in worker.log_text()


def test_a_store_held_at_its_cap_logs_its_refusals_once(broker: Broker, tmp_path: Path,
                                                        start_worker) -> None:
    """Under `reject` with expireSeconds, a store at its cap with messages still coming (the app
    down, the broker holding a backlog) is freed a little by every expiry sweep: ingress resumes,
    fills it and is refused again. Each turn logged an ERROR "store full" and an INFO
    "resuming": ~1,400 lines an hour at the default sweepSeconds, for as long as it lasted (found
    by review). Now: one ERROR, and "resuming" at INFO only once the store took messages for
    RESUMED_QUIET_SECONDS without refusing (never, here)."""
    config = write_config(tmp_path / "config", broker, db={"capMegabytes": 1, "whenFull": "reject"})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    write_lines(tmp_path / "big", 80, width=60_000)  # 4.8 MB for a 1 MB store
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "big").wait(30) == 0
    for turn in range(3):  # the test frees room as an expiry sweep would
        worker.wait(lambda w: w.counters.get("store_full"), 20, f"the store full (turn {turn})")
        stored = worker.counters["stored"]
        store.ack([m.id for m in store.messages(limit=4)])
        worker.wait(lambda w: w.counters.get("stored", 0) > stored, 20, f"ingress resumed (turn {turn})")
    worker.wait(lambda w: w.counters.get("store_full"), 20, "the store full again")
    log = worker.log_text()
    assert (log.count("store full"), log.count("store accepts messages again")) == (1, 0), log[-3000:]


def test_a_store_refusing_again_after_the_log_said_resuming_is_logged_again(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """Found by review: a full disk (or store) logged its ERROR, then "resuming" once acks made a
    little room, then refused again within REFUSED_LOG_SECONDS: that refusal was throttled, so
    the log's last word was "resuming" while nothing was stored (4,000-6,000 messages held).
    Found by re-read of the mend: a worker stopped within RESUMED_QUIET_SECONDS of a resume
    never logged it. (A slow sensor's refusals, minutes apart: tests/test_refusal_log.py.)"""
    config = write_config(tmp_path / "config", broker, db={"capMegabytes": 1, "whenFull": "reject"})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)

    def counts() -> Dict[str, int]:
        log = worker.log_text()
        return {"errors": log.count("store full"), "resumes": log.count("store accepts messages again")}

    for turn, logged in (("first", (1, 1)), ("second", (2, 1))):
        write_lines(tmp_path / turn, 40, width=60_000)  # 2.4 MB for a 1 MB store
        assert publish_lines(broker, INGRESS_TOPIC, tmp_path / turn).wait(30) == 0
        worker.wait(lambda w: w.counters.get("store_full"), 20, f"the store full ({turn})")

        def make_room() -> bool:
            store.ack([m.id for m in store.messages(limit=100)])
            return not worker.counters.get("held") and store.inbox_count() == 0

        worker.wait(lambda w: make_room(), 30, f"everything through ({turn})")
        if turn == "first":  # told after RESUMED_QUIET_SECONDS of storing without a refusal
            wait_for(lambda: counts()["resumes"] == 1, 20, "the resume logged")
        said = counts()
        assert (said["errors"], said["resumes"]) == logged, (turn, said)
    assert worker.stop() == 0
    assert counts()["resumes"] == 2  # the end of the refusals, told as the worker stops


def test_a_store_refusing_to_drop_a_lost_sessions_marks_is_a_refusal_said_by_status(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """Found by re-read: the broker lost our session (restarted without its state) while the
    store refused writes (an SD card gone read-only): the drop of the stale DUP marks, at the
    connect and before each commit, was refused and retried every second with one WARNING and
    nothing in `status` (store_error unset). Now it is a refusal like a commit's: one ERROR,
    `status` degraded (and a "resuming" pending is held back: tests/test_refusal_log.py).
    Real ext4 on a loop device."""
    with mounted_ext4(tmp_path / "sd") as device:
        config = write_config(tmp_path / "config", broker, db={"dataPath": str(tmp_path / "sd" / "data")})
        worker = start_subscribed(start_worker, config, broker)
        store = open_store(config)
        try:  # a message committed whose PUBACK the broker has not confirmed: its mark waits
            store.append([Incoming(INGRESS_TOPIC, b"committed", 1, mid=1)])
        finally:
            store.close()
        subscribed = broker.subscriptions(THING, INGRESS_TOPIC)
        broker.kill()
        (broker.workdir / "state" / "mosquitto.db").unlink(missing_ok=True)
        Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("1")
        wait_for(lambda: read_only(tmp_path / "sd"), 10, "the remount read-only")
        broker.start()
        wait_for(lambda: broker.subscriptions(THING, INGRESS_TOPIC) > subscribed, 20, "subscribed again")
        error = worker.wait(lambda w: w.counters.get("store_error"), 15, "the refusal at the connect")
        publish(broker, INGRESS_TOPIC, b"into a read-only store")
        retries_until = time.monotonic() + 2.5  # retried every second meanwhile
        worker.wait(lambda w: time.monotonic() > retries_until and w.counters["received"] == 1, 10, "retries")
        assert worker.log_text().count("store error") == 1, worker.log_text()[-3000:]
        problems = health({"workers": [{"name": "ingress", "state": "ready"}],
                           "mqtt": {"ingress": worker.counters, "egress": {"connected": True}}})
        assert problems == [f"ingress is not storing (messages stay with the broker): {error}"]
        worker.kill()


def test_a_new_message_reusing_an_acked_packet_id_and_content_is_stored(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """Brokers reuse packet ids (mosquitto after 65,535 messages). A new message with the id and
    the content of one acknowledged long ago, whose first transmission is lost, arrives only as
    a DUP: it must be stored, not taken for a redelivery of the old one."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port)
    store = open_store(config)
    start_subscribed(start_worker, config, broker)
    lines = [b"same"] + [f"{i:06d}".encode() for i in range(1, 65535)]  # packet ids 1..65535
    (tmp_path / "lines").write_bytes(b"".join(line + b"\n" for line in lines))
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "lines").wait(120) == 0
    wait_for(lambda: store.inbox_count() >= len(lines), 60, "the first 65,535 messages stored")
    proxy.swallow("down")  # the next PUBLISH (packet id 1 again) never reaches the worker
    publish(broker, INGRESS_TOPIC, b"same")
    wait_for(lambda: proxy.swallowed["down"] > 0, 10, "the broker to send it into the void")
    proxy.cut()  # reconnect: the broker resends it with DUP set
    wait_for(lambda: store.inbox_count() > len(lines), 20, "the reused-id message stored")
    assert payloads(store).count(b"same") == 2
    proxy.close()


def test_a_trickle_shares_one_commit_and_a_burst_does_not_wait_for_the_window(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """flashlex.app.db.ingestCommitMs (issue 20): messages arriving one by one within the window
    are committed together (one commit, one fsync); ingestCommitBatch (8) waiting messages are committed
    at once, so a broker whose in-flight window is full is never kept waiting for it."""
    config = write_config(tmp_path / "config", broker, db={"ingestCommitMs": 5000})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    started = time.monotonic()
    for n in range(3):
        publish(broker, INGRESS_TOPIC, b"trickle %d" % n)
    worker.wait(lambda w: w.counters.get("stored") == 3, 15, "the trickle stored")
    assert worker.counters["batches"] == 1 and time.monotonic() - started >= 4.5
    lines = write_lines(tmp_path / "burst", 40, width=50)
    publisher = publish_lines(broker, INGRESS_TOPIC, tmp_path / "burst")
    # all but a tail shorter than ingestCommitBatch, well before the 5 s window would end
    wait_for(lambda: store.inbox_count() >= 3 + len(lines) - 7, 4.0, "the burst stored at once")
    assert publisher.wait(30) == 0
    wait_for(lambda: store.inbox_count() >= 3 + len(lines), 15, "the burst's tail stored")
    assert payloads(store) == [b"trickle 0", b"trickle 1", b"trickle 2", *lines]


def held_in_the_window(broker: Broker, tmp_path: Path, start_worker, payload: bytes,
                       mqtt: Optional[Dict[str, Any]] = None, commit_batch: Optional[int] = None):
    """A worker behind a proxy, with a 5 s ingestCommitMs, holding `payload` in its batch
    (`commit_batch`: the ingestCommitBatch that ends a window at once, when not the default)."""
    proxy = Proxy(broker)
    db: Dict[str, Any] = {"ingestCommitMs": 5000}
    if commit_batch is not None:
        db["ingestCommitBatch"] = commit_batch
    config = write_config(tmp_path / "config", broker, port=proxy.port, db=db, mqtt=mqtt)
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    publish(broker, INGRESS_TOPIC, payload)
    worker.wait(lambda w: w.counters.get("received") == 1, 15, "the message received")
    return proxy, store, worker


def test_a_batch_whose_connection_drops_is_committed_without_waiting_out_the_window(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """Nothing more can join a batch once its connection is gone: it is committed at the next
    loop pass, not when ingestCommitMs (5 s here) ends, so what the daemon had received before
    a broker outage is in the inbox as soon as it has seen the link drop."""
    proxy, store, worker = held_in_the_window(broker, tmp_path, start_worker, b"before the drop")
    assert store.inbox_count() == 0  # waiting in the commit window
    received_at = time.monotonic()
    proxy.cut()
    wait_for(lambda: store.inbox_count() == 1, 15, "the message stored")
    assert time.monotonic() - received_at < 2.5, "the batch waited for the window after the drop"
    worker.wait(lambda w: w.counters.get("stored") == 1, 15, "the counters")
    assert worker.stop() == 0
    assert payloads(store) == [b"before the drop"]
    proxy.close()


def test_a_batch_above_the_brokers_window_does_not_stall_it(
        certs, tmp_path: Path, start_worker) -> None:
    """ingestCommitBatch above the broker's in-flight window (10 here): once 10 messages wait
    and the broker goes quiet, they are committed (not at the end of the 5 s window) and the
    windows end at 10 from then on."""
    broker = Broker(certs, tmp_path / "broker10", extra=["max_inflight_messages 10"]).start()
    try:
        config = write_config(tmp_path / "config", broker, db={"ingestCommitMs": 5000,
                                                               "ingestCommitBatch": 16})
        store = open_store(config)
        worker = start_subscribed(start_worker, config, broker)
        lines = write_lines(tmp_path / "burst", 60, width=50)
        started = time.monotonic()
        publisher = publish_lines(broker, INGRESS_TOPIC, tmp_path / "burst")
        wait_for(lambda: store.inbox_count() >= len(lines), 4, "the burst stored, no window waited out")
        assert publisher.wait(30) == 0
        assert payloads(store) == lines and time.monotonic() - started < 4
        worker.wait(lambda w: w.counters.get("stored") == len(lines), 5, "the counters")
    finally:
        broker.close()


# -- a later message of the same content, first sent as a DUP ---------------------------------

def lose_next_delivery_then_cut(proxy: Proxy, broker: Broker, payload: bytes) -> None:
    """`payload` is published and its first transmission to the worker lost, then the link is
    cut: the broker sends it again, with DUP set, on the next connection."""
    proxy.swallow("down")
    before = proxy.swallowed["down"]
    publish(broker, INGRESS_TOPIC, payload)
    wait_for(lambda: proxy.swallowed["down"] > before, 10, "the broker sending it into the void")
    proxy.cut()


def stored_up_to_the_marker(broker: Broker, store: Store) -> List[bytes]:
    publish(broker, INGRESS_TOPIC, b"marker")
    wait_for(lambda: b"marker" in payloads(store), 20, "the marker stored")
    return payloads(store)


@pytest.mark.parametrize("protocol, commit_ms, lost", [("5", 5000, "nothing"), ("3.1.1", 5000, "nothing"),
                                                      ("3.1.1", 0, "the PUBACK")])
def test_two_copies_of_one_content_in_flight_at_a_drop_are_both_stored(
        broker: Broker, tmp_path: Path, start_worker, protocol: str, commit_ms: int, lost: str) -> None:
    """The first "same" is committed (in the window, so at the drop; or at once, its PUBACK
    lost), the second's first transmission is lost, then the link drops. The broker resends
    both with DUP: one is the redelivery of the copy held, the other a new message."""
    proxy = Proxy(broker)
    # ingestCommitBatch 3: the first "same" waits alone in its window (to the drop); the two
    # resent copies and the marker end theirs at once instead of waiting out the 5 s
    config = write_config(tmp_path / "config", broker, port=proxy.port, mqtt={"protocol": protocol},
                          db={"ingestCommitMs": commit_ms, "ingestCommitBatch": 3})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    if lost == "the PUBACK":
        proxy.swallow("up")
    publish(broker, INGRESS_TOPIC, b"same")
    worker.wait(lambda w: w.counters.get("received") == 1, 15, "the first copy received")
    lose_next_delivery_then_cut(proxy, broker, b"same")
    assert stored_up_to_the_marker(broker, store) == [b"same", b"same", b"marker"]
    worker.wait(lambda w: w.counters.get("duplicates") == 1, 10, "the redelivery recognised")
    assert worker.stop() == 0
    proxy.close()


@pytest.mark.parametrize("fault", ["link drop", "ingress SIGKILL"])
def test_under_mqtt5_one_fault_does_not_lose_a_repeated_message_it_cut_off(
        broker: Broker, tmp_path: Path, start_worker, fault: str) -> None:
    """Found by review: "on" committed and its PUBACK processed by the broker, but the link
    dropped (or the ingress was killed) before the barrier's UNSUBACK confirmed it, so its
    count stayed; a second "on", whose first transmission that same fault cut off, came again
    as a DUP and was taken for a redelivery: ONE fault lost a repeated command. Under MQTT 5 a
    resend keeps its packet id, which tells the two apart. (Under 3.1.1 the count alone still
    decides, as the README says: not tested, the loss depends on the broker processing the
    PUBACK before the cut.)"""
    # ingestCommitBatch 2: the first "on" waits alone in its window; after the fault the resent
    # "on" and the marker end theirs at once instead of waiting out the 5 s
    proxy, store, worker = held_in_the_window(broker, tmp_path, start_worker, b"on", mqtt={"protocol": "5"},
                                              commit_batch=2)
    proxy.swallow("down")  # the UNSUBACK that would confirm the PUBACK never reaches the worker
    wait_for(lambda: store.inbox_count() == 1, 15, "the first 'on' committed, its PUBACK sent")
    if fault == "link drop":
        lose_next_delivery_then_cut(proxy, broker, b"on")
    else:
        publish(broker, INGRESS_TOPIC, b"on")
        wait_for(lambda: proxy.swallowed["down"] > 0, 10, "the broker sending it into the void")
        worker.kill()
        proxy.cut()  # the path is healthy again for the next worker
        worker = start_subscribed(start_worker, worker.config, broker)
    assert stored_up_to_the_marker(broker, store) == [b"on", b"on", b"marker"]
    assert worker.stop() == 0
    proxy.close()


def test_marks_confirmed_before_a_stop_do_not_drop_a_later_message(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """A confirmed PUBACK's mark is taken off with the next commit; a stop before any must take
    it off itself, or after the restart a new "same" first sent as a DUP is dropped."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port, db={"ingestCommitMs": 0})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    publish(broker, INGRESS_TOPIC, b"same")
    worker.wait(lambda w: w.counters.get("acks_confirmed", 0) >= 1, 15, "its PUBACK confirmed")
    assert worker.stop() == 0
    worker = start_subscribed(start_worker, config, broker)
    lose_next_delivery_then_cut(proxy, broker, b"same")
    assert stored_up_to_the_marker(broker, store) == [b"same", b"same", b"marker"]
    assert worker.stop() == 0
    proxy.close()


def test_marks_of_a_session_the_broker_lost_do_not_drop_a_later_message(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """"same" committed at the drop, never acknowledged; the broker comes back without its
    state (no session), so it will never resend it: the mark must go, or a new "same" first
    sent as a DUP is taken for its redelivery and dropped."""
    # ingestCommitBatch 2: the resent "same" and the marker end their window at once
    proxy, store, worker = held_in_the_window(broker, tmp_path, start_worker, b"same", commit_batch=2)
    subscribed = broker.subscriptions(THING, INGRESS_TOPIC)
    broker.kill()
    wait_for(lambda: store.inbox_count() == 1, 10, "committed at the drop")
    (broker.workdir / "state" / "mosquitto.db").unlink(missing_ok=True)
    broker.start()
    wait_for(lambda: broker.subscriptions(THING, INGRESS_TOPIC) > subscribed, 20, "subscribed again")
    lose_next_delivery_then_cut(proxy, broker, b"same")
    assert stored_up_to_the_marker(broker, store) == [b"same", b"same", b"marker"]
    assert "dropped 1 DUP marks of the session the broker lost" in worker.log_text()
    assert worker.stop() == 0
    proxy.close()


def test_a_resend_on_the_same_connection_is_stored_once(broker: Broker, tmp_path: Path,
                                                       start_worker) -> None:
    """MQTT 3.1.1 lets a broker resend an unacknowledged message on the same connection (some
    do, on a timer): while the first copy waits in the commit window, the DUP resend with its
    packet id and content is acknowledged with it and not stored."""
    lax = LaxBroker(broker.certs, [(INGRESS_TOPIC.encode(), b"once")], resend_after=1.0)
    try:
        # ingestCommitBatch 2: the resend (at 1 s) ends the 5 s window, both waiting in it
        config = write_config(tmp_path / "config", broker, port=lax.port, mqtt={"protocol": "3.1.1"},
                              db={"ingestCommitMs": 5000, "ingestCommitBatch": 2})
        store = open_store(config)
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.counters.get("received") == 2, 15, "the message and its resend")
        wait_for(lambda: store.inbox_count() >= 1, 15, "the message stored")
        worker.wait(lambda w: (w.counters.get("stored"), w.counters.get("duplicates")) == (1, 1), 10,
                    "one stored, one duplicate")
        assert payloads(store) == [b"once"] and 1 in lax.acked
        assert worker.stop() == 0
    finally:
        lax.close()


# 12 MB: over a 1 MB store and a full batch's bytes (BATCH_BYTES) held while it refuses
BIG_PAYLOADS = [b"%04d" % n + b"." * 200_000 for n in range(60)]


@pytest.mark.parametrize("kind", ["bad-topic", "malformed"])
def test_a_message_dropped_after_one_left_with_the_broker_is_not_acknowledged_before_it(
        broker: Broker, tmp_path: Path, start_worker, kind: str) -> None:
    """PUBACKs go in the order the messages came: once one is left with the broker (a refusing
    store, a full batch), so is every QoS 1 message after it on that connection. One with a
    topic that is not UTF-8 was dropped and acknowledged all the same, before the left ones
    (found by re-read), and a malformed one (paho's to read) was logged "acknowledged" and
    counted at each copy (re-read 27). Each is left too, and dropped in its turn after the
    reconnect, once."""
    bad = len(BIG_PAYLOADS) + 1
    last = publish_packet(b"flashlex/\xff", b"bad", bad) if kind == "bad-topic" else MALFORMED["empty-topic-311"][0](bad)
    lax = RawLaxBroker(broker.certs, [*[(mid, publish_packet(INGRESS_TOPIC.encode(), payload, mid))
                                        for mid, payload in enumerate(BIG_PAYLOADS, 1)], (bad, last)], unsubacks=True)
    seen: List[bytes] = []
    try:
        config = write_config(tmp_path / "config", broker, port=lax.port, mqtt={"protocol": "3.1.1"},
                              db={"capMegabytes": 1, "whenFull": "reject"})
        store = open_store(config)
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.counters.get("left_with_broker", 0) > 1, 30, "messages left with the broker")
        wait_for(lambda: read_and_ack(store, seen) >= 0 and len(seen) >= len(BIG_PAYLOADS), 60,
                 "every message stored", interval=0.1)
        wait_for(lambda: set(range(1, bad + 1)) <= set(lax.acked), 15, "every message acknowledged")
        assert lax.acked.index(bad) > max(lax.acked.index(mid) for mid in range(1, bad)), lax.acked
        assert sorted(seen) == BIG_PAYLOADS
        worker.wait(lambda w: w.counters.get(f"dropped_{kind.replace('-', '_')}") == 1, 10, "the drop counted once")
        assert worker.log_text().count("dropped a") == 1, worker.log_text()
        assert worker.stop() == 0
    finally:
        lax.close()


def test_a_qos0_message_arriving_while_a_stop_waits_for_the_barrier_is_stored(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """A graceful stop waits for the broker to confirm its PUBACKs (the ack barrier), leaving
    unacknowledged what arrives meanwhile for the broker to send again; a QoS 0 message is
    sent once only, and was dropped (found by review). This broker never confirms (it answers
    no UNSUBSCRIBE), so the stop waits its whole share of the budget."""
    lax = LaxBroker(broker.certs, [(INGRESS_TOPIC.encode(), b"qos1")])
    try:
        config = write_config(tmp_path / "config", broker, port=lax.port, mqtt={"protocol": "3.1.1"},
                              db={"ingestCommitMs": 0})
        store = open_store(config)
        worker = start_worker("ingress", config)
        wait_for(lambda: lax.acked, 15, "the QoS 1 message committed and acknowledged")
        worker.send("stop")
        wait_for(lambda: "waiting up to" in worker.log_text(), 15, "the stop waiting for the barrier")
        lax.push(INGRESS_TOPIC.encode(), b"qos0")
        worker.process.wait(15)
        assert worker.stop() == 0
        assert sorted(payloads(store)) == [b"qos0", b"qos1"]
    finally:
        lax.close()


def test_marks_dropped_for_a_lost_session_spare_the_new_sessions(broker: Broker, tmp_path: Path,
                                                                 start_worker) -> None:
    """The broker comes back without our session while a full store holds messages of the old
    connection: the marks are dropped only once those are committed, before any message of the
    new session is, so a new-session message whose PUBACK is lost is still recognised when the
    broker resends it on the next connection."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port,
                          db={"capMegabytes": 1, "whenFull": "reject", "ingestCommitMs": 0})
    store = open_store(config)
    worker = start_subscribed(start_worker, config, broker)
    write_lines(tmp_path / "big", 30, width=60_000)  # 1.8 MB for a 1 MB store
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "big").wait(30) == 0
    worker.wait(lambda w: w.counters.get("store_full"), 20, "the store full, messages held")
    subscribed = broker.subscriptions(THING, INGRESS_TOPIC)
    broker.kill()
    (broker.workdir / "state" / "mosquitto.db").unlink(missing_ok=True)
    broker.start()  # without our session
    wait_for(lambda: broker.subscriptions(THING, INGRESS_TOPIC) > subscribed, 20, "subscribed again")
    proxy.swallow("up")  # from now on our PUBACKs are lost
    publish(broker, INGRESS_TOPIC, b"new session")
    worker.wait(lambda w: w.counters.get("received", 0) > 30, 15, "the new message received")

    def make_room() -> bool:
        store.ack([m.id for m in store.messages(limit=100) if m.payload != b"new session"])
        return b"new session" in payloads(store)
    wait_for(make_room, 30, "the held messages and the new one stored")
    proxy.cut()  # the broker resends "new session" (DUP) on the next connection
    assert stored_up_to_the_marker(broker, store).count(b"new session") == 1
    assert worker.stop() == 0
    proxy.close()


@pytest.mark.parametrize("protocol, again", [("5", []), ("3.1.1", [b"retained"])])
def test_a_retained_message_comes_again_at_each_reconnect_only_under_mqtt311(
        broker: Broker, tmp_path: Path, start_worker, protocol: str, again: List[bytes]) -> None:
    """The ingress subscribes again at every connect. Under MQTT 5 (Retain Handling 1) a
    subscription the broker's session kept brings no retained message; MQTT 3.1.1 has no such
    option, and the broker sends it at each (with RETAIN set: README, "Delivery guarantees")."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port, mqtt={"protocol": protocol})
    store = open_store(config)
    start_subscribed(start_worker, config, broker)
    subprocess.run(["mosquitto_pub", *broker.client_args(), "-q", "1", "-r", "-t", INGRESS_TOPIC,
                    "-m", "retained"], check=True, timeout=20, capture_output=True)
    wait_for(lambda: store.inbox_count() == 1, 15, "the retained message stored")
    for marker in (b"marker 1", b"marker 2"):
        subscribed = broker.subscriptions(THING, INGRESS_TOPIC)
        proxy.cut()
        wait_for(lambda: broker.subscriptions(THING, INGRESS_TOPIC) > subscribed, 20, "subscribed again")
        publish(broker, INGRESS_TOPIC, marker)  # behind what the new subscription brought
        wait_for(lambda: marker in payloads(store), 20, "the marker stored")
    assert payloads(store) == [b"retained", *again, b"marker 1", *again, b"marker 2"]
    proxy.close()


def test_thread_subscribe_takes_the_pubsub_topic_away_on_an_installed_device(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """The seed config (`app.thread: subscribe`) on a device where flashlexd subscribed the
    pubsub topic too: the broker kept that subscription in the session the ingress resumes, so
    its messages still came and were stored for the apps (review)."""
    config = write_config(tmp_path / "config", broker)
    worker = start_worker("ingress", config)  # as the earlier version subscribed
    worker.wait(lambda w: [t for t, _ in w.mqtt.get("subscriptions") or []] == [INGRESS_TOPIC, PUBSUB_TOPIC],
                15, "both topics subscribed")
    assert worker.stop() == 0
    document = yaml.safe_load(config.read_text())
    document["flashlex"]["app"]["thread"] = "subscribe"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected") and [t for t, _ in w.mqtt.get("subscriptions") or []]
                == [INGRESS_TOPIC], 15, "the ingress topic alone subscribed")
    assert_only_the_wanted_one_stored(broker, config, PUBSUB_TOPIC, INGRESS_TOPIC)
    assert worker.stop() == 0


@pytest.mark.parametrize("any_broker", ["mosquitto", "rabbitmq"], indirect=True)
def test_a_subscription_taken_out_of_the_config_leaves_the_brokers_session(
        any_broker: Any, tmp_path: Path, start_worker) -> None:
    """`subscriptions` edited (a reload restarts the ingress): the broker kept the removed
    filter in the session the ingress resumes, so its messages still came and were stored.
    Now the store remembers what the session holds, and the ingress unsubscribes the rest."""
    config = write_config(tmp_path / "config", any_broker, mqtt={"subscriptions": ["extra/kept", "extra/gone"]})
    worker = start_worker("ingress", config)
    worker.wait(lambda w: len(w.mqtt.get("subscriptions") or []) == 4, 20, "four filters subscribed")
    assert worker.stop() == 0
    edit_mqtt(config, subscriptions=["extra/kept"])
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected") and [t for t, _ in w.mqtt.get("subscriptions") or []]
                == [INGRESS_TOPIC, PUBSUB_TOPIC, "extra/kept"], 20, "three filters subscribed")
    assert_only_the_wanted_one_stored(any_broker, config, "extra/gone", "extra/kept")
    assert "unsubscribing from extra/gone: no longer configured" in worker.log_text()
    dropped = 1 if any_broker.name == "rabbitmq" else 0  # RabbitMQ 3.10 kept the filter: sent, dropped
    worker.wait(lambda w: w.counters.get("received") == 1 + dropped, 10, "the counters reported")
    assert worker.counters.get("dropped_unsubscribed") == dropped, worker.counters
    assert worker.stop() == 0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_more_filters_than_aws_takes_in_one_request_are_sent_in_eights(
        plain_broker: Broker, tmp_path: Path, start_worker, protocol: str) -> None:
    """AWS IoT Core closes the link on a SUBSCRIBE or UNSUBSCRIBE naming more than 8 topic
    filters (a hard quota); the README allows 50. All were sent in one SUBSCRIBE at every
    connect: with 9 or more the ingress reconnected forever, blaming "another client using the
    client id" (found by review). Then 8 taken out of the config: the same for the UNSUBSCRIBE."""
    proxy = QuotaProxy(plain_broker, rate=0, filters_per_request=8)
    extra = [f"extra/{n}/#" for n in range(8)]  # with ingress.topic and pubsub.topic: 10 filters
    config = write_config(tmp_path / "config", plain_broker, port=proxy.port,
                          mqtt={"subscriptions": extra, "protocol": protocol})
    try:
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected") and [t for t, _ in w.mqtt.get("subscriptions") or []]
                    == [INGRESS_TOPIC, PUBSUB_TOPIC, *extra], 15, "all ten filters subscribed")
        assert worker.stop() == 0
        edit_mqtt(config, subscriptions=[])
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected") and [t for t, _ in w.mqtt.get("subscriptions") or []]
                    == [INGRESS_TOPIC, PUBSUB_TOPIC], 15, "the eight unsubscribed")
        assert "unsubscribing from extra/0/#, " in worker.log_text()
        assert (proxy.refused_requests, proxy.largest_request) == (0, 8) and proxy.link_count() == 1
        assert worker.stop() == 0
    finally:
        proxy.close()


def test_a_shared_subscriptions_messages_are_stored(broker: Broker, tmp_path: Path, start_worker) -> None:
    """`$share/GROUP/FILTER`: its messages carry topics FILTER matches, not the `$share` form;
    the check that a configured filter matches each message's topic must strip it."""
    config = write_config(tmp_path / "config", broker, mqtt={"subscriptions": ["$share/fleet/extra/+"]})
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 20, "subscribed")
    publish(broker, "extra/one", b"for the group")
    store = open_store(config)
    try:
        wait_for(lambda: store.messages(), 20, "the message stored")
        assert [(m.topic, m.payload) for m in store.messages()] == [("extra/one", b"for the group")]
    finally:
        store.close()
    assert worker.counters.get("dropped_unsubscribed", 0) == 0
    assert worker.stop() == 0


def test_a_filter_the_broker_took_before_a_kill_is_unsubscribed_by_the_next_run(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """A run that adds a filter is killed (power cut, watchdog) after the broker took its
    SUBSCRIBE and before the SUBACK reached it: the record was written after the SUBACK, so it
    never named the filter, and once the filter was taken out of the config again no run
    unsubscribed it (review). The record is now written before the SUBSCRIBE."""
    config = write_config(tmp_path / "config", broker, mqtt={"subscriptions": ["extra/a"]})
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 20, "run 1 subscribed")
    assert worker.stop() == 0
    proxy = Proxy(broker)
    proxy.slow["down"] = 1.0
    edit_mqtt(config, subscriptions=["extra/a", "extra/b"], port=proxy.port,
              connectDisconnectTimeout=30, mqttOperationTimeout=30)
    worker = start_worker("ingress", config)
    wait_for(lambda: broker.subscriptions(THING, "extra/b") >= 1, 30, "the broker took extra/b")
    worker.kill()
    proxy.close()
    edit_mqtt(config, subscriptions=["extra/a"], port=broker.port)
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 20, "run 3 subscribed")
    assert_only_the_wanted_one_stored(broker, config, "extra/b", "extra/a")
    assert "unsubscribing from extra/b: no longer configured" in worker.log_text()
    worker.wait(lambda w: w.counters.get("received") == 1, 10, "the counters reported")
    assert worker.counters.get("dropped_unsubscribed") == 0  # mosquitto did unsubscribe it
    assert worker.stop() == 0


@pytest.mark.parametrize("topic", ["extra/v1.2", "extra/sensor.temp"])
def test_rabbitmq_turns_dots_into_slashes_and_the_message_is_still_stored(
        rabbitmq: Any, tmp_path: Path, start_worker, topic: str) -> None:
    """RabbitMQ delivers `extra/v1.2` as `extra/v1/2`: a check that dropped every message no
    configured filter matched dropped these (review). Only a filter taken out of the config
    can make a message be dropped."""
    config = write_config(tmp_path / "config", rabbitmq, mqtt={"subscriptions": [topic]})
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 30, "subscribed")
    publish(rabbitmq, topic, b"wanted")
    store = open_store(config)
    try:
        wait_for(lambda: store.messages(), 20, "the message stored")
        assert [m.payload for m in store.messages()] == [b"wanted"]
    finally:
        store.close()
    assert worker.counters.get("dropped_unsubscribed", 0) == 0
    assert worker.stop() == 0


def test_a_fresh_store_keeps_what_a_filter_of_an_earlier_life_brings_until_it_is_listed_once(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """A new store (SD card replaced, a second device from one image) resumes the session the
    broker holds for the client id, no Clean Start under MQTT 5 either: a filter an earlier life
    subscribed, unknown to the store, still brings messages, stored (nothing is lost); listed in
    `subscriptions` for one start and taken out, it is unsubscribed (README)."""
    earlier = write_config(tmp_path / "earlier", broker, mqtt={"subscriptions": ["extra/old"], "protocol": "5"})
    worker = start_worker("ingress", earlier)
    worker.wait(lambda w: w.mqtt.get("connected"), 20, "the earlier life subscribed")
    assert worker.stop() == 0
    config = write_config(tmp_path / "fresh", broker, mqtt={"protocol": "5"})
    for subscriptions, received in (([], 2), (["extra/old"], 2), ([], 1)):  # mosquitto unsubscribes
        edit_mqtt(config, subscriptions=subscriptions)
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected"), 20, "subscribed")
        # said at the fresh store's first link (the earlier life's found none), never again
        assert worker.log_text().count("from before this store") == 1, worker.log_text()
        publish(broker, "extra/old", f"on the old filter, {subscriptions}".encode())
        publish(broker, INGRESS_TOPIC, b"wanted")
        worker.wait(lambda w: w.counters.get("stored") == received, 20, "the messages stored")
        assert worker.stop() == 0
    store = open_store(config)
    try:
        assert [m.payload for m in store.messages()] == [b"on the old filter, []", b"wanted",
                                                         b"on the old filter, ['extra/old']", b"wanted", b"wanted"]
    finally:
        store.close()
    assert "unsubscribing from extra/old: no longer configured" in worker.log_text()


def assert_only_the_wanted_one_stored(broker: Any, config: Path, unwanted: str, wanted: str) -> None:
    """Publish on `unwanted` then on `wanted` (in that order on the ingress's one connection):
    only the second may be stored."""
    publish(broker, unwanted, b"no longer wanted")
    publish(broker, wanted, b"still wanted")
    store = open_store(config)
    try:
        wait_for(lambda: store.messages(), 20, "a message stored")
        assert [(m.topic, m.payload) for m in store.messages()] == [(wanted, b"still wanted")]
    finally:
        store.close()


def edit_mqtt(config: Path, **keys: Any) -> None:
    """Change keys of flashlex.thing.mqtt in the config file, as an operator would."""
    document = yaml.safe_load(config.read_text())
    document["flashlex"]["thing"]["mqtt"].update(keys)
    config.write_text(yaml.safe_dump(document, sort_keys=False))


def fill_a_one_megabyte_store(broker: Broker, tmp_path: Path, worker: Any) -> int:
    """40 messages of 60 KB into a 1 MB store under `reject`: once it refuses, the worker's
    resident memory (KiB), the base of what it holds from then on."""
    write_lines(tmp_path / "big", 40, width=60_000)
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "big").wait(30) == 0
    worker.wait(lambda w: w.counters.get("store_full"), 20, "store_full reported")
    return rss_kb(worker.pid)


def test_a_qos0_flood_into_a_full_store_does_not_grow_the_ingress_without_bound(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """`reject` holds PUBACKs back so that the broker keeps the messages, and its in-flight
    window bounds what QoS 1 brings meanwhile; QoS 0 comes regardless, and the ingress kept
    every such message while the store refused (65 MB more for an 80 MB flood, without limit: a
    Pi out of memory). Past a full batch they are dropped and counted (found by review)."""
    config = write_config(tmp_path / "config", broker, db={"capMegabytes": 1, "whenFull": "reject"})
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 15, "subscribed")
    base = fill_a_one_megabyte_store(broker, tmp_path, worker)
    write_lines(tmp_path / "qos0", 4_000, width=20_000)  # 80 MB at QoS 0
    with open(tmp_path / "qos0", "rb") as lines:
        subprocess.run(["mosquitto_pub", *broker.client_args(), "-q", "0", "-t", INGRESS_TOPIC, "-l"],
                       stdin=lines, check=True, timeout=60, capture_output=True)
    worker.wait(lambda w: w.counters.get("received", 0) >= 40 + 4_000 or rss_kb(w.pid) - base > 60_000,
                60, "the QoS 0 flood read")
    grown = rss_kb(worker.pid) - base
    assert grown < 30_000, f"the ingress grew by {grown} KB holding QoS 0 messages it cannot store"
    assert worker.counters["dropped_qos0_full"] > 3_000 and worker.counters["store_full"]
    assert worker.log_text().count("dropping QoS 0 messages while the store refuses them") == 1
    assert worker.stop() == 0


def test_mosquittos_own_window_bounds_what_a_refusing_ingress_holds(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """MQTT 5: mosquitto takes a client's Receive Maximum in place of its own in-flight window
    (20 here, its default): a CONNECT saying 100 made it send 100 unacknowledged messages to
    an ingress whose store refuses, 5x what it holds without one (found by review)."""
    config = write_config(tmp_path / "config", broker, db={"capMegabytes": 1, "whenFull": "reject"},
                          mqtt={"protocol": "5"})
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 15, "subscribed")
    fill_a_one_megabyte_store(broker, tmp_path, worker)
    write_lines(tmp_path / "more", 500, width=2_000)
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "more").wait(60) == 0
    worker.wait(lambda w: w.counters.get("held", 0) >= BROKER_INFLIGHT // 2, 20, "messages held")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # no event marks "the broker sent no more": a window
        worker.pump(0.2)
    assert worker.counters["held"] <= 2 * BROKER_INFLIGHT, worker.counters
    assert worker.stop() == 0


def anon_kb(pid: int) -> int:
    """Anonymous resident memory of a live process, in KiB (a store's mapped pages left out)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError(f"no RssAnon for pid {pid}")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_broker_without_a_window_does_not_grow_a_refusing_ingress_and_nothing_is_lost(
        certs: Certs, tmp_path: Path, start_worker, protocol: str) -> None:
    """A broker with no in-flight window of its own (mosquitto's under MQTT 5 is the protocol's
    65,535; `max_inflight_messages 0` under either protocol) sent everything to an ingress
    whose store refused, and the ingress held it all (1,890 messages, 13 MB, found by review;
    60 MB here). Past a full batch they are left with the broker, and a reconnect once the
    store takes messages again has it resend them: each stored once."""
    broker = Broker(certs, tmp_path / "broker", extra=["max_inflight_messages 0"]).start()
    config = write_config(tmp_path / "config", broker, mqtt={"protocol": protocol},
                          db={"capMegabytes": 16, "whenFull": "reject", "maxPayloadBytes": 262_144})
    store = open_store(config)
    try:
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected"), 15, "subscribed")
        base = anon_kb(worker.pid)
        sent = write_lines(tmp_path / "big", 600, width=100_000)  # 60 MB into a 16 MB store
        assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "big").wait(120) == 0
        worker.wait(lambda w: w.counters.get("received", 0) >= len(sent) or anon_kb(w.pid) - base > 45_000,
                    60, "the broker's whole backlog read")
        grown = anon_kb(worker.pid) - base
        assert grown < 30_000, f"the ingress grew by {grown} KB holding messages its store refused: {worker.counters}"
        assert worker.counters["left_with_broker"] > 0 and worker.counters["store_full"], worker.counters
        seen: List[bytes] = []

        def drained() -> bool:  # read and ack what is stored, so that space frees for the rest
            messages = store.messages(limit=1000)
            seen.extend(m.payload for m in messages)
            store.ack([m.id for m in messages])
            return len(seen) >= len(sent)
        wait_for(drained, 90, "every message stored", interval=0.2)
        worker.wait(lambda w: w.counters.get("held") == 0, 10, "nothing held")
        assert not store.messages() and sorted(seen) == sorted(sent)  # each once
        log = worker.log_text()
        assert "leaving further QoS 1 messages with the broker" in log
        assert "reconnecting so that the broker resends the" in log and "Traceback" not in log, log[-3000:]
        worker.wait(lambda w: sum(1 for m in w.reports("mqtt") if m["connected"]) >= 2, 15,
                    "the link reported up again after the reconnect")
        assert worker.stop() == 0
    finally:
        store.close()
        broker.close()


def wide_window_setup(certs: Certs, tmp_path: Path, protocol: str) -> Tuple[Broker, Path, Store]:
    """A broker with no in-flight window of its own and a 1 MB store under `reject`."""
    broker = Broker(certs, tmp_path / "broker", extra=["max_inflight_messages 0"]).start()
    config = write_config(tmp_path / "config", broker, mqtt={"protocol": protocol},
                          db={"capMegabytes": 1, "whenFull": "reject"})
    return broker, config, open_store(config)


def read_and_ack(store: Store, seen: List[bytes], limit: int = 1000) -> int:
    """Read and acknowledge up to `limit` stored messages into `seen`; how many."""
    messages = store.messages(limit=limit)
    seen.extend(m.payload for m in messages)
    store.ack([m.id for m in messages])
    return len(messages)


def test_a_sender_outpacing_a_reader_has_the_left_messages_back_at_each_reconnect(
        certs: Certs, tmp_path: Path, start_worker) -> None:
    """A broker without a window of its own, a sender at twice what the store takes each second
    and a reader that empties it every second: messages are left with the broker again and
    again, a reconnect at most every second (paced: workers/recyclepace.py) brings them back,
    and each is stored once."""
    broker, config, store = wide_window_setup(certs, tmp_path, "5")
    sent: List[bytes] = []
    seen: List[bytes] = []
    try:
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected"), 15, "subscribed")
        sender = subprocess.Popen(["mosquitto_pub", *broker.client_args(), "-i", "sender", "-q", "1",
                                   "-t", INGRESS_TOPIC, "-l"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        broker.peers.append(sender)
        for second in range(5):  # 2,500 messages a second into a store of ~1,200 emptied every second
            for line in write_lines(tmp_path / "more", 2500, width=700, start=2500 * second):
                sender.stdin.write(line + b"\n")
                sent.append(line)
            sender.stdin.flush()
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                worker.pump(0.1)
            while read_and_ack(store, seen):
                pass
        sender.stdin.close()
        assert sender.wait(30) == 0
        assert worker.counters["left_with_broker"] > 0, worker.counters
        links = sum(1 for m in worker.reports("mqtt") if m["connected"])
        assert 2 <= links <= 6, f"{links} connections in 5 s"
        wait_for(lambda: read_and_ack(store, seen) >= 0 and len(seen) >= len(sent), 90, "every message stored",
                 interval=0.2)
        assert sorted(seen) == sorted(sent)
        assert worker.stop() == 0
    finally:
        store.close()
        broker.close()


def one_content_stored_once_across_a_kill(broker: Any, config: Path, tmp_path: Path, start_worker, count: int,
                                          kill_when: Callable[[Any, Store, List[bytes]], None]) -> None:
    """`count` messages of one content published under MQTT 3.1.1 (no packet ids in the marks)
    into `config`'s store (1 MB, `reject`), read and acknowledged as they come; the ingress
    killed once `kill_when(worker, store, seen)` returns, then started again: each stored once."""
    store = open_store(config)
    seen: List[bytes] = []
    try:
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected"), 15, "subscribed")
        (tmp_path / "same").write_bytes((b"same reading".ljust(700, b".") + b"\n") * count)
        assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "same").wait(60) == 0
        kill_when(worker, store, seen)
        worker.kill()
        worker = start_worker("ingress", config)
        wait_for(lambda: read_and_ack(store, seen) >= 0 and len(seen) >= count, 60, "every message stored", interval=0.2)
        worker.pump(1.0)  # a redelivery stored twice would show now
        read_and_ack(store, seen)
        assert len(seen) == count
        assert worker.stop() == 0
    finally:
        store.close()


def one_content_on_a_wide_window(certs: Certs, tmp_path: Path, start_worker, count: int,
                                 kill_when: Callable[[Any, Store, List[bytes]], None]) -> None:
    """one_content_stored_once_across_a_kill on a mosquitto with no in-flight window of its own."""
    broker, config, store = wide_window_setup(certs, tmp_path, "3.1.1")
    store.close()
    try:
        one_content_stored_once_across_a_kill(broker, config, tmp_path, start_worker, count, kill_when)
    finally:
        broker.close()


def test_a_kill_right_after_the_reconnect_for_left_messages_loses_none_of_a_content(
        certs: Certs, tmp_path: Path, start_worker) -> None:
    """The reconnect waited for the broker's confirmations, but they were written off in the
    store only at the next commit, so a kill right after it left the marks of the last batch,
    and the new process took the broker's resends of as many left messages for redeliveries:
    1,024 of 5,000 lost, 2 runs of 2 (found by re-read). They are written off before the
    reconnect."""
    def after_the_reconnect(worker: Any, store: Store, seen: List[bytes]) -> None:
        worker.wait(lambda w: w.counters.get("left_with_broker", 0) > 0, 20, "messages left with the broker")
        # the log looked at first: a kill one round trip after the reconnect is MQTT 3.1.1's known gap
        wait_for(lambda: "reconnecting so that the broker resends" in worker.log_text()
                 or read_and_ack(store, seen) < 0, 30, "the reconnect for the left messages")
    one_content_on_a_wide_window(certs, tmp_path, start_worker, 5000, after_the_reconnect)


def while_the_store_refuses_every_puback_confirmed(worker: Any, store: Store, seen: List[bytes]) -> None:
    """Return once the store refuses and the broker confirmed every PUBACK the ingress sent."""
    worker.wait(lambda w: w.counters.get("store_full") and w.counters.get("stored")
                and w.counters.get("acks_confirmed", 0) >= w.counters["stored"], 20,
                "the store refusing, every PUBACK sent confirmed")


def test_a_kill_while_the_store_refuses_loses_none_of_a_content(certs: Certs, tmp_path: Path,
                                                                 start_worker) -> None:
    """The broker's confirmation of the last commit's PUBACKs came while the store refused,
    and their marks were to go with the next commit, which never came while it refused;
    killed then, the new process took the broker's resends of as many held messages for
    redeliveries (found by re-read; while they waited 5 s more, up to 1,500 lost a kill,
    review "samecontent"). A refusing store takes them off alone, as soon as they are
    confirmed."""
    one_content_on_a_wide_window(certs, tmp_path, start_worker, 2000, while_the_store_refuses_every_puback_confirmed)


@pytest.mark.parametrize("any_broker", ["rabbitmq"], indirect=True)
def test_a_kill_while_the_store_refuses_loses_none_of_a_content_on_rabbitmq(
        any_broker: Any, tmp_path: Path, start_worker) -> None:
    """The same on RabbitMQ, whose confirmations and resends differ (its own window of 10, a
    session queue that resends every unacknowledged message after a reconnect)."""
    config = write_config(tmp_path / "config", any_broker, mqtt={"protocol": "3.1.1"},
                          db={"capMegabytes": 1, "whenFull": "reject"})
    one_content_stored_once_across_a_kill(any_broker, config, tmp_path, start_worker, 2000,
                                          while_the_store_refuses_every_puback_confirmed)


def test_reconnects_while_the_store_refuses_do_not_pile_up_window_after_window(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """The batch kept a dropped connection's messages (no longer ackable) and the broker,
    keeping the session, resent its whole window on the next connection: each reconnect
    added a window to what the ingress held (500 held after 4 cuts). They are let go, since
    the broker resends them (found by review)."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port,
                          db={"capMegabytes": 1, "whenFull": "reject"}, mqtt={"protocol": "5"})
    try:
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected"), 15, "subscribed")
        fill_a_one_megabyte_store(broker, tmp_path, worker)
        write_lines(tmp_path / "more", 300, width=40_000)  # more than 4 links' windows (~130 sent)
        assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "more").wait(60) == 0
        for _ in range(3):  # kept, 3 reconnects would hold 4 windows
            before = worker.counters["received"]
            proxy.cut()
            worker.wait(lambda w: w.counters.get("received", 0) > before and w.mqtt.get("connected"), 30,
                        "reconnected, the window resent")
        worker.wait(lambda w: w.counters.get("held", 0) > 0, 10, "the counters reported")
        assert worker.counters["held"] <= 2 * BROKER_INFLIGHT, worker.counters  # a window (and change)
        assert worker.stop() == 0
    finally:
        proxy.close()


def test_a_lost_sessions_held_messages_survive_a_later_reconnect_while_the_store_refuses(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """The other side of the above: messages held from a session the broker then lost are
    never resent, so they stay held across the new session's reconnects and are stored once
    space frees."""
    proxy = Proxy(broker)
    config = write_config(tmp_path / "config", broker, port=proxy.port,
                          db={"capMegabytes": 1, "whenFull": "reject"}, mqtt={"protocol": "5"})
    store = open_store(config)
    try:
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected"), 15, "subscribed")
        fill_a_one_megabyte_store(broker, tmp_path, worker)
        write_lines(tmp_path / "more", 30, width=2_000, start=1000)
        assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "more").wait(60) == 0
        worker.wait(lambda w: w.counters.get("held", 0) >= BROKER_INFLIGHT, 20, "a window held")
        received = worker.counters["received"]  # the rest is lost with the broker's session
        broker.stop()
        (broker.workdir / "state" / "mosquitto.db").unlink()  # back without our session
        broker.start()
        worker.wait(lambda w: w.counters.get("sessions_lost") == 1 and w.mqtt.get("connected"), 30, "session lost")
        before = sum(1 for m in worker.reports("mqtt") if m["connected"])
        proxy.cut()  # a reconnect of the new session, the store still refusing
        worker.wait(lambda w: sum(1 for m in w.reports("mqtt") if m["connected"]) > before
                    and w.mqtt.get("connected"), 30, "reconnected")
        seen = set()

        def drained() -> bool:  # read and ack what is stored, so that space frees for the rest
            messages = store.messages(limit=1000)
            seen.update(m.payload for m in messages)
            store.ack([m.id for m in messages])
            return len(seen) >= received
        wait_for(drained, 30, "every message received stored", interval=0.2)
        assert worker.stop() == 0
    finally:
        proxy.close()
        store.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_client_id_with_a_wildcard_character_keeps_the_link_up(
        broker: Broker, tmp_path: Path, start_worker, protocol: str) -> None:
    """MQTT allows `#` and `+` in a client id (mosquitto takes it): the ack barrier's
    UNSUBSCRIBE put it into a topic filter, an invalid one, so mosquitto dropped the link after
    every commit and no DUP mark was ever confirmed (found by review)."""
    config = write_config(tmp_path / "config", broker, mqtt={"clientId": "d%2B#1+x/y\u00e9", "egressClientId": "dev-e",
                                                            "protocol": protocol})
    store = open_store(config)
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 30, "subscribed")
    write_lines(tmp_path / "lines", 200, width=20)
    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "lines").wait(60) == 0
    wait_for(lambda: store.inbox_count() >= 200, 30, "all stored")
    worker.wait(lambda w: w.counters.get("acks_confirmed", 0) >= 200, 10, "the PUBACKs confirmed")
    assert "Malformed packet" not in worker.log_text() and worker.log_text().count("connected to") == 1
    assert worker.stop() == 0
    store.close()


def test_a_qos0_flood_of_property_heavy_messages_into_a_full_store_is_bounded_too(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """The held batch's bytes counted payloads only: 1-byte payloads with 240 KB of MQTT 5
    user properties each were all held, up to 1,024 of them (~250 MB; found by review)."""
    config = write_config(tmp_path / "config", broker, db={"capMegabytes": 1, "whenFull": "reject"},
                          mqtt={"protocol": "5"})
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 15, "subscribed")
    base = fill_a_one_megabyte_store(broker, tmp_path, worker)
    write_lines(tmp_path / "qos0", 200, width=1)
    properties = [arg for i in range(4) for arg in ("-D", "publish", "user-property", f"k{i}", "v" * 60_000)]
    with open(tmp_path / "qos0", "rb") as lines:  # 200 x 240 KB = 48 MB at QoS 0
        subprocess.run(["mosquitto_pub", *broker.client_args(), "-V", "5", "-q", "0", "-t", INGRESS_TOPIC,
                        "-l", *properties], stdin=lines, check=True, timeout=60, capture_output=True)
    worker.wait(lambda w: w.counters.get("received", 0) >= 40 + 200, 60, "the QoS 0 flood read")
    grown = rss_kb(worker.pid) - base
    assert grown < 30_000 and worker.counters["dropped_qos0_full"] > 100, (grown, worker.counters)
    assert worker.stop() == 0


def test_mqtt5_properties_count_against_the_inbound_size_limit(
        broker: Broker, tmp_path: Path, start_worker) -> None:
    """A 5-byte payload with 480 KB of MQTT 5 user properties was stored whole under a 1 KiB
    `maxPayloadBytes`: the properties are stored and served with it (found by review)."""
    config = write_config(tmp_path / "config", broker, db={"maxPayloadBytes": 1024}, mqtt={"protocol": "5"})
    store = open_store(config)
    worker = start_worker("ingress", config)
    worker.wait(lambda w: w.mqtt.get("connected"), 30, "subscribed")
    properties = [arg for i in range(8) for arg in ("-D", "publish", "user-property", f"k{i}", "v" * 60_000)]
    subprocess.run(["mosquitto_pub", *broker.client_args(), "-V", "5", "-q", "1", "-t", INGRESS_TOPIC,
                    "-m", "small", *properties], check=True, timeout=20, capture_output=True)
    publish(broker, INGRESS_TOPIC, b"marker")
    wait_for(lambda: b"marker" in [m.payload for m in store.messages()], 20, "the marker stored")
    assert [m.payload for m in store.messages()] == [b"marker"]
    worker.wait(lambda w: w.counters.get("dropped_oversize") == 1, 10, "counted")
    assert worker.stop() == 0
    store.close()


def test_a_broker_granting_qos_0_only_is_an_error_not_a_healthy_link(certs: Certs, tmp_path: Path,
                                                                      start_worker) -> None:
    """mosquitto's `max_qos 0`: the filters granted at QoS 0, status healthy, no word, and the
    messages published while the daemon restarted lost (review "mqtt5": 10 of 10)."""
    broker = Broker(certs, tmp_path / "broker", listener=["max_qos 0"]).start()
    try:
        config = write_config(tmp_path / "config", broker, mqtt={"protocol": "5"})
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.mqtt.get("connected") and w.mqtt.get("subscriptions"), 15, "subscribed")
        assert "broker grants only QoS 0 for " in (worker.mqtt.get("error") or ""), worker.mqtt
        assert worker.log_text().count("broker grants only QoS 0") == 1
        assert worker.stop() == 0
    finally:
        broker.close()
