"""The FlashLex SDK compat layer against a real API server and store (fast), and against the
whole daemon for what needs its workers (expiry, a real stop and restart). The side-by-side run
against the real old SDK is tests/test_compat_side_by_side.py."""
from __future__ import annotations

import contextlib
import datetime
import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yaml

from flashlexd import check, config as config_module, fds, service
from flashlexd.client import connect
from flashlexd.client.compat import FlashlexSDK, skipped_messages
from flashlexd.client.wire import Code
from flashlexd.store import Incoming
from tests.broker import INGRESS_TOPIC, publish, wait_for
from tests.daemon import Daemon
from flashlexd.ipc import Limits
from tests.test_ipc_server import EGRESS_TOPIC, Harness, harness, raw_connect, until  # noqa: F401

COMMAND = b'{"message": "on", "device": "lamp"}'
NOT_JSON = [b"hello plain text", b"\xff\xfe\x00binary", b"", b"{broken", b"\xef\xbb\xbf{}"]
OUTAGE = "FlashLex SDK calls answer [] / 500"


@pytest.fixture
def sdk(harness):
    made = FlashlexSDK({"flashlex": {"app": {"socket": {"path": harness.path}}}})
    yield made
    made.close()


def compat_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "flashlexd.client.compat"]


# -- reading: JSON messages only, in the old record shape -----------------------------------------

def test_only_json_messages_come_back_in_the_old_record_shape(harness, sdk, caplog):
    ids = harness.ingest(Incoming("ingress/t", COMMAND, qos=1, retain=False, mid=7),
                         *[("ingress/t", payload) for payload in NOT_JSON],
                         ("ingress/t", b'"just a string"'), ("ingress/t", b"[1, 2.5, null, true]"),
                         ("ingress/t", b"NaN"))
    before = skipped_messages()
    records = sdk.getSubscribedMessages()
    assert [r["message"]["payload"] for r in records[:3]] == [
        {"message": "on", "device": "lamp"}, "just a string", [1, 2.5, None, True]]
    assert records[3]["message"]["payload"] != records[3]["message"]["payload"]  # NaN, as json.loads gave it
    first = records[0]
    assert list(first) == ["pk", "timestamp", "datetime", "message"]
    assert list(first["message"]) == ["topic", "payload", "pos", "retain", "mid"]
    assert first["pk"] == str(ids[0]) and isinstance(first["timestamp"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", first["datetime"])
    assert first["message"] == {"topic": "ingress/t", "payload": {"message": "on", "device": "lamp"},
                                "pos": 1, "retain": 0, "mid": 7}
    assert type(first["message"]["retain"]) is int  # the old MQTT client's `flags & 1`
    # the others are left for native clients: not acknowledged, counted, logged once each
    with connect(harness.path) as fx:
        assert len(fx.messages()) == len(ids)
    assert skipped_messages() - before == len(NOT_JSON)
    sdk.getSubscribedMessages()
    assert skipped_messages() - before == len(NOT_JSON)
    logged = [m for m in compat_warnings(caplog) if "is not JSON" in m]
    assert len(logged) == len(NOT_JSON)
    assert all("until a native client acknowledges it" in m for m in logged)


def test_arrival_order_whatever_sort_and_reverse_say_and_count_takes_the_first(harness, sdk):
    ids = harness.ingest(("t", b"1"), ("t", b"not json"), ("t", b"2"), ("t", b"3"))
    pks = [str(i) for i in ids]
    assert [r["pk"] for r in sdk.getSubscribedMessages()] == [pks[0], pks[2], pks[3]]
    assert [r["pk"] for r in sdk.getSubscribedMessages(reverse=True)] == [pks[0], pks[2], pks[3]]
    assert [r["pk"] for r in sdk.getSubscribedMessages(count=2, sortMessages=False)] == [pks[0], pks[2]]
    assert sdk.getSubscribedMessages(count=0) == sdk.getSubscribedMessages()


def test_a_non_json_backlog_larger_than_a_page_does_not_hide_json_messages(harness, sdk):
    from flashlexd.client.wire import MAX_LIMIT
    harness.ingest(*[("t", b"x")] * (MAX_LIMIT + 5), ("t", b'{"late": 1}'))
    assert [r["message"]["payload"] for r in sdk.getSubscribedMessages(count=1)] == [{"late": 1}]


# -- removing -------------------------------------------------------------------------------------

def test_two_old_apps_with_consumer_names_each_get_every_message(harness):
    """An old app's removal takes a message from every app: two of them on one device split
    the messages between them (review "consumers"). Named, each has its own."""
    path = {"flashlex": {"app": {"socket": {"path": harness.path}}}}
    display, logger = FlashlexSDK(path, consumer="display"), FlashlexSDK(path, consumer="logger")
    try:
        harness.ingest(("t", b'{"n": 1}'), ("t", b'{"n": 2}'))
        for app in (display, logger):
            assert [r["message"]["payload"]["n"] for r in app.getSubscribedMessages()] == [1, 2]
        assert display.removeMessageFromStore(display.getSubscribedMessages()[0]) is None
        assert [r["message"]["payload"]["n"] for r in display.getSubscribedMessages()] == [2]
        assert [r["message"]["payload"]["n"] for r in logger.getSubscribedMessages()] == [1, 2]
    finally:
        display.close()
        logger.close()
    with pytest.raises(ValueError, match="consumer must be"):
        FlashlexSDK(path, consumer="Not A Name")


def test_remove_returns_none_and_unknown_pks_raise_key_error(harness, sdk):
    harness.ingest(("t", b"{}"))
    record = sdk.getSubscribedMessages()[0]
    assert sdk.removeMessageFromStore(record) is None
    with pytest.raises(KeyError) as info:
        sdk.removeMessageFromStore(record)  # already gone: pickleDB's `del db[pk]`
    assert info.value.args == (record["pk"],)
    for pk in ("b300d03c7bd4", "", 5, "99999999999999999999999", "0" + record["pk"]):
        with pytest.raises(KeyError) as info:
            sdk.removeMessageFromStore({"pk": pk})
        assert info.value.args == (pk,)
    with pytest.raises(KeyError, match="pk key is required"):
        sdk.removeMessageFromStore({"message": {}})
    with pytest.raises(KeyError, match="pk key is required"):
        sdk.removeMessageFromStore("12")  # the old `'pk' in message` test on a str


class AnswerDropper:
    """A relay in front of the daemon's socket that closes the app's connection instead of
    passing on the next answer: what an app sees of a daemon killed after its commit."""

    def __init__(self, path: str, target: str):
        self.path, self.target, self.drop_next = path, target, False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                app, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            threading.Thread(target=self._pipe, args=(app, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, app, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with contextlib.suppress(OSError):
            for data in iter(lambda: source.recv(65536), b""):
                if answers and self.drop_next:  # the daemon's commit is done: the app never hears
                    self.drop_next = False
                    break
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_remove_whose_answer_was_lost_in_a_restart_is_no_key_error(harness, tmp_path):
    """Found by review: the daemon removed the record, its answer was lost with the link (a
    restart), the ack sent again counted 0, and the app got KeyError(pk): an SDK app does not
    catch it, and its loop died at a daemon restart."""
    harness.ingest(("t", b'{"n": 1}'), ("t", b'{"n": 2}'))
    relay = AnswerDropper(str(tmp_path / "relay.sock"), harness.path)
    sdk = FlashlexSDK({}, socket_path=relay.path)
    try:
        first, second = sdk.getSubscribedMessages()
        relay.drop_next = True
        assert sdk.removeMessageFromStore(first) is None
        assert [r["pk"] for r in sdk.getSubscribedMessages()] == [second["pk"]]
        with pytest.raises(KeyError) as info:  # an answered 0 still says the pk is unknown
            sdk.removeMessageFromStore(first)
        assert info.value.args == (first["pk"],)
    finally:
        sdk.close()
        relay.close()


@pytest.mark.parametrize("pk", [str(2 ** 63), str(2 ** 64 - 1)])
def test_an_unknown_pk_past_the_daemons_id_range_is_a_key_error(harness, sdk, pk):
    """Found by review: an all-digit pk from 2**63 up to 2**64 - 1 passed the compat layer's
    range check, the daemon refused the id as bad_request, and the app got an OSError instead
    of the KeyError(pk) the README promises for an unknown pk."""
    harness.ingest(("ingress/t", b'{"a": 1}'))
    with pytest.raises(KeyError) as info:
        sdk.removeMessageFromStore({"pk": pk})
    assert info.value.args == (pk,)
    assert [r["message"]["payload"] for r in sdk.getSubscribedMessages()] == [{"a": 1}]

def test_a_busy_daemon_gives_the_old_answers_not_an_exception(tmp_path, caplog):
    """At its connection cap the daemon answers `busy`: an unchanged app gets [], None and 500,
    with one warning, as when the old service was not there."""
    h = Harness(tmp_path, limits=Limits(max_connections=1)).start()
    holders = [raw_connect(h.path) for _ in range(1 + fds.PRIVILEGED_CONNECTIONS)]  # root's slots too
    try:
        until(lambda: h.call(lambda: h.server.connection_count) == 1 + fds.PRIVILEGED_CONNECTIONS)
        busy = FlashlexSDK({"flashlex": {"app": {"socket": {"path": h.path}}}})
        assert busy.getSubscribedMessages() == []
        assert busy.removeMessageFromStore({"pk": "1"}) is None
        assert busy.collectMessage({"temp": 1}) == 500
        assert sum(OUTAGE in w for w in compat_warnings(caplog)) == 1
        busy.close()
    finally:
        for holder in holders:
            holder.close()
        h.stop()


def _one_pass(path: str) -> list:
    """An old app's loop body: a new SDK object each pass; read, remove what was read, send."""
    sdk = FlashlexSDK({"flashlex": {"app": {"socket": {"path": path}}}})
    records = sdk.getSubscribedMessages()
    for record in records:
        sdk.removeMessageFromStore(record)
    status = sdk.collectMessage({"alive": True})
    sdk.close()
    return [records, status]


def test_one_outage_warning_per_outage_with_a_new_sdk_object_per_pass(tmp_path, caplog):
    """Found by review: the "daemon down" warning was kept per FlashlexSDK object, so an app
    making a new object per loop pass logged it on every pass of an outage; the README says one
    warning per outage."""
    caplog.set_level("INFO", logger="flashlexd.client.compat")
    h = Harness(tmp_path)  # its socket path, no server on it yet: the daemon is down
    try:
        for _ in range(3):
            assert _one_pass(h.path) == [[], 500]
        assert sum(OUTAGE in w for w in compat_warnings(caplog)) == 1
        h.start()
        assert _one_pass(h.path) == [[], 200]
        assert compat_warnings(caplog).count(f"flashlexd answers again on {h.path}") == 1
    finally:
        h.stop()
    for _ in range(3):  # the next outage is warned about again, once
        assert _one_pass(h.path) == [[], 500]
    assert sum(OUTAGE in w for w in compat_warnings(caplog)) == 2

# -- sending --------------------------------------------------------------------------------------

def test_collect_message_sends_the_old_request_body(harness, sdk, caplog):
    values = [{"foo": "bar", "n": [1, 2.5]}, "hello", None, 3, {"é": "ü"}]
    assert [sdk.collectMessage(v) for v in values] == [200] * len(values)
    with connect(harness.path) as fx:
        entries = fx.outbox(limit=10)["entries"]
    assert [e.payload for e in entries] == [json.dumps(v).encode() for v in values]
    assert entries[1].payload == b'"hello"' and entries[4].payload == b'{"\\u00e9": "\\u00fc"}'
    assert all(e.topic == EGRESS_TOPIC for e in entries)
    for unencodable in ({"when": datetime.datetime(2020, 1, 1)}, b"raw bytes", {1j: 2}):
        assert sdk.collectMessage(unencodable) == 500
    assert len([m for m in compat_warnings(caplog) if "not JSON-serialisable" in m]) == 3
    with connect(harness.path) as fx:
        assert fx.outbox()["count"] == len(values)  # nothing queued for them


def test_collect_message_answers_500_when_the_daemon_refuses(tmp_path, caplog):
    h = Harness(tmp_path, queueing=0).start()
    try:
        sdk = FlashlexSDK({"flashlex": {"app": {"socket": {"path": h.path}}}})
        h.egress_online = False
        assert sdk.collectMessage({"reading": 4}) == 500
        assert sdk.last_error.code == Code.EGRESS_OFFLINE
        assert any("not queued: egress_offline" in m for m in compat_warnings(caplog))
        sdk.close()
    finally:
        h.stop()


def test_set_message_to_store_sends_the_payload_to_the_records_topic(harness, sdk):
    record = {"pk": "x", "message": {"topic": INGRESS_TOPIC, "payload": {"sequence": 3}, "pos": 1}}
    assert sdk.setMessageToStore(record) is None
    with connect(harness.path) as fx:
        (entry,) = fx.outbox()["entries"]
    assert (entry.topic, entry.payload, entry.qos) == (INGRESS_TOPIC, b'{"sequence": 3}', 1)
    with pytest.raises(TypeError):  # as the old store's json.dump raised
        sdk.setMessageToStore({"message": {"topic": INGRESS_TOPIC, "payload": b"x"}})
    with pytest.raises(ValueError, match="the record has no message.topic"):  # a KeyError('topic') before
        sdk.setMessageToStore({"message": {"payload": {"sequence": 4}}})


# -- config ---------------------------------------------------------------------------------------

APP_CONFIG = """\
devices:                      # the app's own section, next to flashlex:
  lamp: {{ip: 192.168.1.20}}
flashlex:
  app:
    socket: {{path: {socket}}}
"""


def test_an_apps_own_sections_are_warned_about_once_and_ignored(harness, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("FLASHLEXD_SOCKET", raising=False)
    path = tmp_path / "config.yml"
    path.write_text(APP_CONFIG.format(socket=harness.path))
    first = FlashlexSDK(str(path))
    FlashlexSDK(yaml.safe_load(path.read_text()))
    assert first.getSubscribedMessages() == [] and first.client.path == harness.path
    assert compat_warnings(caplog).count("devices: unknown top-level section, ignored") == 1
    first.close()


def test_the_config_an_app_names_beats_flashlexd_socket(harness, tmp_path, monkeypatch, caplog):
    """Two things on one device: $FLASHLEXD_SOCKET, exported for flashlexctl and the other
    thing, took an app given this thing's config to the other daemon (found by review)."""
    monkeypatch.setenv("FLASHLEXD_SOCKET", str(tmp_path / "other-thing.sock"))
    path = tmp_path / "config.yml"
    path.write_text(APP_CONFIG.format(socket=harness.path))
    assert FlashlexSDK(str(path)).client.path == harness.path
    assert "the config names socket" in caplog.text  # the daemon would take the variable (re-read)
    assert FlashlexSDK(str(path), socket_path=str(tmp_path / "x.sock"))._path == str(tmp_path / "x.sock")
    path.write_text("flashlex: {app: {}}\n")  # an old config names no socket: the variable's
    assert FlashlexSDK(str(path))._path == str(tmp_path / "other-thing.sock")


def test_run_and_check_warn_about_an_apps_own_sections_and_go_on(daemon_config, tmp_path):
    path = daemon_config
    path.write_text("devices:\n  lamp: {ip: 192.168.1.20}\n" + path.read_text())
    loaded = config_module.load(str(path))
    assert loaded.warnings == ("devices: unknown top-level section, ignored",)
    detail, _ = check.check_config(str(path), None, None)
    assert "warning: devices: unknown top-level section, ignored" in detail
    with pytest.raises(config_module.ConfigError, match=r"^flashlex\.cloud: unknown section"):
        config_module.parse({"flashlex": {"cloud": {}, "thing": {}}}, path)  # flashlex: stays strict


def test_a_key_file_where_the_old_sdk_looked_is_named_with_the_k_to_add(broker, tmp_path):
    tmp_path = tmp_path.resolve()
    install = tmp_path / "opt" / "flashlex"            # the old layout: DIR/app.py, DIR/keys/config.yml
    config = config_module.load(str(_old_layout(broker, tmp_path)))  # keys next to the config: fine
    assert config.thing.keys.root_ca.parent == install / "keys"
    for key in (install / "keys").glob("*.pem"):  # keys in DIR's parent: app.py's default
        key.rename(tmp_path / "opt" / key.name)
    with pytest.raises(config_module.ConfigError) as info:
        config_module.load(str(install / "keys" / "config.yml"))
    assert str(info.value) == (
        f"flashlex.thing.keys.rootCA: key file {install / 'keys' / 'root-ca-cert.pem'} is missing"
        f" (the FlashLex SDK's default keys dir {tmp_path / 'opt'} has it: add -k {tmp_path / 'opt'})")
    loaded = config_module.load(str(install / "keys" / "config.yml"), keys_dir=str(tmp_path / "opt"))
    assert loaded.thing.keys.root_ca == tmp_path / "opt" / "root-ca-cert.pem"


def _old_layout(broker, tmp_path: Path) -> Path:
    from tests.broker import write_config
    keys = tmp_path / "opt" / "flashlex" / "keys"
    written = write_config(keys, broker)
    return written.rename(keys / "config.yml")


def test_service_renders_an_explicit_keys_dir(tmp_path):
    unit = service.render_unit("/opt/fx/venv", "/opt/fx/keys/config.yml")
    assert "run --config /opt/fx/keys/config.yml --keys-dir /opt/fx/keys\n" in unit
    assert "--keys-dir /opt\n" in service.render_unit("/v", "/opt/fx/keys/config.yml", keys="/opt")


# -- the whole daemon: expiry of what compat leaves, a real stop and restart ----------------------

def _start(config: Path, workdir: Path) -> Daemon:
    daemon = Daemon(config, workdir).start()
    try:
        daemon.wait_api(15)
        with connect(str(daemon.socket_path)) as fx:
            wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 15, "ingress connected")
    except BaseException:
        daemon.stop()  # a daemon that never came up must not outlive the test
        raise
    return daemon


def _set_db(config: Path, **db) -> None:
    document = yaml.safe_load(config.read_text())
    document["flashlex"]["app"]["db"].update(db)
    config.write_text(yaml.safe_dump(document, sort_keys=False))


def test_non_json_messages_left_by_compat_expire(daemon_config, broker, tmp_path, caplog):
    _set_db(daemon_config, expireSeconds=1, sweepSeconds=0.2)
    daemon = _start(daemon_config, tmp_path)
    try:
        sdk = FlashlexSDK(socket_path=str(daemon.socket_path))
        publish(broker, INGRESS_TOPIC, b"hello plain text")
        publish(broker, INGRESS_TOPIC, COMMAND)
        with connect(str(daemon.socket_path)) as fx:
            wait_for(lambda: len(fx.messages()) == 2, 15, "both messages stored")
            assert [r["message"]["payload"] for r in sdk.getSubscribedMessages()] == [
                {"message": "on", "device": "lamp"}]
            assert any("is not JSON" in m and "until it expires at" in m for m in compat_warnings(caplog))
            wait_for(lambda: fx.messages() == [], 15, "expiry to remove both")
            assert fx.status()["counters"]["expired"] == 2
        sdk.close()
    finally:
        daemon.stop()


DOWN_APP = textwrap.dedent("""\
    import json, sys
    from flashlexd.client.compat import FlashlexSDK
    sdk = FlashlexSDK(sys.argv[1], timeout=2)  # once connected, a call waits this long for a restart

    def remove(pk):
        try:
            return sdk.removeMessageFromStore({"pk": pk})
        except KeyError:
            return "KeyError"

    for line in sys.stdin:                  # one round of calls per line from the test
        records = sdk.getSubscribedMessages()
        answer = [records, sdk.collectMessage({"n": 1}), [remove(r["pk"]) for r in records] or remove("1")]
        print(json.dumps(answer), flush=True)
    """)


def test_daemon_down_gives_the_old_answers_and_the_same_object_recovers(daemon_config, broker, tmp_path):
    daemon = _start(daemon_config, tmp_path)
    socket_path = str(daemon.socket_path)
    daemon.stop()
    app_config = tmp_path / "app.yml"
    app_config.write_text(APP_CONFIG.format(socket=socket_path))
    app = subprocess.Popen([sys.executable, "-c", DOWN_APP, str(app_config)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def step() -> list:
            app.stdin.write("go\n")
            app.stdin.flush()
            return json.loads(app.stdout.readline())
        assert step() == [[], 500, None]
        assert step() == [[], 500, None]
        daemon = _start(daemon_config, tmp_path)
        publish(broker, INGRESS_TOPIC, COMMAND)
        with connect(socket_path) as fx:
            wait_for(lambda: fx.messages(), 15, "the message stored")
        records, status, removed = step()
        assert [r["message"]["payload"] for r in records] == [{"message": "on", "device": "lamp"}]
        assert (status, removed) == (200, [None])
        daemon.stop()
        assert step() == [[], 500, None]
        app.stdin.close()
        assert app.wait(20) == 0
        stderr = app.stderr.read()
        assert stderr.count(OUTAGE) == 2, stderr  # one per outage, not one per call
        assert "waiting for it to come back" not in stderr  # the client's own: not a second line
        assert stderr.count("devices: unknown top-level section, ignored") == 1
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(10)
        daemon.stop()


def test_an_sdk_object_going_away_closes_its_connection(harness):
    """The old SDK's apps never call close(): its socket was left to the interpreter's exit, a
    ResourceWarning under `-X dev` (found by review)."""
    script = ("from flashlexd.client.compat import FlashlexSDK\n"
              f"sdk = FlashlexSDK(socket_path={harness.path!r})\n"
              "assert sdk.getSubscribedMessages() == []\n")
    done = subprocess.run([sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ResourceWarning" not in done.stderr, done.stderr
