"""Redeliveries recognised by content among the unconfirmed messages (flashlexd/redelivery.py),
the application dedupe key (flashlexd/dedupe.py, flashlex.app.db.dedupe), and the schema 2 -> 3
migration of the DUP marks, on real LMDB files; a kill between commit and confirmation is
covered by tests/test_exactly_once.py with real processes."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Dict, Iterator

import lmdb
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flashlexd.config import load
from flashlexd.dedupe import DedupeKey
from flashlexd.redelivery import MARKS_MAX, MIDS_MAX
from flashlexd.store import SCHEMA_VERSION, Incoming, Store, StoreDamaged, StoreFull, dup_marks
from tests.test_config import config_error, edited_config, setting

CAP = 64 * 1024 * 1024
TOPIC = "things/t/in"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "store", CAP)
    yield opened
    opened.close()


def msg(payload: bytes, mid: int = 1, dup: bool = False, key: Any = None) -> Incoming:
    return Incoming(TOPIC, payload, qos=1, mid=mid, dup=dup, key=key)


# -- DUP redeliveries by content --------------------------------------------------------------

def test_two_equal_messages_are_both_stored_and_both_redeliveries_recognised(store: Store):
    assert store.append([msg(b"x", mid=1), msg(b"x", mid=2)]) == [1, 2]
    assert store.append([msg(b"x", mid=7, dup=True), msg(b"x", mid=8, dup=True)]) == [None, None]
    # one is confirmed: the other is still unconfirmed, its redelivery still recognised
    assert store.append([msg(b"x", mid=3, dup=True)], settled=dup_marks([msg(b"x")])) == [None]
    # both confirmed: a DUP copy with that content is a new message (first transmission lost)
    assert store.append([msg(b"x", mid=4, dup=True)], settled=dup_marks([msg(b"x")])) == [3]


def test_a_message_built_on_the_ingress_hot_path_is_the_same_message_with_the_same_mark(store: Store):
    for qos in (0, 1):
        fields = (TOPIC, b"x", qos, True, 9, True, b"k", {"content_type": "text/plain"})
        fast, plain = Incoming.received(*fields), Incoming(*fields)
        assert fast == plain and fast.mark == plain.mark and (fast.mark is None) == (qos == 0)
    assert store.append([Incoming.received(TOPIC, b"x", 1, False, 1, False, None, None)]) == [1]
    assert store.append([msg(b"x", mid=2, dup=True)]) == [None]  # its mark was stored


def test_marks_survive_a_reopen(tmp_path: Path):
    store = Store(tmp_path / "store", CAP)
    store.append([msg(b"committed, PUBACK never sent", mid=9)])
    store.close()  # the ingress worker killed after its commit
    store = Store(tmp_path / "store", CAP)
    assert store.append([msg(b"committed, PUBACK never sent", mid=2, dup=True)]) == [None]
    store.close()


def test_the_mark_table_is_capped_oldest_first(store: Store):
    for start in range(0, MARKS_MAX + 1, 1024):
        store.append([msg(b"%d" % i) for i in range(start, start + 1024)])
    assert store.append([msg(b"0", dup=True)]) == [MARKS_MAX + 1024 + 1]  # the oldest: gone
    newest = b"%d" % (MARKS_MAX + 1023)
    assert store.append([msg(newest, dup=True)]) == [None]


def test_the_cap_keeps_exactly_the_marks_of_the_last_half_cap_of_ids(store: Store):
    for start in range(0, MARKS_MAX + 1, 1024):  # the cap runs in the last append (ids from 16385)
        store.append([msg(b"%d" % i) for i in range(start, start + 1024)])
    kept_from = MARKS_MAX + 1 - MARKS_MAX // 2  # the inbox id of the oldest mark kept
    assert store.append([msg(b"%d" % (kept_from - 1), dup=True)]) == [None]
    assert store.append([msg(b"%d" % (kept_from - 2), dup=True)]) == [MARKS_MAX + 1024 + 1]


# -- the application dedupe key ---------------------------------------------------------------

def test_a_repeated_key_within_the_window_is_a_duplicate(store: Store):
    assert store.append([msg(b"a", key=b"1"), msg(b"b", key=b"2")], now=1000, dedupe_window=60) == [1, 2]
    assert store.append([msg(b"a again", key=b"1"), msg(b"c", key=b"3"), msg(b"c", key=b"3")],
                        now=1030, dedupe_window=60) == [None, 3, None]
    assert store.stats()["duplicates"] == 2
    assert store.append([msg(b"a later", key=b"1")], now=1091, dedupe_window=60) == [4]  # window over


def test_messages_without_a_key_are_stored_normally(store: Store):
    assert store.append([msg(b"n"), msg(b"n", mid=2)], now=1000, dedupe_window=60) == [1, 2]


def test_expired_keys_are_dropped_from_the_store(tmp_path: Path):
    store = Store(tmp_path / "store", CAP)
    store.append([msg(b"%d" % i, key=b"%d" % i) for i in range(500)], now=1000, dedupe_window=60)
    store.append([msg(b"new", key=b"new")], now=2000, dedupe_window=60)
    store.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat(env.open_db(b"dedupe", txn=txn, create=False))["entries"] == 2  # k + t
    env.close()


@pytest.mark.parametrize("payload, key", [
    (b'{"id": 7, "x": 1}', b"7"),
    (b'{"meta": {"id": "a-1"}}', None),
    (b'not json', None),
    (b'[1, 2]', None),
    (b'{"id": null}', None),
    (b'{"id": ""}', None),  # no id: distinct messages carrying it were dropped as duplicates
    (b'{"id": {"b": 2, "a": 1}}', b'{"a":1,"b":2}'),
])
def test_json_keys(payload: bytes, key: Any):
    assert DedupeKey.parse("json:id").of(payload) == key


def test_nested_json_path_and_mqtt5_without_properties():
    assert DedupeKey.parse("json:meta.id").of(b'{"meta": {"id": "a-1"}}') == b'"a-1"'
    assert DedupeKey.parse("json:list.1").of(b'{"list": [5, 6]}') == b"6"
    assert DedupeKey.parse("mqtt5:msg-id").of(b"anything", None) is None  # MQTT 3.1.1: no properties


# -- config -----------------------------------------------------------------------------------

def test_dedupe_config(tmp_path: Path):
    path = edited_config(tmp_path / "etc", setting("flashlex.app.db.dedupe", {"key": "json:a.b"}))
    assert load(str(path)).store.dedupe == DedupeKey("json", "a.b", 3600.0)
    path = edited_config(tmp_path / "etc2", setting("flashlex.app.db.dedupe",
                                                    {"key": "mqtt5:msg-id", "windowSeconds": 60}))
    assert load(str(path)).store.dedupe == DedupeKey("mqtt5", "msg-id", 60.0)
    assert load(str(edited_config(tmp_path / "etc3", lambda d: None))).store.dedupe is None


def test_a_dedupe_window_without_a_key_leaves_dedupe_off_with_a_warning(tmp_path: Path):
    """Found by review: windowSeconds alone was refused ("key: missing required key") though
    README says `key` defaults to off. Off it is, and the window set for nothing is said."""
    config = load(str(edited_config(tmp_path / "etc", setting("flashlex.app.db.dedupe",
                                                                  {"windowSeconds": 5}))))
    assert config.store.dedupe is None
    assert [w for w in config.warnings if "dedupe" in w] == [
        "flashlex.app.db.dedupe.windowSeconds: set without flashlex.app.db.dedupe.key, so dedupe"
        " is off (it is on only with a key)"]


@pytest.mark.parametrize("value, expected", [
    ({"key": "id"}, "flashlex.app.db.dedupe.key: expected json:<dotted.path> or"
                    " mqtt5:<user-property-name>, got 'id'"),
    ({"key": "json:a..b"}, "flashlex.app.db.dedupe.key: empty part in the JSON path 'a..b'"),
    ({"key": "json:id", "windowSeconds": 0},
     "flashlex.app.db.dedupe.windowSeconds: must be greater than 0, got 0"),
    ("json:id", "flashlex.app.db.dedupe: expected a mapping, got 'json:id'"),
])
def test_bad_dedupe_config_is_one_line(tmp_path: Path, value: Any, expected: str):
    assert config_error(edited_config(tmp_path / "etc", setting("flashlex.app.db.dedupe", value))) \
        == expected


# -- schema 2 -> 3 ----------------------------------------------------------------------------

def write_schema2_marks(path: Path, marks: Dict[int, bytes]) -> None:
    """Turn a store into what schema 2 wrote: per-mid marks (mid -> digest + id) in `recent`."""
    env = lmdb.open(str(path), max_dbs=8, map_size=CAP * 2)
    with env.begin(write=True) as txn:
        for name in (b"unconfirmed", b"dedupe"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        recent = env.open_db(b"recent", txn=txn)
        for mid, digest in marks.items():
            txn.put(struct.pack(">H", mid), digest + struct.pack(">Q", mid), db=recent)
        txn.put(b"schema", struct.pack(">Q", 2), db=env.open_db(b"meta", txn=txn))
    env.close()


def test_a_schema2_store_keeps_its_dup_marks(tmp_path: Path):
    store = Store(tmp_path / "store", CAP)
    store.append([msg(b"one", mid=1), msg(b"two", mid=2), msg(b"two", mid=3)])
    store.close()
    marks = dup_marks([msg(b"one"), msg(b"two"), msg(b"two")])
    write_schema2_marks(tmp_path / "store", dict(zip((1, 2, 3), marks)))
    store = Store(tmp_path / "store", CAP)
    assert [m.payload for m in store.messages()] == [b"one", b"two", b"two"]
    # every old mark recognises a renumbered redelivery; "two" twice, confirmed one at a time
    assert store.append([msg(b"one", mid=50, dup=True), msg(b"two", mid=51, dup=True)]) == [None, None]
    assert store.append([msg(b"two", mid=52, dup=True)], settled=[marks[1]]) == [None]
    assert store.append([msg(b"two", mid=53, dup=True)], settled=[marks[1]]) == [4]
    store.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:
        assert struct.unpack(">Q", txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False)))[0] \
            == SCHEMA_VERSION == 7
        assert txn.stat(env.open_db(b"recent", txn=txn, create=False))["entries"] == 0
    env.close()


def test_a_damaged_mark_is_reported_as_damage_not_a_traceback(tmp_path: Path):
    Store(tmp_path / "store", CAP).close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=8, map_size=CAP * 2)
    with env.begin(write=True) as txn:
        txn.put(dup_marks([msg(b"x")])[0], b"bad", db=env.open_db(b"unconfirmed", txn=txn))
    env.close()
    store = Store(tmp_path / "store", CAP)
    with pytest.raises(StoreDamaged) as caught:
        store.append([msg(b"x", dup=True)])
    assert "unconfirmed-message mark of 3 bytes" in str(caught.value)
    store.close()


def test_on_one_connection_a_dup_beyond_the_copies_held_is_a_new_message(store: Store):
    """A broker resends each unconfirmed copy once per connection. One copy of "x" held: of two
    DUPs of "x" on the next connection, one is its redelivery and the other a new message whose
    first transmission was lost (both were taken for redeliveries, and the second was lost).
    A copy redelivered on one connection after another is recognised on each."""
    assert store.append([msg(b"x", mid=1)], links=[1]) == [1]
    assert store.append([msg(b"x", mid=1, dup=True), msg(b"x", mid=2, dup=True)], links=[2, 2]) == [None, 2]
    assert store.append([msg(b"x", mid=3, dup=True)], links=[2]) == [3]  # both accounted for on 2
    assert store.append([msg(b"y", mid=4)], links=[3]) == [4]
    for link in (4, 5):
        assert store.append([msg(b"y", mid=4, dup=True)], links=[link]) == [None]


def test_marks_that_fill_the_cap_are_taken_off_by_the_batch_the_cap_refuses(tmp_path: Path):
    """At `capMegabytes: 1` the DUP marks of messages stored and acked by apps filled the cap:
    every later batch was refused before the confirmed marks it brought were taken off, and the
    ingress refused the broker's messages for good with the inbox empty (found by review: 16,128
    marks in 254 pages). The marks go first, and the room they free counts."""
    store = Store(tmp_path / "store", 1024 * 1024)
    try:
        sent, mid = [], 0
        for size in (500, 1):  # halved down to one message, as the ingress does
            with pytest.raises(StoreFull):
                while True:  # the marks pile up (none confirmed yet), apps empty the inbox
                    batch = [msg(b"%08d" % (mid + i), mid=mid + i) for i in range(size)]
                    store.ack(i for i in store.append(batch) if i is not None)
                    sent += batch
                    mid += size
        assert store.inbox_count() == 0
        next_id = store.stats()["inbox_last_id"] + 1
        assert store.append([msg(b"after the confirmation", mid=mid)], settled=dup_marks(sent)) == [next_id]
    finally:
        store.close()


def test_a_confirmation_frees_the_copy_its_connection_accounted_for(store: Store):
    """Two copies of "x" on connection 1, the first one's PUBACK confirmed: the other is still
    held, and on connection 2 one DUP of "x" is its redelivery, a second one new."""
    assert store.append([msg(b"x", mid=1), msg(b"x", mid=2)], links=[1, 1]) == [1, 2]
    assert store.append([], settled=dup_marks([msg(b"x")])) == []
    assert store.append([msg(b"x", mid=2, dup=True), msg(b"x", mid=5, dup=True)], links=[2, 2]) == [None, 3]


def test_a_mark_written_before_connections_were_counted_is_read(tmp_path: Path):
    """A store written by the previous version holds 12-byte marks (count, seq)."""
    Store(tmp_path / "store", CAP).close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=8, map_size=CAP * 2)
    with env.begin(write=True) as txn:
        txn.put(dup_marks([msg(b"x")])[0], struct.pack(">IQ", 1, 1), db=env.open_db(b"unconfirmed", txn=txn))
    env.close()
    store = Store(tmp_path / "store", CAP)
    assert store.append([msg(b"x", dup=True), msg(b"x", mid=2, dup=True)], links=[9, 9]) == [None, 1]
    store.close()


def test_under_mqtt5_a_dup_is_a_redelivery_only_under_an_unconfirmed_copys_packet_id(store: Store):
    """Found by review: "on" committed, the broker processed its PUBACK but the link dropped
    before the barrier confirmed it, so its count stays for good; a second "on" whose first
    transmission that drop cut off came as a DUP and was taken for a redelivery: one drop lost
    a repeated command. Under MQTT 5 (ids kept on a resend) its packet id tells them apart."""
    assert store.append([msg(b"on", mid=1)], links=[1], ids_kept=True) == [1]
    assert store.append([msg(b"on", mid=2, dup=True)], links=[2], ids_kept=True) == [2]
    # both copies unconfirmed now: each one's resend is recognised, on any later connection
    assert store.append([msg(b"on", mid=2, dup=True), msg(b"on", mid=1, dup=True)], links=[3, 3],
                        ids_kept=True) == [None, None]
    # connection 3's first PUBACK confirmed (confirmations come in the order they were sent):
    # id 2 is free again, id 1 still held
    assert store.append([msg(b"on", mid=2, dup=True), msg(b"on", mid=1, dup=True)], links=[4, 4],
                        settled=dup_marks([msg(b"on")]), ids_kept=True) == [3, None]


def test_packet_ids_decide_only_when_known_for_every_copy(store: Store):
    """A copy that came under 3.1.1 (RabbitMQ renumbers resends), or more than MIDS_MAX copies
    of one content: the count decides, as before."""
    assert store.append([msg(b"x", mid=1)], links=[1]) == [1]  # 3.1.1: no id kept
    assert store.append([msg(b"x", mid=2)], links=[1], ids_kept=True) == [2]
    # the first DUP is taken for the id-less copy's resend, whose id it learns; the second's id
    # is then neither copy's
    assert store.append([msg(b"x", mid=9, dup=True), msg(b"x", mid=10, dup=True)], links=[3, 3],
                        ids_kept=True) == [None, 3]
    copies = [msg(b"y", mid=100 + i) for i in range(MIDS_MAX + 1)]
    store.append(copies, links=[5] * len(copies), ids_kept=True)
    assert store.append([msg(b"y", mid=7, dup=True)], links=[6], ids_kept=True) == [None]


def test_packet_ids_decide_again_once_a_burst_of_copies_is_confirmed(store: Store):
    """A burst of more than MIDS_MAX copies of "on" lost the packet ids of that content for good:
    with one stale copy left (its PUBACK processed, the link dropped before the barrier's
    answer), a new "on" first sent as a DUP was taken for a redelivery and lost, at every later
    drop; the ids of the newest copies are kept now (found by review)."""
    assert store.append([msg(b"on", mid=1)], links=[1], ids_kept=True) == [1]  # never confirmed
    burst = [msg(b"on", mid=10 + i) for i in range(MIDS_MAX + 1)]
    assert None not in store.append(burst, links=[2] * len(burst), ids_kept=True)
    assert store.append([msg(b"on", mid=42, dup=True)], links=[3], ids_kept=True) == [None]
    store.append([], settled=dup_marks(burst))  # the barrier confirmed the whole burst
    assert store.append([msg(b"on", mid=500, dup=True)], links=[4], ids_kept=True) != [None]


def test_a_stale_count_of_a_content_that_keeps_coming_is_dropped_by_the_cap(store: Store):
    """The cap dropped marks by the inbox id of their last change, which every new copy of the
    content rewrote: the stale count of "on" (its PUBACK's confirmation never came), one "on"
    among every 4,096 messages, was never dropped, and every later new "on" first sent as a
    DUP (3.1.1, or past MIDS_MAX copies) was lost (found by review)."""
    assert store.append([msg(b"on", mid=1)], links=[1]) == [1]
    for n in range(0, 2 * MARKS_MAX, 4095):  # 2 x MARKS_MAX other contents, stale too
        batch = [msg(b"%d" % (n + i), mid=2) for i in range(4095)] + [msg(b"on", mid=3)]
        # on the first copy's connection: a fresh "on" on a later one drops the stale copy by
        # itself (drop_unresent), and the cap would no longer be what this test checks
        store.append(batch, links=[1] * len(batch))
        store.append([], settled=dup_marks(batch[-1:]))  # that "on" confirmed: the first stays
    assert store.append([msg(b"on", mid=4, dup=True)], links=[3]) != [None]


def test_copies_an_earlier_connection_did_not_resend_before_a_fresh_one_are_dropped(store: Store):
    """Found by review: an "on" whose PUBACK the broker processed just before a drop (the
    barrier's answer lost) kept its count for good, and each later new "on" first sent as a
    DUP (3.1.1: no packet ids) was taken for its redelivery. A broker resends what it holds of a
    topic before anything newer: once a fresh "on" comes, the copies not resent are gone."""
    assert store.append([msg(b"on", mid=1)], links=[1]) == [1]  # PUBACK processed, answer lost
    assert store.append([msg(b"on", mid=5)], links=[2]) == [2]  # the next connection: a fresh one
    store.append([], settled=dup_marks([msg(b"on")]))  # its PUBACK confirmed
    assert store.append([msg(b"on", mid=9, dup=True)], links=[3]) == [3]  # first sent as a DUP


def test_under_mqtt5_packet_ids_decide_for_every_copy_of_a_batch(store: Store):
    """Found by review: a mark kept the packet ids of the newest 32 copies, and a batch holds up
    to 1,024 of one content waiting for the barrier: past 32 the count decided, and after a
    drop the DUP of a new "on" was taken for one of the copies whose PUBACK the broker had
    processed (4 SIGKILLs in a stream of 1,200 "on" lost up to 470)."""
    burst = [msg(b"on", mid=i) for i in range(1, 1001)]
    store.append(burst, links=[1] * len(burst), ids_kept=True)
    store.append([], settled=dup_marks(burst[:400]))  # 400 confirmed, then the link drops
    assert store.append([msg(b"on", mid=700, dup=True), msg(b"on", mid=2000, dup=True)], links=[2, 2],
                        ids_kept=True) == [None, 1001]


def test_a_mark_without_packet_ids_from_the_previous_version_keeps_working(tmp_path: Path):
    """A schema 5 store upgraded in place holds 24-byte marks (count, seq, link, taken) with no
    ids: a DUP of their content is judged by the count, and the ids of the copies it takes for
    resends are learnt."""
    Store(tmp_path / "store", CAP).close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=8, map_size=CAP * 2)
    with env.begin(write=True) as txn:
        txn.put(dup_marks([msg(b"x")])[0], struct.pack(">IQQI", 2, 1, 7, 2),
                db=env.open_db(b"unconfirmed", txn=txn))
        txn.put(b"schema", struct.pack(">Q", 5), db=env.open_db(b"meta", txn=txn))
    env.close()
    store = Store(tmp_path / "store", CAP)
    assert store.append([msg(b"x", mid=5, dup=True), msg(b"x", mid=6, dup=True), msg(b"x", mid=7, dup=True)],
                        links=[9, 9, 9], ids_kept=True) == [None, None, 1]
    store.close()


def test_a_store_holding_marks_with_packet_ids_is_refused_by_the_previous_version(tmp_path: Path):
    """A mark ending with its copies' packet ids is damage to the previous version (schema 5,
    24-byte marks only): rolled back, it opened such a store and reported it damaged at the
    next DUP of that content, where the README promises a clear refusal of a store written by
    a newer flashlexd. Its schema is now past 5, which that version refuses at open (found by
    review)."""
    store = Store(tmp_path / "store", CAP)
    assert store.append([msg(b"on")], links=[1], ids_kept=True) == [1]
    store.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:
        marks = [len(value) for _, value in txn.cursor(db=env.open_db(b"unconfirmed", txn=txn, create=False))]
        schema = struct.unpack(">Q", txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False)))[0]
    env.close()
    assert marks == [24 + 2] and schema > 5


def test_mqtt5_user_property_key_once_properties_arrive():
    """Ready for MQTT 5: paho's PUBLISH properties carry user properties as (name, value)."""
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = [("other", "x"), ("msg-id", "a1")]
    assert DedupeKey.parse("mqtt5:msg-id").of(b"", properties) == b"a1"
    assert DedupeKey.parse("mqtt5:absent").of(b"", properties) is None
    empty = Properties(PacketTypes.PUBLISH)
    empty.UserProperty = [("msg-id", "")]  # no id, as absent (found by review)
    assert DedupeKey.parse("mqtt5:msg-id").of(b"", empty) is None


def test_confirmed_marks_go_off_on_a_full_disk_through_the_space_reserve(tmp_path: Path):
    """Review "diskfull": a commit taking marks off only was an append, kept from the space
    reserve: on a disk the store had filled it failed every second, and the ingress, waiting
    for it to have the broker resend what it left there, stored nothing (4.5 min, 2 of 5)."""
    from flashlexd.storebase import DiskFull
    from tests.tmpfs import fill as fill_disk, mounted_tmpfs
    with mounted_tmpfs(tmp_path / "disk", 8) as disk:
        store = Store(disk / "store", CAP)
        try:
            sent = [msg(b"%d" % i + b"x" * 2000, mid=i % 60000 + 1) for i in range(400)]
            store.append(sent)
            fill_disk(disk, 0)
            with pytest.raises(DiskFull):
                for round_ in range(10_000):  # LMDB's free pages used up too
                    store.append([msg(b"more %d" % round_ + b"y" * 2000, mid=1)])
            assert store.append([], settled=dup_marks(sent)) == []  # DiskFull before
        finally:
            store.close()
