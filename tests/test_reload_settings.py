"""What a reload (SIGHUP, `systemctl reload`) does with each kind of setting, on the real daemon
with real mosquitto, real workers and real signals: a changed setting takes effect as the
README's table says, and one the daemon cannot use is refused in one line, the running config
kept, READY=1 sent again. Found by review: each of these was broken before."""
from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path


import pytest

from flashlexd.client import DaemonNotRunning, RpcError, connect
from tests.broker import HOST, INGRESS_TOPIC, _Authority, publish, publish_lines, wait_for, write_lines
from tests.daemon import Daemon
from tests.test_supervisor import daemon, edit_config, notify  # noqa: F401 - fixtures
from tests.tmpfs import mounted_ext4, read_only

FAT32_FILE_LIMIT = 4 * 1024 ** 3 - 1  # bytes: a file on a FAT32 USB stick


def inbox(running: Daemon) -> list:
    with connect(str(running.socket_path)) as fx:
        return [m.payload for m in fx.messages(limit=1000)]


def reload(running: Daemon, notify) -> str:
    """SIGHUP, then the daemon's output once READY=1 came back (refused or applied)."""
    hup_at = time.monotonic()
    running.signal(signal.SIGHUP)
    notify.wait_for("READY=1", after=hup_at, timeout=15)
    return running.output()


def test_expire_seconds_set_by_a_reload_removes_the_messages_stored_before(daemon, notify, daemon_config,
                                                                         broker):
    """An operator whose store filled up (whenFull: reject) sets `expireSeconds` and reloads:
    the messages stored before, without an expiry, were stepped over for good."""
    notify.wait_for("READY=1", timeout=15)
    with connect(str(daemon.socket_path)) as fx:  # READY=1 is the workers up, not subscribed
        wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 20, "ingress subscribed")
    for i in range(3):
        publish(broker, INGRESS_TOPIC, f"old-{i}".encode())
    wait_for(lambda: len(inbox(daemon)) == 3, 15, "three stored messages")
    edit_config(daemon_config, lambda d: d["flashlex"]["app"]["db"].update(expireSeconds=1, sweepSeconds=0.2))
    assert "config reloaded" in reload(daemon, notify)
    wait_for(lambda: inbox(daemon) == [], 10, "the messages stored before, expired")


def _big_publish_small_budget(document) -> None:
    """Publishes of up to 1 MiB, and a read budget that held only 1 MiB + the inbound limit."""
    document["flashlex"]["thing"]["mqtt"]["maxPayloadBytes"] = 1048576
    document["flashlex"]["app"]["socket"]["maxBufferedBytes"] = 1048576 + 262144


def test_a_read_budget_smaller_than_a_publish_is_refused_on_reload(daemon, notify, daemon_config):
    """It passed the config's check (against the inbound limit only): a traceback at start
    (test_config), and on a reload a failing loop pass and no READY=1 after RELOADING=1."""
    notify.wait_for("READY=1", timeout=15)
    before = daemon.children()
    edit_config(daemon_config, _big_publish_small_budget)
    output = reload(daemon, notify)
    assert "reload refused" in output and "maxBufferedBytes" in output and "Traceback" not in output, output[-2000:]
    assert daemon.children() == before


def test_a_root_ca_rotated_in_place_is_used_after_a_reload(daemon, notify, daemon_config, broker, tmp_path):
    """The broker moves to a certificate of a new CA (as AWS IoT did); the operator writes the
    new CA into the same rootCA file and reloads: the reload checked the files but restarted no
    worker (same paths), so both links kept the old CA and never connected again."""
    notify.wait_for("READY=1", timeout=15)
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: all(fx.status()["mqtt"][link].get("connected") for link in ("ingress", "egress")),
                 20, "both links up")
    new_ca = _Authority("new-root-ca")
    new_server = new_ca.issue(tmp_path, "new-server", "localhost", ("localhost", HOST))
    new_ca.write(daemon_config.parent / "root-ca-cert.pem")  # rotated in place, same name
    assert "config reloaded" in reload(daemon, notify)
    broker.stop()
    broker.server = new_server  # the broker's side of the rotation
    broker.start()
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: all(fx.status()["mqtt"][link].get("connected") for link in ("ingress", "egress")),
                 30, "both links back, on the new CA")


def test_key_files_renewed_in_place_are_used_at_the_next_reconnect_without_a_reload(
        daemon, notify, daemon_config, broker, tmp_path):
    """A renewal written over the same files (here the CA, as the broker moves to a new one)
    was used only after a reload or a worker's restart: every reconnect until then offered the
    old credentials, and the line blamed the new file (found by review)."""
    notify.wait_for("READY=1", timeout=15)
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: all(fx.status()["mqtt"][link].get("connected") for link in ("ingress", "egress")),
                 20, "both links up")
    before = daemon.children()
    root_ca = daemon_config.parent / "root-ca-cert.pem"
    old_ca = root_ca.read_bytes()
    root_ca.write_text("not a certificate\n")  # a renewal half copied: kept out, the link goes on
    broker.stop()
    broker.start()
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: all(fx.status()["mqtt"][link].get("connected") for link in ("ingress", "egress")),
                 30, "both links back on the credentials loaded before")
    assert daemon.output().count("the key files changed, but flashlex.thing.keys.rootCA: cannot load") == 2
    new_ca = _Authority("new-root-ca")
    new_server = new_ca.issue(tmp_path, "new-server", "localhost", ("localhost", HOST))
    new_ca.write(root_ca)  # the renewal done: no reload follows
    assert root_ca.read_bytes() != old_ca
    broker.stop()
    broker.server = new_server
    broker.start()
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: all(fx.status()["mqtt"][link].get("connected") for link in ("ingress", "egress")),
                 30, "both links back, on the new CA, without a reload")
    assert daemon.children() == before  # no worker restarted for it
    assert daemon.output().count("the key files changed: connecting with them from now on") == 2


def test_a_key_gone_from_the_file_since_the_running_config_is_named_by_the_reload(
        daemon, notify, daemon_config):
    """A file saved half-written that was still valid YAML was applied without a word: its
    `port` cut off fell back to 8883 and both links went down (found by review). Applied still
    (removing a key asks for its default), but each key gone is named, with what applies now;
    not a key a command-line option sets, nor one set now by its other name (found by re-read)."""
    notify.wait_for("READY=1", timeout=15)
    def cut(document) -> None:
        mqtt = document["flashlex"]["thing"]["mqtt"]
        mqtt.pop("port")  # cut off
        mqtt["keepAliveSeconds"] = mqtt.pop("keepalive")  # renamed: still set
        document["flashlex"]["app"]["socket"].pop("path")  # `--socket` still sets it
    edit_config(daemon_config, cut)
    output = reload(daemon, notify)
    assert "config reloaded" in output
    note = (f"flashlex.thing.mqtt.port: gone from {daemon_config} since the running config, so its"
            f" default (8883) applies now (was the file saved whole?)")
    assert output.count(note) == 1, output[-3000:]
    with connect(str(daemon.socket_path)) as fx:
        assert fx.status()["reload"]["notes"] == [note]


def fat32() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FAT32_FILE_LIMIT, FAT32_FILE_LIMIT))


def test_a_store_cap_the_file_system_cannot_hold_is_one_line_at_start_and_refused_on_reload(
        daemon_config, tmp_path, notify):
    """data.mdb is extended to its map (the cap and headroom) at open: on a FAT32 stick
    (simulated with RLIMIT_FSIZE: the same EFBIG) a 4 GiB cap was a traceback at start, and on
    a reload left the supervisor with its store closed (every call failing, no READY=1)."""
    running = Daemon(daemon_config, tmp_path, preexec=fat32, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    try:
        notify.wait_for("READY=1", timeout=15)
        edit_config(daemon_config, lambda d: d["flashlex"]["app"]["db"].update(capMegabytes=4096))
        output = reload(running, notify)
        assert "reload refused" in output and "lower capMegabytes" in output, output[-2000:]
        with connect(str(running.socket_path)) as fx:
            status = fx.status()
        assert status["counters"]["loop_errors"] == 0 and status["store"]["cap_bytes"] < 4096 << 20
    finally:
        running.stop()
    again = Daemon(daemon_config, tmp_path, preexec=fat32).start()
    try:
        assert again.wait_exit(timeout=30) in (1, 2)
    finally:
        again.stop()
    assert "capMegabytes" in again.output() and "Traceback" not in again.output(), again.output()[-1500:]


def test_an_invalid_topic_filter_on_a_reload_is_refused(daemon, notify, daemon_config):
    """`sensors/#/x` (# only last) passed the config: paho's SUBSCRIBE raised in the ingress at
    each start, a crash loop that stopped the daemon (exit 1), from a reload too."""
    notify.wait_for("READY=1", timeout=15)
    before = daemon.children()
    edit_config(daemon_config, lambda d: d["flashlex"]["thing"]["mqtt"].update(subscriptions=["sensors/#/x"]))
    output = reload(daemon, notify)
    assert "reload refused" in output and "subscriptions[0]" in output, output[-2000:]
    assert daemon.children() == before and daemon.proc.poll() is None


def test_what_was_queued_online_keeps_its_rate_across_an_egress_restart(daemon, notify, daemon_config):
    """`drainingFrequency` paces what was queued while the link was down; what is queued while
    it is up goes at publishRatePerSecond. A reload that restarts the egress made the rest of a
    burst queued online a backlog, drained at 2/s: minutes instead of seconds."""
    notify.wait_for("READY=1", timeout=15)
    edit_config(daemon_config, lambda d: d["flashlex"]["thing"]["mqtt"].update(
        drainingFrequency=2, publishRatePerSecond=40))
    reload(daemon, notify)
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: fx.status()["mqtt"]["egress"].get("connected"), 20, "egress up")
        for i in range(300):  # a burst, queued while the link is up (a loaded CI machine's
            fx.publish(f"burst {i}".encode())  # API took 15 s for 1,500: the rate stays below)
        backlog = fx.status()["outbox"]["count"]
        assert backlog > 100, backlog  # still draining, at 40/s
        edit_config(daemon_config, lambda d: d["flashlex"]["thing"]["mqtt"].update(keepAliveSeconds=45))
        assert "config reloaded" in reload(daemon, notify)
        # at 40/s what is left takes < 8 s (and the egress restart); at 2/s, minutes
        wait_for(lambda: fx.status()["outbox"]["count"] == 0, 40,
                 f"the {backlog} entries queued online to drain at publishRatePerSecond")


def _calls_until_gone(fx, deadline: float) -> list:
    """The answers (or errors) of `messages` called back to back until the daemon has gone."""
    answers = []
    while time.monotonic() < deadline:
        try:
            fx.messages()
            answers.append("ok")
        except DaemonNotRunning:  # the connection lost, or the socket gone
            break
        except RpcError as exc:
            answers.append(str(exc))
    return answers


def test_a_store_setting_reloaded_on_a_disk_gone_read_only_stops_the_daemon(daemon_config, tmp_path, notify):
    """An SD card that starts failing makes ext4 remount the data dir read-only (errors=remount-ro,
    Raspberry Pi OS's default for its root). A reload changing a store setting then closed the
    store and could open neither the new one nor the running one again: the supervisor went on
    with its store closed (a traceback a second, every call `internal`, no READY=1 so
    `systemctl reload` hung) and never exited, so systemd never restarted it. It now says so in
    one line and stops, exit 1. Real ext4 on a loop device, a real error remount. Found by review."""
    with mounted_ext4(tmp_path / "sd") as device:
        edit_config(daemon_config, lambda d: d["flashlex"]["app"]["db"].update(dataPath=str(tmp_path / "sd" / "data")))
        running = Daemon(daemon_config, tmp_path / "run", env={"NOTIFY_SOCKET": str(notify.path)}).start()
        try:
            notify.wait_for("READY=1", timeout=15)
            Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("1")  # the kernel remounts it ro
            wait_for(lambda: read_only(tmp_path / "sd"), 10, "the remount read-only")
            edit_config(daemon_config, lambda d: d["flashlex"]["app"]["db"].update(expireSeconds=3600))
            # its calls wait for a daemon gone up to their timeout (10 s by default), then raise
            with connect(str(running.socket_path), timeout=5) as fx:
                hup_at = time.monotonic()
                running.signal(signal.SIGHUP)
                answers = _calls_until_gone(fx, deadline=hup_at + 20)
            assert running.wait_exit(timeout=30) == 1
        finally:
            running.stop()
    output = running.output()
    assert "nor again with the running ones" in output and "Traceback" not in output, output[-3000:]
    # until it exits, an app's call is told the store is gone (it was `internal`, a traceback
    # logged: the API worked on the closed store; found by review)
    assert not [a for a in answers if "internal" in a], sorted(set(answers))
    assert any("store_error: the store is closed, the daemon is stopping" in a for a in answers), sorted(set(answers))
    assert not any(field == "READY=1" and at >= hup_at for at, field in notify.lines())
    assert "still running the previous config" not in output


def test_a_full_store_cured_by_a_reload_logs_its_end(daemon, notify, daemon_config, broker, tmp_path):
    """Found by re-read: a store full under `reject`, its cap raised by a reload (ingress
    restarted), stored everything, but the log's last word on it stayed the old ingress's
    "store full": the new one, never refused, had no refusal to end."""
    notify.wait_for("READY=1", timeout=15)
    edit_config(daemon_config, lambda d: d["flashlex"]["app"]["db"].update(capMegabytes=1, whenFull="reject"))
    assert "config reloaded" in reload(daemon, notify)
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 20, "ingress subscribed")
        # one mosquitto_pub for the 40 (40 runs of it took ~2.5 s, a TLS handshake each)
        write_lines(tmp_path / "big-lines", 40, width=60_000)
        assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "big-lines").wait(20) == 0
        wait_for(lambda: "store full" in daemon.output(), 20, "the store full")
        # `systemctl status` said all was well meanwhile (review "rocard")
        wait_for(lambda: any(f.startswith("STATUS=") and "; ingress not storing, the broker keeps the messages (store"
                             in f for _, f in notify.lines()), 10, "STATUS= saying the ingress is not storing")
        edit_config(daemon_config, lambda d: d["flashlex"]["app"]["db"].update(capMegabytes=16))
        assert "config reloaded" in reload(daemon, notify)
        wait_for(lambda: fx.status()["inbox"]["count"] == 40, 30, "all 40 stored")
    wait_for(lambda: "store accepts messages again" in daemon.output(), 10, "the end of the refusal logged")


def test_a_cap_lowered_under_what_the_store_holds_is_named_by_the_reload(daemon, notify, daemon_config, broker,
                                                                          tmp_path):
    """It was taken without a word, and under `dropOldest` the next message dropped 2,281 of
    3,000 unread messages (review "reload")."""
    notify.wait_for("READY=1", timeout=15)
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 20, "ingress subscribed")
        write_lines(tmp_path / "big-lines", 40, width=60_000)  # 2.4 MB
        assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "big-lines").wait(20) == 0
        wait_for(lambda: fx.status()["inbox"]["count"] == 40, 30, "all 40 stored")
    edit_config(daemon_config, lambda d: d["flashlex"]["app"]["db"].update(capMegabytes=1, whenFull="dropOldest"))
    output = reload(daemon, notify)
    assert "config reloaded" in output
    assert "over the new capMegabytes (1 MiB): the oldest inbox messages, read or not (about " in output, output[-3000:]
    assert "of the 40 there), are dropped to make room at the next message" in output


def test_a_start_on_a_disk_gone_read_only_is_one_line_naming_the_way_out(daemon_config, tmp_path,
                                                                                      broker, notify):
    """A restart after ext4 remounted the card read-only said only `cannot open lock file ...:
    Read-only file system`, and the stored messages looked lost (review "rocard"). The line names
    the cause and `store recover`, which reads a read-only store. Exit 1, tried again every 2 s:
    a disk mounted late looks the same at first (re-read 31)."""
    with mounted_ext4(tmp_path / "sd") as device:
        data_dir = tmp_path / "sd" / "data"
        edit_config(daemon_config, lambda d: d["flashlex"]["app"]["db"].update(dataPath=str(data_dir)))
        running = Daemon(daemon_config, tmp_path / "run", env={"NOTIFY_SOCKET": str(notify.path)}).start()
        try:
            notify.wait_for("READY=1", timeout=15)
            with connect(str(running.socket_path)) as fx:
                wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 20, "ingress subscribed")
            publish(broker, INGRESS_TOPIC, b"kept")
            wait_for(lambda: inbox(running) == [b"kept"], 15, "the message stored")
            Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("1")
            wait_for(lambda: read_only(tmp_path / "sd"), 10, "the remount read-only")
            with connect(str(running.socket_path)) as fx, pytest.raises(RpcError) as refused:
                fx.publish(b"out")  # told what it is, not LMDB's words alone
            assert "the disk is read-only (mdb_txn_commit: Read-only file system; the kernel remounts" \
                in refused.value.message, refused.value.message
        finally:
            running.stop()
        again = Daemon(daemon_config, tmp_path / "again").start()
        try:
            assert again.wait_exit(timeout=30) == 1
        finally:
            again.stop()
        assert f"the disk under data dir {data_dir} is read-only" in again.output(), again.output()[-2000:]
        recovered = subprocess.run([sys.executable, "-m", "flashlexd", "store", "recover", "--data-dir",
                                    str(data_dir), "--to", str(tmp_path / "copy")], capture_output=True, text=True)
        assert recovered.returncode == 0 and "inbox: copied 1, lost 0" in recovered.stdout, recovered
