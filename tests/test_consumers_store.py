"""Named consumers in the store, on real LMDB files: each consumer sees every matching message
once, a message leaves only when every matching consumer acked it, out-of-order acks, resets,
the cap's and maxBacklog's drops counted per consumer, idle removal, no write per ingested
message, and a schema-3 store (as flashlexd wrote it before consumers) opening with no loss."""
from __future__ import annotations

import logging
import struct
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import lmdb
import msgpack
import pytest

from flashlexd.configconsumers import ConsumerSettings
from flashlexd.clock import Reading
from flashlexd.consumerkeeper import ConsumerKeeper
from flashlexd.ipc.methods import SCAN_BUDGET
from flashlexd.storeconsumers import COMMIT_STEP, COUNT_STEP, FLOOR_HINT, WALK_BUDGET, FloorCatchUp
from flashlexd.consumers import MAX_CONSUMERS, ConsumerSpec, UnknownConsumer
from flashlexd.store import SCHEMA_VERSION, Incoming, Store, StoreDamaged

CAP = 64 * 1024 * 1024
NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "store", CAP)
    yield opened
    opened.close()


def put(store: Store, *topics: str) -> List[int]:
    return store.append([Incoming(topic, f"{topic}#{i}".encode()) for i, topic in enumerate(topics)])


def ids_for(store: Store, name: str, **query) -> List[int]:
    return [m.id for m in store.consumer_messages(name, 10 ** 6, **query)]


def upkeep(store: Store, now: float, idle_seconds: Optional[float]) -> List[str]:
    """A whole sweep (the supervisor takes one step per turn of its loop): the names removed."""
    return [name for name in store.consumers_upkeep(now, idle_seconds) if name is not None]


def stored(store: Store) -> List[int]:
    return [m.id for m in store.messages(10 ** 6)]


def declare(store: Store, *specs: ConsumerSpec) -> None:
    store.consumer_declare(list(specs), NOW)


def test_each_consumer_sees_its_matching_messages_and_a_message_leaves_when_all_acked(store: Store):
    declare(store, ConsumerSpec("display", "sensors/#"), ConsumerSpec("logger", "#"))
    ids = put(store, "sensors/t", "cmd/x", "sensors/h")
    assert ids_for(store, "display") == [ids[0], ids[2]]
    assert ids_for(store, "logger") == ids
    assert store.consumer_ack("display", ids, NOW) == 2  # cmd/x is not display's: no ack
    assert stored(store) == ids  # logger has not acked anything
    assert ids_for(store, "display") == []
    assert store.consumer_ack("logger", [ids[0], ids[1]], NOW) == 2
    assert stored(store) == [ids[2]]
    assert store.consumer_ack("logger", [ids[2]], NOW) == 1
    assert stored(store) == []
    assert store.stats()["acked"] == 3


def test_acks_are_idempotent_and_out_of_order_acks_keep_the_floor_exact(store: Store):
    declare(store, ConsumerSpec("a"), ConsumerSpec("b"))
    ids = put(store, *["t"] * 5)
    assert store.consumer_ack("a", [ids[3], ids[1]], NOW) == 2
    assert store.consumer_ack("a", [ids[3]], NOW) == 0
    assert ids_for(store, "a") == [ids[0], ids[2], ids[4]]
    assert store.consumer_state("a").floor == 0
    store.consumer_ack("a", [ids[0], ids[2]], NOW)
    assert store.consumer_state("a").floor == ids[3]  # acks-ahead folded into the floor
    assert ids_for(store, "a") == [ids[4]] and ids_for(store, "b") == ids


def test_the_default_consumer_keeps_todays_behaviour(store: Store):
    declare(store, ConsumerSpec("a"))
    ids = put(store, "t", "t")
    assert store.ack([ids[0]]) == 1  # the inbox itself: gone for everybody, as before
    assert stored(store) == [ids[1]] and ids_for(store, "a") == [ids[1]]
    assert store.consumer_ack("a", ids, NOW) == 1
    assert stored(store) == []


def test_messages_no_named_consumer_matches_stay_for_the_default_consumer(store: Store):
    declare(store, ConsumerSpec("display", "sensors/#"))
    ids = put(store, "sensors/t", "other")
    store.consumer_ack("display", ids, NOW)
    assert stored(store) == [ids[1]]


def test_reset_replays_and_skips(store: Store):
    declare(store, ConsumerSpec("a"), ConsumerSpec("b"))
    ids = put(store, "t", "t", "t")
    store.consumer_ack("a", ids, NOW)
    assert ids_for(store, "a") == []
    assert store.consumer_reset("a", "earliest") == 0
    assert ids_for(store, "a") == ids
    store.consumer_reset("a", ids[1])
    assert ids_for(store, "a") == ids[1:]
    assert store.consumer_reset("b", "latest") == ids[-1]
    assert stored(store) == ids[1:]  # b skipped everything; a had acked ids[0] (before the replay)
    store.consumer_ack("a", ids[1:], NOW)
    assert stored(store) == []


@pytest.mark.parametrize("floor_before", ["below the id", "past the id"])
def test_a_reset_to_an_id_starts_at_that_message_whatever_was_acked(store: Store, floor_before: str):
    """`reset a --to ID` with the floor below the id skipped forward keeping a's acks from there
    on (ids[2] and ids[4] never came again), while with the floor at or past it it replayed: the
    same command gave different results (found by review)."""
    declare(store, ConsumerSpec("a"), ConsumerSpec("keeper"))  # keeper holds every message
    ids = put(store, *["t"] * 6)
    store.consumer_ack("a", ids[1:3] + [ids[4]] + (ids[:1] if floor_before == "past the id" else []), NOW)
    store.consumer_reset("a", ids[2])
    assert ids_for(store, "a") == ids[2:]


def test_unknown_consumer_is_one_clear_error(store: Store):
    with pytest.raises(UnknownConsumer) as caught:
        store.consumer_messages("nobody")
    assert "'nobody'" in str(caught.value) and "\n" not in str(caught.value)


def test_ingest_writes_nothing_per_consumer(store: Store):
    declare(store, *(ConsumerSpec(f"c{i}") for i in range(5)))
    before = store.stats()["used_bytes"]
    put(store, *["t"] * 200)
    with store._read() as txn:
        assert txn.stat(store._consumer_acks)["entries"] == 0
        states = [bytes(v) for _, v in txn.cursor(db=store._consumer_db)]
    assert len(states) == 5 and store.stats()["used_bytes"] > before
    with store._read() as txn:
        assert [bytes(v) for _, v in txn.cursor(db=store._consumer_db)] == states


@pytest.mark.parametrize("batch", [10, 3 * WALK_BUDGET])  # an ack's walk: past its own ids
def test_in_order_acks_leave_no_ack_entries(store: Store, batch: int):
    declare(store, ConsumerSpec("a"), ConsumerSpec("b"))
    ids = put(store, *["t"] * (5 * batch))
    for start in range(0, len(ids), batch):
        store.consumer_ack("a", ids[start:start + batch], NOW)
    with store._read() as txn:
        assert txn.stat(store._consumer_acks)["entries"] == 0
    assert store.consumer_state("a").floor == ids[-1]


def test_a_system_topic_neither_counts_nor_holds_the_floor_of_a_consumer_of_every_topic(store: Store):
    """`#` does not match `$aws/...` (MQTT 4.7.2): such a message is not in that consumer's
    backlog, and its acks move its floor past it (it stuck there, so that every later ack was
    kept as an entry and every read walked from it, until the message expired)."""
    declare(store, ConsumerSpec("logger", "#"))
    ids = put(store, "sensors/t", "$aws/things/pi/shadow/update/delta", "sensors/h")
    assert ids_for(store, "logger") == [ids[0], ids[2]]
    assert [c["backlog"] for c in store.consumers_report()] == [2]
    assert store.consumer_ack("logger", [ids[0], ids[2]], NOW) == 2
    assert store.consumer_state("logger").floor >= ids[1]
    assert [(c["backlog"], c["oldest_age"]) for c in store.consumers_report()] == [(0, None)]
    assert stored(store) == [ids[1]]  # the default consumer's, until acked or expired


def test_the_cap_counts_a_drop_for_each_consumer_that_had_not_acked(tmp_path: Path):
    store = Store(tmp_path / "store", 1024 * 1024, "dropOldest")
    try:
        declare(store, ConsumerSpec("fast"), ConsumerSpec("slow"), ConsumerSpec("other", "x/#"))
        first = store.append([Incoming("t", b"p" * 2000) for _ in range(10)])
        store.consumer_ack("fast", first, NOW)
        for _ in range(60):
            store.append([Incoming("t", b"p" * 2000) for _ in range(10)])
        dropped = store.stats()["dropped_full"]
        assert dropped > 10
        report = {c["name"]: c for c in store.consumers_report()}
        assert report["slow"]["dropped"] == dropped
        assert report["fast"]["dropped"] == dropped - 10
        assert report["other"]["dropped"] == 0
    finally:
        store.close()


def test_max_backlog_drops_the_slow_consumers_oldest_and_counts_them(store: Store):
    declare(store, ConsumerSpec("fast"), ConsumerSpec("slow", max_backlog=5))
    ids = put(store, *["t"] * 20)
    store.consumer_ack("fast", ids, NOW)
    assert upkeep(store, NOW, None) == []
    assert ids_for(store, "slow") == ids[-5:]
    assert stored(store) == ids[-5:]  # fast had acked them all: they left with the drop
    report = {c["name"]: c for c in store.consumers_report()}
    assert report["slow"]["dropped"] == 15 and report["slow"]["backlog"] == 5
    assert report["fast"]["backlog"] == 0 and report["fast"]["dropped"] == 0
    # they left by the trim, not by every matching consumer's ack: counted so (they were all
    # counted as acked, 989,980 at a million stored with no app acking: found by review)
    assert (store.stats()["released"], store.stats()["acked"]) == (15, 0)
    store.consumer_ack("slow", ids[-2:], NOW)
    assert (store.stats()["released"], store.stats()["acked"]) == (15, 2)


def test_acks_of_several_consumers_in_one_commit_each_get_their_own_result(store: Store):
    """apiCommitMs for named consumers: one transaction, each call its count, and a call naming
    a consumer gone meanwhile gets its own error, not the others'."""
    declare(store, ConsumerSpec("a"), ConsumerSpec("b"))
    ids = put(store, "t", "t")
    results = store.consumer_ack_each([("a", ids), ("nosuch", ids), ("b", ids[:1]), ("a", ids)], NOW)
    assert results[0] == 2 and isinstance(results[1], UnknownConsumer) and results[2:] == [1, 0]
    assert stored(store) == ids[1:]  # both done with the first: it left in that commit


def test_dynamic_max_backlog_trims_a_dynamic_consumer_that_never_acks(store: Store):
    """An app reading under an undeclared name and never acking held every message, and under
    `reject` the full store refused every app's new ones (review "consumers"): with
    `dynamicMaxBacklog` it loses its oldest, counted, as a declared one past its `maxBacklog`."""
    declare(store, ConsumerSpec("fast"))
    store.consumer_register("lazy", NOW)
    store.consumer_register("lazy-too", NOW)
    ids = put(store, *["t"] * 20)
    store.consumer_ack("fast", ids, NOW)
    assert [name for name in store.consumers_upkeep(NOW, None, (), None) if name] == []
    assert len(ids_for(store, "lazy")) == 20  # without it: all held
    assert [name for name in store.consumers_upkeep(NOW, None, (), 4) if name] == []
    assert ids_for(store, "lazy") == ids[-4:] and ids_for(store, "lazy-too") == ids[-4:]
    assert stored(store) == ids[-4:]
    report = {c["name"]: c for c in store.consumers_report()}
    assert report["lazy"]["dropped"] == 16 and report["fast"]["dropped"] == 0


@pytest.mark.parametrize("acker", ["the consumer", "an unnamed app", "an unnamed app, no journal"])
def test_a_trim_keeps_max_backlog_messages_when_some_it_counted_are_acked_meanwhile(store: Store, acker: str):
    """The supervisor serves calls between the count's reads and the trim's commits. The app
    acks its newest message after every step, one the count has passed: each such ack moves the
    cut one message further back, also while the trim is under way (the trim used to keep one
    message fewer per ack). An unnamed app's ack takes it from every consumer: through the ack
    journal, as in the supervisor, or in a commit of its own when the journal could not open."""
    limit = 100
    if acker != "an unnamed app, no journal":
        store.open_ack_journal()
    declare(store, ConsumerSpec("slow", "rare/#", max_backlog=limit))
    rare = len(put(store, *["rare/x" if i % 20 == 0 else "noise" for i in range(4 * COUNT_STEP)])) // 20
    acks, before, trim_commits = 0, rare, 0
    for _ in store.consumers_upkeep(NOW, None):
        backlog = ids_for(store, "slow")
        assert len(backlog) >= min(limit, before), f"a trim step kept {len(backlog)} of {before}"
        trim_commits += len(backlog) < before
        if acker == "the consumer":
            store.consumer_ack("slow", backlog[-1:], NOW)
        else:
            store.ack(backlog[-1:])
        acks += 1
        before = len(backlog) - 1
    kept = ids_for(store, "slow")
    assert trim_commits >= 3  # acks came between the trim's commits too
    assert len(kept) <= limit and store.consumer_state("slow").dropped == rare - acks - len(kept)


def test_an_idle_dynamic_consumer_is_removed_and_releases_what_it_held(store: Store):
    declare(store, ConsumerSpec("kept"))
    store.consumer_register("gone", NOW - 8 * 86400)
    ids = put(store, "t", "t")
    store.consumer_ack("kept", ids, NOW)
    assert stored(store) == ids
    assert upkeep(store, NOW, 7 * 86400) == ["gone"]
    assert stored(store) == [] and store.consumer_state("gone") is None


def test_an_undeclared_consumer_becomes_dynamic(store: Store):
    declare(store, ConsumerSpec("a", "x/#", max_backlog=3))
    assert store.consumer_state("a").dynamic is False
    declare(store)
    assert store.consumer_state("a").dynamic is True


def test_a_dynamic_consumer_declared_keeps_its_acks_and_is_said_so(store: Store, caplog):
    """A name an app had registered, then declared (with allowUids that leave that app out):
    it kept the app's acks without a word, and the protected app never got what that one had
    acked (review "security"). Kept (the same app declared is the usual case), one WARNING."""
    from flashlexd.consumerkeeper import declared_changes
    store.consumer_register("actuator", NOW)
    ids = put(store, "t", "t")
    store.consumer_ack("actuator", ids, NOW)
    declared = store.consumer_declare([ConsumerSpec("actuator", allow_uids=frozenset({1001}))], NOW)
    assert declared.adopted == ["actuator"] and declared.created == []
    with caplog.at_level(logging.WARNING, logger="flashlexd.consumerkeeper"):
        declared_changes(declared, lambda name: None)
    assert "consumer 'actuator' declared: it was dynamic" in caplog.text
    assert "flashlexctl consumers reset actuator --to earliest" in caplog.text
    again = store.consumer_declare([ConsumerSpec("actuator", allow_uids=frozenset({1001}))], NOW)
    assert again.adopted == []  # declared already: said once


def test_a_reload_widening_a_filter_delivers_the_stored_messages_its_floor_passed(store: Store):
    """display's floor had passed the cmd/ messages actuator still holds (not its topic then): a
    reload widening its filter to every topic never delivered them to it, though each named
    consumer gets every stored message its filter matches (found by review). What it acked
    under the old filter stays acked."""
    declare(store, ConsumerSpec("display", "sensors/#"), ConsumerSpec("actuator", "cmd/#"))
    ids = put(store, "sensors/t", "cmd/x", "sensors/h", "cmd/y", "sensors/p")
    store.consumer_ack("display", [ids[0], ids[2]], NOW)
    assert store.consumer_state("display").floor == ids[3]  # past cmd/x and cmd/y, unseen
    declare(store, ConsumerSpec("display", "#"), ConsumerSpec("actuator", "cmd/#"))
    assert ids_for(store, "display") == [ids[1], ids[3], ids[4]]


@pytest.mark.parametrize("acked, widened", [
    (0, []),  # sensors/+ matches no stored message sensors/# did not
    (1, ["display"]),  # cmd/x past display's floor
    (3, ["display"]),  # cmd/x below it (reopened)
])
def test_a_reload_names_a_consumer_widened_only_over_stored_messages_its_filter_missed(
        store: Store, acked: int, widened: List[str]):
    """`Declared.widened`, what a running stream() of the consumer starts over on (found by
    review): a new filter matching a stored message the old one did not, past the floor or
    below it; not a changed filter that matches nothing new."""
    declare(store, ConsumerSpec("display", "sensors/#"), ConsumerSpec("actuator", "cmd/#"))
    ids = put(store, "sensors/t", "cmd/x", "sensors/h")
    store.consumer_ack("display", [i for i in ids[:acked] if i != ids[1]], NOW)
    new_filter = "#" if widened else "sensors/+"
    assert store.consumer_declare([ConsumerSpec("display", new_filter), ConsumerSpec("actuator", "cmd/#")],
                                  NOW).widened == widened


def test_a_declared_consumer_beyond_the_most_stored_is_refused_by_name_not_stored(store: Store, caplog):
    """Apps registered all but one of the 64 places: a reload declaring two new consumers stored
    both (65), over the cap the README promises for declared and registered together. The one
    that fits is stored, the other is named once in an ERROR, and the rest of the reload (a
    changed filter) still applies."""
    store.consumer_register("first", NOW)
    for i in range(MAX_CONSUMERS - 2):
        store.consumer_register(f"app{i}", NOW)
    settings = ConsumerSettings((ConsumerSpec("first", "a/#"), ConsumerSpec("fits"), ConsumerSpec("over")))
    keeper = ConsumerKeeper(lambda: store, lambda: settings, lambda: 5.0, start_grace=0)
    with caplog.at_level(logging.INFO, logger="flashlexd.consumerkeeper"):
        keeper.declare()
    assert len(store.consumers_report()) == MAX_CONSUMERS and store.consumer_state("over") is None
    assert store.consumer_state("fits") is not None and store.consumer_state("first").filter == "a/#"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["flashlex.app.consumers.over: no room for a new consumer 'over': 64 are stored, the"
                      " most there may be (a dynamic one goes when unused for consumerIdleDays, or by"
                      " `flashlexctl consumers remove NAME`); it is declared again at the next reload"]
    while store.consumer_remove_step("app0", NOW + 1) is None:
        pass
    assert store.consumer_declare(list(settings.declared), NOW) == (["over"], [], [], [], [])


def test_a_consumer_renamed_in_the_config_with_the_most_stored_takes_the_old_ones_place(store: Store, caplog):
    """With 64 consumers stored, a reload renaming a declared one refused the new name (one
    ERROR) until the old one was removed by hand (found by review): the old one, taken out of
    the config, gives its place (one WARNING), and the new one gets every stored message it
    matches, those the old one acked too."""
    for i in range(MAX_CONSUMERS - 1):
        store.consumer_register(f"app{i}", NOW)  # every topic: they hold every message
    declare(store, ConsumerSpec("old", "t/#"))
    ids = put(store, "t/a", "t/b", "u")
    store.consumer_ack("old", ids[:1], NOW)
    settings = ConsumerSettings((ConsumerSpec("new", "t/#"),))
    keeper = ConsumerKeeper(lambda: store, lambda: settings, lambda: 5.0, start_grace=0)
    with caplog.at_level(logging.INFO, logger="flashlexd.consumerkeeper"):
        keeper.declare()
    assert store.consumer_state("old") is None and store.consumer_state("new").dynamic is False
    assert len(store.consumer_states()) == MAX_CONSUMERS and ids_for(store, "new") == ids[:2]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "consumer 'old' removed: taken out of flashlex.app.consumers, it gave its place to a newly"
        " declared one (64 are stored, the most there may be); the messages it alone still held back"
        " were released (those no other consumer matches stay, for unnamed apps and expiry)"]


def write_schema3_store(path: Path) -> List[int]:
    """A store as flashlexd wrote it before consumers: today's layout, no consumer databases,
    schema 3 in meta."""
    store = Store(path, CAP)
    ids = put(store, "a", "b", "c")
    store.outbox_append([("up", b"x", 1, False)])
    store.close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        for name in (b"consumers", b"cacks"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        txn.put(b"schema", struct.pack(">Q", 3), db=env.open_db(b"meta", txn=txn))
    env.close()
    return ids


def test_a_schema3_store_opens_with_no_loss(tmp_path: Path):
    ids = write_schema3_store(tmp_path / "store")
    store = Store(tmp_path / "store", CAP)
    try:
        assert stored(store) == ids and len(store.outbox_peek()) == 1
        declare(store, ConsumerSpec("a"))
        assert ids_for(store, "a") == ids
    finally:
        store.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:
        assert struct.unpack(">Q", txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False)))[0] \
            == SCHEMA_VERSION == 7
    env.close()


def test_the_supervisors_keeper_declares_removes_idle_ones_with_one_warning_and_trims(store: Store, caplog):
    """ConsumerKeeper against a real store: one WARNING per removed consumer, the sweep cadence."""
    settings = ConsumerSettings((ConsumerSpec("kept", max_backlog=2),), idle_seconds=3600)
    keeper = ConsumerKeeper(lambda: store, lambda: settings, lambda: 5.0, start_grace=0)
    keeper.declare()
    store.consumer_register("old", time.time() - 7200)
    ids = put(store, *["t"] * 5)
    with caplog.at_level(logging.WARNING, logger="flashlexd.consumerkeeper"):
        keeper.tick(100.0)
        while keeper.next_run == 100.0:  # a step per turn of the loop
            keeper.tick(100.0)
        keeper.tick(101.0)  # not due again before 105
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'old' removed: unused for 0.0416667 days" in warnings[0]
    assert keeper.next_run == 105.0
    assert ids_for(store, "kept") == ids[-2:] and store.consumer_state("kept").dropped == 3
    assert stored(store) == ids[-2:]  # "old" is gone and "kept" dropped the rest: they left


def test_while_the_store_is_full_a_dynamic_consumer_unused_for_hours_goes(store: Store, caplog):
    """An app that used a name once and went away held every message it matched: the store
    filled, and no app got anything new until its 7 idle days were over (found by review: a
    soak's ghost consumer; 17 hours to fill the default cap at 50 messages a second). While the
    store refuses for want of room, a dynamic consumer unused for over 4 hours goes; a declared
    one, one used since, or any while the store has room, stays. An hour took a live reader's
    too (found by re-read): its reads write its last use hourly, and a `wait` may last an hour."""
    full = [False]
    settings = ConsumerSettings((ConsumerSpec("declared"),), idle_seconds=7 * 86400.0)
    keeper = ConsumerKeeper(lambda: store, lambda: settings, lambda: 5.0, start_grace=0,
                            store_full=lambda: full[0])
    keeper.declare()
    store.consumer_register("ghost", time.time() - 5 * 3600)
    store.consumer_register("app", time.time() - 2 * 3600 - 60)  # a reader in a `wait` of an hour
    ids = put(store, "t", "t")
    store.consumer_ack("declared", ids, time.time())
    store.consumer_ack("app", ids, time.time() - 2 * 3600 - 60)

    def sweep(now: float) -> List[str]:
        keeper.tick(now)
        while keeper.next_run == now:
            keeper.tick(now)
        return sorted(c.name for c in store.consumer_states())
    with caplog.at_level(logging.WARNING, logger="flashlexd.consumerkeeper"):
        assert sweep(100.0) == ["app", "declared", "ghost"]  # room in the store: 7 days as before
        assert stored(store) == ids
        full[0] = True
        assert sweep(105.0) == ["app", "declared"]
    assert stored(store) == []  # what the ghost alone held back left: room again
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'ghost' removed: unused for over 4 hours while the store is full" in warning, warning


def test_the_keeper_takes_no_clock_step_for_idle_time_and_waits_out_its_start_grace(store: Store):
    """A Pi that boots with its clock 10 days behind, an app reads, NTP steps the clock: the
    app's consumer (with the messages only it holds) went at the next sweep. Nor may a consumer
    used after the step be kept a step too long (review of the first fix: kept for good after a
    start in 1970). After a long power-off every consumer looks idle until its app, started
    after the daemon, uses it."""
    day = 86400.0
    clock = SteppingClock(time.time() - 10 * day)
    run = KeeperRun(lambda: store, clock)
    store.consumer_register("stored-long-ago", clock.wall - 30 * day)  # before the power-off
    store.consumer_register("app", clock.wall)
    ids = put(store, "t")
    assert run.sweep(0) == ["app", "stored-long-ago"]  # the start: within the grace
    assert run.sweep(3600, step=10 * day) == ["app"]  # NTP; the app's 1 h is not 10 days and an hour
    assert ids_for(store, "app") == ids
    store.consumer_register("used-after-the-step", clock.wall)
    assert run.sweep(6 * day) == ["app", "used-after-the-step"]
    assert run.sweep(1 * day + 1) == []  # 7 days unused, each of them


def test_a_read_writes_nothing_and_the_sweep_moves_the_floor_past_other_topics(store: Store):
    """A read that passed other apps' records used to commit its floor's move, one commit for
    every 250 records (14.7 MB written by one consumer reading past 100,000)."""
    declare(store, ConsumerSpec("rare", "rare/#"), ConsumerSpec("all"))
    ids = put(store, *["busy"] * 1500, "rare/x")
    with store._read() as txn:
        before = txn.id()
    assert ids_for(store, "rare") == [ids[-1]]
    with store._read() as txn:
        assert txn.id() == before  # no commit
    upkeep(store, NOW, None)
    assert store.consumer_state("rare").floor == ids[-2]  # the next read starts at rare/x
    assert ids_for(store, "rare") == [ids[-1]] and ids_for(store, "all") == ids


def test_an_ack_of_the_newest_message_moves_the_floor_to_it_though_it_left_the_inbox(store: Store):
    declare(store, ConsumerSpec("rare", "rare/#"))
    ids = put(store, "noise", "rare/x")
    assert store.consumer_ack("rare", [ids[1]], NOW) == 1 and stored(store) == [ids[0]]
    assert store.consumer_state("rare").floor == ids[1]  # not ids[0], the last record it could step on


def stream_and_ack(store: Store, name: str, after: int) -> int:
    """What an app reading on from its last message does (`stream()`, `messages(after=...)`):
    pages from `after`, not from the floor, to the end; then one ack of all it found. Returns
    the last id read."""
    found: List[int] = []
    while True:
        page = store.consumer_messages_page(name, 1000, None, after, SCAN_BUDGET)
        found += [m.id for m in page.found]
        after = page.cursor or (found[-1] if found else after)
        if page.cursor is None:
            break
    store.consumer_ack(name, found, NOW)
    return after


def test_the_sweep_catches_up_the_floor_of_an_app_that_reads_on_from_its_last_message(store: Store):
    """Such reads never move the floor and an ack walks WALK_BUDGET records: the floor of a
    consumer of half the traffic, acking batches that span more records than that, fell
    behind for good, its ack entries piled up and `status` counted its backlog from far back."""
    declare(store, ConsumerSpec("even", "even/#"), ConsumerSpec("all"))  # "all" holds every message
    last = 0
    for _ in range(10):  # one message in five is its: a batch spans more than its ack walks
        put(store, *["even/x", "odd/a", "odd/b", "odd/c", "odd/d"] * WALK_BUDGET)
        last = stream_and_ack(store, "even", last)
    assert last - store.consumer_state("even").floor > 4 * WALK_BUDGET  # reads and acks: behind
    with store._read() as txn:
        assert txn.stat(store._consumer_acks)["entries"] > 2 * COMMIT_STEP  # the sweep commits in chunks
    upkeep(store, NOW, None)
    # within FLOOR_HINT ids of the last one (a commit for fewer would wear an SD card for little)
    assert 0 <= last + 1 - store.consumer_state("even").floor < FLOOR_HINT
    with store._read() as txn:
        assert txn.stat(store._consumer_acks)["entries"] < FLOOR_HINT
    assert {c["name"]: (c["backlog"], c["backlog_exact"]) for c in store.consumers_report()}["even"] == (0, True)


def test_the_catch_up_moves_no_floor_that_a_replay_moved_back_meanwhile(store: Store):
    """The sweep's walk reads without the write lock: what it saw is checked when it commits."""
    declare(store, ConsumerSpec("rare", "rare/#"), ConsumerSpec("all"))
    ids = put(store, *["noise"] * (4 * WALK_BUDGET), "rare/a", *["noise"] * (3 * COUNT_STEP), "rare/b")
    store.consumer_ack("rare", [ids[4 * WALK_BUDGET]], NOW)  # rare/a: an ack entry ahead of the floor
    floor = store.consumer_state("rare").floor
    assert 0 < floor < ids[4 * WALK_BUDGET] - 1
    walk = FloorCatchUp("rare")
    assert store.consumer_catch_up_step(walk) is False and walk.relied  # passed rare/a as acked
    store.consumer_reset("rare", floor + 1)  # a replay from the same floor: rare/a is unacked again
    while not store.consumer_catch_up_step(walk):
        pass
    assert store.consumer_state("rare").floor == floor  # not moved over rare/a
    upkeep(store, NOW, None)  # the next sweep walks again: to just before rare/a
    assert store.consumer_state("rare").floor == ids[4 * WALK_BUDGET - 1]
    assert ids_for(store, "rare") == [ids[4 * WALK_BUDGET], ids[-1]]


def test_a_replay_step_never_moves_a_floor_forward_without_passing_the_records(store: Store):
    """`way: replay` sent with a target past the floor (or a replay decided before another reset
    took the floor back) set the floor there: what only this consumer held stayed stored."""
    declare(store, ConsumerSpec("app"))
    ids = put(store, *["t"] * 50)
    assert store.consumer_reset_step("app", ids[29], "replay") == (ids[29], True)
    assert stored(store) == ids[30:]  # passed: done for its only consumer, gone


def test_each_step_of_the_catch_up_is_one_read_or_one_commit_of_one_consumer(store: Store):
    """A review found one `next()` of the sweep walking and committing for every consumer (88 ms
    for 20 of them): now each is a step of its own, like the trims."""
    declare(store, *[ConsumerSpec(f"rare{i}", f"rare{i}/#") for i in range(5)], ConsumerSpec("all"))
    put(store, *["noise"] * (2 * FLOOR_HINT))
    commits = []
    with store._read() as txn:
        last = txn.id()
    for _ in store.consumers_upkeep(NOW, None):
        with store._read() as txn:
            commits.append(txn.id() - last)
            last = txn.id()
    assert commits.count(1) == 5 and set(commits) == {0, 1}  # one commit per step at most
    assert all(c.floor == 2 * FLOOR_HINT for c in store.consumer_states() if c.name != "all")


def test_the_catch_up_writes_nothing_to_a_damaged_store(store: Store):
    declare(store, ConsumerSpec("rare", "rare/#"))
    put(store, *["noise"] * (2 * FLOOR_HINT))
    store.damage = "store in test is damaged: a page did not read back"  # as _damaged sets it
    with pytest.raises(StoreDamaged):
        upkeep(store, NOW, None)
    assert store.consumer_state("rare").floor == 0


def test_a_skip_and_a_removal_over_many_chunks_of_records_leave_what_others_hold(store: Store):
    """A reset or a removal goes COMMIT_STEP records a commit: over several steps the outcome
    is record for record what one pass gives."""
    declare(store, ConsumerSpec("all"), ConsumerSpec("t", "t/#"))
    ids = put(store, *[("t/x" if i % 3 == 0 else "u/y") for i in range(3 * COMMIT_STEP + 17)])
    acked_ahead = ids[5::7]
    store.consumer_ack("all", acked_ahead, NOW)
    assert store.consumer_reset("all", "latest") == ids[-1]
    held_by_t = [i for n, i in enumerate(ids) if n % 3 == 0]
    assert stored(store) == held_by_t  # "all" is done with everything; "t" still holds t/x
    assert store.consumer_register("gone", NOW)  # dynamic, of every topic, from the start
    store.consumer_ack("t", held_by_t[:10], NOW)
    assert upkeep(store, NOW + 10, 1) == ["gone"]
    assert stored(store) == held_by_t[10:]  # removing "gone" released nothing "t" holds
    assert ids_for(store, "t") == held_by_t[10:] and ids_for(store, "all") == []


def test_a_sweep_over_a_large_store_goes_in_bounded_steps_with_the_same_outcome(store: Store):
    """The sweep used to be one commit (0.5-1 s inside the supervisor's loop at 500,000 stored,
    for one narrow consumer with a maxBacklog): now each step reads COUNT_STEP records or
    commits COMMIT_STEP, and the outcome is what the one commit gave."""
    declare(store, ConsumerSpec("rare", "rare/#", max_backlog=3), ConsumerSpec("all"))
    store.consumer_register("gone", NOW - 8 * 86400)
    topics = ["rare/x" if i % 500 == 0 else "noise" for i in range(3 * COUNT_STEP)]
    ids = put(store, *topics)
    rare = [i for i, topic in zip(ids, topics) if topic == "rare/x"]
    steps, removed = 0, []
    for name in store.consumers_upkeep(NOW, 7 * 86400):
        steps += 1
        removed += [name] if name else []
        store.consumer_ack("all", ids[:1], NOW)  # other calls go between the steps
    assert removed == ["gone"] and store.consumer_state("gone") is None
    assert steps >= len(ids) // COMMIT_STEP + 2  # the removal's commits, then the count's reads
    assert ids_for(store, "rare") == rare[-3:] and store.consumer_state("rare").dropped == len(rare) - 3
    assert stored(store) == ids[1:]  # "all" holds the rest: nothing left the inbox but its ack


def test_an_idle_consumers_ack_entries_go_a_bounded_number_a_commit_before_its_record(store: Store):
    """Its entries past the last stored message (acked by it, then removed by an unnamed app's
    ack) were all forgotten in the removal's last commit, however many."""
    declare(store, ConsumerSpec("keeper"))  # holds every message: gone's acks stay entries
    store.consumer_register("gone", NOW - 8 * 86400)
    ids = put(store, *["t"] * (6 * COMMIT_STEP))
    store.consumer_ack("gone", ids[3 * COMMIT_STEP:], NOW - 8 * 86400)
    store.ack(ids[3 * COMMIT_STEP:])  # unnamed: gone for everyone, gone's entries stay behind
    entries = []
    while True:
        removed = store.consumer_remove_step("gone", NOW - 7 * 86400)
        with store._read() as txn:
            entries.append(txn.stat(store._consumer_acks)["entries"])
        if removed is not None:
            break
    drops = [before - after for before, after in zip([3 * COMMIT_STEP] + entries, entries)]
    assert removed is True and entries[-1] == 0 and store.consumer_state("gone") is None
    assert max(drops) <= COMMIT_STEP, drops
    assert stored(store) == ids[:3 * COMMIT_STEP]  # "keeper" holds them


def test_an_idle_consumer_used_again_during_its_removal_stays(store: Store):
    declare(store, ConsumerSpec("kept"))
    store.consumer_register("gone", NOW - 8 * 86400)
    ids = put(store, *["t"] * (3 * COMMIT_STEP))
    sweep = store.consumers_upkeep(NOW, 7 * 86400)
    assert next(sweep) is None  # one commit of the removal
    assert store.consumer_register("gone", NOW) is False  # the app is back
    assert [name for name in sweep if name] == []
    assert store.consumer_state("gone").floor == ids[COMMIT_STEP - 1]  # as far as it got
    assert ids_for(store, "gone") == ids[COMMIT_STEP:] and stored(store) == ids


def test_a_consumers_remembered_matches_follow_its_filter_and_stay_small():
    """`ConsumerState.matches` remembers a filter's answers per topic: a changed filter answers
    anew, and neither many topics nor long ones make the memo grow past its bounds."""
    from flashlexd.consumers import MEMO_TOPIC_CHARS, MEMO_TOPICS, ConsumerState

    consumer = ConsumerState("app", "a/+")
    assert consumer.matches("a/b") and not consumer.matches("a/b/c")
    consumer.filter = "a/b/#"  # a config reload, the same object
    assert consumer.matches("a/b/c") and consumer.matches("a/b") and not consumer.matches("x/b")
    long_topic = "a/" + "b" * MEMO_TOPIC_CHARS
    assert not consumer.matches(long_topic) and long_topic not in consumer._matched
    for i in range(2 * MEMO_TOPICS):
        assert consumer.matches(f"a/b/{i}")
    assert len(consumer._matched) == MEMO_TOPICS
    assert consumer.matches("a/b/late") and not consumer.matches("z/late")  # past the bound: matched anew


class SteppingClock:
    """The store's clock on a Pi without a real-time clock: a boot time that only counts, and a
    wall clock that NTP steps."""
    boot_id = b"one-boot"

    def __init__(self, wall: float):
        self.wall, self.boottime = wall, 1000.0

    def now(self) -> Reading:
        return Reading(self.wall, self.boottime)

    def advance(self, seconds: float, step: float = 0.0) -> None:
        self.wall += seconds + step
        self.boottime += seconds

    def reboot(self, boot_id: bytes) -> None:
        self.boot_id, self.boottime = boot_id, 20.0


class KeeperRun:
    """A ConsumerKeeper (7 idle days, an hour's start grace) driven as the supervisor's loop
    drives it, its wall clock `clock`'s; `restart()` is a new supervisor on the same store."""

    def __init__(self, store: Callable[[], Store], clock: SteppingClock):
        self.store, self.clock, self.loop = store, clock, 100.0
        self.restart()

    def restart(self) -> None:
        self.keeper = ConsumerKeeper(self.store, lambda: ConsumerSettings(idle_seconds=7 * 86400.0),
                                     lambda: 5.0, start_grace=3600, wall=lambda: self.clock.wall)

    def sweep(self, after: float, step: float = 0.0) -> List[str]:
        """`after` seconds on (and a wall-clock step of `step`), then one whole sweep: the names
        of the consumers left."""
        self.clock.advance(after, step)
        self.loop += after
        self.keeper.tick(self.loop)
        while self.keeper.next_run == self.loop:
            self.keeper.tick(self.loop)
        return sorted(c["name"] for c in self.store().consumers_report())


def test_a_daemon_restarted_after_the_step_leaves_it_out_of_idle_times_too(tmp_path: Path):
    """The steps a supervisor saw lived in its memory: the next one (a restart after NTP)
    counted the step as idle time and removed a consumer used an hour before, with the messages
    only it held (review). The store's boot frame has the step."""
    day = 86400.0
    clock = SteppingClock(time.time() - 10 * day)  # fake-hwclock: 10 days behind
    opened = [Store(tmp_path / "store", 64 << 20, clock=clock)]
    run = KeeperRun(lambda: opened[0], clock)
    try:
        opened[0].consumer_register("app", clock.wall)  # the app reads at boot, before NTP
        ids = put(opened[0], "t")
        assert run.sweep(0) == ["app"]
        assert run.sweep(60, step=10 * day) == ["app"]  # NTP
        put(opened[0], "t")  # the ingress writes on: the boot frame records the step
        opened[0].close()  # flashlexd restarted
        opened[0] = Store(tmp_path / "store", 64 << 20, clock=clock)
        run.restart()
        assert run.sweep(60) == ["app"]
        assert run.sweep(3600) == ["app"]  # used 62 minutes ago
        assert ids_for(opened[0], "app")[:1] == ids
        assert run.sweep(7 * day) == []  # and a week later it goes
    finally:
        opened[0].close()


def test_a_step_while_the_daemon_was_down_is_left_out_of_idle_times(tmp_path: Path):
    """Found by review: NTP stepped the clock while the daemon was down (same boot). The store's
    open recorded the step in the boot's frame, but its handle kept the frame it had read, so
    the keeper, asking that handle at its start, took the step for idle time: the consumer
    used a minute before was removed with the messages only it held, once the grace was over."""
    day = 86400.0
    clock = SteppingClock(time.time() - 10 * day)  # fake-hwclock: 10 days behind
    opened = [Store(tmp_path / "store", 64 << 20, clock=clock)]
    try:
        opened[0].consumer_register("app", clock.wall)  # the app reads at boot, before NTP
        ids = put(opened[0], "t")
        opened[0].close()
        clock.advance(60, step=10 * day)  # NTP, while the daemon is down
        opened[0] = Store(tmp_path / "store", 64 << 20, clock=clock)
        assert opened[0].clock_steps_recorded() == [10 * day]
        run = KeeperRun(lambda: opened[0], clock)
        assert run.sweep(0) == ["app"]
        assert run.sweep(3600) == ["app"]  # past the grace, used 61 minutes ago
        assert ids_for(opened[0], "app") == ids
    finally:
        opened[0].close()


def test_a_consumers_last_use_follows_a_step_and_an_older_record_still_reads(tmp_path: Path):
    """Found by review: `last_seen` was a bare wall time, so a consumer used 2 s before a
    +2-year step (NTP) read as used 2 years ago. Now stamped as records are and re-based; a
    record of the older form (no stamp) still opens, on the wall clock."""
    clock = SteppingClock(NOW)
    store = Store(tmp_path / "store", CAP, clock=clock)
    store.consumer_register("app", clock.wall)
    store.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=16)
    with env.begin(write=True) as txn:  # as the previous version wrote it: six fields
        txn.put(b"old", msgpack.packb([0, 0, NOW, True, "#", None]), db=env.open_db(b"consumers", txn=txn))
    env.close()
    clock.advance(2, step=730 * 86400.0)
    store = Store(tmp_path / "store", CAP, clock=clock)
    try:
        seen = {c["name"]: c["last_seen"] for c in store.consumers_report()}
        assert seen == {"app": pytest.approx(clock.wall - 2), "old": NOW}
    finally:
        store.close()


def test_a_step_an_earlier_boot_recorded_is_left_out_of_idle_times(tmp_path: Path):
    """Found by review: a Pi boots with its clock 8 days behind (fake-hwclock), its app reads,
    NTP steps the clock (the expiry sweep records it in the boot's frame), the Pi reboots and
    the app is not back within the hour's grace: the keeper forgot the earlier boot's step and
    removed the consumer used 2 hours before as unused for 8 days, with the messages it held."""
    day = 86400.0
    clock = SteppingClock(time.time() - 8 * day)
    opened = [Store(tmp_path / "store", 64 << 20, clock=clock)]
    try:
        opened[0].consumer_register("app", clock.wall)
        ids = put(opened[0], "t")
        clock.advance(120, step=8 * day)  # NTP
        assert opened[0].note_clock()  # the expiry worker records the step
        clock.advance(1800)
        opened[0].close()
        clock.reboot(b"boot-b")
        opened[0] = Store(tmp_path / "store", 64 << 20, clock=clock)
        run = KeeperRun(lambda: opened[0], clock)
        assert run.sweep(0) == ["app"]
        assert run.sweep(3600 + 60) == ["app"]  # past the grace, used 1 h 33 min ago
        assert ids_for(opened[0], "app") == ids
        assert run.sweep(7 * day) == []  # and a week later it goes
    finally:
        opened[0].close()


def test_the_steps_of_many_earlier_boots_do_not_add_up_in_idle_times(tmp_path: Path):
    """Found by review of the test above's fix: every earlier boot's step counted, and a dead
    letter keeps every boot's clock record since its own, so on a Pi powered off every night
    (fake-hwclock, NTP stepping each boot forward by the night) 31 nights' steps, 12.9 days,
    were left out of the idle time of a consumer unused for 8 days (consumerIdleDays 7)."""
    hour, day = 3600.0, 86400.0
    clock = SteppingClock(time.time() - 60 * day)
    opened = [Store(tmp_path / "store", 64 << 20, clock=clock)]
    try:
        [entry] = opened[0].outbox_append([("up", b"x", 1, False)])
        assert opened[0].outbox_dead_letter(entry, "refused by the broker: Not authorized (0x87)", 1)
        for night in range(30):
            clock.advance(0, step=10 * hour)  # NTP after the boot: the night the clock missed
            assert opened[0].note_clock()
            clock.advance(14 * hour)          # the day's work, then power off
            opened[0].close()
            clock.reboot(f"boot-{night}".encode())
            opened[0] = Store(tmp_path / "store", 64 << 20, clock=clock)
        clock.advance(0, step=10 * hour)
        assert opened[0].note_clock()
        clock.advance(60)
        opened[0].consumer_register("app", clock.wall)  # its last use
        put(opened[0], "t")
        clock.advance(8 * day)                # up for 8 days, no step since the last use
        opened[0].close()                     # flashlexd restarted (same boot)
        opened[0] = Store(tmp_path / "store", 64 << 20, clock=clock)
        run = KeeperRun(lambda: opened[0], clock)
        assert run.sweep(0) == ["app"]        # the daemon's first hour: none goes
        assert run.sweep(hour + 60) == []
    finally:
        opened[0].close()


def test_a_consumers_page_and_the_outbox_stop_at_the_answers_size(store: Store):
    """Reads of large records stop before they would hold more than `size` bytes (the answer's),
    the record past it not decoded (review "lowmem": one 33 MB payload copied for nothing): a
    named consumer's `limit=1000` decoded every one of them first (review); the cursor goes on
    after the last one kept, so nothing is skipped. The first record is always taken."""
    declare(store, ConsumerSpec("display", "#"))
    ids = store.append([Incoming("t", bytes([i]) * 100_000) for i in range(30)])
    page = store.consumer_messages_page("display", 1000, size=250_000)
    assert [m.id for m in page.found] == ids[:2] and page.cursor == ids[1]
    rest = store.consumer_messages_page("display", 1000, after=page.cursor, size=10 ** 9)
    assert [m.id for m in rest.found] == ids[2:] and rest.cursor is None
    assert [m.id for m in store.consumer_messages_page("display", 1000, size=1).found] == ids[:1]
    store.outbox_append([("up", b"z" * 100_000, 1, False) for _ in range(10)])
    assert len(store.outbox_peek(1000, size=250_000)) == 2 and len(store.outbox_peek(1000)) == 10
    assert len(store.outbox_peek(1000, size=1)) == 1


def test_a_message_past_its_own_expiry_is_not_delivered_before_the_sweep_removes_it(store: Store):
    """Its MQTT 5 expiry passed, it was handed to apps until the next sweep (1.7-4.6 s late,
    review "mqtt5"): every read leaves it out, while it waits for the sweep."""
    import time
    declare(store, ConsumerSpec("display"))
    store.append([Incoming("t", b"expired", properties={"message_expiry_interval": 1}),
                  Incoming("t", b"fresh", properties={"message_expiry_interval": 600}), Incoming("t", b"kept")],
                 now=time.time() - 5)
    assert [m.payload for m in store.messages()] == [b"fresh", b"kept"]
    assert [m.payload for m in store.messages(topic="t")] == [b"fresh", b"kept"]
    assert [m.payload for m in store.consumer_messages("display")] == [b"fresh", b"kept"]
    assert store.inbox_count() == 3  # still stored: the sweep's to remove and count
