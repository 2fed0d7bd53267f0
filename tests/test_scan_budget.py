"""A topic filter that matches little costs each call a bounded walk: the store looks at no more
than its budget and says where to go on; the API's `paged` answers carry that cursor, and the
client follows it, so callers still get every match. Real store, real server, real client."""
from __future__ import annotations

import selectors
import socket
import threading
from typing import Any, Callable, Tuple

import msgpack
import pytest

from flashlexd.client import RpcError, connect
from flashlexd.client.wire import HEADER
from flashlexd.consumers import ConsumerSpec
from flashlexd.ipc import Limits, RpcServer
from flashlexd.ipc.server import POLLS_PER_TURN, WALK_STEPS_PER_TURN
from flashlexd.ipc.methods import SCAN_BUDGET, Methods
from flashlexd.runtime import ApiRules
from flashlexd.store import Store, StoreDamaged
from flashlexd.storeconsumers import COMMIT_STEP, RESET_STEP
from flashlexd.storerecords import Incoming
from flashlexd.topics import DEFAULT_MAX_TOPIC_BYTES
from tests.broker import wait_for

try:
    from test_ipc_server import MAX_PAYLOAD, harness, req  # noqa: F401
except ImportError:  # tests run as a package
    from tests.test_ipc_server import MAX_PAYLOAD, harness, req  # noqa: F401

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


def test_a_wait_answers_by_its_timeout_and_the_same_wait_goes_on_from_where_it_stopped(harness):
    """The client walked page after page to the end of the inbox whatever the timeout: 1.2 s
    for wait(timeout=0) at 200,000 stored, 5.9 s at 1,000,000 (found by review). Now a wait
    stops at its deadline; the same wait called again goes on from where it stopped (what it
    passed matched nothing), so short waits in a loop still reach a match far down."""
    pages = 20
    harness.ingest(*[("noise/x", b"n")] * (pages * SCAN_BUDGET))
    [late] = harness.ingest(("rare/y", b"r"))
    requests = lambda: harness.call(lambda: harness.server.counters["requests"])  # noqa: E731
    with connect(harness.path) as fx:
        before = requests()
        assert fx.wait(timeout=0, topic="rare/#") == []
        assert requests() - before == 1  # one page, not twenty
        found, calls = [], 0
        while not found and calls < 2 * pages:
            found, calls = fx.wait(timeout=0, topic="rare/#"), calls + 1
        assert [m.id for m in found] == [late] and calls <= pages
        assert [m.id for m in fx.wait(timeout=10, topic="rare/#")] == [late]  # time enough: from the start
        assert [m.id for m in fx.messages(topic="rare/#")] == [late]  # `messages` walks to the end


def test_a_wait_that_timed_out_at_the_end_goes_on_from_there_next_time(harness):
    """A wait that walked to the end and timed out there parked, and its answer said nothing of
    how far it read: the same wait called again walked the whole inbox from the start, so a
    wait in a loop for a rare topic over 500,000 messages held the daemon's loop most of the
    time (found by review). Now the next call goes on from the end, and still finds what comes."""
    harness.ingest(*[("noise/x", b"n")] * (3 * SCAN_BUDGET))
    requests = lambda: harness.call(lambda: harness.server.counters["requests"])  # noqa: E731
    with connect(harness.path) as fx:
        before = requests()
        assert fx.wait(timeout=1, topic="rare/#") == []
        assert requests() - before == 3  # two pages with a cursor, the third parked at the end
        before = requests()
        assert fx.wait(timeout=0.2, topic="rare/#") == []
        assert requests() - before == 1  # parked at once, not three pages again
        [late] = harness.ingest(("rare/y", b"r"))
        assert [m.id for m in fx.wait(timeout=5, topic="rare/#")] == [late]
        assert [m.id for m in fx.wait(timeout=0.2, topic="rare/#", after=0)] == [late]  # another query


def test_a_remembered_place_is_void_after_another_daemon_start(tmp_path):
    """The place a timed-out wait remembered (`seen`) outlived the daemon: started again on a
    store with lower ids (another dataPath, a store recovered), the same wait sent its old
    place and skipped every new message below it for good (found by re-read). A reconnect
    voids it."""
    from tests.test_ipc_server import Harness
    first = Harness(tmp_path / "first").start()
    first.ingest(*[("noise/x", b"n")] * 10)
    with connect(first.path) as fx:
        try:
            assert fx.wait(timeout=0.2, topic="rare/#") == [] and len(fx._resume) == 1
        finally:
            first.stop()
        again = Harness(tmp_path / "second", path=first.path).start()  # a new store, ids from 1
        try:
            [rare] = again.ingest(("rare/y", b"r"))
            assert rare == 1 and [m.id for m in fx.wait(timeout=5, topic="rare/#")] == [rare]
        finally:
            again.stop()


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


# -- unpaged calls (the protocol before `paged`): walked one page per turn of the loop ----------

class TurnByTurn:
    """The server on a selector this test turns by hand (one `turn()` = one pass of the
    supervisor's loop), so what happens per turn is exact, not a matter of timing."""

    def __init__(self, tmp_path, store: Store):
        rules = ApiRules("things/dev1/egress", -1, MAX_PAYLOAD, DEFAULT_MAX_TOPIC_BYTES, MAX_PAYLOAD)
        methods = Methods(lambda: store, dict, lambda: None, lambda: True, lambda: rules)
        self.selector = selectors.DefaultSelector()
        self.server = RpcServer(str(tmp_path / "api.sock"), methods, Limits.for_payload(MAX_PAYLOAD),
                                self.selector)

    def turn(self) -> None:
        for key, mask in self.selector.select(0):
            self.server.dispatch(key, mask)
        self.server.tick()

    def client(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.server.path)
        self.turn()  # accepted
        return sock

    def answer(self, sock: socket.socket, turns: int) -> Tuple[Any, int]:
        """The next response on `sock` and how many turns it took to start (fails after
        `turns`); a large one is read while the loop turns on to send the rest."""
        for taken in range(1, turns + 1):
            self.turn()
            if _readable(sock):
                break
        else:
            raise AssertionError(f"no answer in {turns} turns")
        frame = b""
        while len(frame) < HEADER.size or len(frame) < HEADER.size + HEADER.unpack_from(frame)[0]:
            self.turn()
            try:
                frame += sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        return msgpack.unpackb(frame[HEADER.size:], raw=False), taken

    def close(self) -> None:
        self.server.close()
        self.selector.close()


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


@pytest.fixture
def turns(tmp_path, store):
    server = TurnByTurn(tmp_path, store)
    yield server
    server.close()


PAGES = 6  # pages of noise before the one match: the unpaged walk takes that many turns


def test_an_unpaged_filtered_messages_is_walked_a_page_per_turn_and_other_calls_go_between(turns, store):
    ids = store.append([Incoming("noise/x", b"n")] * (PAGES * SCAN_BUDGET) + [Incoming("rare/y", b"r")])
    walker, other = turns.client(), turns.client()
    walker.sendall(req("messages", 1, topic="rare/#", limit=5))
    turns.turn()
    assert not _readable(walker), "the walk was answered in one turn: it held the loop"
    other.sendall(req("status", 2))
    status, taken = turns.answer(other, 1)
    assert taken == 1 and status["result"]["inbox"]["count"] == len(ids)
    assert not _readable(walker)
    found, taken = turns.answer(walker, PAGES + 2)
    assert taken >= 2 and [m["id"] for m in found["result"]] == [ids[-1]]


def test_an_unpaged_filtered_wait_walks_then_parks_and_goes_on_from_where_it_stopped(turns, store):
    store.append([Incoming("noise/x", b"n")] * (2 * SCAN_BUDGET))
    waiter = turns.client()
    waiter.sendall(req("wait", 1, topic="rare/#", timeout=30))
    for _ in range(4):
        turns.turn()
    parked = [conn.parked for conn in turns.server._parked]
    assert len(parked) == 1 and not parked[0].walking and not _readable(waiter)  # at the end
    walk = parked[0].walk
    [late] = store.append([Incoming("rare/y", b"r")])
    looked_from = walk.position
    turns.server.notify_inbox()
    found, _ = turns.answer(waiter, 2)
    assert looked_from == late - 1 and [m["id"] for m in found["result"]] == [late]


def test_parked_walks_share_a_few_pages_per_turn_and_each_walks_on_to_the_end(turns, store):
    """Found by review: every walking parked call read a page on every turn, and notify_inbox
    walked every parked one at once: 1,000 parked waits with a filter matching nothing stalled
    the loop 1.5 s at each burst of messages. Now they take turns, a few pages a turn in all."""
    waiters = [turns.client() for _ in range(20)]
    for n, sock in enumerate(waiters):
        sock.sendall(req("wait", n, topic="nomatch/#", timeout=60))
    for _ in range(5):
        turns.turn()
    walks = [conn.parked.walk for conn in turns.server._parked]
    assert len(walks) == 20 and not any(walk.walking for walk in walks)
    ids = store.append([Incoming("noise/x", b"n")] * (2 * SCAN_BUDGET))

    def stepped(work: Callable[[], Any]) -> int:
        """How many walks `work` moved on."""
        before = [walk.position for walk in walks]
        work()
        return sum(walk.position != was for walk, was in zip(walks, before))
    assert stepped(lambda: (turns.server.notify_inbox(), turns.turn())) <= WALK_STEPS_PER_TURN
    for _ in range(3 * 20 // WALK_STEPS_PER_TURN):  # three pages each at most, round-robin
        assert stepped(turns.turn) <= WALK_STEPS_PER_TURN
    assert not any(walk.walking for walk in walks) and len(turns.server._parked) == 20
    assert {walk.position for walk in walks} == {ids[-1]}


def test_parked_paged_waits_are_polled_a_few_per_turn_after_a_commit(turns, store, monkeypatch):
    """Found by review: notify_inbox polled every parked wait at once, a page each with a
    filter, so hundreds of parked waits (the client's `wait` and `stream()` are paged) with a
    filter that matches little stalled the loop at each burst of messages. They are polled
    POLLS_PER_TURN a turn now, and every one of them is, within a few turns."""
    waiters = [turns.client() for _ in range(3 * POLLS_PER_TURN)]
    for n, sock in enumerate(waiters):
        sock.sendall(req("wait", n, topic="nomatch/#", timeout=60, paged=True))
    for _ in range(3):
        turns.turn()
    assert len(turns.server._parked) == len(waiters)
    polled = []
    settle = turns.server._settle
    monkeypatch.setattr(turns.server, "_settle", lambda conn, produce, what: (
        polled.append(conn) if what == "wait" else None, settle(conn, produce, what)))
    store.append([Incoming("noise/x", b"n")] * SCAN_BUDGET)
    turns.server.notify_inbox()
    assert len(polled) == POLLS_PER_TURN
    for _ in range(2):
        turns.turn()
    assert len(polled) == len(set(polled)) == len(waiters)
    assert turns.server.next_deadline() > 0  # nothing left due: the loop may sleep


def test_an_unpaged_wait_with_timeout_0_walks_to_the_end_before_it_answers(turns, store):
    ids = store.append([Incoming("noise/x", b"n")] * (3 * SCAN_BUDGET) + [Incoming("rare/y", b"r")])
    waiter = turns.client()
    waiter.sendall(req("wait", 1, topic="rare/#", timeout=0))
    found, _ = turns.answer(waiter, 10)
    assert [m["id"] for m in found["result"]] == [ids[-1]]
    waiter.sendall(req("wait", 2, topic="none/#", timeout=0))
    nothing, _ = turns.answer(waiter, 10)
    assert nothing["result"] == []


def test_a_full_response_ends_a_walk_without_skipping_what_it_left_out(turns, store):
    big = b"x" * MAX_PAYLOAD
    ids = store.append([Incoming("noise/x", b"n")] * 10 + [Incoming("big/y", big)] * 8
                       + [Incoming("noise/x", b"n")] * SCAN_BUDGET)  # the page's budget runs out
    reader = turns.client()
    reader.sendall(req("messages", 1, topic="big/#", paged=True))
    page, _ = turns.answer(reader, 2)
    kept = [m["id"] for m in page["result"]["messages"]]
    assert kept == ids[10:10 + len(kept)] and 1 <= len(kept) < 8
    assert page["result"]["cursor"] == kept[-1]  # go on after the last one kept, not past the rest


def test_a_consumer_reset_commits_a_step_per_turn_and_other_calls_go_between(turns, store):
    """A reset to latest over a large store used to pass every record in one commit inside the
    loop (~1 s at 500,000 stored); it goes a step per turn, with the same end state."""
    steps = 6
    ids = store.append([Incoming("t/x", b"n")] * (steps * RESET_STEP + 10))
    store.consumer_register("keeper", 0.0)  # holds every message: the reset removes none
    resetter, other = turns.client(), turns.client()
    resetter.sendall(req("reset", 1, consumer="app", to="latest", register=True))
    turns.turn()
    assert not _readable(resetter), "the reset was answered in one turn: it held the loop"
    assert ids[0] < store.consumer_state("app").floor < ids[-1]  # some of the way, committed
    other.sendall(req("status", 2))
    status, taken = turns.answer(other, 1)
    assert taken == 1 and status["result"]["inbox"]["count"] == len(ids)
    done, taken = turns.answer(resetter, steps + 2)
    assert taken >= 2 and done["result"] == {"consumer": "app", "acked_through": ids[-1]}
    assert store.consumer_messages("app") == [] and store.stats()["inbox_count"] == len(ids)


def test_a_paged_reset_is_a_commit_per_call_and_the_client_calls_on(harness):
    ids = harness.ingest(*[("t/x", b"n")] * (2 * RESET_STEP + 5))
    harness.store.consumer_register("keeper", 0.0)  # holds every message
    with connect(harness.path, consumer="app") as fx:
        first = fx.call("reset", consumer="app", to="latest", paged=True, register=True)
        assert first == {"consumer": "app", "acked_through": ids[RESET_STEP - 1], "done": False,
                         "to": ids[-1] + 1, "way": "skip"}
        assert fx.reset("app", "latest") == ids[-1]
        assert fx.messages() == [] and harness.store.stats()["inbox_count"] == len(ids)


def test_a_paged_latest_reset_keeps_an_ack_made_between_its_calls(harness):
    """A reset to an id forgets the consumer's acks from there on; a paged `latest` goes on
    with an id as its `to`, and must forget none: a message stored and acked between its calls
    stays acked (found by review: a store step told the two apart by the target alone)."""
    harness.ingest(*[("t/x", b"n")] * (2 * RESET_STEP + 5))
    harness.store.consumer_register("keeper", 0.0)  # holds every message
    with connect(harness.path, consumer="app") as fx:
        answer = fx.call("reset", consumer="app", to="latest", paged=True, register=True)
        assert fx.ack(harness.ingest(("t/x", b"newer"))) == 1
        while not answer["done"]:
            answer = fx.call("reset", consumer="app", to=answer["to"], paged=True, way=answer["way"])
        assert fx.messages() == []


def test_a_paged_skip_overtaken_by_the_floor_ends_instead_of_replaying(harness):
    """Between two calls of a skip, an ack's (or the sweep's) walk may take the floor past its
    target. The next call decided the way anew and replayed: the floor went back to the
    target and every ack was forgotten, so acked messages came again."""
    ids = harness.ingest(*[("t/x", b"n")] * (2 * RESET_STEP + 5))
    harness.store.consumer_register("keeper", 0.0)  # holds every message
    with connect(harness.path, consumer="app") as fx:
        first = fx.call("reset", consumer="app", to=ids[RESET_STEP + 1], paged=True, register=True)
        assert first["done"] is False and first["way"] == "start"
        assert fx.ack([m.id for m in fx.messages(limit=len(ids))]) == len(ids) - RESET_STEP
        assert harness.store.consumer_state("app").floor == ids[-1]  # past the skip's target
        last = fx.call("reset", consumer="app", to=first["to"], paged=True, way=first["way"])
        assert last == {"consumer": "app", "acked_through": ids[-1], "done": True, "to": None}
        assert fx.messages() == []  # nothing comes again
        assert "param 'way' must be skip, start or replay" in str(pytest.raises(
            RpcError, fx.call, "reset", consumer="app", to=1, paged=True, way="sideways").value)


def test_a_replay_forgets_every_ack_in_steps_even_from_floor_0(store):
    """A replay drops the consumer's acks COMMIT_STEP per commit. With its first message
    unacked a consumer's floor stays at 0 whatever it acks after it; a replay from there used to
    keep those acks (it replayed nothing)."""
    ids = store.append([Incoming("t/x", b"n")] * (2 * COMMIT_STEP + 2))
    store.consumer_register("app", 0.0)
    store.consumer_register("keeper", 0.0)
    store.consumer_ack("app", ids[1:], 1.0)
    assert store.consumer_state("app").floor == 0
    assert [store.consumer_reset_step("app", 0, "replay") for _ in range(3)] == [(0, False), (0, False), (0, True)]
    assert [m.id for m in store.consumer_messages("app", limit=len(ids))] == ids


# -- a filter reads a large record's topic from its head (storerecords._topic_of) ------------------

@pytest.mark.parametrize("topic", ["t/short", "t/" + "m" * 60, "t/" + "l" * 400, "t/ü"])
def test_a_filter_finds_large_and_small_records_alike(store, topic):
    ids = store.append([Incoming(topic, b"p" * size) for size in (10, 5000)]
                       + [Incoming("other/" + topic, b"o" * 5000)])
    assert [m.id for m in store.messages(topic="t/#")] == ids[:2]
    assert [m.id for m in store.messages_page(10, "other/#", None, budget=10).found] == ids[2:]


@pytest.mark.parametrize("topic", ["$aws/things/pi/shadow/update", "$" + "m" * 60, "$" + "l" * 400])
def test_a_consumer_of_every_topic_passes_system_topics_of_every_size(store, topic):
    """A `#` consumer tells a `$` topic from the record's head (storerecords._system_topic):
    fixstr, str 8 and str 16 topics, small and large records."""
    store.consumer_declare([ConsumerSpec("all")], 0.0)
    ids = store.append([Incoming(name, b"p" * size) for size in (10, 5000) for name in (topic, "t/x", "t/$")])
    assert [m.id for m in store.consumer_messages("all", limit=10)] == [ids[1], ids[2], ids[4], ids[5]]
    assert [c["backlog"] for c in store.consumers_report()] == [4]


def test_a_large_record_with_a_damaged_topic_is_damage_not_a_mismatch(store):
    [good] = store.append([Incoming("t/x", b"p" * 5000)])
    raw = bytearray(msgpack.packb([1.0, "t/y", b"p" * 5000, 1, False, 0, None, 1, 1.0]))
    raw[11:14] = b"\xff\xfe\xfd"  # the topic's bytes: not UTF-8
    with store._env.begin(write=True) as txn:  # white box: the damage a bad sector leaves
        txn.put((good + 1).to_bytes(8, "big"), bytes(raw), db=store._inbox)
    with pytest.raises(StoreDamaged):
        store.messages(topic="t/#")
