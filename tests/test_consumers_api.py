"""Named consumers through the API: a real Store, Methods and RpcServer (tests/test_ipc_server.py's
Harness), the client's `connect(consumer=...)`, uid checks by SO_PEERCRED, and flashlexctl."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from flashlexd.client import RpcError, connect
from flashlexd.configconsumers import ConsumerSettings
from flashlexd.consumers import MAX_CONSUMERS, ConsumerSpec
from flashlexd.ipc.protocol import RpcFailure
from flashlexd.store import Incoming
from tests.broker import wait_for
from tests.test_ipc_server import Harness, run_as_nobody

FLASHLEXCTL = str(Path(sys.executable).parent / "flashlexctl")
NOBODY = 65534
DECLARED = (ConsumerSpec("display", "sensors/#", allow_uids=frozenset({4242})),
            ConsumerSpec("logger", "#", max_backlog=100))


@pytest.fixture
def harness() -> Iterator[Harness]:
    root = Path(tempfile.mkdtemp(prefix="consumers-"))
    root.chmod(0o755)  # reachable by the uid-65534 child
    running = Harness(root, path=str(root / "api.sock"), allow_uids=[NOBODY], mode=0o666)
    running.rules = dataclasses.replace(running.rules, consumers=ConsumerSettings(DECLARED))
    running.store.consumer_declare(DECLARED, 0.0)
    running.start()
    yield running
    running.stop()
    subprocess.run(["rm", "-rf", str(root)], check=True)


def ingest(harness: Harness, *topics: str):
    ids = harness.store.append([Incoming(t, t.encode()) for t in topics])
    harness.server.notify_inbox()
    return ids


def test_two_apps_each_get_their_messages_and_the_inbox_empties_once_both_acked(harness: Harness):
    ids = ingest(harness, "sensors/t", "cmd/reboot", "sensors/h")
    with connect(harness.path, consumer="display") as display, connect(harness.path, consumer="logger") as logger, \
            connect(harness.path) as legacy:
        assert [m.id for m in display.messages()] == [ids[0], ids[2]]
        assert [m.id for m in logger.wait(timeout=1)] == ids
        assert display.ack(display.messages()) == 2
        assert [m.id for m in legacy.messages()] == ids  # logger still holds them all
        assert logger.ack(ids) == 3
        assert legacy.messages() == [] and display.messages() == []
        status = legacy.status()
        assert {c["name"]: c["backlog"] for c in status["consumers"]} == {"display": 0, "logger": 0}
        assert status["counters"]["acked"] == 3


def test_wait_wakes_a_parked_consumer_and_stream_yields_each_message_once(harness: Harness):
    with connect(harness.path, consumer="display") as display:
        stream = display.stream(timeout_per_wait=5)
        ingest(harness, "cmd/x", "sensors/a")
        first = next(stream)
        assert first.topic == "sensors/a"
        ingest(harness, "sensors/b")
        assert next(stream).topic == "sensors/b"


def test_a_dynamic_consumer_registers_on_first_use_and_can_be_reset(harness: Harness):
    ids = ingest(harness, "a", "b")
    with connect(harness.path, consumer="newapp") as app:
        assert [m.id for m in app.messages()] == ids
        app.ack(ids)
        assert app.messages() == []
        assert app.reset("newapp", "earliest") == 0
        assert [m.id for m in app.messages()] == ids
        assert app.reset("newapp", ids[1]) == ids[0]
        assert app.reset("newapp", "latest") == ids[1]
        names = {c["name"]: c for c in app.consumers()}
        assert names["newapp"]["dynamic"] and not names["display"]["dynamic"]


def test_a_wait_in_a_loop_gets_what_a_reset_replays_below_its_remembered_place(harness: Harness):
    """A wait that timed out at the end remembered where it stood, and after a reset of its
    consumer it remembered that place again: the same wait in a loop never got the replayed
    messages below it (found by re-read)."""
    ids = ingest(harness, "rare/x", *["noise"] * 5)
    with connect(harness.path, consumer="newapp") as app:
        assert [m.id for m in app.wait(timeout=5, topic="rare/#")] == [ids[0]]
        app.ack([ids[0]])
        assert app.wait(timeout=0.2, topic="rare/#") == []  # timed out at the end: remembered
        app.reset("newapp", "earliest")
        got, calls = [], 0
        while not got and calls < 3:
            got, calls = app.wait(timeout=0.3, topic="rare/#"), calls + 1
        assert [m.id for m in got] == [ids[0]], calls


def test_a_wait_in_a_loop_gets_the_messages_of_a_consumer_removed_and_registered_again(harness: Harness):
    """A dynamic consumer removed and used again starts at the earliest stored message, but its
    app's wait went on from the place it remembered: the messages below it never came (found by
    re-read). A removal counts as a replay of the name."""
    ids = ingest(harness, "rare/x", *["noise"] * 5)
    with connect(harness.path, consumer="newapp") as app:
        assert [m.id for m in app.wait(timeout=5, topic="rare/#")] == [ids[0]]
        app.ack([ids[0]])
        assert app.wait(timeout=0.2, topic="rare/#") == []  # remembered where it stood
        with connect(harness.path) as admin:
            admin.remove_consumer("newapp")
        got, calls = [], 0
        while not got and calls < 3:
            got, calls = app.wait(timeout=0.3, topic="rare/#"), calls + 1
        assert [m.id for m in got] == [ids[0]], calls


def test_a_stream_of_a_consumer_removed_while_it_waits_starts_over_instead_of_failing(harness: Harness):
    """A parked wait of a consumer removed meanwhile got `store_error` (unknown consumer) and
    the app's stream() died (found by re-read). It is told as the replay the removal counts:
    the stream starts over, its next call registering the name again."""
    import threading
    ids = ingest(harness, "a")
    with connect(harness.path, consumer="newapp") as app:
        stream = app.stream(timeout_per_wait=5)
        assert next(stream).id == ids[0]
        app.ack([ids[0]])
        got: list = []
        reader = threading.Thread(target=lambda: got.append(next(stream)))
        reader.start()
        wait_for(lambda: harness.server._parked, 5, "the stream's wait to park")
        with connect(harness.path) as admin:
            admin.remove_consumer("newapp")
        [later] = ingest(harness, "b")
        reader.join(10)
        assert [m.id for m in got] in ([ids[0]], [later])  # started over, as a new consumer: from the earliest


def test_an_unpaged_wait_of_a_consumer_removed_while_it_waits_answers_empty_not_an_error(harness: Harness):
    """The protocol before `paged`: a parked wait of a consumer removed meanwhile was answered
    `store_error` at the next message (found by re-read); it answers [] by its timeout, and the
    caller's next call registers the name again."""
    import threading
    ids = ingest(harness, "a")
    with connect(harness.path, consumer="newapp") as app:
        app.ack([m.id for m in app.messages()])
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(
            app.call("wait", consumer="newapp", topic="b/#", timeout=2)))
        waiter.start()
        wait_for(lambda: harness.server._parked, 5, "the wait to park")
        with connect(harness.path) as admin:
            admin.remove_consumer("newapp")
        ingest(harness, "b/x")
        waiter.join(10)
        assert got == [[]]
        assert [m.topic for m in app.messages(topic="b/#")] == ["b/x"] and ids


def test_a_dynamic_consumer_can_be_removed_at_once_and_the_messages_only_it_held_leave(harness: Harness):
    """An app's typo held every message it matched (and one of the 64 places) for
    consumerIdleDays: there was no way to remove it sooner. 450 messages: the removal takes
    several commits (200 records each), paged by the client, stepped by the server unpaged."""
    topics = [("sensors/t" if n % 2 else "cmd/x") for n in range(450)]
    ids = ingest(harness, *topics)
    with connect(harness.path, consumer="logr") as typo, connect(harness.path, consumer="logger") as logger, \
            connect(harness.path, consumer="display") as display, connect(harness.path) as fx:
        assert len(typo.messages(limit=1)) == 1  # registered by its first use
        while logger.ack(logger.messages(limit=1000)):
            pass
        while display.ack(display.messages(limit=1000)):
            pass
        assert len(fx.messages(limit=1000)) == 450  # the typo holds them all
        assert fx.remove_consumer("logr") is True
        assert fx.messages(limit=1000) == []
        assert "logr" not in {c["name"] for c in fx.consumers()}
        ids = ingest(harness, "sensors/t", "cmd/y")
        assert [m.id for m in typo.messages()] == ids  # used again: a new consumer, from the earliest
        assert fx.call("remove_consumer", consumer="logr") == {"consumer": "logr", "removed": True}
        assert [m.id for m in fx.messages()] == ids  # logger and display hold them still
        for name, said in (("display", "is declared in flashlex.app.consumers"), ("nobody", "no consumer named"),
                           ("Bad Name", "consumer name")):
            with pytest.raises(RpcError) as info:
                fx.remove_consumer(name)
            assert info.value.code == "bad_params" and said in str(info.value), name


def test_replay_counts_of_removed_consumers_are_not_kept(harness: Harness):
    """Found by review: the daemon kept a replay count for every consumer ever replayed, so an
    app registering, replaying and removing consumers under fresh names in a loop grew the
    supervisor's memory for good. Counts of consumers gone are dropped; a live one's stays."""
    ingest(harness, "a", "b")
    with connect(harness.path) as fx:
        fx.reset("logger", "earliest")
        for n in range(3 * MAX_CONSUMERS):
            name = f"app{n}"
            fx.call("messages", consumer=name, paged=True)  # registers it
            fx.reset(name, "earliest")
            assert fx.remove_consumer(name) is True
        assert fx.call("messages", consumer="logger", paged=True)["replays"] == 1
        # a name whose mark was dropped reads as the highest dropped, never lower than it was
        # (a count back at 0 hid its removal's replay, and the next ones: found by re-read)
        last = fx.call("messages", consumer="app0", paged=True)["replays"]
        assert last >= 3 * MAX_CONSUMERS - MAX_CONSUMERS
        # and a stored consumer never replayed still reads 0: a prune is no replay of it (it
        # read the highest mark dropped, and its streams started over at each prune: re-read)
        assert fx.call("messages", consumer="display", paged=True)["replays"] == 0
    assert len(harness.call(lambda: harness.methods._replays)) <= MAX_CONSUMERS + 1


def test_a_streaming_consumer_gets_a_replay_and_a_plain_wait_waits_on_through_it(harness: Harness):
    """README's display.py: `stream()` and an ack per message, `logger` still holding them. A
    reset from another client replayed nothing to it until it restarted: the stream reads on
    from its last message, past the replayed ones (found by review)."""
    ids = ingest(harness, "sensors/a", "sensors/b")
    got: List[int] = []
    waited: List[Tuple[float, list]] = []
    with connect(harness.path, consumer="display") as display, connect(harness.path, consumer="display") as other, \
            connect(harness.path, consumer="display") as admin:
        def read() -> None:
            for msg in display.stream(timeout_per_wait=30):
                got.append(msg.id)
                display.ack([msg])
                if len(got) == 4:
                    return

        def wait_after_the_last() -> None:
            started = time.monotonic()
            answer = other.wait(timeout=1.5, after=ids[-1])
            waited.append((time.monotonic() - started, answer))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: got == ids, 5, "the first delivery")
        assert other.wait(timeout=0) == []  # acked: nothing for "display" now
        waiter = threading.Thread(target=wait_after_the_last, daemon=True)
        waiter.start()
        wait_for(lambda: harness.call(lambda: len(harness.server._parked)) == 2, 5, "both waits parked")
        assert admin.reset("display", "earliest") == 0
        wait_for(lambda: got == ids + ids, 5, "the replay, without waiting out the stream's 30 s")
        waiter.join(5)
        assert waited and waited[0][1] == [] and waited[0][0] >= 1.5  # nothing after the last: waits on


def test_ids_past_any_the_store_hands_out_are_refused_and_a_reset_to_0_replays(harness: Harness):
    """`after + 1` and `to - 1` must fit the store's 8-byte keys: a failed packing is taken for
    damage (the store read-only for every app). Reset to 0 is "earliest" (it stored floor -1)."""
    ids = ingest(harness, "sensors/t", "sensors/h")
    with connect(harness.path, consumer="display") as display, connect(harness.path) as fx:
        for bad in (2 ** 64 - 1, 2 ** 63, str(2 ** 64 - 1)):
            with pytest.raises(RpcError) as info:
                display.call("messages", consumer="display", after=bad, paged=True)
            assert info.value.code == "bad_params" and "message id" in str(info.value)
        assert display.call("messages", consumer="display", after=2 ** 63 - 1, paged=True)["messages"] == []
        assert display.ack(ids) == 2
        assert display.reset("display", 0) == 0
        assert [m.id for m in display.messages()] == ids
        assert display.ack([ids[1]]) == 1  # out of order: an ack entry ahead of the floor
        assert isinstance(fx.publish(b"still writable"), int) and fx.status()["store"].get("damaged") is None


def test_apps_register_consumers_only_while_fewer_than_the_most_are_stored(harness: Harness):
    """Every named ack and `status` reads every consumer: any app could make them slow by naming
    thousands (3,000: `status` 68 ms, an ack 15 ms)."""
    from flashlexd.consumers import MAX_CONSUMERS
    ingest(harness, "sensors/t")
    for i in range(MAX_CONSUMERS - len(DECLARED)):
        with connect(harness.path, consumer=f"app{i}") as app:
            app.messages(limit=1)
    with connect(harness.path, consumer="onemore") as app:
        with pytest.raises(RpcError) as info:
            app.messages(limit=1)
    assert info.value.code == "bad_params"
    assert "no room for a new consumer 'onemore': 64 are stored" in str(info.value)
    with connect(harness.path, consumer="app0") as app:  # the registered ones go on
        assert len(app.messages()) == 1
    assert len(harness.store.consumers_report()) == MAX_CONSUMERS


def test_a_reset_past_the_newest_id_is_refused_not_a_floor_above_messages_to_come(harness: Harness):
    """`flashlexctl consumers reset display --to 999999` (a typo) was taken: the consumer's floor
    stood above every message stored afterwards, and it got none of them (found by review)."""
    ingest(harness, "sensors/a", "sensors/b")
    with connect(harness.path, consumer="display") as display:
        with pytest.raises(RpcError) as refused:
            display.reset("display", 999_999)
        assert refused.value.code == "bad_params" and "no message has id 999999 yet (the newest is 2)" \
            in str(refused.value)
        assert display.reset("display", 3) == 2  # the id after the newest: as "latest"
        later = ingest(harness, "sensors/c", "sensors/d")
        assert [m.id for m in display.messages()] == later


def test_a_declared_consumer_with_no_room_left_is_refused_with_the_reason(harness: Harness):
    """A consumer declared by a reload while apps hold every other place: its app is told why
    (it was neither stored nor refused: the declare stored a 65th)."""
    from flashlexd.consumers import MAX_CONSUMERS
    for i in range(MAX_CONSUMERS - len(DECLARED)):
        harness.store.consumer_register(f"app{i}", time.time())
    late = ConsumerSettings(DECLARED + (ConsumerSpec("late", "cmd/#"),))
    harness.rules = dataclasses.replace(harness.rules, consumers=late)
    with connect(harness.path, consumer="late") as app:
        with pytest.raises(RpcError) as info:
            app.messages(limit=1)
    assert info.value.code == "bad_params" and "no room for a new consumer 'late'" in str(info.value)
    assert len(harness.store.consumers_report()) == MAX_CONSUMERS


def test_a_stream_gets_what_a_declare_on_first_use_widened_its_consumer_to(harness: Harness):
    """A reload widened display's filter but its own declare failed; a declared consumer's
    first use declared them all again, and the store widened display, but the widening was not
    counted as a replay: display's running stream() read on past the newly matched message and
    never got it (found by review)."""
    ids = ingest(harness, "cmd/x", "sensors/a")  # display (sensors/#) does not match cmd/x yet
    got: List[int] = []
    with connect(harness.path, consumer="display") as display:
        def read() -> None:
            for msg in display.stream(timeout_per_wait=30):
                got.append(msg.id)
                if len(got) == 3:
                    return
        threading.Thread(target=read, daemon=True).start()
        wait_for(lambda: got == [ids[1]], 5, "the first delivery")
        widened = (ConsumerSpec("display", "#"), DECLARED[1], ConsumerSpec("audit", "#"))
        harness.rules = dataclasses.replace(harness.rules, consumers=ConsumerSettings(widened))
        with connect(harness.path, consumer="audit") as audit:
            audit.messages()  # its first use declares every configured consumer
        wait_for(lambda: got == [ids[1], ids[0], ids[1]], 5, "the stream started over on the widening")


@pytest.mark.parametrize("paged", [True, False])
def test_a_parked_wait_gets_a_replay_of_its_consumer_at_once_and_first(harness: Harness, paged: bool):
    """A wait parked at the inbox's end stands past the messages a replay gives back: it was
    polled only on new messages, then answered those before the replayed ones."""
    ids = ingest(harness, "sensors/a", "sensors/b")
    with connect(harness.path, consumer="display") as app, connect(harness.path, consumer="display") as admin:
        assert app.ack(ids) == 2
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(
            app.call("wait", consumer="display", timeout=20, paged=paged)))
        waiter.start()
        wait_for(lambda: harness.call(lambda: harness.server.parked_count) == 1, 5, "the wait parked")
        replayed_at = time.monotonic()
        assert admin.reset("display", "earliest") == 0
        waiter.join(25)
        took = time.monotonic() - replayed_at
    messages = answers[0]["messages"] if paged else answers[0]
    assert [m["id"] for m in messages] == ids and took < 10, (answers, took)


def test_bad_names_unknown_consumers_and_bad_reset_targets_are_one_line_errors(harness: Harness):
    with pytest.raises(ValueError, match="^consumer must be a consumer name: 1 to 64 of a-z 0-9 _ -, not 'Bad Name'$"):
        connect(harness.path, consumer="Bad Name")  # found by review: said only at the first call
    with connect(harness.path) as bad:  # the daemon's own check, for clients that skip it
        with pytest.raises(RpcError) as info:
            bad.call("messages", consumer="Bad Name")
    assert info.value.code == "bad_params" and "consumer name" in str(info.value)
    harness.rules = dataclasses.replace(harness.rules, consumers=ConsumerSettings(DECLARED, allow_dynamic=False))
    with connect(harness.path, consumer="stranger") as app:
        with pytest.raises(RpcError) as info:
            app.messages()
        assert "allowDynamicConsumers is false" in str(info.value)
        with pytest.raises(RpcError) as info:
            app.call("reset", consumer="display", to="first")
        assert info.value.code == "bad_params" and "'to' must be earliest, latest or a message id" in str(info.value)


def test_allow_uids_limits_a_consumer_by_the_peers_uid(harness: Harness):
    """The uid is the kernel's (SO_PEERCRED): a child that became uid 65534 is admitted to the
    socket (allowUids) but not to `display` (its allowUids is 4242); `logger` has none."""
    def attempt(name: str) -> str:
        def work() -> str:
            with connect(harness.path, consumer=name) as app:
                return str(len(app.messages()))
        return work

    ingest(harness, "sensors/t")
    refused = run_as_nobody(attempt("display"))
    assert "forbidden" in refused and "uid 65534 may not use consumer 'display'" in refused
    assert run_as_nobody(attempt("logger")) == "1"
    with pytest.raises(RpcFailure):  # the same check, straight through the methods
        harness.methods.handle("messages", {"consumer": "display"}, uid=NOBODY)
    assert harness.methods.handle("messages", {"consumer": "display"}, uid=os.geteuid()) != []


def test_flashlexctl_lists_reads_and_resets_consumers(harness: Harness):
    ids = ingest(harness, "sensors/t", "other")

    def ctl(*args: str) -> str:
        done = subprocess.run([FLASHLEXCTL, "--socket", harness.path, *args], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "consumers display backlog 1 dropped 0; logger backlog 2 dropped 0" in \
        subprocess.run([FLASHLEXCTL, "--socket", harness.path, "status"], capture_output=True, text=True,
                       timeout=30).stdout
    listing = ctl("consumers")
    assert "display" in listing and "sensors/#" in listing and "declared" in listing
    assert "other" not in ctl("messages", "--consumer", "display")
    assert "acknowledged 1 of 1" in ctl("ack", "--consumer", "display", str(ids[0]))
    assert ctl("messages", "--consumer", "display").strip() == "no messages"
    assert "acknowledged through id 0" in ctl("consumers", "reset", "display", "--to", "earliest")
    assert "sensors/t" in ctl("messages", "--consumer", "display")
    for to, said in (("latest", "no consumer named 'dispaly' (there are: display, logger)"),
                     ("\u00b2", "param 'to' must be")):
        refused = subprocess.run([FLASHLEXCTL, "--socket", harness.path, "consumers", "reset", "dispaly"
                                  if to == "latest" else "display", "--to", to], capture_output=True,
                                 text=True, timeout=30)
        assert refused.returncode == 1 and said in refused.stderr and refused.stderr.count("\n") == 1, \
            refused.stderr  # a misspelt name registered a consumer holding every message; ² a traceback
    assert [c["name"] for c in harness.methods.handle("consumers", {})] == ["display", "logger"]
    with connect(harness.path, consumer="typo") as typo:  # an app registers by use (flashlexctl refuses)
        assert typo.messages() != []
    assert "consumer typo removed; the messages it alone still held back were released" \
        in ctl("consumers", "remove", "typo")
    assert "typo" not in ctl("consumers")
    refused = subprocess.run([FLASHLEXCTL, "--socket", harness.path, "consumers", "remove", "typo"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and refused.stderr == ("flashlexctl: no consumer named 'typo' (there"
                                                          " are: display, logger): see flashlexctl consumers\n"), \
        refused.stderr  # it was the daemon's words: "bad_params: remove_consumer: no consumer named"


# -- bounded work per call (issue 14): a consumer's reads walk pages, status counts a budget ----

def test_a_consumer_read_walks_a_page_at_a_time_and_the_client_follows_its_cursor(harness: Harness):
    from flashlexd.ipc.methods import SCAN_BUDGET
    ids = ingest(harness, *["cmd/noise"] * (2 * SCAN_BUDGET + 10), "sensors/t")
    with connect(harness.path, consumer="display") as display:
        page = display.call("messages", paged=True, consumer="display")
        assert page == {"messages": [], "cursor": ids[SCAN_BUDGET - 1], "replays": 0, "run": page["run"]}
        assert [m.id for m in display.messages()] == [ids[-1]]
        assert [m.id for m in display.wait(timeout=1)] == [ids[-1]]
        assert [m["id"] for m in display.call("messages", consumer="display")] == [ids[-1]]  # unpaged


def test_status_counts_each_consumers_backlog_up_to_its_share_of_the_budget(harness: Harness):
    from flashlexd.storeconsumers import REPORT_BUDGET, report_share
    share = report_share(len(DECLARED))
    assert share == REPORT_BUDGET // 2
    ingest(harness, *["sensors/t"] * (share + 5))
    with connect(harness.path) as fx:
        report = {c["name"]: c for c in fx.status()["consumers"]}
        assert (report["display"]["backlog"], report["display"]["backlog_exact"]) == (share, False)
        assert report["display"]["oldest_age"] is not None
        assert fx.ack([m.id for m in fx.messages(limit=10)]) == 10  # unnamed: gone for everyone
        report = {c["name"]: c for c in fx.status()["consumers"]}
        assert (report["display"]["backlog"], report["display"]["backlog_exact"]) == (share - 5, True)


def test_status_walks_no_more_records_however_many_consumers_apps_register(harness: Harness):
    from flashlexd.storeconsumers import REPORT_BUDGET, report_share
    assert [report_share(n) for n in (0, 1, 3, REPORT_BUDGET, 10 * REPORT_BUDGET)] == \
        [REPORT_BUDGET, REPORT_BUDGET, REPORT_BUDGET // 3, 1, 1]
    ingest(harness, *["sensors/t"] * 30)
    names = [f"app{i}" for i in range(48)]  # with the two declared: 50 consumers, 10 records each
    for name in names:
        with connect(harness.path, consumer=name) as app:
            app.messages(limit=1)  # registers it
    with connect(harness.path) as fx:
        report = {c["name"]: c for c in fx.status()["consumers"]}
    assert len(report) == 50 and report_share(50) == 10
    assert all((c["backlog"], c["backlog_exact"]) == (10, False) for c in report.values())


def test_a_reset_of_a_name_not_stored_is_refused_unless_it_is_the_apps_own(harness: Harness):
    """An unnamed app's `fx.reset("dispaly", to="latest")` registered a consumer of every topic
    and its skip released every stored message: on a daemon without other named consumers the
    inbox was emptied for the unnamed apps too (found by review). Refused now, as
    `remove_consumer` refuses; an app's own consumer is still registered by its reset."""
    ids = ingest(harness, "a", "b", "sensors/t")
    with connect(harness.path) as fx:
        with pytest.raises(RpcError) as info:
            fx.reset("loger", "latest")
        assert info.value.code == "bad_params" and "no consumer named 'loger'" in str(info.value)
        assert "loger" not in {c["name"] for c in fx.consumers()}
        assert [m.id for m in fx.messages()] == ids
    with connect(harness.path, consumer="fresh") as fresh:  # skips what is stored, from its start
        assert fresh.reset("fresh", "latest") == ids[-1]
        assert fresh.messages() == []
        assert "fresh" in {c["name"] for c in fresh.consumers()}
        with pytest.raises(RpcError):
            fresh.reset("other", "earliest")  # only its own name is registered so


def test_consumers_shows_the_backlog_bound_dynamic_max_backlog_sets(harness: Harness):
    """`flashlexctl consumers` showed `-` for a dynamic consumer that `dynamicMaxBacklog`
    bounds (session 43 left it alone): the bound that holds is shown, the lower of the two."""
    harness.rules = dataclasses.replace(harness.rules, consumers=ConsumerSettings(DECLARED, dynamic_max_backlog=50))
    with connect(harness.path, consumer="app") as app:
        app.messages()
    bounds = {c["name"]: c["max_backlog"] for c in harness.methods.handle("consumers", {})}
    assert bounds == {"app": 50, "display": None, "logger": 100}
