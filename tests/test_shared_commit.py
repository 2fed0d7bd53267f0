"""API acks and publishes of several apps sharing one commit (flashlex.app.db.apiCommitMs,
issue 20), over real sockets on the real RpcServer with a real Store: each call gets its own
result, only after the one commit that wrote it, and a store failure reaches every call of the
window."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from flashlexd.client import RpcError, connect
from flashlexd.client.wire import Code
from flashlexd.store import Incoming
from tests.test_ipc_server import Harness

WINDOW = 0.4


@pytest.fixture
def harness(tmp_path: Path):
    h = Harness(tmp_path)
    h.rules = dataclasses.replace(h.rules, write_window=WINDOW)
    h.start()
    yield h
    h.stop()


def from_apps(harness: Harness, method: str, calls: List[Any]) -> Dict[int, Any]:
    """Each call made by its own app (connection, thread) at about the same time:
    index -> (result, when it returned) or the RpcError."""
    results: Dict[int, Any] = {}

    def app(index: int, argument: Any) -> None:
        with connect(harness.path) as fx:
            try:
                results[index] = (getattr(fx, method)(argument), time.monotonic())
            except RpcError as exc:
                results[index] = exc
    threads = [threading.Thread(target=app, args=(i, arg)) for i, arg in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_acks_of_several_apps_share_one_commit_and_return_after_it(harness: Harness):
    ids = harness.ingest(*[("t", b"m%d" % i) for i in range(6)])
    before = harness.methods.acks.commits
    started = time.monotonic()
    results = from_apps(harness, "ack", [ids[0:2], ids[2:4], [ids[4], ids[0]]])
    assert sorted(count for count, _ in results.values()) == [1, 2, 2]  # ids[0]: its first ack only
    assert harness.methods.acks.commits - before == 1
    assert all(at - started >= WINDOW * 0.9 for _, at in results.values())
    # committed (sync=True: on disk) when the calls returned
    assert [m.payload for m in harness.call(harness.store.messages)] == [b"m5"]
    assert harness.store.stats()["acked"] == 5


def test_an_ack_after_the_window_opens_the_next_one(harness: Harness):
    ids = harness.ingest(("t", b"a"), ("t", b"b"))
    with connect(harness.path) as fx:
        assert fx.ack([ids[0]]) == 1
        assert fx.ack([ids[0], ids[1]]) == 1
    assert harness.methods.acks.commits == 2


def test_a_store_failure_reaches_every_ack_of_the_window(harness: Harness):
    ids = harness.ingest(("t", b"a"), ("t", b"b"))
    harness.call(lambda: harness.store.__setattr__("damage", "store in x is damaged: test"))
    results = from_apps(harness, "ack", [[ids[0]], [ids[1]]])
    assert all(isinstance(r, RpcError) and r.code == Code.STORE_ERROR for r in results.values())
    harness.call(lambda: harness.store.__setattr__("damage", None))
    assert harness.store.inbox_count() == 2
    assert harness.store.append([Incoming("t", b"c")]) == [3]


def test_publishes_of_several_apps_share_one_commit_each_with_its_id(harness: Harness):
    before = harness.outbox_wakeups
    results = from_apps(harness, "publish", [b"one", b"two", b"three"])
    assert sorted(outbox_id for outbox_id, _ in results.values()) == [1, 2, 3]
    assert harness.methods.publishes.commits == 1 and harness.outbox_wakeups == before + 1
    entries = harness.call(harness.store.outbox_peek)
    assert sorted(e.payload for e in entries) == [b"one", b"three", b"two"]


def test_a_full_outbox_refuses_only_the_publishes_past_the_limit(tmp_path: Path):
    h = Harness(tmp_path, queueing=2)
    h.rules = dataclasses.replace(h.rules, write_window=WINDOW)
    h.start()
    try:
        h.call(lambda: h.store.outbox_append([("t", b"queued", 1, False)]))
        results = from_apps(h, "publish", [b"a", b"b", b"c"])
        refused = [r for r in results.values() if isinstance(r, RpcError)]
        assert len(refused) == 2 and all(r.code == Code.OUTBOX_FULL for r in refused)
        assert "offlinePublishQueueing" in str(refused[0])
        assert h.call(h.store.outbox_count) == 2
    finally:
        h.stop()


def test_publishes_at_the_store_cap_are_refused_as_outbox_full(tmp_path: Path):
    h = Harness(tmp_path)
    h.rules = dataclasses.replace(h.rules, write_window=WINDOW)
    h.start()
    try:
        h.call(lambda: h.store.__setattr__("cap_bytes", 0))  # the cap is reached
        results = from_apps(h, "publish", [b"a", b"b"])
        assert all(isinstance(r, RpcError) and r.code == Code.OUTBOX_FULL and "is full" in str(r)
                   for r in results.values()), results
    finally:
        h.stop()


def test_named_consumers_acks_share_one_commit_each_with_its_own_result(harness: Harness):
    """A named consumer's ack was a commit of its own whatever apiCommitMs said: 29-51 KiB
    written per stored message with 4-5 consumers acking (review "consumers")."""
    ids = harness.ingest(*[("t", b"m%d" % i) for i in range(3)])
    for name in ("display", "logger", "audit"):
        with connect(harness.path, consumer=name) as fx:
            assert len(fx.messages()) == 3  # registered, every message held for it
    results: Dict[str, Any] = {}

    def app(name: str) -> None:
        with connect(harness.path, consumer=name) as fx:
            try:
                results[name] = fx.ack(ids)
            except RpcError as exc:
                results[name] = exc
    before = harness.methods.consumer_acks.commits
    threads = [threading.Thread(target=app, args=(name,)) for name in ("display", "logger")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {"display": 3, "logger": 3}
    assert harness.methods.consumer_acks.commits - before == 1
    with connect(harness.path, consumer="audit") as fx:  # the third still holds them
        assert [m.id for m in fx.messages()] == ids
    assert harness.store.inbox_count() == 3
