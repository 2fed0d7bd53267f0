"""Schema 4: MQTT 5 properties at the end of inbox records and outbox entries, the per-message
expiry index, and the upgrade of a schema-3 store written by the schema-3 code itself (the
package at SCHEMA3_COMMIT, from git; no loss)."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lmdb
import pytest

from flashlexd.storebase import SCHEMA_VERSION
from flashlexd.store import Incoming, Store

ROOT = Path(__file__).resolve().parent.parent
CAP = 64 * 1024 * 1024
PROPS = {"user_properties": [["tenant", "a"], ["tenant", "b"], ["kind", "reading"]],
         "content_type": "application/json", "payload_format_indicator": 1,
         "response_topic": "reply/here", "correlation_data": b"\x00\x01corr"}

WRITE_SCHEMA3 = """
import sys
from flashlexd.store import Incoming, Store
store = Store(sys.argv[1], 64 * 1024 * 1024, expire_seconds=3600)
store.append([Incoming("in/a", b"one", 1, False, 7), Incoming("in/b", b"two", 0, True, 0)])
ids = store.outbox_append([("out/a", b"first", 1, False), ("out/b", b"second", 0, True)])
store.outbox_dead_letter(ids[0], "refused", 3)
store.close()
"""


SCHEMA3_COMMIT = "6321fbea86e33c620255db830155ab139766695e"  # the last release of schema 3 (main when schema 4 began)


def old_code(tmp_path: Path) -> Path:
    """The flashlexd package of SCHEMA3_COMMIT, unpacked beside the test."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", SCHEMA3_COMMIT, "flashlexd"], check=True,
                             capture_output=True).stdout
    target = tmp_path / "main-code"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # 3.12+ warns without a filter (3.14 defaults to "data"); the filter exists from 3.9.17
        tar.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return target


def schema(path: Path) -> int:
    env = lmdb.open(str(path), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return struct.unpack(">Q", txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False)))[0]
    finally:
        env.close()


def test_a_schema3_store_written_by_the_schema3_code_opens_migrates_and_loses_nothing(tmp_path: Path) -> None:
    path, code = tmp_path / "store", old_code(tmp_path)
    subprocess.run([sys.executable, "-c", WRITE_SCHEMA3, str(path)], check=True, cwd=code,
                   env={"PYTHONPATH": str(code)})
    assert schema(path) == 3
    store = Store(path, CAP, expire_seconds=3600)
    try:
        messages = store.messages()
        assert [(m.id, m.topic, m.payload, m.qos, m.retain, m.mid, m.properties) for m in messages] == [
            (1, "in/a", b"one", 1, False, 7, {}), (2, "in/b", b"two", 0, True, 0, {})]
        assert all(m.expires_at is not None for m in messages)
        assert [(e.topic, e.payload, e.qos, e.retain, e.properties) for e in store.outbox_peek()] == [
            ("out/b", b"second", 0, True, {})]
        dead = store.dead_letters()
        assert [(d.topic, d.payload, d.reason, d.attempts) for d in dead] == [("out/a", b"first", "refused", 3)]
        assert store.dead_retry([dead[0].id]) and store.outbox_peek()[-1].payload == b"first"
        store.append([Incoming("in/c", b"three", properties={"content_type": "text/plain"})])
        assert store.messages()[-1].properties == {"content_type": "text/plain"}
    finally:
        store.close()
    assert schema(path) == SCHEMA_VERSION == 7


def test_inbox_properties_come_back_and_filter_by_user_property(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", CAP)
    try:
        store.append([Incoming("t", b"with", properties=PROPS), Incoming("t", b"without"),
                      Incoming("t", b"other", properties={"user_properties": [["tenant", "c"]]})])
        first = store.messages()[0]
        assert first.properties == PROPS and first.user_property("tenant") == "a"
        assert store.messages()[1].properties == {}
        assert [m.payload for m in store.messages(user_property=("tenant", "b"))] == [b"with"]
        assert [m.payload for m in store.messages(topic="t", user_property=("tenant", "c"))] == [b"other"]
        assert store.messages(user_property=("kind", "nope")) == []
    finally:
        store.close()


def test_a_message_whose_own_expiry_passes_while_stored_is_expired_and_counted(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", CAP)  # no expireSeconds: only the message's own expiry
    try:
        now = time.time()  # reads leave out what is past its expiry by the real clock
        ids = store.append([Incoming("t", b"short", properties={"message_expiry_interval": 10}),
                            Incoming("t", b"keeps"),
                            Incoming("t", b"long", properties={"message_expiry_interval": 100})], now=now)
        acked = store.append([Incoming("t", b"acked first", properties={"message_expiry_interval": 5})], now=now)
        store.ack(acked)
        assert store.has_message_expiry()
        assert [m.expires_at for m in store.messages()] == [pytest.approx(now + 10), None, pytest.approx(now + 100)]
        assert store.expire(now=now + 9) == 0
        assert store.expire(now=now + 11) == 1  # the acked one's entry goes without a count
        assert [m.id for m in store.messages()] == ids[1:]
        assert store.expire(now=now + 101) == 1
        assert [m.payload for m in store.messages()] == [b"keeps"]
        assert store.stats()["expired"] == 2 and not store.has_message_expiry()
    finally:
        store.close()


def test_messages_dropped_at_the_cap_take_their_expiry_entries_along(tmp_path: Path) -> None:
    """dropOldest with MQTT 5 expiry intervals (a day): the entries of dropped messages stayed
    in the per-message expiry index, counted toward the cap, so each append dropped more
    messages, until the inbox was down to the batch and appends were refused as full."""
    from flashlexd.store import dup_marks
    store = Store(tmp_path / "store", 512 * 1024, "dropOldest", None)
    try:
        earlier: list = []
        for n in range(400):  # 20,000 messages of 100 bytes through 512 KiB
            batch = [Incoming("t", f"c{n}-{i}".encode().ljust(100, b"."), mid=(n * 50 + i) % 65535 + 1,
                              properties={"message_expiry_interval": 86400}) for i in range(50)]
            store.append(batch, now=1000.0 + n, settled=dup_marks(earlier))  # as ingress settles
            earlier = batch
        figures = store.stats()
        assert figures["inbox_count"] > 1500, figures  # ~3,000 fit without the property
        with store._env.begin() as txn:
            entries = store._msg_expiry.pending(txn)
        assert entries == figures["inbox_count"], figures  # one entry per stored message, no more
        assert figures["dropped_full"] == 20000 - figures["inbox_count"]
        assert store.expire(now=1000.0 + 86400 + 400, batch=10 ** 6) == figures["inbox_count"]
    finally:
        store.close()


def index_entries(store: Store) -> int:
    with store._env.begin() as txn:
        return store._msg_expiry.pending(txn)


@pytest.mark.parametrize("way", ["ack", "journaled ack", "named consumers", "purge", "expireSeconds"])
def test_messages_that_leave_take_their_expiry_entries_along(tmp_path: Path, way: str) -> None:
    """Acked messages left their entries in the per-message expiry index until due: a day's
    interval at a steady rate filled the cap with them (reject: ingress stopped acking)."""
    from flashlexd.consumers import ConsumerSpec
    store = Store(tmp_path / "store", CAP, expire_seconds=60 if way == "expireSeconds" else None)
    try:
        if way == "named consumers":
            store.consumer_declare([ConsumerSpec("a"), ConsumerSpec("b")], 1000.0)
        if way == "journaled ack":
            store.open_ack_journal()
        ids = store.append([Incoming("t", b"m%d" % i, properties={"message_expiry_interval": 86400})
                            for i in range(10)], now=1000.0)
        assert index_entries(store) == 10
        if way == "purge":
            store.purge()
        elif way == "expireSeconds":  # the batch expiry comes first for all of them
            assert store.expire(now=1000.0 + 61) == 10
        elif way == "named consumers":
            store.consumer_ack("a", ids[:6], 1000.0)
            assert index_entries(store) == 10  # b still holds them
            store.consumer_ack("b", ids[:6], 1000.0)
        else:
            store.ack(ids[:6])
            if way == "journaled ack":
                store.apply_acks()
        left = 0 if way in ("purge", "expireSeconds") else 4
        assert index_entries(store) == left and store.inbox_count() == left  # stamped 1970: past their expiry
        assert store.expire(now=1000.0 + 86401) == left  # the entries kept are the right ones
    finally:
        store.close()


@pytest.mark.parametrize("bad", ["x", float("nan"), 1e30])
def test_a_record_whose_expiry_is_not_a_time_is_still_acked_and_dropped(tmp_path: Path, bad) -> None:
    """Damage that still decodes (an interval that is text, NaN or huge): the ack and the
    dropOldest append look for its index entry; they failed on it (TypeError, ValueError,
    struct.error, the last one taken for damage and the store made read-only)."""
    import msgpack
    from flashlexd.storerecords import _ID
    store = Store(tmp_path / "store", 512 * 1024, "dropOldest")
    try:
        first, second = store.append([Incoming("t", b"ok", properties={"message_expiry_interval": 60})
                                      for _ in range(2)], now=1000.0)
        with store._env.begin(write=True) as txn:
            for record_id in (first, second):
                record = msgpack.unpackb(txn.get(_ID.pack(record_id), db=store._inbox))
                record[9] = {"message_expiry_interval": bad}
                txn.put(_ID.pack(record_id), msgpack.packb(record, use_bin_type=True), db=store._inbox)
        assert store.ack([first]) == 1
        for n in range(40):  # 800 KB through 512 KiB: the other damaged record is dropped first
            store.append([Incoming("t", b"." * 1000) for _ in range(20)], now=1001.0 + n)
        assert store.stats()["dropped_full"] > 0 and store.damage is None
        assert second not in [m.id for m in store.messages(limit=10 ** 6)]
    finally:
        store.close()


def test_outbox_properties_survive_the_dead_letters_and_a_retry(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", CAP)
    try:
        given = dict(PROPS, message_expiry_interval=60)
        (entry_id,) = store.outbox_append([("out", b"p", 1, False, given)])
        assert store.outbox_peek()[0].properties == given
        store.outbox_dead_letter(entry_id, "refused", 1)
        assert store.dead_letters()[0].properties == given
        store.dead_retry([entry_id])
        assert store.outbox_peek()[0].properties == given
    finally:
        store.close()
