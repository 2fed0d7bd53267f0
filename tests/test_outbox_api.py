"""Publish checks, the outbox listing, dead letters, retry and drop through the client and
flashlexctl, against a real server, Methods and LMDB store (the supervisor's part played by
tests/test_ipc_server.Harness)."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import List

import pytest

from flashlexd.client import OutboxEntry, RpcError, connect
from flashlexd.client import ctl, ctlview
from flashlexd.client.wire import MAX_IDS_PER_ACK, Code
from flashlexd.quotas import TOPIC_SLASHES
from tests.test_ipc_server import MAX_PAYLOAD, harness  # noqa: F401 (fixture)


@pytest.fixture
def fx(harness):
    with connect(harness.path) as client:
        yield client


def dead_letter(harness, *entry_ids: int, reason: str = "refused by the broker") -> None:
    """What the egress worker does with a poison entry (run in the server's thread: the store
    is used by one thread)."""
    for entry_id in entry_ids:
        assert harness.call(lambda: harness.store.outbox_dead_letter(entry_id, reason, 3))


def ctl_run(harness, capsys, *argv: str):
    code = ctl.main(["--socket", harness.path, *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- publish: refused at the door -----------------------------------------------------------------

@pytest.mark.parametrize("topic, rule", [
    ("dev/a\nb", "contains control character U+000A at character 5"),
    ("dev/a\0b", "contains U+0000 (NUL)"),
    ("dev/\x7f", "contains control character U+007F"),
    ("dev/\x9b", "contains control character U+009B"),
    ("dev/\uffff", "contains Unicode non-character U+FFFF"),
    ("dev/\ufdd0", "contains Unicode non-character U+FDD0"),
    ("dev/+", "contains the wildcard '+'"),
    ("dev/#", "contains the wildcard '#'"),
    ("", "is empty"),
    ("t" * 257, "is 257 bytes in UTF-8, over maxTopicBytes (256)"),
    # mosquitto refuses it (MQTT 5: 0x87) and under 3.1.1 drops it, the entry counted as sent
    # (found by review); other '$' topics are a broker's own business ($CONTROL/...)
    ("$SYS/x", "begins with '$SYS', the broker's own status topics"),
    ("$SYS", "begins with '$SYS'"),
    ("$SYSx/y", "begins with '$SYS'"),  # mosquitto refuses these too (found by re-read)
])
def test_publish_refuses_a_topic_no_broker_takes_and_queues_nothing(harness, fx, topic, rule):
    with pytest.raises(RpcError) as info:
        fx.publish(b"x", topic=topic)
    assert info.value.code == Code.BAD_PARAMS
    assert info.value.message.startswith("publish: param 'topic' " + rule)
    assert "\n" not in info.value.message and "nothing was queued" in info.value.message
    assert fx.outbox()["count"] == 0 and harness.outbox_wakeups == 0


@pytest.mark.parametrize("topic", ["$SYS/x", "$foo/bar", "$"])
def test_publish_on_aws_refuses_the_dollar_topics_it_reserves(harness, fx, topic):
    """AWS IoT Core reserves every topic beginning with '$' and disconnects on a publish to one
    outside $aws/: such entries were queued (found by review)."""
    harness.rules = replace(harness.rules, max_topic_slashes=TOPIC_SLASHES)  # an AWS endpoint's rules
    with pytest.raises(RpcError) as info:
        fx.publish(b"x", topic=topic)
    assert info.value.code == Code.BAD_PARAMS and "\n" not in info.value.message
    assert info.value.message.startswith("publish: param 'topic' begins with '$', reserved by AWS IoT Core")
    assert fx.publish(b"{}", topic="$aws/things/T/shadow/update") == 1
    assert fx.publish(b"x", topic="$aws/rules/r/a") == 2  # Basic Ingest
    assert fx.outbox()["count"] == 2


def test_publish_refuses_a_retained_message_on_an_aws_reserved_topic(fx):
    """AWS IoT Core refuses RETAIN on its reserved topics ("MQTT differences"): the entry was
    queued and failed later, far from the call (review "aws")."""
    with pytest.raises(RpcError) as info:
        fx.publish(b"{}", topic="$aws/things/T/shadow/update", retain=True)
    assert info.value.code == Code.BAD_PARAMS and "\n" not in info.value.message
    assert info.value.message.startswith("publish: param 'retain': AWS IoT Core keeps no retained message")
    assert fx.outbox()["count"] == 0
    assert fx.publish(b"{}", topic="$aws/things/T/shadow/update") == 1


def test_publish_accepts_the_longest_topic_and_the_largest_payload(fx):
    assert fx.publish(b"x" * MAX_PAYLOAD, topic="é" * 128) == 1  # 256 bytes in UTF-8
    with pytest.raises(RpcError) as info:
        fx.publish(b"x" * (MAX_PAYLOAD + 1))
    assert info.value.code == Code.PAYLOAD_TOO_LARGE
    assert f"exceeds flashlex.thing.mqtt.maxPayloadBytes ({MAX_PAYLOAD})" in info.value.message
    assert fx.outbox()["count"] == 1


def test_publish_refusal_through_flashlexctl_is_one_line(harness, capsys):
    code, out, err = ctl_run(harness, capsys, "publish", "--topic", "dev/a\tb", "x")
    assert code == 1 and out == ""
    assert err.startswith("flashlexctl: bad_params: publish: param 'topic' contains control"
                          " character U+0009") and err.count("\n") == 1


# -- listing, retry and drop ----------------------------------------------------------------------

def test_outbox_lists_queued_entries_and_dead_letters_with_size_attempts_and_reason(harness, fx):
    for n in range(4):
        fx.publish(b"p" * (n + 1), topic=f"dev/{n}")
    dead_letter(harness, 2, 4)
    queued = fx.outbox()
    assert (queued["count"], queued["dead"]) == (2, 2)
    assert [(e.id, e.topic, e.size, e.attempts, e.reason) for e in queued["entries"]] == [
        (1, "dev/0", 1, None, None), (3, "dev/2", 3, None, None)]
    dead = fx.outbox(dead=True)
    assert [(e.id, e.topic, e.size, e.attempts, e.reason) for e in dead["entries"]] == [
        (2, "dev/1", 2, 3, "refused by the broker"), (4, "dev/3", 4, 3, "refused by the broker")]
    assert all(isinstance(e, OutboxEntry) and e.dead_at >= e.created for e in dead["entries"])
    assert [e.id for e in fx.outbox(dead=True, after=2)["entries"]] == [4]
    raw = fx.call("outbox", dead=True, limit=1)["entries"][0]
    assert (raw["id"], raw["size"], raw["attempts"], raw["reason"]) == (2, 2, 3, "refused by the broker")
    status = fx.status()["outbox"]
    assert (status["count"], status["dead"], status["oldest_inflight_age"]) == (2, 2, None)


def test_retry_moves_dead_letters_to_the_tail_and_wakes_the_egress(harness, fx):
    for n in range(3):
        fx.publish(b"%d" % n)
    dead_letter(harness, 1, 2)
    woken = harness.outbox_wakeups
    assert fx.retry([2, 1, 77]) == [4, 5]  # in id order; 77 is not a dead letter
    assert harness.outbox_wakeups == woken + 1
    assert [(e.id, e.payload) for e in fx.outbox()["entries"]] == [(3, b"2"), (4, b"0"), (5, b"1")]
    assert fx.outbox(dead=True)["entries"] == [] and fx.retry([1]) == []
    assert harness.outbox_wakeups == woken + 1  # nothing moved: nothing to wake


def test_drop_deletes_queued_entries_or_dead_letters(harness, fx):
    for n in range(4):
        fx.publish(b"%d" % n)
    dead_letter(harness, 3)
    assert fx.drop([3]) == 0  # a dead letter is dropped with dead=True only
    assert fx.drop([1, 2, 99]) == 2
    entries = fx.outbox(dead=True)["entries"]
    assert fx.drop(entries, dead=True) == 1
    assert [e.id for e in fx.outbox()["entries"]] == [4] and fx.status()["outbox"]["dead"] == 0
    counters = fx.status()["counters"]
    assert (counters["outbox_dropped"], counters["dead_dropped"], counters["dead_lettered"]) == (2, 1, 1)


def test_retry_and_drop_split_long_id_lists(harness, fx):
    count = MAX_IDS_PER_ACK + 3
    ids = harness.call(lambda: harness.store.outbox_append([("t", b"x", 1, False)] * count))
    dead_letter(harness, *ids)
    new_ids = fx.retry(ids)
    assert len(new_ids) == count and new_ids[0] == ids[-1] + 1
    assert fx.drop(new_ids) == count


@pytest.mark.parametrize("method, params, name", [
    ("retry", {}, "ids"),
    ("retry", {"ids": [-1]}, "ids"),
    ("retry", {"ids": list(range(MAX_IDS_PER_ACK + 1))}, "ids"),
    ("drop", {"ids": "1"}, "ids"),
    ("drop", {"ids": [1], "dead": "yes"}, "dead"),
    ("outbox", {"dead": 1}, "dead"),
    ("outbox", {"after": "x"}, "after"),
    ("publish", {"payload": b"x", "topic": b"bytes/topic"}, "topic"),
])
def test_bad_params_of_the_outbox_calls_name_the_param(fx, method, params, name):
    with pytest.raises(RpcError) as info:
        fx.call(method, **params)
    assert info.value.code == Code.BAD_PARAMS and f"'{name}'" in info.value.message


# -- flashlexctl ----------------------------------------------------------------------------------

def queue_with_dead_letters(harness, fx) -> List[int]:
    """One good entry (id 1) and two dead letters (ids 2, 3) whose topics `publish` would
    refuse today (queued by an older flashlexd, say)."""
    fx.publish(b"ok")
    bad = harness.call(lambda: harness.store.outbox_append(
        [("dev/\x85x", b"big" * 10, 1, False), ("dev/a\x1bb", b"zz", 1, False)]))
    dead_letter(harness, *bad, reason="link dropped 3 times with it alone in flight")
    return bad


def test_flashlexctl_lists_dead_letters_with_escaped_topics(harness, fx, capsys):
    dead = queue_with_dead_letters(harness, fx)
    code, out, _ = ctl_run(harness, capsys, "outbox", "--dead")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("1 queued, oldest") and lines[0].endswith(", 2 dead letters")
    assert lines[1].split() == ["ID", "AGE", "TOPIC", "BYTES", "ATTEMPTS", "REASON"]
    assert lines[2].split()[0] == str(dead[0]) and "dev/\\x85x" in lines[2] and " 30 " in lines[2]
    assert "dev/a\\x1bb" in lines[3] and lines[3].endswith("link dropped 3 times with it alone in flight")
    assert "\x1b" not in out and "\x85" not in out
    code, out, _ = ctl_run(harness, capsys, "--json", "outbox", "--dead", "--limit", "1")
    listed = json.loads(out)
    assert listed["dead"] == 2 and [e["id"] for e in listed["entries"]] == dead[:1]
    assert listed["entries"][0]["topic"] == "dev/\x85x"  # --json: exactly what the API says


def test_flashlexctl_status_is_degraded_while_dead_letters_exist(harness, fx, capsys):
    queue_with_dead_letters(harness, fx)
    code, out, _ = ctl_run(harness, capsys, "status")
    assert code == 1
    assert "degraded: 2 dead letters in the outbox (see: flashlexctl outbox --dead)" in out.splitlines()[0]
    assert "outbox    1 queued" in out and "2 dead letters" in out
    fx.drop([e.id for e in fx.outbox(dead=True)["entries"]], dead=True)
    assert ctl_run(harness, capsys, "status")[0] == 0


def test_flashlexctl_retry_by_id_and_all(harness, fx, capsys):
    dead = queue_with_dead_letters(harness, fx)
    code, out, _ = ctl_run(harness, capsys, "outbox", "retry", str(dead[0]), "999")
    assert code == 0 and out == "retried 1 dead letter (1 not dead letters): now outbox entries 4\n"
    dead_letter(harness, 4)
    code, out, _ = ctl_run(harness, capsys, "outbox", "retry", "--all")
    assert code == 0 and out == "retried 2 dead letters: now outbox entries 5-6\n"
    code, out, _ = ctl_run(harness, capsys, "--json", "outbox", "retry", "--all")
    assert code == 0 and json.loads(out) == []
    code, _, err = ctl_run(harness, capsys, "outbox", "retry")
    assert code == 2 and "ids or --all" in err


def test_flashlexctl_drop_queued_and_dead(harness, fx, capsys):
    dead = queue_with_dead_letters(harness, fx)
    code, out, _ = ctl_run(harness, capsys, "outbox", "drop", "1", str(dead[0]))
    assert code == 0 and out == ("dropped 1 of 2 queued entries (1 not found among the queued entries;"
                                 " dead letters take --dead)\n")  # found by review: no hint
    code, out, _ = ctl_run(harness, capsys, "outbox", "drop", "--dead", *map(str, dead))
    assert code == 0 and out == "dropped 2 of 2 dead letters\n"
    code, out, _ = ctl_run(harness, capsys, "--json", "outbox")
    assert json.loads(out)["count"] == 0 and json.loads(out)["dead"] == 0


def test_flashlexctl_status_labels_worker_counters_totals_and_rates(harness, capsys):
    harness.mqtt["ingress"].update(received=0, stored=0)
    harness.ingest(("t", b"1"))
    code, out, _ = ctl_run(harness, capsys, "status")
    lines = {line[:10]: line for line in out.splitlines() if line}
    assert "(since the worker started: received 0, stored 0)" in lines["mqtt ingre"]
    assert lines["totals    "].startswith("totals    received 1,")
    assert lines["totals    "].endswith("(since the store was created); restarts 0 (this run)")  # review "upgrade2"
    assert "rates" not in out  # the harness reports none
    assert ctlview.render_rates({"ingest_per_s": 1.5, "drain_per_s": 0.0, "window_s": 9.9}) == \
        "ingest 1.5/s, drain 0.0/s over the last 9.9s"
    assert ctlview.render_rates({"ingest_per_s": 0.0, "drain_per_s": 0.0, "window_s": 0.0}).startswith(
        "not measured yet")
