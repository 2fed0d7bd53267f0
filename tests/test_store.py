"""The LMDB store, on real files: group commit, peeking, idempotent acks, DUP redeliveries,
expiry, the outbox, the cap policies, the schema and fork guards, and durability with several
processes writing at once or being killed with SIGKILL in the middle of a transaction."""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import random
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import lmdb
import pytest
from hypothesis import given, settings, strategies as st

from flashlexd.store import (SCHEMA_VERSION, Incoming, Store, dup_marks, StoreError, StoreForkError,
                             StoreFull)
from tests.daemon import Daemon, NotifyListener
from tests.tmpfs import fill as fill_disk, mounted_tmpfs

CAP = 64 * 1024 * 1024
TOPIC = "things/ecd13b11-mything/in"


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """`open_store(cap=..., when_full=..., expire_seconds=...)`; all closed at teardown."""
    opened: List[Store] = []

    def open_(cap: int = CAP, when_full: str = "reject",
              expire_seconds: Optional[float] = None) -> Store:
        store = Store(tmp_path / "store", cap, when_full, expire_seconds)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    return open_store()


def message(payload: str, topic: str = TOPIC, **fields) -> Incoming:
    return Incoming(topic, payload.encode(), **fields)


def batch(prefix: str, count: int, size: int = 0) -> List[Incoming]:
    return [Incoming(TOPIC, f"{prefix}{i}".encode().ljust(size, b".")) for i in range(count)]


def inbox(store: Store, **query) -> List[Tuple[int, bytes]]:
    return [(m.id, m.payload) for m in store.messages(limit=10 ** 6, **query)]


def ids(store: Store) -> List[int]:
    return [m.id for m in store.messages(limit=10 ** 6)]


def expiry_entries(store: Store) -> int:
    """White box: entries left in the expiry index (it must not outlive the messages)."""
    with store._env.begin() as txn:
        return txn.stat(store._expiry)["entries"]


# -- append and peek ----------------------------------------------------------------------------

def test_group_commit_append_returns_increasing_ids_in_order(store: Store):
    assert store.append(batch("a", 3)) == [1, 2, 3]
    assert store.append(batch("b", 2)) == [4, 5]
    assert store.append([]) == []
    assert inbox(store) == [(1, b"a0"), (2, b"a1"), (3, b"a2"), (4, b"b0"), (5, b"b1")]
    figures = store.stats()
    assert (figures["inbox_count"], figures["inbox_last_id"], figures["received"]) == (5, 5, 5)


def test_a_stored_message_keeps_its_fields(store: Store):
    [record_id] = store.append([Incoming("t/1", b"\x00\xffbin", qos=1, retain=True, mid=42)],
                               now=1234.5)
    [stored] = store.messages()
    assert (stored.id, stored.pk, stored.timestamp, stored.topic, stored.payload) == \
        (record_id, str(record_id), 1234.5, "t/1", b"\x00\xffbin")
    assert (stored.qos, stored.retain, stored.mid, stored.expires_at) == (1, True, 42, None)


def test_ids_are_never_reused_after_acks(store: Store):
    store.append(batch("a", 3))
    store.ack([1, 2, 3])
    assert store.append(batch("b", 1)) == [4]


def test_peek_with_limit_returns_the_oldest_first(store: Store):
    store.append(batch("m", 10))
    assert [(m.id, m.payload) for m in store.messages(limit=3)] == [(1, b"m0"), (2, b"m1"),
                                                                     (3, b"m2")]
    assert store.messages(limit=0) == []


def test_peek_topic_filter_uses_mqtt_wildcards(store: Store):
    topics = ["sensors/a/temp", "sensors/b/temp", "sensors/a/hum", "alerts/x", "sensors/a/temp/raw"]
    store.append([message(t, topic=t) for t in topics])

    def matching(pattern: str) -> List[str]:
        return [m.topic for m in store.messages(topic=pattern)]

    assert matching("sensors/+/temp") == ["sensors/a/temp", "sensors/b/temp"]
    assert matching("sensors/#") == ["sensors/a/temp", "sensors/b/temp", "sensors/a/hum",
                                     "sensors/a/temp/raw"]
    assert matching("sensors/a/+") == ["sensors/a/temp", "sensors/a/hum"]
    assert matching("alerts/x") == ["alerts/x"]
    assert matching("#") == topics
    assert matching("nothing/here") == []
    assert [m.topic for m in store.messages(limit=1, topic="sensors/+/temp", after=1)] == \
        ["sensors/b/temp"]


def test_peek_after_is_an_exclusive_id(store: Store):
    store.append(batch("m", 6))
    assert [m.id for m in store.messages(after=3)] == [4, 5, 6]
    assert [m.id for m in store.messages(after=3, limit=2)] == [4, 5]
    assert store.messages(after=6) == []
    assert [m.id for m in store.messages(after=0)] == [1, 2, 3, 4, 5, 6]
    assert store.messages(after=2 ** 64 - 1) == []
    store.ack([4])
    assert [m.id for m in store.messages(after=3)] == [5, 6]  # a gap is skipped


# -- ack ----------------------------------------------------------------------------------------

def test_ack_is_idempotent(store: Store):
    store.append(batch("m", 5))
    assert store.ack([1, 2]) == 2
    assert store.ack([1, 2]) == 0
    assert store.ack([2, 3, 3, 999]) == 1  # counts what was actually removed
    assert store.ack([]) == 0
    assert ids(store) == [4, 5]
    assert store.stats()["acked"] == 3


def test_ack_of_ids_that_cannot_exist_removes_nothing(store: Store):
    store.append(batch("m", 2))
    assert store.ack([0, -1, 2 ** 64]) == 0
    assert ids(store) == [1, 2]


# -- DUP redeliveries ---------------------------------------------------------------------------

def test_dup_redelivery_of_a_stored_message_is_not_stored_twice(store: Store):
    assert store.append([message("on", qos=1, mid=7)]) == [1]
    assert store.append([message("on", qos=1, mid=7, dup=True)]) == [None]
    assert inbox(store) == [(1, b"on")]
    assert store.stats()["duplicates"] == 1


def test_dup_redelivery_is_recognised_after_the_original_was_acked(store: Store):
    """Stored, acked by a fast client, then redelivered because our PUBACK never arrived."""
    store.append([message("on", qos=1, mid=7)])
    store.ack([1])
    assert store.append([message("on", qos=1, mid=7, dup=True)]) == [None]
    assert store.inbox_count() == 0


@pytest.mark.parametrize("redelivery", [
    message("off", qos=1, mid=7, dup=True),                          # other payload
    message("on", topic="things/other/in", qos=1, mid=7, dup=True),  # other topic
], ids=["payload", "topic"])
def test_dup_with_different_content_is_stored(store: Store, redelivery: Incoming):
    store.append([message("on", qos=1, mid=7)])
    assert store.append([redelivery]) == [2]
    assert store.inbox_count() == 2


def test_a_redelivery_under_a_new_packet_id_is_recognised(store: Store):
    """RabbitMQ renumbers what it redelivers: sent as 6, redelivered as 1."""
    store.append([message("on", qos=1, mid=6)])
    assert store.append([message("on", qos=1, mid=1, dup=True)]) == [None]


def test_once_confirmed_a_message_no_longer_masks_a_dup_of_equal_content(store: Store):
    first = message("a", qos=1, mid=5)
    store.append([first, message("b", qos=1, mid=5)])  # mid reused: `a` was acknowledged
    assert store.append([message("a", qos=1, mid=9, dup=True)]) == [None]  # not confirmed yet
    assert store.append([message("a", qos=1, mid=5, dup=True)], settled=dup_marks([first])) == [3]


def test_dup_of_a_message_earlier_in_the_same_batch_is_not_stored_twice(store: Store):
    result = store.append([message("x", qos=1, mid=3), message("x", qos=1, mid=3, dup=True),
                           message("y", qos=1, mid=4, dup=True)])
    assert result == [1, None, 2]
    assert inbox(store) == [(1, b"x"), (2, b"y")]


def test_qos0_messages_are_never_taken_for_redeliveries(store: Store):
    store.append([message("x", qos=0, mid=0)])
    assert store.append([message("x", qos=0, mid=0, dup=True)]) == [2]


# -- expiry -------------------------------------------------------------------------------------

def test_expire_removes_exactly_the_expired_messages(open_store: Callable[..., Store]):
    store = open_store(expire_seconds=60)
    store.append(batch("a", 3), now=1000.0)           # expire at 1060
    second = store.append(batch("b", 2), now=1010.0)  # 1070
    third = store.append(batch("c", 2), now=1020.0)   # 1080
    assert store.expire(now=1059.999) == 0
    assert store.expire(now=1060.0) == 3
    assert ids(store) == second + third
    assert store.expire(now=1075.0) == 2
    assert ids(store) == third
    assert [m.expires_at for m in store.messages()] == [1080.0, 1080.0]
    assert store.stats()["expired"] == 5


def test_expire_works_in_bounded_batches_oldest_first(open_store: Callable[..., Store]):
    store = open_store(expire_seconds=60)
    for now, count in ((1000.0, 10), (1001.0, 10), (1002.0, 5)):
        store.append(batch(f"t{now:.0f}-", count), now=now)
    removed = []
    for _ in range(6):
        removed.append(store.expire(now=2000.0, batch=7))
        if removed[-1] == 7:
            assert ids(store)[0] == sum(removed) + 1  # the oldest went first
    assert removed == [7, 7, 7, 4, 0, 0]
    assert store.inbox_count() == 0 and expiry_entries(store) == 0


def test_expire_skips_acked_messages_and_counts_only_what_it_removed(
        open_store: Callable[..., Store]):
    store = open_store(expire_seconds=60)
    store.append(batch("m", 10), now=1000.0)
    assert store.ack([1, 5, 10]) == 3  # both ends of the batch and a hole in the middle
    assert store.expire(now=2000.0, batch=3) == 3
    assert ids(store) == [6, 7, 8, 9]
    assert store.expire(now=2000.0) == 4
    assert store.stats()["expired"] == 7


def test_messages_without_an_expiry_never_expire(store: Store):
    store.append(batch("m", 3), now=1000.0)
    assert store.expire(now=10.0 ** 12) == 0
    assert store.inbox_count() == 3


def test_acking_every_message_leaves_no_expiry_work_behind(open_store: Callable[..., Store]):
    store = open_store(expire_seconds=60)
    appended = [i for n in range(5) for i in store.append(batch(f"b{n}-", 6), now=1000.0 + n)]
    order = appended[:]
    random.Random(7).shuffle(order)
    for chunk in range(0, len(order), 4):
        store.ack(order[chunk:chunk + 4])
    assert expiry_entries(store) == 0


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_expiry_matches_a_model_through_appends_acks_and_sweeps(data: st.DataObject):
    """Any mix of batches, acks and bounded sweeps removes exactly the messages whose expiry
    has passed, the earliest expiry first, and counts them right. `now` is this boot's steady
    time, which never goes back (wall-clock steps: test_clock_store.py)."""
    steps = st.sampled_from([0.0, 0.25, 1.0, 2.5])
    clock = [999.0]
    live: Dict[int, int] = {}  # id -> expiry in ms, the model
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory), CAP, expire_seconds=2.5)
        try:
            for _ in range(data.draw(st.integers(1, 12), label="steps")):
                action = data.draw(st.sampled_from(["append", "ack", "expire"]))
                if action == "append":
                    clock[0] += data.draw(steps, label="later by")
                    now = clock[0]
                    count = data.draw(st.integers(0, 4), label="count")
                    for record_id in store.append(batch("m", count), now=now):
                        live[record_id] = int((now + 2.5) * 1000)
                elif action == "ack":
                    known = sorted(live) + [max(live, default=0) + 1]
                    chosen = data.draw(st.lists(st.sampled_from(known), max_size=4), label="ack")
                    assert store.ack(chosen) == len(set(chosen) & set(live))
                    for record_id in chosen:
                        live.pop(record_id, None)
                else:
                    now = data.draw(st.sampled_from([1001.0, 1002.5, 1003.0, 1004.0, 1010.0]))
                    limit = data.draw(st.integers(1, 5), label="batch")
                    due = sorted((ms, i) for i, ms in live.items() if ms <= int(now * 1000))
                    assert store.expire(now=now, batch=limit) == len(due[:limit])
                    for _, record_id in due[:limit]:
                        del live[record_id]
                assert ids(store) == sorted(live)
            assert store.expire(now=10.0 ** 6, batch=10 ** 6) == len(live)
            assert store.inbox_count() == 0 and expiry_entries(store) == 0
        finally:
            store.close()


# -- the outbox ---------------------------------------------------------------------------------

def test_outbox_is_fifo(store: Store):
    entries = [("flashlex/collect", f"e{i}".encode(), 1, False) for i in range(3)]
    assert store.outbox_append(entries, now=50.0) == [1, 2, 3]
    assert [e.payload for e in store.outbox_peek()] == [b"e0", b"e1", b"e2"]
    assert [e.id for e in store.outbox_peek(limit=2)] == [1, 2]
    assert [e.id for e in store.outbox_peek(after=1)] == [2, 3]
    assert store.outbox_peek(limit=0) == []
    assert store.outbox_remove([1]) == 1
    assert store.outbox_remove([1]) == 0
    assert store.outbox_append([("flashlex/collect", b"e3", 0, True)]) == [4]
    assert [e.id for e in store.outbox_peek()] == [2, 3, 4]
    first = store.outbox_peek(limit=1)[0]
    assert (first.created, first.topic, first.qos, first.retain) == \
        (50.0, "flashlex/collect", 1, False)
    figures = store.stats()
    assert (figures["outbox_count"], figures["queued"], figures["sent"]) == (3, 4, 1)


def test_outbox_refuses_entries_beyond_max_entries(store: Store):
    entry = ("flashlex/collect", b"x", 1, False)
    assert store.outbox_append([entry, entry], max_entries=3) == [1, 2]
    with pytest.raises(StoreFull, match="outbox is full"):
        store.outbox_append([entry, entry], max_entries=3)
    assert store.outbox_count() == 2  # nothing of the refused batch
    assert store.outbox_append([entry], max_entries=3) == [3]
    with pytest.raises(StoreFull):
        store.outbox_append([entry], max_entries=3)
    store.outbox_remove([1])
    assert store.outbox_append([entry], max_entries=3) == [4]
    assert len(store.outbox_append([entry] * 10, max_entries=-1)) == 10  # -1: unlimited


# -- the cap ------------------------------------------------------------------------------------

SMALL_CAP = 512 * 1024


def fill(store: Store, size: int = 1000, per_batch: int = 20) -> int:
    """Append until the store refuses; returns how many batches went in."""
    for count in range(10_000):
        try:
            store.append(batch(f"fill{count}-", per_batch, size))
        except StoreFull:
            return count
    raise AssertionError("the store never filled up")


def test_reject_policy_refuses_the_whole_batch_and_stores_nothing_of_it(
        open_store: Callable[..., Store]):
    store = open_store(cap=SMALL_CAP, when_full="reject")
    assert fill(store) > 0
    before, last_id = inbox(store), store.stats()["inbox_last_id"]
    with pytest.raises(StoreFull, match="policy reject"):
        store.append(batch("late", 20, 1000))
    assert inbox(store) == before
    assert store.stats()["inbox_last_id"] == last_id


def test_acks_work_in_a_full_store_and_make_room_again(open_store: Callable[..., Store]):
    store = open_store(cap=SMALL_CAP, when_full="reject")
    fill(store)
    stored = ids(store)
    assert store.ack(stored[: len(stored) // 2]) == len(stored) // 2
    new_ids = store.append(batch("after-ack", 20, 1000))
    assert new_ids[0] > stored[-1] and len(new_ids) == 20


def test_confirmed_marks_are_taken_off_in_a_store_past_its_cap(open_store: Callable[..., Store]):
    """The README: deletes and acks always work in a full store. A clean stop takes the marks
    the barrier confirmed off with an append of no message, and a `reject` store past its cap
    refused it: the marks stayed, and after the restart the broker's resend (DUP) of a held
    message of that content was taken for a redelivery and lost (found by review)."""
    store = open_store()
    on = message("on", qos=1, mid=1)
    assert store.append([on], links=[1]) == [1]
    store.append(batch("held", 100, 1000))
    store.close()
    store = open_store(cap=64 * 1024, when_full="reject")  # capMegabytes lowered: past the cap
    with pytest.raises(StoreFull):
        store.append(batch("late", 1))
    store.append([], settled=dup_marks([on]))  # its PUBACK confirmed, at a stop
    store.ack(ids(store))
    assert store.append([message("on", qos=1, mid=2, dup=True)], links=[2]) != [None]


def test_drop_oldest_policy_keeps_the_newest(open_store: Callable[..., Store]):
    store = open_store(cap=SMALL_CAP, when_full="dropOldest", expire_seconds=60)
    total = 0
    for n in range(60):  # about 1.2 MB into a 512 KiB store
        total += len(store.append(batch(f"b{n}-", 20, 1000), now=1000.0))
    kept = ids(store)
    assert 0 < len(kept) < total
    assert kept == list(range(total - len(kept) + 1, total + 1))  # a suffix: the newest
    figures = store.stats()
    assert figures["dropped_full"] == total - len(kept)
    assert figures["used_bytes"] <= SMALL_CAP * 1.1
    assert store.expire(now=5000.0, batch=10 ** 6) == len(kept)  # the expiry index kept up
    assert expiry_entries(store) == 0


def test_drop_oldest_is_logged_once_a_minute_with_how_many(open_store: Callable[..., Store], caplog):
    """Found by review: 4,311 messages dropped under dropOldest with no line in the log (only
    the `dropped_full` counter). A WARNING now at the first, at most one a minute after, with
    the count since the last, and the rest at close: the lines add up to the counter (found by
    re-read: they said 72 of 1,901)."""
    def told() -> List[int]:
        return [int(r.getMessage().split("dropOldest): ")[1].split()[0]) for r in caplog.records
                if "dropped to make room" in r.getMessage()]
    store = open_store(cap=SMALL_CAP, when_full="dropOldest")
    with caplog.at_level(logging.WARNING, logger="flashlexd.store"):
        total = sum(len(store.append(batch(f"b{n}-", 20, 1000), now=1000.0)) for n in range(60))
        dropped = store.stats()["dropped_full"]
        assert 0 < dropped < total
        assert len(told()) == 1 and 0 < told()[0] < dropped  # the first commit's; the rest wait
        store._drop_lines.last -= 60  # a minute later
        store.append(batch("late-", 20, 1000), now=1000.0)
        assert len(told()) == 2 and sum(told()) == store.stats()["dropped_full"]
        assert caplog.records[-1].getMessage().endswith("since the last line about it (the store's"
                                                        " dropped_full counts them all)")
        store.append(batch("later-", 20, 1000), now=1000.0)  # within the minute: not yet said
        dropped = store.stats()["dropped_full"]
        assert len(told()) == 2
        store.close()
        assert len(told()) == 3 and sum(told()) == dropped


def test_drop_oldest_keeps_every_commit_within_the_cap(open_store: Callable[..., Store]):
    """The room made before an append is an estimate of the batch's records alone; each
    message also adds a dedupe key, a DUP mark and a per-message expiry entry, and pages split.
    After the append the store drops older messages until its pages are within the cap again."""
    store = open_store(cap=SMALL_CAP, when_full="dropOldest")
    total, over = 0, []
    for n in range(80):
        messages = [Incoming(TOPIC, f"c{n}-{i}".encode().ljust(300, b"."), mid=i + 1, dup=False,
                             key=f"key-{n}-{i}".encode(),
                             properties={"message_expiry_interval": 2 ** 32 - 1})  # unexpired at 1970s stamps
                    for i in range(40)]
        total += len(store.append(messages, now=1000.0 + n, dedupe_window=10))
        used = store.stats()["used_bytes"]
        if used > SMALL_CAP:
            over.append((n, used))
    kept = ids(store)
    assert 0 < len(kept) < total and kept == list(range(total - len(kept) + 1, total + 1))
    assert store.stats()["dropped_full"] == total - len(kept)
    assert over == [], f"over the {SMALL_CAP} byte cap after these appends: {over}"


def test_drop_oldest_makes_room_in_a_store_over_a_lowered_cap(tmp_path: Path):
    """README: a store over a cap lowered since is handled "as for any store over its cap":
    under dropOldest the oldest inbox messages make room. 2000-byte payloads fill LMDB's leaf
    pages by half, so the pages used are twice the record bytes: the excess measured in pages
    and dropped by record bytes made even the whole inbox "not enough", and then the map (the
    new cap and its headroom) had no page left for the write: every append refused, ingress
    acknowledging nothing again (found by review). Now a step at a time, measured again."""
    data = tmp_path / "store"
    store = Store(data, 64 * 1024 * 1024)
    try:
        for start in range(0, 8000, 500):
            store.append([Incoming("t", b"x" * 2000, mid=start // 500 + 1) for _ in range(500)])
    finally:
        store.close()
    store = Store(data, 8 << 20, when_full="dropOldest")
    try:
        before = store.stats()
        assert before["used_bytes"] > 8 << 20 and before["inbox_count"] == 8000
        ids = store.append([Incoming("t", b"new", mid=1)])
        after = store.stats()
        assert ids[0] is not None and after["dropped_full"] > 0
        assert after["used_bytes"] <= 8 << 20
    finally:
        store.close()


def test_under_drop_oldest_the_inbox_makes_room_for_the_outbox_which_is_never_dropped(
        open_store: Callable[..., Store]):
    """An inbox that dropOldest keeps at the cap (apps that do not ack) refused every publish
    for good (found by review): inbox messages make room for outbox entries too. Outbox entries
    are never dropped: once they alone fill the cap, a publish is refused and drops nothing."""
    store = open_store(cap=SMALL_CAP, when_full="dropOldest")
    total = sum(len(store.append(batch(f"b{n}-", 20, 1000))) for n in range(30))  # 600 KB
    dropped = store.stats()["dropped_full"]
    assert dropped > 0
    entry = ("flashlex/collect", b"o" * 1000, 1, False)
    queued = store.outbox_append([entry] * 20)
    figures = store.stats()
    assert figures["dropped_full"] > dropped and figures["used_bytes"] <= SMALL_CAP
    kept = ids(store)
    assert kept == list(range(total - len(kept) + 1, total + 1))  # the newest, as for the inbox
    with pytest.raises(StoreFull, match="outbox append refused, nothing left to drop"):
        for _ in range(10_000):
            queued += store.outbox_append([entry] * 20)
    left = ids(store)  # fewer than a refused batch needed: its drops were rolled back with it
    assert len(left) < 20 and store.stats()["dropped_full"] == total - len(left)
    assert [e.id for e in store.outbox_peek(limit=10 ** 6)] == queued


# -- schema and fork guards ---------------------------------------------------------------------

def test_a_store_with_a_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "store"
    Store(path, CAP).close()
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"schema", struct.pack(">Q", SCHEMA_VERSION + 1), db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(StoreError) as caught:
        Store(path, CAP)
    message = str(caught.value)
    assert f"has schema {SCHEMA_VERSION + 1}" in message and "upgrade flashlexd" in message
    assert str(path) in message and "\n" not in message


def test_an_older_schema_held_open_by_another_process_is_not_migrated(tmp_path: Path, caplog):
    """Found by review: a release before the data dir lock takes none, so the current one
    started beside it (or refused later, at its socket) had already migrated the store under
    it, one way. A store another live process holds open is not migrated; once it is closed,
    the migration goes ahead and says so."""
    path = tmp_path / "store"
    Store(path, CAP).close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema", struct.pack(">Q", SCHEMA_VERSION - 1), db=env.open_db(b"meta", txn=txn))
    env.close()
    holder = subprocess.Popen([sys.executable, "-c", "import lmdb, sys\n"
                               f"env = lmdb.open({str(path)!r}, max_dbs=16)\n"
                               "env.begin().abort()\nprint('open', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(StoreError) as caught:
            Store(path, CAP)
        assert f"is open in pid {holder.pid}: stop that flashlexd first" in str(caught.value)
    finally:
        holder.communicate("", timeout=10)
    caplog.set_level(logging.INFO, "flashlexd.store")
    Store(path, CAP).close()
    assert f"migrated from schema {SCHEMA_VERSION - 1} to {SCHEMA_VERSION}" in caplog.text


STORE_CALLS: List[Callable[[Store], object]] = [
    lambda s: s.inbox_count(),
    lambda s: s.messages(),
    lambda s: s.stats(),
    lambda s: s.append([message("from the child")]),
    lambda s: s.ack([1]),
    lambda s: s.expire(now=10.0 ** 9),
    lambda s: s.outbox_append([("t", b"x", 1, False)]),
    lambda s: s.outbox_peek(),
    lambda s: s.outbox_dead_letter(1, "refused", 3),
    lambda s: s.dead_letters(),
    lambda s: s.dead_retry([1]),
    lambda s: s.outbox_drop([1], dead=True),
]


def test_a_store_used_across_fork_raises_in_the_child(store: Store):
    store.append([message("before fork")])
    pid = os.fork()
    if pid == 0:  # the child: exit status = number of calls that did not refuse
        status = 100
        try:
            status = 0
            for call in STORE_CALLS:
                try:
                    call(store)
                    status += 1
                except StoreForkError:
                    pass
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert inbox(store) == [(1, b"before fork")]  # the parent's handle is untouched
    assert store.append([message("after fork")]) == [2]


# -- several processes --------------------------------------------------------------------------

WRITERS, PER_WRITER, KEPT_MODULO = 3, 150, 7
DEADLINE_SECONDS = 30.0


def _writer(path: Path, writer: int, results) -> None:
    """Appends PER_WRITER messages in random batches; reports (id, payload) of each."""
    store = Store(path, CAP)  # opened after fork, in this process
    rng, written, sequence = random.Random(writer), [], 0
    while sequence < PER_WRITER:
        count = min(rng.randint(1, 10), PER_WRITER - sequence)
        payloads = [f"w{writer}-{sequence + i}".encode() for i in range(count)]
        got = store.append([Incoming(f"w/{writer}", p, qos=1, mid=(sequence + i) & 0xFFFF)
                            for i, p in enumerate(payloads)])
        written += list(zip(got, payloads))
        sequence += count
    store.close()
    results.put(("writer", writer, written))


def _acker(path: Path, acker: int, writers_done, results) -> None:
    """Acks what it sees (except ids divisible by KEPT_MODULO) until the writers are done and
    nothing is left: acker 0 one id per call (each return value says if *it* removed it),
    the others whole peeks per call. Reports what it asked for and what came back."""
    store = Store(path, CAP)
    singles: List[Tuple[int, bytes, int]] = []  # (id, payload seen, removed by this call)
    batches: List[Tuple[List[Tuple[int, bytes]], int]] = []
    rng, deadline = random.Random(100 + acker), time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        finished = writers_done.is_set()  # read before peeking: then an empty peek is final
        seen = [(m.id, m.payload) for m in store.messages(limit=1000) if m.id % KEPT_MODULO]
        if not seen:
            if finished:
                break
            writers_done.wait(0.002)  # poll; the event only ends the wait early
            continue
        if acker == 0:
            for record_id, payload in rng.sample(seen, min(len(seen), 5)):
                singles.append((record_id, payload, store.ack([record_id])))
        else:
            chunk = seen[:rng.randint(1, 20)]
            batches.append((chunk, store.ack([i for i, _ in chunk])))
    store.close()
    results.put(("acker", acker, singles, batches))


def _collect(results, count: int, processes: list, deadline: float) -> List[tuple]:
    """`count` reports, polling with a deadline; a child that died fails the test at once."""
    reports: List[tuple] = []
    while len(reports) < count:
        try:
            reports.append(results.get(timeout=0.05))
        except queue.Empty:
            failed = [(p.pid, p.exitcode) for p in processes if p.exitcode not in (None, 0)]
            assert not failed, f"children failed (pid, exit code): {failed}"
            assert time.monotonic() < deadline, "children did not report in time"
    return reports


def test_concurrent_writers_and_ackers_lose_nothing_and_duplicate_nothing(tmp_path: Path):
    path = tmp_path / "store"
    Store(path, CAP).close()  # created here, closed before any fork
    context = multiprocessing.get_context("fork")
    results, writers_done = context.Queue(), context.Event()
    processes = [context.Process(target=_writer, args=(path, w, results)) for w in range(WRITERS)]
    processes += [context.Process(target=_acker, args=(path, a, writers_done, results))
                  for a in range(2)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        written = _collect(results, WRITERS, processes, deadline)
        writers_done.set()
        acked = _collect(results, 2, processes, deadline)
        for process in processes:
            process.join(max(0.1, deadline - time.monotonic()))
            assert process.exitcode == 0, f"pid {process.pid} exit {process.exitcode}"
    finally:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()

    appended: Dict[int, bytes] = {}
    for _, _, pairs in written:
        for record_id, payload in pairs:
            assert record_id not in appended, f"id {record_id} given to two appends"
            appended[record_id] = payload
    assert len(appended) == WRITERS * PER_WRITER
    assert len(set(appended.values())) == WRITERS * PER_WRITER

    store = Store(path, CAP)
    try:
        remaining = dict(inbox(store))
        figures = store.stats()
    finally:
        store.close()
    removed_ids = set(appended) - set(remaining)
    assert set(remaining) <= set(appended)
    assert all(remaining[i] == appended[i] for i in remaining)        # nothing changed
    assert set(remaining) == {i for i in appended if i % KEPT_MODULO == 0}

    total_removed, removed_by_singles = 0, Counter()
    for _, _, singles, batches in acked:
        for record_id, payload, removed in singles:
            assert payload == appended[record_id]
            removed_by_singles[record_id] += removed
            total_removed += removed
        for chunk, removed in batches:
            assert all(payload == appended[i] for i, payload in chunk)
            total_removed += removed
    assert total_removed == len(removed_ids)  # every removal counted once, none twice
    assert all(count <= 1 and i in removed_ids for i, count in removed_by_singles.items())
    assert figures["acked"] == len(removed_ids)
    assert (figures["received"], figures["inbox_last_id"]) == (len(appended), len(appended))


# -- SIGKILL in the middle of writes ------------------------------------------------------------

REPORT = struct.Struct(">QQ")  # first id, first sequence number of a committed batch
KILL_BATCH, KILL_PAYLOAD = 200, 1000


def kill_payload(round_: int, sequence: int) -> bytes:
    return f"r{round_}-s{sequence}".encode().ljust(KILL_PAYLOAD, b".")


def _append_until_killed(path: Path, round_: int, report_fd: int) -> None:
    store = Store(path, 4 * CAP)
    sequence = 0
    while True:
        got = store.append([Incoming("k/t", kill_payload(round_, sequence + i))
                            for i in range(KILL_BATCH)])
        assert got == list(range(got[0], got[0] + KILL_BATCH))
        os.write(report_fd, REPORT.pack(got[0], sequence))  # only after append returned
        sequence += KILL_BATCH


def _read_reports(fd: int, pending: bytearray, until: float,
                  want: int = 0) -> List[Tuple[int, int]]:
    """Reports read before `until` (or as soon as `want` of them arrived); b"" is the end."""
    reports: List[Tuple[int, int]] = []
    while (not want or len(reports) < want) and time.monotonic() < until:
        ready, _, _ = select.select([fd], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        while len(pending) >= REPORT.size:
            reports.append(REPORT.unpack(bytes(pending[:REPORT.size])))
            del pending[:REPORT.size]
    return reports


def test_sigkill_during_writes_keeps_every_committed_message(tmp_path: Path):
    path = tmp_path / "store"
    Store(path, 4 * CAP).close()
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    committed: Dict[int, bytes] = {}
    for round_ in range(10):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                _append_until_killed(path, round_, write_fd)
            finally:
                os._exit(3)
        os.close(write_fd)
        pending = bytearray()
        try:
            wanted = rng.randint(1, 4)
            reports = _read_reports(read_fd, pending, time.monotonic() + 10.0, want=wanted)
            assert len(reports) == wanted, f"seed {seed}: child stalled"
            # a random extra moment, so the kill lands anywhere in the next transaction
            reports += _read_reports(read_fd, pending, time.monotonic() + rng.uniform(0, 0.004))
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        reports += _read_reports(read_fd, pending, time.monotonic() + 1.0)  # written before death
        os.close(read_fd)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"seed {seed}: the child ended by itself (status {status})"
        for first_id, sequence in reports:
            for i in range(KILL_BATCH):
                committed[first_id + i] = kill_payload(round_, sequence + i)

        store = Store(path, 4 * CAP)  # must open; clears the dead child's reader slot
        try:
            stored = dict(inbox(store))
            missing = [i for i, payload in committed.items() if stored.get(i) != payload]
            assert not missing, f"seed {seed}, round {round_}: lost {len(missing)} committed"
            assert store.stats()["inbox_last_id"] >= max(committed)
            [new_id] = store.append([message("the writer lock is free")])
            assert store.ack([new_id]) == 1
        finally:
            store.close()



def test_a_settled_message_no_longer_masks_a_later_dup_with_the_same_mid_and_content(tmp_path):
    """Once the broker has processed a message's PUBACK, its DUP mark goes: a new message with
    its packet id and content that arrives only as a DUP (first transmission lost) is stored."""
    store = Store(tmp_path / "data", cap_bytes=64 << 20)
    first = Incoming("t", b"ping", qos=1, mid=1)
    assert store.append([first]) == [1]
    assert store.append([Incoming("t", b"ping", qos=1, mid=1, dup=True)]) == [None]  # unsettled
    assert store.append([Incoming("t", b"other", qos=1, mid=2)], settled=dup_marks([first])) == [2]
    assert store.append([Incoming("t", b"ping", qos=1, mid=1, dup=True)]) == [3]
    store.close()


def test_an_open_that_fails_after_lmdb_mapped_the_file_leaves_no_handle(tmp_path, monkeypatch):
    """The data file gone between LMDB's open and the identity stat (a data dir removed at
    start): the open fails with one line and closes LMDB's handle, so the next open in this
    process is the only one on the file (two break LMDB's locks when either is closed)."""
    from flashlexd.storebase import StoreBase
    Store(tmp_path / "store", CAP).close()

    def gone(self: StoreBase) -> Tuple[int, int]:
        raise FileNotFoundError(2, "No such file or directory", str(self.path / "data.mdb"))

    def handles() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}") == str(tmp_path / "store" / "data.mdb"))

    with monkeypatch.context() as patch:
        patch.setattr(StoreBase, "_data_file", gone)
        with pytest.raises(StoreError, match="cannot open store in .*No such file") as refused:
            Store(tmp_path / "store", CAP)
    assert handles() == 0, "a handle is left while the error is held (its context's frames)"
    del refused
    store = Store(tmp_path / "store", CAP)
    try:
        assert store.append(batch("again", 1)) == [1]
    finally:
        store.close()
    assert handles() == 0


def test_every_guarded_method_that_writes_is_refused_on_a_damaged_store():
    """A damaged store is read-only: `guarded` refuses the methods named in WRITES before they
    start. `note_session_topics` wrote on regardless (review): a new write method must be named."""
    import inspect
    from flashlexd.storedamage import WRITES
    writers = {name for name, method in inspect.getmembers(Store, inspect.isfunction)
               if hasattr(method, "__wrapped__") and "self._write(" in inspect.getsource(method.__wrapped__)}
    assert writers and writers <= WRITES, sorted(writers - WRITES)


def test_a_cap_past_lmdbs_map_size_is_a_store_error(tmp_path):
    """lmdb.open raised OverflowError, which is not an lmdb.Error: a reload's reopen left the
    supervisor with its store closed, every API call failing (found by review). It names the
    setting to lower (a 32-bit size_t overflows at 4 GiB)."""
    with pytest.raises(StoreError, match="cannot open store in .*capMegabytes.*lower capMegabytes"):
        Store(tmp_path / "store", 2 ** 70)


OPEN_IN_CHILD = """
import sys
from flashlexd.store import Store, StoreError
try:
    Store(sys.argv[1], 16 << 20).close()
except StoreError as exc:
    sys.exit(str(exc))
"""


def open_in_child(path: Path) -> subprocess.CompletedProcess:
    """Open and close a Store in a child process: a SIGBUS kills the child, not pytest."""
    return subprocess.run([sys.executable, "-c", OPEN_IN_CHILD, str(path)], capture_output=True,
                          text=True, timeout=60)


def address_space(limit: int) -> Callable[[], None]:
    """A preexec_fn giving the child `limit` bytes of address space, as `ulimit -v` does: a
    32-bit Pi's ~3 GB per process, emulated."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_a_map_that_does_not_fit_the_address_space_names_capmegabytes(tmp_path):
    """On a 32-bit Pi (~3 GB per process) a large capMegabytes said only `cannot open store in
    DIR: DIR: Cannot allocate memory`, naming no setting (found by review)."""
    refused = subprocess.run([sys.executable, "-c", OPEN_IN_CHILD.replace("16 << 20", "2048 << 20"),
                              str(tmp_path / "store")], capture_output=True, text=True, timeout=60,
                             preexec_fn=address_space(1 << 30))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "capMegabytes 2048" in refused.stderr and "lower capMegabytes" in refused.stderr, refused.stderr


WRITE_WITHOUT_ROOM_FOR_A_THREAD = """
import resource, sys
from flashlexd.store import Incoming, Store, StoreError
store = Store(sys.argv[1], 16 << 20, write_wait=1.0)
held = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (held + (1 << 20), resource.RLIM_INFINITY))  # no 8 MiB stack
try:
    store.append([Incoming(topic="t/in", payload=b"x")])
except StoreError as exc:
    sys.exit(str(exc))
"""


def test_a_bounded_write_whose_thread_cannot_start_is_a_store_error(tmp_path):
    """The supervisor's writes run in a helper thread (write_wait): with no address space left
    for its stack the write raised RuntimeError (`can't start new thread`), a traceback, not
    the store's one-line error naming the setting to lower (found by review)."""
    refused = subprocess.run([sys.executable, "-c", WRITE_WITHOUT_ROOM_FOR_A_THREAD, str(tmp_path / "store")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "can't start new thread" in refused.stderr and "capMegabytes" in refused.stderr, refused.stderr


def _vm_size(pid: int) -> int:
    """Bytes of address space process `pid` holds."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:"))


@pytest.mark.parametrize("spare", [-4 << 20, 512 << 10], ids=["no-room-for-a-thread", "no-room-for-a-lookup"])
def test_a_map_that_leaves_too_little_address_space_is_one_line_at_start(daemon_config, tmp_path, spare):
    """A map that fits but leaves too little room (RLIMIT_AS: the running supervisor's own size
    less 4 MiB, or plus 512 KiB): the supervisor died with a traceback (`can't start new
    thread`, the store's write helper), or its workers crash-looped (`unknown encoding: idna`,
    their name lookups failing for memory). The start is now refused in one line, exit 1
    (found by review). Real daemon, real mosquitto."""
    notify = NotifyListener(tmp_path / "notify.sock")
    first = Daemon(daemon_config, tmp_path / "first", env={"NOTIFY_SOCKET": str(notify.path)}).start()
    try:
        notify.wait_for("READY=1", timeout=15)
        running = _vm_size(first.pid)  # its map and its write helper's stack, on this machine
    finally:
        first.stop()
        notify.close()
    again = Daemon(daemon_config, tmp_path / "again", preexec=address_space(running + spare)).start()
    try:
        code = again.wait_exit(timeout=30)
    finally:
        again.stop()
    output = again.output()
    assert code == 1 and "Traceback" not in output, output[-2000:]
    assert "cannot start" in output and "lower capMegabytes" in output, output[-2000:]


def test_a_new_store_on_a_full_disk_is_one_line_and_opens_once_space_is_freed(tmp_path):
    """A first start on a full disk died of SIGBUS with nothing in the log, at every restart:
    LMDB makes lock.mdb sparse and writes it through a memory map (found by review). Now it
    is one line naming the full disk, and the store opens once space is freed."""
    with mounted_tmpfs(tmp_path / "disk", 1) as disk:
        junk = fill_disk(disk, 0)
        refused = open_in_child(disk / "store")
        junk.unlink()
        again = open_in_child(disk / "store")
    assert refused.returncode == 1, f"exit {refused.returncode} (-7: SIGBUS): {refused.stderr}"
    assert "cannot open store" in refused.stderr and "no space left on device" in refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert again.returncode == 0, again.stderr



def test_a_disk_out_of_inodes_is_named_so_not_out_of_space(tmp_path):
    """Review "diskfull": with its inodes used up, the disk nearly empty, the start said "no
    space left on device" (what `df -h` contradicts)."""
    with mounted_tmpfs(tmp_path / "disk", 8, options="nr_inodes=3") as disk:
        refused = open_in_child(disk / "store")
    assert refused.returncode == 1 and "no free inodes on its filesystem (df -i" in refused.stderr, refused.stderr


def test_a_first_open_cut_short_by_a_full_disk_leaves_no_damaged_store_behind(tmp_path):
    """A first start with a few KiB free left a 4096-byte data.mdb (its second meta page cut
    short) that every later start called damaged, even after space was freed, and `store
    recover` reported records lost from a store that never held one (found by review). Now
    the refused open removes it, and the store opens once space is freed."""
    with mounted_tmpfs(tmp_path / "disk", 1) as disk:
        junk = fill_disk(disk, 12288)  # lock.mdb's 8 KiB and one of data.mdb's two meta pages
        refused = open_in_child(disk / "store")
        junk.unlink()
        again = open_in_child(disk / "store")
    assert refused.returncode == 1 and "no space left on device" in refused.stderr, refused.stderr
    assert again.returncode == 0, again.stderr


def test_the_last_ingress_client_id_is_recorded_not_worked_out_from_wall_times(store: Store) -> None:
    """Found by re-read: the start's warning about a new client id took the ingress session
    marked latest by the wall clock; a run with the clock set back (a Pi before NTP) made an
    older id look newer and the next start warned of a change that did not happen."""
    assert store.last_ingress_client_id() is None  # a store that never connected: nothing to say
    store.note_session("thing-a", 2_000_000_000.0, ingress=True)
    store.note_session("thing-b", 1_000_000_000.0, ingress=True)  # the clock behind
    store.note_session("thing-b-egress", 3_000_000_000.0)  # the egress's link is not the thing's id
    assert store.last_ingress_client_id() == "thing-b"
    assert store.session_seen("thing-a") == 2_000_000_000.0


def test_the_session_records_per_broker_and_the_previous_releases_record(store: Store) -> None:
    """Found by review: the record (then the wall time and the broker) was none to the
    previous release, which reads exactly the double: `session:` stays that. A session up on
    each broker, and the last link's broker, are records of their own; the previous release's
    store names no broker (unknown): its record stands for the broker of now."""
    store.note_session("thing-a", 2_000_000_000.0, ingress=True, broker="a.example")
    store.note_session("thing-a", 2_000_000_100.0, ingress=True, broker="b.example", last=False)
    with store._read() as txn:
        assert bytes(txn.get(b"session:thing-a", db=store._meta)) == struct.pack(">d", 2_000_000_100.0)
    assert store.session_broker("thing-a") == "a.example"  # not `last`: a move's marks not dropped yet
    assert store.session_seen_on("thing-a", "a.example") == 2_000_000_000.0
    assert store.session_seen_on("thing-a", "b.example") == 2_000_000_100.0
    assert store.session_seen_on("thing-a", "c.example") is None  # never up there: nothing to lose
    store._write(lambda txn: txn.put(b"session:thing-b", struct.pack(">d", 1_000_000_000.0), db=store._meta))
    assert (store.session_seen("thing-b"), store.session_broker("thing-b")) == (1_000_000_000.0, None)
    # the previous release's: taken for any broker's (an upgrade seldom moves; a lost session said)
    assert store.session_seen_on("thing-b", "a.example") == 1_000_000_000.0
    store._write(lambda txn: txn.put(b"sessionbroker:thing-b", b"a.example", db=store._meta))
    assert store.session_seen_on("thing-b", "a.example") == 1_000_000_000.0
    assert store.session_seen_on("thing-b", "z.example") is None  # its last link was elsewhere
    assert store.session_broker("thing-c") is None and store.last_ingress_client_id() == "thing-a"


def test_a_store_from_before_the_record_gives_its_latest_ingress_session(store: Store) -> None:
    """Found by re-read: a store from before the record gave None, so the first start after
    the upgrade, under a new client id, did not warn. Only the ingress records topic filters."""
    store.note_session("old-a", 1_000_000_000.0)
    store.note_session_topics("old-a", ["t/#"])
    store.note_session("old-b", 2_000_000_000.0)
    store.note_session_topics("old-b", ["t/#"])
    store.note_session("old-b-egress", 3_000_000_000.0)
    assert store.last_ingress_client_id() == "old-b"


def test_a_store_from_before_the_record_without_topic_records_gives_its_latest_session(store: Store) -> None:
    """Found by re-read: the ingress recorded its filters only when they were more than the
    pubsub topic, so such a store had none and the first start under a new id said nothing."""
    store.note_session("old-a", 1_000_000_000.0)
    store.note_session("old-a-egress", 3_000_000_000.0)
    assert store.last_ingress_client_id() == "old-a"


def test_the_status_figures_keep_no_payload_between_calls(tmp_path: Path):
    """`stats` keeps the oldest inbox and outbox records aside between commits, for their ages:
    whole, they held two 33 MB payloads in the supervisor for good (review "lowmem"). Their
    payloads are left out."""
    import tracemalloc
    store = Store(tmp_path, 64 << 20)
    try:
        store.append([Incoming("t/a", b"x" * (8 << 20), mid=1)])
        store.outbox_append([("t/o", b"y" * (8 << 20), 1, False)])
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            figures = store.stats()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert figures["inbox_count"] == 1 and figures["outbox_count"] == 1
        assert figures["inbox_oldest_age"] is not None and figures["outbox_oldest_age"] is not None
        assert held < 1 << 20, held
    finally:
        store.close()


def test_the_egress_backlog_marks_yield_to_an_earlier_release_that_wrote_since(tmp_path: Path):
    """Re-read 35: after 0.3.0 -> 0.2.0 -> 0.3.0, the mark 0.3.0 kept before the rollback won
    over the one 0.2.0 wrote since: 500 entries 0.2.0 queued online drained at drainingFrequency."""
    import struct
    store = Store(tmp_path / "store", CAP)
    try:
        store.note_queued_online(10, [(0, 5)])
        assert (store.queued_online(), store.backlog_ranges()) == (10, [(0, 5)])
        store._write(lambda txn: txn.put(b"queued_online", struct.pack(">Q", 510), db=store._meta))  # 0.2.0's
        assert (store.queued_online(), store.backlog_ranges()) == (510, [])
    finally:
        store.close()
