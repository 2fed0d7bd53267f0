"""Ages that survive clock steps, on real LMDB files with a clock the test steps: messages of
this boot age on CLOCK_BOOTTIME (a step neither expires them early nor keeps them late), their
wall-clock arrival time is re-based on a step, messages of an earlier boot age on the wall clock
from the last offset their boot recorded, and a schema-1 store opens and migrates with no loss."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import List

import lmdb
import msgpack
import pytest

from flashlexd.clock import Reading
from flashlexd.store import SCHEMA_VERSION, Incoming, Store
from flashlexd.workers.egress import _expiry_left

CAP = 64 * 1024 * 1024
TTL = 60.0
DAY = 86400.0
TRUE_TIME = 1_796_000_000.0  # 2026-11-30


class FakeClock:
    """Wall clock and boot clock that the test moves: `advance` lets real time pass (both move),
    `step` sets the wall clock (as NTP or `date -s` does; CLOCK_BOOTTIME does not move)."""

    def __init__(self, boot_id: bytes = b"boot-a", wall: float = TRUE_TIME, boottime: float = 30.0):
        self.boot_id, self.wall, self.boottime = boot_id, wall, boottime

    def now(self) -> Reading:
        return Reading(self.wall, self.boottime)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boottime += seconds

    def step(self, seconds: float) -> None:
        self.wall += seconds

    def reboot(self, boot_id: bytes, uptime: float = 20.0) -> None:
        self.boot_id, self.boottime = boot_id, uptime


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stores(tmp_path: Path):
    opened: List[Store] = []

    def open_(clock: FakeClock, expire_seconds: float = TTL) -> Store:
        store = Store(tmp_path / "store", CAP, expire_seconds=expire_seconds, clock=clock)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def arrive(store: Store, name: str, count: int = 2) -> List[int]:
    return store.append([Incoming("t", f"{name}{i}".encode()) for i in range(count)])  # type: ignore[return-value]


def payloads(store: Store) -> List[bytes]:
    return [m.payload for m in store.messages(limit=1000)]


def due_in(store: Store, clock: FakeClock, seconds: float, count: int) -> None:
    """Real time passes: nothing goes 10 ms before `seconds`, `count` messages 10 ms after."""
    clock.advance(seconds - 0.01)
    assert store.expire() == 0
    clock.advance(0.02)
    assert store.expire() == count


def test_a_forward_step_expires_nothing_early_and_each_message_on_time(stores, clock: FakeClock):
    clock.step(-2 * DAY)                # booted with the clock 2 days behind
    store = stores(clock)
    arrive(store, "a")
    clock.advance(3)
    arrive(store, "b")
    clock.advance(3)
    clock.step(2 * DAY)                 # NTP: the truth
    assert store.expire() == 0 and payloads(store) == [b"a0", b"a1", b"b0", b"b1"]
    oldest = store.messages(limit=1)[0]
    assert oldest.age == pytest.approx(6)
    assert store.stats()["inbox_oldest_age"] == pytest.approx(6)
    due_in(store, clock, TTL - 6, 2)
    assert payloads(store) == [b"b0", b"b1"]
    clock.advance(3)
    assert store.expire() == 2 and store.stats()["expired"] == 4


def test_expiry_is_by_the_ttl_configured_now_whatever_it_was_when_messages_came(stores, clock: FakeClock):
    """The sweep keyed on the expiry stored with each message (found by review): messages
    stored without expireSeconds never went once it was set, and after it was lowered the
    newer messages waited behind the older ones. Each store here is what a reload reopens."""
    store = stores(clock, expire_seconds=None)
    arrive(store, "kept")
    assert store.messages(limit=1)[0].expires_at is None
    clock.advance(10 * TTL)
    assert store.expire() == 0  # none configured: none goes
    store.close()
    store = stores(clock, expire_seconds=10 * TTL)  # set: the old ones are long due
    arrive(store, "long")
    assert store.expire() == 2 and payloads(store) == [b"long0", b"long1"]
    store.close()
    store = stores(clock, expire_seconds=TTL)  # lowered
    arrive(store, "short")
    assert [m.expires_at - m.timestamp for m in store.messages(limit=10)] == [pytest.approx(TTL)] * 4
    due_in(store, clock, TTL, 4)  # all on the TTL now: the newer ones do not wait for the older


def test_a_backward_step_still_expires_on_time(stores, clock: FakeClock):
    store = stores(clock)
    arrive(store, "a")
    clock.advance(10)
    clock.step(-DAY)                    # a clock that was a day ahead, corrected
    due_in(store, clock, TTL - 10, 2)


def test_steps_in_both_directions_during_a_lifetime_change_nothing(stores, clock: FakeClock):
    store = stores(clock)
    arrive(store, "a")
    for step in (DAY, -3 * DAY, 5.0, 2 * DAY):
        clock.advance(10)
        clock.step(step)
        assert store.expire() == 0
    due_in(store, clock, TTL - 40, 2)


def test_arrival_time_and_expiry_are_rebased_on_a_step(stores, clock: FakeClock):
    clock.step(-2 * DAY)
    store = stores(clock)
    arrive(store, "a", 1)
    stamped = clock.wall
    assert store.messages()[0].timestamp == stamped  # no step yet: the stamp itself
    clock.advance(5)
    clock.step(2 * DAY)
    [message] = store.messages()
    assert message.timestamp == pytest.approx(stamped + 2 * DAY)
    assert message.expires_at == pytest.approx(stamped + 2 * DAY + TTL, abs=0.001)
    assert message.age == pytest.approx(5)


def test_a_small_drift_is_not_a_step(stores, clock: FakeClock):
    store = stores(clock)
    arrive(store, "a", 1)
    clock.step(1.5)                     # NTP slewing, not a step: the stamp stays as written
    assert store.messages()[0].timestamp == TRUE_TIME


def test_outbox_entries_age_on_the_boot_clock(stores, clock: FakeClock):
    clock.step(-DAY)
    store = stores(clock)
    store.outbox_append([("up", b"x", 1, False)])
    clock.advance(7)
    clock.step(DAY)
    [entry] = store.outbox_peek()
    assert entry.age == pytest.approx(7) and entry.created == pytest.approx(TRUE_TIME)
    assert store.stats()["outbox_oldest_age"] == pytest.approx(7)


def dead_letter_a_day_behind(stores, clock: FakeClock) -> Store:
    """A device booted with its clock a day behind: an entry queued, dead-lettered 3 s later,
    and 4 s after that NTP steps the clock a day forward."""
    clock.step(-DAY)
    store = stores(clock)
    [entry_id] = store.outbox_append([("up", b"x", 1, False)])
    clock.advance(3)
    assert store.outbox_dead_letter(entry_id, "refused", 1)
    clock.advance(4)
    clock.step(DAY)
    return store


def test_a_dead_letters_time_is_rebased_on_a_step(stores, clock: FakeClock, tmp_path: Path):
    """A device that booted with its clock a day behind dead-letters an entry, then NTP steps
    the clock: `dead_at` is the real time it happened, like the entry's `created` (it was the
    wall clock as written, a day off). A dead letter written before (a bare float) reads as
    it was written."""
    store = dead_letter_a_day_behind(stores, clock)
    [dead] = store.dead_letters()
    assert dead.created == pytest.approx(TRUE_TIME)
    assert dead.dead_at == pytest.approx(TRUE_TIME + 3) and dead.age == pytest.approx(7)
    store.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"dead", txn=txn)
        record = msgpack.unpackb(txn.get(struct.pack(">Q", dead.id), db=db))
        txn.put(struct.pack(">Q", dead.id), msgpack.packb([1, "refused", 1234.5, *record[3:]]), db=db)
    env.close()
    assert stores(clock).dead_letters()[0].dead_at == 1234.5


def test_across_a_reboot_messages_age_on_the_wall_clock_with_their_boots_last_step(
        stores, clock: FakeClock):
    """The documented reboot rule: a step the old boot saw (and a sweep recorded) is applied;
    after the reboot, the wall clock counts."""
    clock.step(-2 * DAY)
    store = stores(clock)
    arrive(store, "a", 1)
    clock.advance(5)
    clock.step(2 * DAY)
    assert store.expire() == 0          # the sweep records the step in the boot's frame
    store.close()
    clock.reboot(b"boot-b")
    clock.advance(10)                   # 15 s after arrival, wall clock right after the reboot
    store = stores(clock)
    [message] = store.messages()
    assert message.timestamp == pytest.approx(TRUE_TIME)  # re-based with the recorded step
    assert message.age == pytest.approx(15)
    due_in(store, clock, TTL - 15, 1)


def test_across_a_reboot_a_step_after_it_counts_on_the_wall_clock(stores, clock: FakeClock):
    store = stores(clock)
    arrive(store, "a", 1)
    store.close()
    clock.reboot(b"boot-b")
    clock.step(-DAY)                    # the new boot starts a day behind: "a" looks young
    store = stores(clock)
    arrive(store, "b", 1)
    clock.advance(TTL + 1)
    assert store.expire() == 1 and payloads(store) == [b"a0"]  # "b" on its real age
    clock.step(DAY)                     # the wall clock is right again: "a" is past due
    assert store.expire() == 1 and store.inbox_count() == 0


def test_frames_of_boots_without_records_are_dropped(stores, clock: FakeClock):
    store = stores(clock)
    arrive(store, "a", 1)
    for n in range(3):
        store.close()
        clock.reboot(f"boot-{n}".encode())
        store = stores(clock)
    assert frames(store) == [1, 2, 3, 4]      # the first still stamps a stored message
    store.ack([1])
    store.close()
    clock.reboot(b"boot-last")
    assert frames(stores(clock)) == [5]


def test_a_step_is_noted_once_whoever_records_it(stores, clock: FakeClock):
    """Found by re-read review: the supervisor logged each step twice a second apart (its
    cached frame stayed stale after its own write, and the next look found the step again)."""
    store = stores(clock)
    clock.step(DAY)
    assert store.note_clock() == pytest.approx(DAY, abs=1)
    assert store.note_clock() is None
    clock.step(DAY)
    store.append([Incoming("t", b"x")])  # another write records the step first
    assert store.note_clock() == pytest.approx(DAY, abs=1)  # learned once, nothing written
    assert store.note_clock() is None
    # an app publishing every 0.2 s: the second publish after the step found it recorded and
    # took it into this process's frame, and the step was never logged (found by review)
    clock.step(-DAY)
    for _ in range(2):
        store.outbox_append([("t", b"x", 1, False)])
    assert store.note_clock() == pytest.approx(-DAY, abs=1)
    assert store.note_clock() is None


def test_a_dead_letters_times_stay_rebased_after_a_reboot(stores, clock: FakeClock):
    """Found by review: a Pi booted with its clock a day behind dead-letters an entry, NTP steps
    the clock (a sweep records the step), the Pi reboots with the inbox and outbox empty: the
    store's open dropped the old boot's frame, so the dead letter's `created` and `dead_at`
    read a day off (README "Clock steps": re-based with the last step that boot saw)."""
    store = dead_letter_a_day_behind(stores, clock)
    assert store.note_clock()          # the step recorded in boot a's frame
    store.close()
    clock.reboot(b"boot-b")
    clock.advance(10)
    store = stores(clock)
    [dead] = store.dead_letters()
    assert dead.created == pytest.approx(TRUE_TIME, abs=1)
    assert dead.dead_at == pytest.approx(TRUE_TIME + 3, abs=1)


def test_a_retried_dead_letter_keeps_its_real_age_after_a_reboot(stores, clock: FakeClock):
    """Found by review: a retried dead letter goes to the outbox's tail with its old boot's
    stamp, behind an entry of a later boot. At the next reboot the open dropped the old boot's
    frame: the entry aged a day too old, and with an MQTT 5 message expiry of an hour the
    egress dropped it as expired, never sent. Once the entries are gone the frames go too."""
    clock.step(-DAY)
    store = stores(clock)
    [old] = store.outbox_append([("up", b"x", 1, False, {"message_expiry_interval": 3600})])
    assert store.outbox_dead_letter(old, "refused", 1)
    clock.advance(4)
    clock.step(DAY)
    assert store.note_clock()
    store.close()
    clock.reboot(b"boot-b")
    store = stores(clock)
    [newer] = store.outbox_append([("up", b"newer", 1, False)])     # boot b's entry at the front
    [retried] = store.dead_retry([old])
    store.close()
    clock.reboot(b"boot-c")
    clock.advance(10)
    store = stores(clock)
    [entry] = [e for e in store.outbox_peek() if e.id == retried]
    assert entry.created == pytest.approx(TRUE_TIME, abs=1)
    assert entry.age < 3600, f"aged {entry.age:.0f}s: its boot's frame was dropped"
    assert _expiry_left(entry) > 0          # else the egress drops it as expired, never sent
    assert store.outbox_remove([newer, retried]) == 2
    store.close()
    clock.reboot(b"boot-d")
    assert frames(stores(clock)) == [4]


def test_messages_of_a_boot_whose_frame_is_gone_expire_on_the_wall_clock(stores, clock: FakeClock,
                                                                           tmp_path: Path):
    """Found by review: a boot's frame gone from meta (as after `store recover` over a damaged
    meta page) made that boot's messages expire at the first sweep, whatever their age (their
    boottime alone was taken for their arrival); they go by the wall clock, as their age reads."""
    store = stores(clock)
    arrive(store, "a", 1)
    store.close()
    clock.reboot(b"boot-b")
    clock.advance(10)
    stores(clock).close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=16)
    with env.begin(write=True) as txn:
        assert txn.delete(b"frame" + struct.pack(">I", 1), db=env.open_db(b"meta", txn=txn))
    env.close()
    store = stores(clock)
    [message] = store.messages()
    assert message.age == pytest.approx(10)
    assert message.expires_at == pytest.approx(message.timestamp + TTL)
    due_in(store, clock, TTL - 10, 1)


def frames(store: Store) -> List[int]:
    """White box: the boot seqs whose frames the meta database keeps."""
    with store._read() as txn:
        return sorted(store._frames.snapshot_timeline(txn).frames)


# -- a store written by schema 1 ----------------------------------------------------------------

def write_schema1_store(path: Path, wall: float) -> None:
    """A store as flashlexd with schema 1 wrote it: inbox records (timestamp, topic, payload,
    qos, retain, mid, expires_at), expiry keys expires_ms(8) + first id(8) -> last id, outbox
    entries [created, topic, payload, qos, retain], a meta schema of 1."""
    path.mkdir(parents=True)
    env = lmdb.open(str(path), max_dbs=8, map_size=CAP)
    q = struct.Struct(">Q")
    with env.begin(write=True) as txn:
        inbox, expiry, outbox, meta = (env.open_db(name, txn=txn) for name in
                                       (b"inbox", b"expiry", b"outbox", b"meta"))
        env.open_db(b"recent", txn=txn)
        for record_id, at in ((1, wall - 50), (2, wall - 50), (3, wall - 10)):
            txn.put(q.pack(record_id), msgpack.packb((at, "t", b"old%d" % record_id, 1, False,
                                                      record_id, at + TTL), use_bin_type=True), db=inbox)
        txn.put(q.pack(int((wall - 50 + TTL) * 1000)) + q.pack(1), q.pack(2), db=expiry)
        txn.put(q.pack(int((wall - 10 + TTL) * 1000)) + q.pack(3), b"", db=expiry)
        txn.put(q.pack(1), msgpack.packb([wall - 5, "up", b"queued", 1, False], use_bin_type=True),
                db=outbox)
        for name, value in ((b"schema", 1), (b"inbox_last_id", 3), (b"outbox_last_id", 1),
                            (b"received", 3), (b"queued", 1)):
            txn.put(name, q.pack(value), db=meta)
    env.close()


def test_a_schema1_store_opens_migrates_and_loses_nothing(tmp_path: Path, clock: FakeClock):
    write_schema1_store(tmp_path / "store", clock.wall)
    store = Store(tmp_path / "store", CAP, expire_seconds=TTL, clock=clock)  # type: ignore[arg-type]
    try:
        assert payloads(store) == [b"old1", b"old2", b"old3"]
        old = store.messages()[0]
        assert old.timestamp == clock.wall - 50 and old.age == pytest.approx(50)
        assert old.expires_at == clock.wall - 50 + TTL
        assert [e.payload for e in store.outbox_peek()] == [b"queued"]
        assert store.stats()["received"] == 3 and store.stats()["outbox_oldest_age"] == pytest.approx(5)
        assert arrive(store, "new", 1) == [4]       # ids go on
        clock.advance(TTL - 50 + 0.01)              # the schema-1 records: the wall-clock rule
        assert store.expire() == 2 and payloads(store) == [b"old3", b"new0"]
        store.ack([3])                              # unindexes a migrated expiry entry
        clock.advance(TTL)
        assert store.expire() == 1 and store.inbox_count() == 0
    finally:
        store.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=8, readonly=True, lock=False)
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        assert struct.unpack(">Q", txn.get(b"schema", db=meta))[0] == SCHEMA_VERSION == 7
        assert txn.stat(env.open_db(b"expiry", txn=txn, create=False))["entries"] == 0
    env.close()


@pytest.mark.parametrize("step", [2 * DAY, -DAY], ids=["forward", "backward"])
def test_dedupe_windows_run_on_real_time_across_a_step(stores, clock: FakeClock, step: float):
    """A broker's redelivery 5 s after the original is a duplicate whatever the clock did
    meanwhile; one past the window is new, whatever the clock did."""
    store = stores(clock)
    again = [Incoming("t", b'{"id": 1}', mid=7, key=b"1")]
    assert store.append([Incoming("t", b'{"id": 1}', mid=1, key=b"1")], dedupe_window=3600) == [1]
    clock.advance(5)
    clock.step(step)
    assert store.append(again, dedupe_window=3600) == [None]
    clock.advance(3600)
    assert store.append(again, dedupe_window=3600) == [2]


def test_a_dedupe_key_from_a_boot_whose_clock_ran_ahead_is_not_held_against_new_messages(stores):
    """A boot with its clock right stores a keyed message; after a day off the next boot starts
    in 1970 (no fake-hwclock) and its dedupe stamps stay in that frame all boot long, even
    after NTP: the earlier boot's stamp lay in its future, and the same key a day later (the
    window is 1 h) was refused as a duplicate, acknowledged and thrown away, for the whole boot."""
    clock = FakeClock()
    store = stores(clock, expire_seconds=None)
    keyed = [Incoming("t", b'{"id": 1}', mid=1, key=b"1")]
    assert store.append(keyed, dedupe_window=3600) == [1]
    store.close()
    clock.reboot(b"boot-b")
    clock.wall += DAY  # the power-off
    clock.step(5.0 - clock.wall)  # the boot's clock: 1970
    store = stores(clock, expire_seconds=None)
    clock.advance(30)
    clock.wall = TRUE_TIME + DAY + 30  # NTP steps it right
    store.expire()  # the step recorded
    clock.advance(2 * DAY)
    again = [Incoming("t", b'{"id": 1}', mid=7, key=b"1")]
    assert store.append(again, dedupe_window=3600) == [2], "refused as a duplicate"
    assert store.append(again, dedupe_window=3600) == [None]  # and a duplicate of it is one
