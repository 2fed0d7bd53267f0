"""A topic filter that matches little costs each call a bounded walk: the store looks at no more
than its budget and says where to go on; the API's `paged` answers carry that cursor, and the
client follows it, so callers still get every match. Real store, real server, real client."""
from __future__ import annotations

import threading

import pytest

from flashlexd.client import connect
from flashlexd.ipc.methods import SCAN_BUDGET
from flashlexd.store import Store
from flashlexd.storerecords import Incoming
from tests.broker import wait_for

try:
    from test_ipc_server import harness  # noqa: F401
except ImportError:  # tests run as a package
    from tests.test_ipc_server import harness  # noqa: F401

NOISE = 2 * SCAN_BUDGET + 100  # non-matching messages before the one that matches


@pytest.fixture
def store(tmp_path):
    opened = Store(tmp_path / "data", cap_bytes=64 << 20)
    yield opened
    opened.close()


def test_a_filtered_walk_stops_at_its_budget_and_resumes_from_its_cursor(store):
    ids = store.append([Incoming("noise/x", b"n")] * 25 + [Incoming("rare/y", b"r")])
    first = store.messages_page(10, "rare/#", None, budget=10)
    assert (first.found, first.cursor, first.last) == ([], ids[9], ids[9])
    second = store.messages_page(10, "rare/#", first.cursor, budget=10)
    assert (second.found, second.cursor) == ([], ids[19])
    third = store.messages_page(10, "rare/#", second.cursor, budget=10)
    assert [m.id for m in third.found] == [ids[25]] and third.cursor is None  # the end: no cursor
    assert third.last == ids[25]


def test_a_walk_that_fills_its_limit_or_has_no_budget_gives_no_cursor(store):
    ids = store.append([Incoming("t/a", b"1")] * 30)
    full = store.messages_page(5, "t/#", None, budget=10)
    assert [m.id for m in full.found] == ids[:5] and full.cursor is None
    unbounded = store.messages_page(100, "none/#", None)
    assert unbounded.found == [] and unbounded.cursor is None and unbounded.last == ids[-1]


def test_paged_calls_are_bounded_and_the_client_still_finds_every_match(harness):
    ids = harness.ingest(*[("noise/x", b"n")] * NOISE, ("rare/y", b"r"))
    with connect(harness.path) as fx:
        page = fx.call("messages", paged=True, topic="rare/#")
        assert page == {"messages": [], "cursor": ids[SCAN_BUDGET - 1]}
        assert [m.id for m in fx.messages(topic="rare/#")] == [ids[-1]]
        assert [m.id for m in fx.messages(topic="noise/#", limit=3)] == ids[:3]
        assert [m.id for m in fx.wait(timeout=5, topic="rare/#")] == [ids[-1]]
        assert fx.call("messages", topic="rare/#")[0]["id"] == ids[-1]  # unpaged: as before


def test_a_parked_paged_wait_walks_on_from_where_it_stopped(harness):
    harness.ingest(*[("noise/x", b"n")] * NOISE)
    with connect(harness.path) as fx:
        got = []
        waiter = threading.Thread(target=lambda: got.extend(fx.wait(timeout=10, topic="rare/#")))
        waiter.start()
        wait_for(lambda: harness.server._parked, 5, "the wait to park")  # walked to the end
        [late] = harness.ingest(("rare/y", b"r"))
        waiter.join(10)
        assert [m.id for m in got] == [late]
