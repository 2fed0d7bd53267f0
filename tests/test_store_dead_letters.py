"""Dead letters in the LMDB store, on real files: the move out of the outbox and back to its
tail, dropping from either list, the cap (dead letters are never dropped to make room, and
dead-lettering works in a full store), durability, and opening a store written before the
dead-letter database existed."""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Callable, List

import lmdb
import msgpack
import pytest

from flashlexd.store import DeadLetter, Store, StoreFull
from tests.test_store import CAP, SMALL_CAP, batch, open_store, store  # noqa: F401 (fixtures)

TOPIC = "flashlex/collect"


def queue(store: Store, *payloads: bytes, now: float = 100.0) -> List[int]:
    return store.outbox_append([(TOPIC, p, 1, False) for p in payloads], now=now)


def outbox_ids(store: Store) -> List[int]:
    return [e.id for e in store.outbox_peek(limit=10 ** 6)]


def without_age(letters: List[DeadLetter]) -> List[DeadLetter]:
    """The stored fields only: an age depends on the clock at reading time."""
    return [dataclasses.replace(letter, age=0.0) for letter in letters]


def dead_ids(store: Store) -> List[int]:
    return [d.id for d in store.dead_letters(limit=10 ** 6)]


def test_dead_lettering_moves_the_entry_with_its_fields_reason_and_attempts(store: Store):
    queue(store, b"a", b"poison", b"c")
    store.outbox_append([("dev/x", b"retained", 0, True)], now=101.0)
    assert store.outbox_dead_letter(2, "link dropped 3 times with it alone in flight", 3, now=200.0)
    assert store.outbox_dead_letter(4, "refused", 1, now=201.0)
    assert outbox_ids(store) == [1, 3]
    assert without_age(store.dead_letters()) == [
        DeadLetter(id=2, created=100.0, topic=TOPIC, payload=b"poison", qos=1, retain=False, age=0.0,
                   attempts=3, reason="link dropped 3 times with it alone in flight", dead_at=200.0),
        DeadLetter(id=4, created=101.0, topic="dev/x", payload=b"retained", qos=0, retain=True,
                   age=0.0, attempts=1, reason="refused", dead_at=201.0)]
    assert store.dead_letters()[0].to_dict()["reason"].startswith("link dropped")
    figures = store.stats()
    assert (figures["dead_count"], figures["dead_lettered"], figures["outbox_count"]) == (2, 2, 2)
    assert store.dead_count() == 2


def test_dead_lettering_an_entry_no_longer_in_the_outbox_returns_false(store: Store):
    queue(store, b"a", b"b")
    store.outbox_remove([1])
    assert not store.outbox_dead_letter(1, "gone", 3)
    assert store.outbox_dead_letter(2, "refused", 3)
    assert not store.outbox_dead_letter(2, "twice", 3)  # already dead: not moved again
    assert not store.outbox_dead_letter(0, "no such id", 3)
    assert not store.outbox_dead_letter(2 ** 64, "no such id", 3)
    assert dead_ids(store) == [2] and store.dead_letters()[0].reason == "refused"
    assert store.stats()["dead_lettered"] == 1


def test_dead_letters_are_listed_oldest_first_with_limit_and_after(store: Store):
    queue(store, *[b"e%d" % i for i in range(6)])
    for entry_id in (5, 2, 4):
        store.outbox_dead_letter(entry_id, "refused", 3)
    assert dead_ids(store) == [2, 4, 5]
    assert [d.id for d in store.dead_letters(limit=2)] == [2, 4]
    assert [d.id for d in store.dead_letters(after=2)] == [4, 5]
    assert [d.id for d in store.dead_letters(after=5)] == []
    assert store.dead_letters(limit=0) == []


def test_retry_moves_dead_letters_to_the_tail_under_new_ids(store: Store):
    queue(store, b"a", b"poison1", b"poison2", b"d")
    store.outbox_dead_letter(3, "refused", 3)
    store.outbox_dead_letter(2, "refused", 3)
    queue(store, b"e")  # id 5
    assert store.dead_retry([3, 2, 99, 2]) == [6, 7]  # in id order; unknown and repeated skipped
    assert [(e.id, e.payload, e.created) for e in store.outbox_peek()] == [
        (1, b"a", 100.0), (4, b"d", 100.0), (5, b"e", 100.0),
        (6, b"poison1", 100.0), (7, b"poison2", 100.0)]
    assert store.dead_count() == 0
    assert store.dead_retry([2]) == [] and store.dead_retry([]) == []
    assert queue(store, b"f") == [8]  # ids stay unique across both lists
    assert store.stats()["dead_retried"] == 2


def test_drop_deletes_from_the_list_it_names_only(store: Store):
    queue(store, b"a", b"b", b"c", b"d")
    store.outbox_dead_letter(2, "refused", 3)
    store.outbox_dead_letter(3, "refused", 3)
    assert store.outbox_drop([2]) == 0  # a dead letter is not an outbox entry
    assert store.outbox_drop([1], dead=True) == 0
    assert store.outbox_drop([1, 4, 77]) == 2
    assert store.outbox_drop([2, 3, 3], dead=True) == 2
    assert store.outbox_drop([]) == 0
    assert outbox_ids(store) == [] and dead_ids(store) == []
    figures = store.stats()
    assert (figures["outbox_dropped"], figures["dead_dropped"], figures["sent"]) == (2, 2, 0)


def test_dead_letters_survive_a_reopen(tmp_path: Path):
    first = Store(tmp_path / "store", CAP)
    queue(first, b"a", b"b")
    first.outbox_dead_letter(1, "refused", 3, now=150.0)
    first.close()
    again = Store(tmp_path / "store", CAP)
    try:
        assert without_age(again.dead_letters()) == [
            DeadLetter(id=1, created=100.0, topic=TOPIC, payload=b"a", qos=1, retain=False, age=0.0,
                       attempts=3, reason="refused", dead_at=150.0)]
        assert outbox_ids(again) == [2]
    finally:
        again.close()


def test_dead_letters_use_the_cap_and_are_never_dropped_to_make_room(
        open_store: Callable[..., Store]):
    store = open_store(cap=SMALL_CAP, when_full="dropOldest")
    entry_ids = store.outbox_append([(TOPIC, b"o" * 1000, 1, False)] * 200)
    for entry_id in entry_ids:
        assert store.outbox_dead_letter(entry_id, "refused", 3)
    assert store.stats()["used_bytes"] > 200 * 1000
    total = sum(len(store.append(batch(f"b{n}-", 20, 1000))) for n in range(30))  # 600 KB
    figures = store.stats()
    assert 0 < figures["dropped_full"] < total  # dropOldest dropped inbox messages only
    assert figures["used_bytes"] <= SMALL_CAP * 1.1
    assert dead_ids(store) == entry_ids
    store.ack(m.id for m in store.messages(limit=10 ** 6))
    more: List[int] = []
    with pytest.raises(StoreFull):  # the outbox is refused, never dropped
        for _ in range(10_000):
            more += store.outbox_append([(TOPIC, b"o" * 1000, 1, False)] * 20)
    for entry_id in more:  # dead letters alone fill the cap: the inbox is refused
        assert store.outbox_dead_letter(entry_id, "refused", 3)
    with pytest.raises(StoreFull, match="nothing left to drop"):
        store.append(batch("late", 20, 1000))
    assert dead_ids(store) == entry_ids + more


def test_dead_lettering_and_retry_work_in_a_full_store(open_store: Callable[..., Store]):
    store = open_store(cap=SMALL_CAP, when_full="reject")
    entry_ids: List[int] = []
    with pytest.raises(StoreFull):
        for _ in range(10_000):
            entry_ids += store.outbox_append([(TOPIC, b"o" * 1000, 1, False)] * 20)
    assert all(store.outbox_dead_letter(i, "refused", 3) for i in entry_ids)  # moves: no refusal
    assert len(store.dead_retry(entry_ids)) == len(entry_ids)
    assert store.outbox_count() == len(entry_ids) and store.dead_count() == 0


def _write_schema_1_store(path: Path) -> None:
    """A store as flashlexd wrote it before dead letters: five named databases, schema 1,
    records in the same packing as store.py (written with raw LMDB, not with Store)."""
    path.mkdir()
    env = lmdb.open(str(path), max_dbs=8, map_size=CAP)
    key = struct.Struct(">Q").pack
    with env.begin(write=True) as txn:
        dbs = {name: env.open_db(name, txn=txn) for name in
               (b"inbox", b"expiry", b"outbox", b"recent", b"meta")}
        txn.put(key(1), msgpack.packb([90.0, "things/in", b"kept", 1, False, 7, None]),
                db=dbs[b"inbox"])
        for entry_id in (1, 2):
            txn.put(key(entry_id), msgpack.packb([95.0, TOPIC, b"out%d" % entry_id, 1, False]),
                    db=dbs[b"outbox"])
        for name, value in ((b"schema", 1), (b"inbox_last_id", 1), (b"outbox_last_id", 2),
                            (b"received", 1), (b"queued", 2)):
            txn.put(name, key(value), db=dbs[b"meta"])
    env.close()


def test_a_store_written_before_dead_letters_opens_without_loss(tmp_path: Path):
    _write_schema_1_store(tmp_path / "store")
    store = Store(tmp_path / "store", CAP)
    try:
        assert [(m.id, m.payload, m.mid) for m in store.messages()] == [(1, b"kept", 7)]
        assert [(e.id, e.payload) for e in store.outbox_peek()] == [(1, b"out1"), (2, b"out2")]
        figures = store.stats()
        assert (figures["dead_count"], figures["received"], figures["queued"]) == (0, 1, 2)
        assert store.outbox_dead_letter(1, "refused", 3)
        assert store.dead_retry([1]) == [3]
        assert queue(store, b"new") == [4]
    finally:
        store.close()


def test_a_dead_letter_and_its_retry_keep_the_entrys_clock_stamp(store: Store):
    """The outbox record is kept whole, so its age stays its real age (clock.py's rule)."""
    queue(store, b"a")
    [before] = store.outbox_peek()
    assert store.outbox_dead_letter(1, "refused", 3)
    [dead] = store.dead_letters()
    assert dead.created == before.created and dead.age >= before.age
    assert store.dead_retry([1]) == [2]
    [back] = store.outbox_peek()
    assert back.created == before.created and back.age >= dead.age
