"""flashlexd.client against a real server and store: every method and error (the compat SDK:
tests/test_compat*.py)."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from typing import List

import pytest

import flashlexd.client.connection as connection_module
from flashlexd import fds
from flashlexd.client import (Client, DaemonNotRunning, Message, OutboxEntry, ProtocolError, RpcError,
                              connect)
from flashlexd.client.wire import MAX_IDS_PER_ACK, MAX_WAIT_SECONDS, Code
from tests.broker import serve_each

try:
    from test_ipc_server import EGRESS_TOPIC, MAX_PAYLOAD, Harness, harness, raw_connect  # noqa: F401
    from broker import wait_for
    from tmpfs import mounted_tmpfs
except ImportError:  # tests run as a package
    from tests.test_ipc_server import EGRESS_TOPIC, MAX_PAYLOAD, Harness, harness, raw_connect  # noqa: F401
    from tests.broker import wait_for
    from tests.tmpfs import mounted_tmpfs


@pytest.fixture
def fx(harness):
    with connect(harness.path) as client:
        yield client


# -- round trips ----------------------------------------------------------------------------------

def test_status(harness, fx):
    harness.ingest(("t/1", b"a"), ("t/2", b"b"))
    status = fx.status()
    assert status["version"] == "0.1.0" and status["uptime"] == 12.5
    assert [w["name"] for w in status["workers"]] == ["ingress", "egress", "expiry"]
    assert status["mqtt"]["egress"]["connected"] is True
    assert status["inbox"]["count"] == 2 and status["inbox"]["oldest_age"] >= 0
    assert status["outbox"] == {"count": 0, "oldest": None, "oldest_age": None, "limit": -1,
                                "dead": 0, "oldest_inflight_age": None}
    assert status["store"]["cap_bytes"] == 64 << 20 and status["store"]["used_bytes"] > 0
    assert status["counters"]["received"] == 2 and status["counters"]["restarts"] == 0


def test_messages_oldest_first_with_filter_after_and_limit(harness, fx):
    ids = harness.ingest(("a/x", b'{"n": 1}'), ("b/y", b"plain"), ("a/z", b"\xff\x00"))
    messages = fx.messages()
    assert [m.id for m in messages] == ids
    first = messages[0]
    assert isinstance(first, Message) and first.pk == str(ids[0]) and first.json() == {"n": 1}
    assert first.qos == 1 and first.retain is False and first.expires_at is None
    assert messages[2].payload == b"\xff\x00"
    assert [m.topic for m in fx.messages(topic="a/+")] == ["a/x", "a/z"]
    assert [m.id for m in fx.messages(after=ids[0])] == ids[1:]
    assert [m.id for m in fx.messages(after=str(ids[1]))] == ids[2:]
    assert len(fx.messages(limit=1)) == 1


def test_large_results_are_split_by_size_and_paged(harness, fx):
    """A response full before `limit` ended `messages()` there, with no sign of the rest: 5 of
    12 large messages for `limit=20` (found by review). It answers its last id as the cursor,
    and the client calls again from there."""
    payload = os.urandom(MAX_PAYLOAD)
    ids = harness.ingest(*[("big", payload)] * 10)
    page = fx.call("messages", limit=10, paged=True)
    assert 1 <= len(page["messages"]) < 10 and page["cursor"] == page["messages"][-1]["id"]
    every = fx.messages(limit=20)
    assert [m.id for m in every] == ids and all(m.payload == payload for m in every)
    assert [m.id for m in fx.messages(limit=3, after=ids[6])] == ids[7:10]


def test_ack_by_id_pk_and_message_is_idempotent(harness, fx):
    ids = harness.ingest(("t", b"1"), ("t", b"2"), ("t", b"3"))
    messages = fx.messages()
    assert fx.ack([ids[0], str(ids[1]), messages[2]]) == 3
    assert fx.ack(ids) == 0
    assert fx.messages() == []


def test_one_id_alone_is_one_id_not_its_characters(harness, fx):
    """`fx.ack(msg.pk)` iterated the string: ack("12") acked messages 1 and 2 and left 12; ack(b"12")
    acked ids 49 and 50. One id, pk or Message alone is that one; bytes are refused."""
    ids = harness.ingest(*[("t", b"%d" % n) for n in range(1, 61)])
    twelfth = fx.messages()[11]
    assert twelfth.pk == str(ids[11])
    assert fx.ack(twelfth.pk) == 1 and fx.ack(ids[12]) == 1 and fx.ack(fx.messages()[11]) == 1
    with pytest.raises(TypeError):
        fx.ack(b"12")
    assert [m.id for m in fx.messages(limit=100)] == ids[:11] + ids[14:]


def test_one_outbox_entry_alone_is_retried_or_dropped(harness, fx):
    first, second = fx.publish(b"a"), fx.publish(b"b")
    assert fx.outbox(after=fx.outbox()["entries"][0])["entries"][0].id == second
    assert fx.drop(first) == 1 and fx.drop(fx.outbox()["entries"][0]) == 1
    assert fx.outbox()["entries"] == [] and second > first


def test_a_wait_longer_than_the_daemons_bound_on_one_call_is_several_calls(harness, fx):
    """The daemon waits at most MAX_WAIT_SECONDS a call: `wait(timeout=86400)` was bad_params."""
    got = []
    waiter = threading.Thread(target=lambda: got.append(fx.wait(timeout=MAX_WAIT_SECONDS + 60)), daemon=True)
    waiter.start()
    wait_for(lambda: harness.call(lambda: harness.server.parked_count) == 1, 10, "the wait parked")
    harness.ingest(("t", b"late"))
    waiter.join(10)
    assert [[m.payload for m in batch] for batch in got] == [[b"late"]]


@pytest.mark.parametrize("timeout", [-1, 0, float("nan"), float("inf"), None, "10"])
def test_a_bad_timeout_is_refused_at_connect_with_its_name(harness, timeout):
    """-1 was a ValueError out of settimeout; None a TypeError at the first call."""
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        connect(harness.path, timeout=timeout)


def test_ack_splits_long_lists(harness, fx):
    ids = harness.ingest(*[("t", b"x")] * (MAX_IDS_PER_ACK + 5))
    assert fx.ack(ids) == MAX_IDS_PER_ACK + 5


def test_wait_answers_at_once_when_messages_exist(harness, fx):
    harness.ingest(("t", b"ready"))
    assert [m.payload for m in fx.wait(timeout=30)] == [b"ready"]


def test_stream_yields_each_message_once(harness, fx):
    harness.ingest(("t", b"1"))
    stream = fx.stream(timeout_per_wait=5)
    assert next(stream).payload == b"1"
    harness.ingest(("t", b"2"), ("t", b"3"))
    assert [next(stream).payload, next(stream).payload] == [b"2", b"3"]
    stream.close()


def test_stream_waits_for_a_restarted_daemon_and_goes_on_from_its_last_message(tmp_path, caplog):
    """Found by review: `stream()`, "forever", ended with ConnectionLost at the daemon's restart
    (`systemctl restart`, an upgrade), taking the app down with it."""
    first = Harness(tmp_path).start()
    client = connect(first.path)
    stream = client.stream(timeout_per_wait=5)
    try:
        first.ingest(("t", b"1"))
        assert next(stream).payload == b"1"
        first.stop()
        restarted: List[Harness] = []

        def restart_once_the_stream_waits() -> None:
            wait_for(lambda: any("waiting for it to come back" in r.getMessage() for r in caplog.records),
                     10, "the stream's warning")
            restarted.append(Harness(tmp_path, path=first.path).start())  # the same store
            restarted[0].ingest(("t", b"2"))

        helper = threading.Thread(target=restart_once_the_stream_waits)
        helper.start()
        try:
            assert next(stream).payload == b"2"  # not "1" again: it goes on from its last
        finally:
            helper.join()
    finally:
        stream.close()
        client.close()
        for harness in restarted:
            harness.stop()


def test_a_publish_waits_out_a_write_lock_held_past_the_daemons_bounded_wait(harness, fx):
    """Found by review: on a starved device an ingress commit held LMDB's write lock past the
    supervisor's bounded 1 s wait, and a quarter of the apps' publishes failed with
    store_error "(a hung worker?)" (nothing was hung). The daemon answers `busy` (nothing was
    written) and the client asks again within its timeout."""
    harness.store.write_wait = 0.3
    holder = _write_lock_holder(harness.store.path)
    try:
        release = threading.Timer(1.5, holder.stdin.close)  # a long commit, then it lets go
        release.start()
        queued = fx.publish(b"after the long commit")
        release.join()
    finally:
        holder.kill()
        holder.wait()
    assert fx.outbox()["entries"][-1].id == queued


def _write_lock_holder(store_path) -> subprocess.Popen:
    """Another process holding the store's write lock (a long commit) until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", "import lmdb, sys\n"
                               f"env = lmdb.open({str(store_path)!r}, max_dbs=16)\n"
                               "txn = env.begin(write=True)\nprint('locked', flush=True)\n"
                               "sys.stdin.read()\ntxn.abort()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


@pytest.mark.parametrize("window", [0.0, 0.05])
def test_a_publish_busy_past_the_timeout_raises_busy_and_queues_nothing(harness, window):
    """Found by re-read review: the retry of `busy` sent again with whatever time was left (a
    few ms, or less than nothing): with apiCommitMs the app got RpcTimeout, or a bare
    ValueError, for a publish the daemon then queued and sent. A retry goes only with time for
    an answer as slow as the last; else the last `busy` is raised, and nothing was queued."""
    harness.rules = dataclasses.replace(harness.rules, write_window=window)
    harness.store.write_wait = 1.0  # the supervisor's
    holder = _write_lock_holder(harness.store.path)
    try:
        with connect(harness.path, timeout=2) as fx:
            with pytest.raises(RpcError) as refused:
                fx.publish(b"never queued")
            assert refused.value.code == "busy"
    finally:
        holder.communicate("", timeout=10)
    with connect(harness.path) as fx:
        assert fx.outbox()["count"] == 0


def test_publish_json_bytes_and_text(harness, fx):
    first = fx.publish({"temp": 21.5})
    second = fx.publish(b"\x00raw", topic="other/topic", qos=0, retain=True)
    third = fx.publish("text")
    assert second == first + 1 and third == first + 2
    outbox = fx.outbox(limit=10)
    assert outbox["count"] == 3 and outbox["oldest_age"] >= 0
    entries = outbox["entries"]
    assert all(isinstance(e, OutboxEntry) for e in entries)
    assert (entries[0].topic, json.loads(entries[0].payload)) == (EGRESS_TOPIC, {"temp": 21.5})
    assert (entries[1].topic, entries[1].payload, entries[1].qos, entries[1].retain) == \
        ("other/topic", b"\x00raw", 0, True)
    assert entries[2].payload == b"text"
    assert harness.outbox_wakeups == 3


def test_publish_refused_while_offline_when_queueing_is_off(tmp_path):
    h = Harness(tmp_path, queueing=0).start()
    try:
        with connect(h.path) as client:
            client.publish(b"online is fine")
            h.egress_online = False
            with pytest.raises(RpcError) as info:
                client.publish(b"offline")
            assert info.value.code == Code.EGRESS_OFFLINE
            assert client.outbox()["count"] == 1
    finally:
        h.stop()


def test_publish_refused_when_outbox_is_full(tmp_path):
    h = Harness(tmp_path, queueing=2).start()
    try:
        with connect(h.path) as client:
            client.publish(b"1")
            client.publish(b"2")
            with pytest.raises(RpcError) as info:
                client.publish(b"3")
            assert info.value.code == Code.OUTBOX_FULL and "outbox is full" in info.value.message
    finally:
        h.stop()


def test_publish_refused_on_a_full_disk_is_outbox_full_and_goes_on_after_a_drop(tmp_path):
    """README: a full disk is handled like a full store under `reject`, whose publish is
    refused with outbox_full; it came back as store_error, an app's sign of a failed store."""
    with mounted_tmpfs(tmp_path / "disk", 3) as disk:
        h = Harness(disk).start()
        try:
            with connect(h.path) as client:
                queued = []
                with pytest.raises(RpcError) as info:
                    for _ in range(1000):
                        queued.append(client.publish(os.urandom(20000)))
                assert info.value.code == Code.OUTBOX_FULL and "no space left on device" in info.value.message
                assert client.drop(queued[:20]) == 20
                client.publish(b"fits again")
        finally:
            h.stop()


def test_publish_payload_limit(fx):
    fx.publish(b"x" * MAX_PAYLOAD)
    with pytest.raises(RpcError) as info:
        fx.publish(b"x" * (MAX_PAYLOAD + 1))
    assert info.value.code == Code.PAYLOAD_TOO_LARGE


@pytest.mark.parametrize("payload, properties", [
    (b"z" * (2 * 1024 * 1024), None),
    (b"z", {"user_properties": [("big", "v" * (2 * 1024 * 1024))]}),  # the payload is not what is large
])
def test_a_publish_larger_than_the_daemon_reads_is_payload_too_large(fx, payload, properties):
    """README: a payload over maxPayloadBytes is refused with `payload_too_large`; one past the
    daemon's frame limit got `frame_too_large`, a code README never names, so an app catching
    `payload_too_large` missed it (found by review). The message says what was too large."""
    with pytest.raises(RpcError) as info:
        fx.publish(payload, properties=properties)
    assert info.value.code == Code.PAYLOAD_TOO_LARGE
    assert "the request of" in info.value.message and "flashlex.thing.mqtt.maxPayloadBytes" in info.value.message
    assert info.value.message.endswith("nothing was queued")
    assert fx.outbox()["count"] == 0  # and the client goes on (reconnected)


def test_purge_needs_confirmation(harness, fx):
    harness.ingest(("t", b"1"), ("t", b"2"))
    with pytest.raises(RpcError) as info:
        fx.purge()
    assert info.value.code == Code.CONFIRM_REQUIRED
    assert fx.purge(confirm=True) == 2 and fx.messages() == []


@pytest.mark.parametrize("method, params, name", [
    ("messages", {"limit": "10"}, "limit"),
    ("messages", {"limit": 0}, "limit"),
    ("messages", {"limit": 10_000}, "limit"),
    ("messages", {"topic": "a/#/b"}, "topic"),
    ("messages", {"after": -1}, "after"),
    ("messages", {"after": "12x"}, "after"),
    ("ack", {}, "ids"),
    ("ack", {"ids": "1"}, "ids"),
    ("ack", {"ids": [1, None]}, "ids"),
    ("ack", {"ids": [True]}, "ids"),
    ("wait", {"timeout": -1}, "timeout"),
    ("wait", {"timeout": "5"}, "timeout"),
    ("wait", {"timeout": 10 ** 6}, "timeout"),
    ("publish", {}, "payload"),
    ("publish", {"payload": 5}, "payload"),
    ("publish", {"payload": b"x", "topic": "a/+"}, "topic"),
    ("publish", {"payload": b"x", "topic": ""}, "topic"),
    ("publish", {"payload": b"x", "qos": 2}, "qos"),
    ("publish", {"payload": b"x", "retain": 1}, "retain"),
    ("outbox", {"limit": -1}, "limit"),
    ("status", {"verbose": True}, "verbose"),
    ("purge", {"confirm": True, "force": 1}, "force"),
])
def test_bad_params_name_the_param(fx, method, params, name):
    with pytest.raises(RpcError) as info:
        fx.call(method, **params)
    assert info.value.code == Code.BAD_PARAMS
    assert f"'{name}'" in info.value.message and info.value.message.startswith(method)


@pytest.mark.parametrize("call, name", [
    (lambda fx: fx.ack([2 ** 64]), "ids"),
    (lambda fx: fx.messages(after=2 ** 70), "after"),
    (lambda fx: fx.call("messages", limit=-2 ** 64), "limit"),
    (lambda fx: fx.call("ack", ids={1, 2}), "ids"),
])
def test_params_msgpack_cannot_carry_are_bad_params_named(fx, call, name):
    """Found by review: an id or a limit past 64 bits (or a set) raised a bare OverflowError
    (TypeError) out of the client, not one of its typed errors; it is now `bad_params`
    naming the param, as the daemon names one, and the connection goes on."""
    with pytest.raises(RpcError) as info:
        call(fx)
    assert info.value.code == Code.BAD_PARAMS and f"'{name}' cannot be sent" in info.value.message
    assert fx.status()


@pytest.mark.parametrize("method, params, name", [
    ("publish", {"payload": b"x", "topic": "dev/\ud800"}, "topic"),
    ("publish", {"payload": b"x", "properties": {"user_properties": [["k", "\udfff"]]}}, "properties"),
    ("messages", {"topic": "a/\ud800"}, "topic"),
])
def test_a_lone_surrogate_is_bad_params_naming_the_param(fx, method, params, name):
    """A str with a lone surrogate (no UTF-8 for it) raised msgpack's UnicodeEncodeError at the
    application instead of the bad_params README promises for a topic that is not valid UTF-8
    (found by review). Nothing is sent: the connection goes on."""
    with pytest.raises(RpcError) as info:
        fx.call(method, **params)
    assert info.value.code == Code.BAD_PARAMS
    assert f"'{name}'" in info.value.message and info.value.message.startswith(method)
    assert fx.outbox()["count"] == 0


@pytest.mark.parametrize("call, error, words", [
    (lambda fx: fx.wait(timeout="5"), ValueError,
     "timeout must be a number of seconds, 0 or more and under 1e9, not '5'"),
    (lambda fx: fx.wait(timeout=-1), ValueError, "timeout must be a number of seconds, 0 or more and under 1e9, not -1"),
    (lambda fx: fx.wait(timeout=10**9), ValueError,
     "timeout must be a number of seconds, 0 or more and under 1e9, not 1000000000"),
    # None was no wait at all: a loop of wait(timeout=None) made ~5,000 calls a second (review)
    (lambda fx: fx.wait(timeout=None), ValueError, "timeout must be a number of seconds, 0 or more and under 1e9, not None"),
    (lambda fx: next(fx.stream(timeout_per_wait=None)), ValueError,
     "timeout_per_wait must be a number of seconds, 0 or more and under 1e9, not None"),
    (lambda fx: next(fx.stream(timeout_per_wait=float("nan"))), ValueError,
     "timeout_per_wait must be a number of seconds, 0 or more and under 1e9, not nan"),
    (lambda fx: fx.ack(None), TypeError, "ids must be ids or a list of them, not NoneType"),
    (lambda fx: fx.ack(1.5), TypeError, "ids must be ids or a list of them, not float"),
    (lambda fx: fx.ack({1: "x"}), TypeError, "ids must be ids or a list of them, not dict"),
    (lambda fx: fx.outbox(after="abc"), ValueError, "after must be an outbox entry id (digits), not 'abc'"),
    (lambda fx: fx.outbox(after="-1"), ValueError, "after must be an outbox entry id (digits), not '-1'"),
    (lambda fx: fx.outbox(after=2.5), TypeError, "an outbox entry id must be an int or an OutboxEntry"),
])
def test_a_wrong_argument_is_named_by_the_client(fx, call, error, words):
    """Found by review: these raised Python's own words (`unsupported operand type(s) for +`,
    `'NoneType' object is not iterable`, `invalid literal for int()`), and a negative wait
    timeout was taken as a peek."""
    with pytest.raises(error) as info:
        call(fx)
    assert str(info.value).startswith(words)
    assert fx.wait(timeout=0) == [] and fx.outbox(after="0")["count"] == 0


def test_unknown_method(fx):
    with pytest.raises(RpcError) as info:
        fx.call("frobnicate")
    assert info.value.code == Code.UNKNOWN_METHOD and "status" in info.value.message


# -- connection errors ----------------------------------------------------------------------------

def test_daemon_not_running_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.sock")
    with pytest.raises(DaemonNotRunning, match=f"no socket at {missing}"):
        connect(missing)
    stale = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(stale)
    dead.close()
    with pytest.raises(DaemonNotRunning, match=f"nothing listens on {stale}"):
        connect(stale)
    config = tmp_path / "flashlex.yml"
    config.write_text("flashlex: {}\n")
    with pytest.raises(DaemonNotRunning, match=f"^{config} is not a socket "):
        connect(str(config))


def test_socket_from_the_environment(harness, monkeypatch):
    monkeypatch.setenv("FLASHLEXD_SOCKET", harness.path)
    with connect() as client:
        assert client.path == harness.path and client.status()


def test_newer_client_gets_a_clear_version_error(fx, monkeypatch):
    monkeypatch.setattr(connection_module, "PROTOCOL_VERSION", 2)
    with pytest.raises(RpcError) as info:
        fx.status()
    assert info.value.code == Code.UNSUPPORTED_VERSION
    assert "client speaks protocol 2, daemon speaks 1: upgrade" in info.value.message


def test_not_a_flashlexd_socket_is_a_protocol_error(tmp_path):
    path = str(tmp_path / "http.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def answer() -> None:
        peer, _ = listener.accept()
        peer.recv(65536)
        peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        peer.close()
    threading.Thread(target=answer, daemon=True).start()
    with Client(path) as client, pytest.raises(ProtocolError, match="is it a flashlexd socket"):
        client.status()
    listener.close()


def test_restarted_daemon_is_reconnected(tmp_path):
    h = Harness(tmp_path).start()
    client = connect(h.path, timeout=1)
    client.status()
    h.stop()
    with pytest.raises(DaemonNotRunning):  # not back within the call's timeout
        client.status()
    h2 = Harness(tmp_path / "again", path=h.path).start()
    try:
        assert client.status()["version"] == "0.1.0"
    finally:
        client.close()
        h2.stop()


def test_one_client_shared_by_threads(harness, fx):
    errors = []

    def worker() -> None:
        try:
            for _ in range(50):
                assert fx.status()["version"] == "0.1.0"
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


def test_import_is_light():
    code = ("import sys, flashlexd.client, flashlexd.client.ctl, flashlexd.client.compat;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('paho', 'lmdb', 'yaml')"
            " or m in ('flashlexd.store', 'flashlexd.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_message_record():
    message = Message.from_wire({"id": 5, "pk": "5", "topic": "t", "payload": b"[1]", "timestamp": 1.5,
                                 "qos": 0, "retain": True, "mid": 9, "expires_at": 99.0})
    assert (message.pk, message.json(), message.text(), message.mid) == ("5", [1], "[1]", 9)
    with pytest.raises(Exception):
        message.id = 6  # frozen


def test_refusals_reach_the_caller_as_rpc_errors(tmp_path):
    from flashlexd.ipc import Limits
    h = Harness(tmp_path, limits=Limits(max_connections=1)).start()
    root_slots = [raw_connect(h.path) for _ in range(fds.PRIVILEGED_CONNECTIONS)]
    try:
        with connect(h.path) as first:
            first.status()
            with connect(h.path) as second, pytest.raises(RpcError) as info:
                second.status()
            assert info.value.code == Code.BUSY
            with pytest.raises(RpcError) as info:  # bigger than any frame the daemon reads
                first.publish(b"z" * (4 * 1024 * 1024))
            assert info.value.code == Code.PAYLOAD_TOO_LARGE  # README's code for it
            assert first.status()["version"] == "0.1.0"  # reconnected
    finally:
        for sock in root_slots:
            sock.close()
        h.stop()


def test_a_client_used_before_a_fork_works_in_both_processes(harness, fx):
    """multiprocessing's default on Linux: one connection shared by two processes, whose
    answers crossed ("response id 6 does not match request 5") or went to the other one."""
    harness.ingest(("sensors/t", b"1"), ("sensors/t", b"2"))
    assert len(fx.messages()) == 2  # connected before the fork
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if all(len(fx.messages()) == 2 for _ in range(200)) else 2
        finally:
            os._exit(code)
    parent_ok = all(len(fx.messages()) == 2 for _ in range(200))
    _, status = os.waitpid(pid, 0)
    assert parent_ok and os.waitstatus_to_exitcode(status) == 0


def test_a_client_forked_while_a_thread_is_in_a_call_works_in_the_child(harness, fx):
    """The Client's lock is copied held when another thread is inside a call at the fork, and
    that thread does not exist in the child: its first call hung for good."""
    harness.ingest(("sensors/t", b"1"))
    waiting = threading.Thread(target=lambda: fx.wait(timeout=3, after=10 ** 6))
    waiting.start()
    wait_for(lambda: harness.call(lambda: harness.server.parked_count), 5, "the wait parked")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if len(fx.messages()) == 1 else 2
        finally:
            os._exit(code)
    waiting.join(10)

    def exited():
        done = os.waitpid(pid, os.WNOHANG)
        return done if done[0] else None
    try:
        _, status = wait_for(exited, 15, "the forked child's first call")
    except AssertionError:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    assert os.waitstatus_to_exitcode(status) == 0



def _cutting_proxy(path: str, daemon_path: str) -> socket.socket:
    """A socket at `path` relaying to the daemon's, whose first connection swallows the first
    ack request and closes (a daemon restart cutting the call); later ones relay everything."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    cut = threading.Event()

    def relay(source: socket.socket, sink: socket.socket, cutting: bool) -> None:
        while True:
            data = source.recv(65536)
            if cutting and b"ack" in data and not cut.is_set():
                cut.set()
                source.close()
                sink.close()
                return
            if not data:
                sink.close()
                return
            sink.sendall(data)

    def serve(peer: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(daemon_path)
        for source, sink, cutting in ((peer, upstream, True), (upstream, peer, False)):
            threading.Thread(target=_quietly, args=(relay, source, sink, cutting), daemon=True).start()
    serve_each(listener, lambda peer: _quietly(serve, peer))
    return listener


def _quietly(function, *args) -> None:
    try:
        function(*args)
    except OSError:  # the other side closed
        pass


def test_an_ack_cut_by_a_lost_connection_is_sent_again(harness, tmp_path):
    """Found by review: an app whose `ack` raised ConnectionLost at a daemon restart and went on
    with its `stream()` left that message unacked for good (stream never yields it again). An
    ack is idempotent: the client sends it again."""
    ids = harness.ingest(("t", b"1"))
    listener = _cutting_proxy(str(tmp_path / "proxy.sock"), harness.path)
    try:
        with connect(str(tmp_path / "proxy.sock"), timeout=5) as client:
            assert client.ack(ids) == 1
            assert client.messages() == []
    finally:
        listener.close()


def _older_daemon_proxy(path: str, daemon_path: str) -> socket.socket:
    """A socket at `path` relaying to the daemon's, answering a `reset` that carries `register`
    as a daemon from before that param does (flashlexd d637477: params it does not know are
    refused); everything else relayed."""
    import msgpack
    from flashlexd.client.wire import HEADER, encode_frame
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)

    def serve(peer: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(daemon_path)
        with peer, upstream:
            while True:
                head = peer.recv(HEADER.size, socket.MSG_WAITALL)
                if len(head) < HEADER.size:
                    return
                body = peer.recv(HEADER.unpack(head)[0], socket.MSG_WAITALL)
                request = msgpack.unpackb(body, raw=False)
                if request["method"] == "reset" and "register" in request["params"]:
                    peer.sendall(encode_frame({"id": request["id"], "error": {
                        "code": "bad_params", "message": "reset: unknown param 'register' (accepted:"
                                                         " consumer, paged, to, way)"}}))
                    continue
                upstream.sendall(head + body)
                answer = upstream.recv(HEADER.size, socket.MSG_WAITALL)
                peer.sendall(answer + upstream.recv(HEADER.unpack(answer)[0], socket.MSG_WAITALL))

    serve_each(listener, lambda peer: _quietly(serve, peer))
    return listener


def test_an_apps_own_reset_works_with_a_daemon_from_before_register(harness, tmp_path):
    """A client newer than its daemon (apps install the client in their own environment):
    `connect(consumer="newapp").reset("newapp", "latest")` raised the older daemon's
    "unknown param 'register'" (found by re-read). The client asks again without it."""
    ids = harness.ingest(("t", b"1"), ("t", b"2"))
    listener = _older_daemon_proxy(str(tmp_path / "older.sock"), harness.path)
    try:
        with connect(str(tmp_path / "older.sock"), consumer="newapp", timeout=5) as app:
            assert len(app.messages()) == 2  # registered by use, as that daemon does it
            assert app.reset("newapp", "latest") == ids[-1]
            assert app.messages() == []
    finally:
        listener.close()


def test_a_call_from_a_signal_handler_inside_a_call_is_refused_not_a_hang(harness, tmp_path):
    """A SIGTERM handler that publishes a goodbye on the Client the main thread was waiting
    on waited for the lock that thread held: the app hung until SIGKILL (found by review)."""
    script = tmp_path / "app.py"
    script.write_text(
        "import signal, sys\n"
        "from flashlexd.client import connect\n"
        f"fx = connect({harness.path!r})\n"
        "said = []\n"
        "def bye(signum, frame):\n"
        "    try:\n"
        "        fx.publish({'bye': True})\n"
        "    except RuntimeError as exc:\n"
        "        said.append(str(exc))\n"
        "signal.signal(signal.SIGALRM, bye)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.3)\n"
        "assert fx.wait(timeout=1.5) == []\n"
        "print(said[0])\n"
        "print(fx.status()['inbox']['count'])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    first, count = done.stdout.splitlines()
    assert first.startswith("a flashlexd Client call from inside another call") and count == "0", done.stdout


def test_an_overtaken_answer_is_no_replay(harness):
    """Two threads' answers may be read in either order: an older count after a newer one was
    taken for a replay, and restarted a `stream()` for nothing (found by review, from reading)."""
    with connect(harness.path) as fx:
        assert fx._note_replays(0, "run-a") is False
        assert fx._note_replays(1, "run-a") is True   # a reset of this consumer
        assert fx._note_replays(0, "run-a") is False  # an answer from before it, read late
        assert fx._note_replays(1, "run-a") is False
        assert fx._note_replays(2, "run-a") is True
        assert fx._note_replays(0, "run-b") is False  # a new run (restart) counts from 0
        assert fx._note_replays(1, "run-b") is True
