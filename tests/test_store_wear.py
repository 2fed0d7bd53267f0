"""What each store write touches (issue 20: bytes written per message): an append writes no
expiry index, an ack writes the inbox and nothing else, `acked` is derived and continues from a
schema-3 store's stored count, and a schema-3 store opens, migrates and loses nothing."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, List

import lmdb
import msgpack

from flashlexd.store import SCHEMA_VERSION, Incoming, Store

CAP = 64 * 1024 * 1024
TTL = 60.0
_Q = struct.Struct(">Q")


def arrive(store: Store, prefix: str, count: int, now: float) -> List[int]:
    return [i for i in store.append([Incoming("t", b"%s%d" % (prefix.encode(), n), mid=n + 1)
                                     for n in range(count)], now=now) if i is not None]


def database(path: Path, name: bytes) -> Dict[bytes, bytes]:
    env = lmdb.open(str(path), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=env.open_db(name, txn=txn, create=False))}
    finally:
        env.close()


def test_appends_write_no_expiry_index_and_acks_leave_meta_alone(tmp_path: Path):
    store = Store(tmp_path, CAP, expire_seconds=TTL)
    try:
        ids = arrive(store, "m", 5, now=1000.0)
        store.close()
        meta_before = database(tmp_path, b"meta")
        assert database(tmp_path, b"expiry") == {}
        store = Store(tmp_path, CAP, expire_seconds=TTL)
        assert store.ack(ids[:2]) == 2 and store.ack(ids[:2]) == 0
        store.close()
        assert database(tmp_path, b"meta") == meta_before
        store = Store(tmp_path, CAP, expire_seconds=TTL)
        assert store.stats()["acked"] == 2
    finally:
        store.close()


def test_acked_is_derived_from_every_way_out_of_the_inbox(tmp_path: Path):
    store = Store(tmp_path, 2 * 1024 * 1024, when_full="dropOldest", expire_seconds=TTL)
    try:
        ids = arrive(store, "a", 10, now=1000.0)
        store.ack(ids[:3] + [10 ** 6])
        assert store.expire(now=1000.0 + TTL) == 7
        arrive(store, "b", 4, now=2000.0)
        store.ack([ids[-1] + 1])
        store.purge()
        big = [Incoming("t", bytes(200_000), mid=n) for n in range(12)]  # over the cap: drops
        for chunk in range(0, len(big), 3):
            store.append(big[chunk:chunk + 3], now=3000.0)
        store.ack([m.id for m in store.messages()][:1])
        figures = store.stats()
        assert figures["dropped_full"] > 0
        assert figures["acked"] == 3 + 1 + 1
        assert figures["received"] == figures["acked"] + figures["expired"] + figures["purged"] \
            + figures["dropped_full"] + figures["inbox_count"]
    finally:
        store.close()


def make_schema3(path: Path, acked: int) -> None:
    """Turn a store into what schema 3 (flashlexd before issue 20) wrote: one expiry range per
    appended batch (boot seq(4) + expiry ms(8) + first id(8) -> last id(8)), a stored `acked`
    total, schema 3."""
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        inbox, expiry, meta = (env.open_db(name, txn=txn) for name in (b"inbox", b"expiry", b"meta"))
        for key, raw in txn.cursor(db=inbox):
            record = msgpack.unpackb(raw)
            txn.put(struct.pack(">I", record[7]) + _Q.pack(round(record[6] * 1000)) + key, key, db=expiry)
        txn.delete(b"acked_offset", db=meta)
        txn.put(b"acked", _Q.pack(acked), db=meta)
        txn.put(b"schema", _Q.pack(3), db=meta)
    env.close()


def test_a_schema3_store_opens_migrates_and_loses_nothing(tmp_path: Path):
    store = Store(tmp_path, CAP, expire_seconds=TTL)
    first = arrive(store, "old", 3, now=1000.0)
    second = arrive(store, "later", 2, now=1030.0)
    store.outbox_append([("up", b"queued", 1, False)])
    store.close()
    make_schema3(tmp_path, acked=40)  # 40 acked over the store's life, before these
    assert len(database(tmp_path, b"expiry")) == 5

    store = Store(tmp_path, CAP, expire_seconds=TTL)
    try:
        assert [m.id for m in store.messages()] == first + second
        assert [m.payload for m in store.messages()] == [b"old0", b"old1", b"old2", b"later0", b"later1"]
        assert [e.payload for e in store.outbox_peek()] == [b"queued"]
        assert store.stats()["acked"] == 40
        assert store.ack([first[0]]) == 1 and store.stats()["acked"] == 41
        assert store.expire(now=1000.0 + TTL) == 2          # the rest of the first batch
        assert [m.payload for m in store.messages()] == [b"later0", b"later1"]
        assert arrive(store, "new", 1, now=1031.0) == [second[-1] + 1]  # ids go on
        assert store.expire(now=1031.0 + TTL) == 3 and store.inbox_count() == 0
        assert store.stats()["acked"] == 41 and store.stats()["expired"] == 5
    finally:
        store.close()
    assert database(tmp_path, b"expiry") == {}
    assert _Q.unpack(database(tmp_path, b"meta")[b"schema"])[0] == SCHEMA_VERSION == 7


def test_messages_stored_without_an_expiry_go_by_the_ttl_set_since(tmp_path: Path):
    """They were stepped over for good (the expiry stored with each was the key); the sweep
    now applies the expireSeconds configured, in arrival order, a bounded batch at a time."""
    store = Store(tmp_path, CAP)  # expireSeconds unset: nothing expires
    kept = arrive(store, "kept", 3, now=1000.0)
    assert store.expire(now=10.0 ** 6) == 0
    store.close()
    store = Store(tmp_path, CAP, expire_seconds=TTL)
    try:
        due = arrive(store, "due", 2, now=1001.0)
        later = arrive(store, "later", 1, now=1002.0)
        assert store.expire(now=1001.0 + TTL, batch=2) == 2
        assert store.expire(now=1001.0 + TTL, batch=2) == 2
        assert store.expire(now=1001.0 + TTL, batch=2) == 1
        assert [m.id for m in store.messages()] == later and len(kept + due) == 5
        assert store.expire(now=10.0 ** 6) == 1 and store.messages() == []
    finally:
        store.close()
