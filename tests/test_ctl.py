"""flashlexctl against a real server: output, --json, exit codes, tail."""
import base64
import contextlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from flashlexd.client import __version__, ctl, ctlview
from flashlexd.client.wire import HEADER
from tests.daemon import default_sigint

try:
    from test_ipc_server import Harness, harness, run_as_nobody, until, world_dir  # noqa: F401
except ImportError:  # tests run as a package
    from tests.test_ipc_server import Harness, harness, run_as_nobody, until, world_dir  # noqa: F401

CTL = [sys.executable, "-m", "flashlexd.client.ctl"]


def run(harness, capsys, *argv):
    code = ctl.main(["--socket", harness.path, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_healthy(harness, capsys):
    harness.ingest(("t", b"1"), ("t", b"2"))
    code, out, err = run(harness, capsys, "status")
    assert code == 0 and err == ""
    assert out.startswith("flashlexd 0.1.0, up 12s, healthy")
    assert "WORKER   PID  STATE  RESTARTS  HEARTBEAT" in out
    assert "ingress  100  ready         0  0.2s ago" in out
    assert "inbox     2 messages, oldest" in out and "ago" in out
    assert "of 64.0 MiB" in out and "mqtt egress   connected" in out


@pytest.mark.parametrize("change, reason", [
    (lambda h: h.mqtt["egress"].update(connected=False), "egress MQTT is not connected"),
    (lambda h: h.mqtt["egress"].update(connected=False, error="cannot resolve nosuchhost.invalid"),
     "egress MQTT is not connected: cannot resolve nosuchhost.invalid"),  # why, not only that (review "reload")
    (lambda h: h.workers[2].update(state="backoff"), "worker expiry is backoff"),
    (lambda h: h.mqtt["ingress"].update(error="broker refused the subscription to x/#"),
     "ingress MQTT: broker refused the subscription to x/#"),
    (lambda h: h.reload.update(done=1, refused="flashlex.thing.mqtt.port: expected an integer"),
     "the last reload was refused, the previous config runs: flashlex.thing.mqtt.port: expected an integer"),
    (lambda h: h.mqtt["egress"].update(stalled_entry=7),  # RabbitMQ past its max_message_size
     "the broker does not acknowledge outbox entry 7, and the outbox waits behind it (see the log;"
     " flashlexctl outbox drop 7 gives it up)"),
])
def test_status_degraded_exits_1(harness, capsys, change, reason):
    change(harness)
    code, out, _ = run(harness, capsys, "status")
    assert code == 1 and f"degraded: {reason}" in out.splitlines()[0]


def test_status_shows_what_the_last_reload_applied_only_in_part(harness, capsys):
    """A reload's notes (a socket change waiting for a restart, a new client id) reached only
    `flashlexd reload` and the journal: `systemctl reload` users never saw them (found by review)."""
    note = "API socket path, group or allowUids changed: they take effect at the next restart"
    harness.reload.update(done=1, notes=[note])
    code, out, _ = run(harness, capsys, "status")
    assert code == 0 and f"reload    {note}" in out.splitlines()


@pytest.mark.parametrize("argv", [("status",), ("--json", "status")])
@pytest.mark.parametrize("connected, code", [(True, 0), (False, 1)])
def test_status_into_a_reader_that_went_keeps_its_exit_code(harness, argv, connected, code):
    """`flashlexctl status | true` exited 0 although status alone exited 1 (degraded): the
    reader gone turned every exit code into 0 (found by review)."""
    harness.mqtt["egress"].update(connected=connected)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        done = subprocess.run(CTL + ["--socket", harness.path, *argv], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write_end)
    assert done.returncode == code and done.stderr == "", done.stderr


def test_status_json_is_the_api_answer(harness, capsys):
    code, out, _ = run(harness, capsys, "--json", "status")
    status = json.loads(out)
    assert code == 0 and status["inbox"]["count"] == 0 and status["workers"][0]["name"] == "ingress"
    assert status["health"] == []


def test_status_json_says_why_it_is_degraded(harness, capsys):
    """A monitoring script reading `status --json` had the exit code but not the reasons: it
    had to copy flashlexctl's rules to say why (found by review)."""
    harness.mqtt["egress"].update(connected=False)
    code, out, _ = run(harness, capsys, "status", "--json")
    assert code == 1 and json.loads(out)["health"] == ["egress MQTT is not connected"], out


def test_not_running_is_one_line_and_exit_2(tmp_path):
    missing = str(tmp_path / "gone.sock")
    for argv in (["status"], ["messages"], ["tail"]):
        done = subprocess.run(CTL + ["--socket", missing, *argv], capture_output=True, text=True)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and missing in done.stderr and "Traceback" not in done.stderr


def test_an_empty_socket_path_is_a_usage_error_not_the_default_daemon(harness):
    """`flashlexctl --socket "$SOCK" purge --yes` with SOCK unset purged the daemon of
    $FLASHLEXD_SOCKET (or the default one): an empty --socket counted as none (found by review)."""
    harness.ingest(("t", b"1"))
    done = subprocess.run(CTL + ["--socket", "", "purge", "--yes"], capture_output=True, text=True,
                          env={**os.environ, "FLASHLEXD_SOCKET": harness.path}, timeout=30)
    assert done.returncode == 2 and "--socket: an empty path" in done.stderr, done.stderr
    emptied = subprocess.run(CTL + ["purge", "--yes"], capture_output=True, text=True,
                             env={**os.environ, "FLASHLEXD_SOCKET": ""}, timeout=30)
    assert emptied.returncode == 2 and "$FLASHLEXD_SOCKET is set but empty" in emptied.stderr, emptied.stderr
    assert len(harness.store.messages()) == 1


def _ctl_as_nobody(path, command):
    """flashlexctl's exit code and stderr as uid 65534: ctl.main in a forked child, since the
    venv's python (under /root) is closed to nobody."""
    def attempt() -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = ctl.main(["--socket", path, command])
        return f"{code} {err.getvalue()}"
    return run_as_nobody(attempt).split(" ", 1)


@pytest.mark.parametrize("mode, said", [
    (0o660, "flashlexctl: permission denied on "),  # the socket's mode shuts the user out
    (0o666, "flashlexctl: forbidden: uid 65534 may not use flashlexd"),  # the peer check does
])
def test_a_user_refused_by_the_socket_or_by_the_daemon_exits_2_in_one_line(world_dir, mode, said):
    """Refused by the socket's mode it exited 2, refused by allowUids 1 (found by review)."""
    h = Harness(world_dir, path=str(world_dir / "api.sock"), mode=mode, allow_uids=()).start()
    try:
        for command in ("status", "messages"):
            code, err = _ctl_as_nobody(h.path, command)
            assert code == "2" and err.count("\n") == 1 and err.startswith(said), (code, err)
    finally:
        h.stop()


def test_messages_table_and_json(harness, capsys):
    harness.ingest(("sensors/a", b'{"t": 1}'), ("sensors/b", b"\xff\xfe"))
    code, out, _ = run(harness, capsys, "messages")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["PK", "AGE", "TOPIC", "QOS", "BYTES", "PAYLOAD"]
    assert "sensors/a" in lines[1] and '{"t": 1}' in lines[1] and "ago" in lines[1]
    assert "<2 bytes binary>" in lines[2]
    code, out, _ = run(harness, capsys, "--json", "messages", "--topic", "sensors/+")
    records = json.loads(out)
    assert records[0]["payload"] == '{"t": 1}'
    assert base64.b64decode(records[1]["payload"]["$base64"]) == b"\xff\xfe"


def test_messages_empty(harness, capsys):
    assert run(harness, capsys, "messages")[1] == "no messages\n"


def test_ack(harness, capsys):
    ids = harness.ingest(("t", b"1"))
    code, out, _ = run(harness, capsys, "ack", str(ids[0]), "999")
    assert code == 0 and out == "acknowledged 1 of 2 (1 already gone)\n"
    harness.store.consumer_register("display", time.time())  # a consumer's ack: not only "gone"
    code, out, _ = run(harness, capsys, "ack", "--consumer", "display", "999")
    assert code == 0 and out == "acknowledged 0 of 1 (1 already acknowledged by display, gone or outside its topics)\n"


def test_publish_argument_and_stdin(harness, capsys, monkeypatch):
    code, out, _ = run(harness, capsys, "publish", '{"on": true}')
    assert code == 0 and out == "queued as outbox entry 1 (12 bytes)\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xffbinary")))
    code, out, _ = run(harness, capsys, "--json", "publish", "--topic", "x/y", "--qos", "0", "-")
    assert json.loads(out) == {"id": 2}
    code, out, _ = run(harness, capsys, "outbox")
    lines = out.splitlines()
    assert lines[0].startswith("2 queued, oldest") and lines[1].split()[0] == "ID"
    assert "x/y" in lines[3] and "<7 bytes binary>" in lines[3]


def test_purge_needs_yes(harness, capsys):
    harness.ingest(("t", b"1"), ("t", b"2"))
    code, _, err = run(harness, capsys, "purge")
    assert code == 2 and "--yes" in err
    assert run(harness, capsys, "purge", "--yes")[:2] == (0, "purged 2 messages\n")


def test_refused_call_exits_1_with_the_reason(harness, capsys):
    code, out, err = run(harness, capsys, "messages", "--limit", "5000")
    assert code == 1 and out == "" and err.startswith("flashlexctl: bad_params: messages: param 'limit'")


def test_version_and_help():
    done = subprocess.run(CTL + ["--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"flashlexctl {__version__} (protocol 1)"
    done = subprocess.run(CTL + ["--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "$base64" in done.stdout and "tail" in done.stdout


def _read_line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output from flashlexctl tail"
    return proc.stdout.readline()


@pytest.mark.parametrize("extra", [[], ["--json", "tail", "--all", "--ack"]])
def test_tail_follows_until_ctrl_c(harness, extra):
    harness.ingest(("old", b"backlog"))
    argv = extra or ["tail"]
    proc = subprocess.Popen(CTL + ["--socket", harness.path, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=default_sigint)
    try:
        if extra:  # --all: the backlog first; --ack removes it once printed
            assert json.loads(_read_line(proc))["payload"] == "backlog"
        until(lambda: harness.call(lambda: harness.server.parked_count) == 1, timeout=10, what="tail waiting")
        harness.ingest(("live/1", b"fresh"))
        line = _read_line(proc)
        assert ("live/1" in line and "fresh" in line) if not extra else json.loads(line)["topic"] == "live/1"
        if extra:
            until(lambda: harness.call(harness.store.inbox_count) == 0, what="tail --ack")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_tail_follows_on_across_a_restart_of_the_daemon(tmp_path):
    """Found by review: `flashlexctl tail` ended with "closed the connection" when the daemon
    restarted; it says it waits, and prints what the restarted daemon stores."""
    first = Harness(tmp_path).start()
    proc = subprocess.Popen(CTL + ["--socket", first.path, "tail"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    again = None
    try:
        until(lambda: first.call(lambda: first.server.parked_count) == 1, timeout=10, what="tail waiting")
        first.stop()
        ready, _, _ = select.select([proc.stderr], [], [], 10)
        assert ready and "waiting for it to come back" in proc.stderr.readline()
        again = Harness(tmp_path, path=first.path).start()
        again.ingest(("live/2", b"after the restart"))
        line = _read_line(proc)
        assert "live/2" in line and "after the restart" in line
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if again is not None:
            again.stop()


def test_idle_tail_asks_again_within_seconds(harness):
    """Python runs a SIGINT's handler only once a blocking poll returns, so a Ctrl-C landing
    just before the tail's wait began was seen only when that wait ended (seconds later in CI):
    the idle tail's waits must be short."""
    proc = subprocess.Popen(CTL + ["--socket", harness.path, "tail"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        until(lambda: harness.call(lambda: harness.server.parked_count) == 1, timeout=10, what="tail waiting")
        asked = harness.call(lambda: harness.server.counters["requests"])
        until(lambda: harness.call(lambda: harness.server.counters["requests"]) > asked, timeout=5,
              what="the idle tail asking again")
    finally:
        proc.kill()
        proc.wait()


def test_formatting_helpers():
    assert ctlview.duration(3.25) == "3.2s" and ctlview.duration(3725) == "1h 2m" and ctlview.duration(90061) == "1d 1h"
    assert ctlview.ago(65) == "1m 5s ago" and ctlview.ago(None) == "-"
    assert ctlview.human_bytes(1536) == "1.5 KiB" and ctlview.human_bytes(10) == "10 B"
    assert ctlview.preview(b"a\nb") == "a\\x0ab" and ctlview.preview(b"x" * 100, 10) == "xxxxxxx..."
    assert ctlview.table(("A", "LONG"), [(1, "x"), (22, "y")], right=(0,)).splitlines() == \
        [" A  LONG", " 1  x", "22  y"]
    assert ctlview.jsonable({"p": b"ok", "q": [b"\xff"]}) == {"p": "ok", "q": [{"$base64": "/w=="}]}


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_bad_timeout_is_a_usage_error_not_a_traceback(harness, value):
    done = subprocess.run(CTL + ["--socket", harness.path, "--timeout", value, "status"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"argument --timeout: must be a positive number of seconds, got '{value}'" in done.stderr


@pytest.mark.parametrize("argv", [("outbox", "drop", "99999999999999999999999"),
                                  ("outbox", "drop", "--dead", "18446744073709551616"),
                                  ("outbox", "retry", "0"), ("outbox", "retry", "x")])
def test_an_outbox_id_out_of_range_is_a_usage_error_not_a_traceback(harness, argv):
    """Past 64 bits msgpack raised OverflowError out of flashlexctl."""
    done = subprocess.run(CTL + ["--socket", harness.path, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"must be an id from 1 to {2 ** 63 - 1}, got '{argv[-1]}'" in done.stderr


@pytest.mark.parametrize("argv, which", [(("outbox", "retry"), "neither was given"),
                                         (("outbox", "retry", "--all", "3"), "not both")])
def test_outbox_retry_says_what_it_was_not_given(harness, capsys, argv, which):
    """Found by review: with neither ids nor --all it said "(not both)"."""
    code, _, err = run(harness, capsys, *argv)
    assert code == 2 and err == f"flashlexctl: outbox retry takes dead letter ids or --all ({which})\n"


def test_publish_to_an_empty_topic_is_refused_not_sent_to_the_default_one(harness, capsys):
    """A script's unset $TOPIC (`--topic ""`) published to the configured egress topic."""
    code, out, err = run(harness, capsys, "publish", "--topic", "", "x")
    assert code == 1 and "is empty" in err
    assert json.loads(run(harness, capsys, "--json", "outbox")[1])["count"] == 0


@pytest.mark.parametrize("argv", [("messages", "--limit", "99999999999999999999999"),
                                  ("outbox", "--limit", "99999999999999999999999"),
                                  ("consumers", "reset", "display", "--to", "99999999999999999999999")])
def test_a_number_past_64_bits_is_one_line_not_a_traceback(harness, argv):
    """msgpack's OverflowError came out of flashlexctl for these too (found by review)."""
    harness.store.consumer_register("display", time.time())
    done = subprocess.run(CTL + ["--socket", harness.path, *argv], capture_output=True, text=True, timeout=30)
    assert "Traceback" not in done.stderr and done.returncode in (1, 2), done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("flashlexctl"), done.stderr


def test_tail_ack_into_a_reader_that_left_acks_only_what_it_printed(harness):
    """`flashlexctl tail --all --ack | head -1` (take one message): tail printed the batch into the
    pipe's buffer, head read one line and left, and tail acked the whole batch: messages removed
    from the inbox that nobody saw (found by review)."""
    harness.ingest(*[("t", b"%d" % n) for n in range(10)])
    argv = " ".join(CTL + ["--socket", harness.path, "tail", "--all", "--ack"])
    done = subprocess.run(f"timeout 10 {argv} | head -1", shell=True, capture_output=True, text=True,
                          timeout=30)  # timeout: the unfixed tail also waited for more (the next test)
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr, done
    left = harness.call(harness.store.inbox_count)
    assert left >= 5, f"{10 - left} messages acked, 1 shown"  # head reads lines it does not show


def test_tail_into_head_ends_once_head_has_its_line(harness):
    """`msg=$(flashlexctl tail | head -1)`: head got its line and left, but tail noticed only at
    its next write, so the pipeline (and the script) waited for a second message (found by review)."""
    argv = " ".join(CTL + ["--socket", harness.path, "tail"])
    proc = subprocess.Popen(f"{argv} | head -1", shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        until(lambda: harness.call(lambda: harness.server.parked_count) == 1, timeout=10, what="tail waiting")
        harness.ingest(("live/1", b"one"))
        out, err = proc.communicate(timeout=10)  # was: until the next message
    finally:
        proc.kill()
        proc.wait()
    assert b"one" in out and b"Traceback" not in err, err


@pytest.mark.parametrize("argv", ["messages", "tail --all | head -1"])
def test_text_the_locale_cannot_encode_is_escaped_not_a_traceback(harness, argv):
    """A device whose locale is not UTF-8 (en_US.ISO-8859-1, or PYTHONIOENCODING as here): a
    payload with a printable character outside it (the euro sign) raised UnicodeEncodeError out
    of print() as a traceback, and `tail` stopped (found by review)."""
    harness.ingest(("t", "price 5\u20ac".encode()))
    command = " ".join(CTL + ["--socket", harness.path]) + " " + argv
    done = subprocess.run(command, shell=True, capture_output=True, timeout=30,
                          env={**os.environ, "PYTHONIOENCODING": "latin-1"})
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert b"price 5\\u20ac" in done.stdout, done.stdout


@pytest.mark.parametrize("argv", [("status",), ("--json", "status"), ("messages",), ("consumers",)])
def test_output_to_a_full_disk_is_one_line_not_a_traceback(harness, argv):
    """`flashlexctl --json status > /var/tmp/status.json` on a device whose disk is full (the
    very moment an operator looks): OSError ENOSPC came out as a traceback (found by review)."""
    harness.ingest(("t", b"1"))
    with open("/dev/full", "w") as full:
        done = subprocess.run(CTL + ["--socket", harness.path, *argv], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=30)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1 and done.stderr == "flashlexctl: cannot write the output: No space left on device\n"


def test_a_publish_that_timed_out_says_it_may_have_been_queued(harness):
    """A supervisor stalled past --timeout (on a device a slow SD card commit) still reads the
    request and queues the entry once it runs again, but flashlexctl said only "did not answer
    publish within 1s": the operator published again and the cloud got it twice (found by review)."""
    resume = threading.Event()
    stalled = threading.Thread(target=harness.call, args=(lambda: resume.wait(30),))
    stalled.start()
    try:
        done = subprocess.run(CTL + ["--socket", harness.path, "--timeout", "1", "publish", "hello"],
                              capture_output=True, text=True, timeout=30)
    finally:
        resume.set()
        stalled.join()
    until(lambda: harness.call(lambda: harness.methods.handle("outbox", {})["count"]) == 1, timeout=10,
          what="the publish queued after all")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "may have been queued" in done.stderr and "flashlexctl outbox" in done.stderr, done.stderr


def test_a_change_whose_read_timed_out_says_nothing_was_changed(harness):
    """`flashlexctl --timeout 1 outbox retry --all` against a stalled daemon said "it may have
    been carried out", though only its listing of the dead letters went unanswered and nothing
    could have been retried (found by review)."""
    resume = threading.Event()
    stalled = threading.Thread(target=harness.call, args=(lambda: resume.wait(30),))
    stalled.start()
    try:
        done = subprocess.run(CTL + ["--socket", harness.path, "--timeout", "1", "outbox", "retry", "--all"],
                              capture_output=True, text=True, timeout=30)
    finally:
        resume.set()
        stalled.join()
    assert done.returncode == 1 and done.stderr == (
        "flashlexctl: flashlexd did not answer outbox within 1s; only a read was under way: nothing"
        " was changed, run it again\n"), done.stderr


def test_publish_from_a_closed_stdin_is_one_line_not_a_traceback(harness):
    """`flashlexctl publish -` from `ssh host flashlexctl publish - <&-` or a cron job without
    stdin: sys.stdin is None and `sys.stdin.buffer` raised AttributeError as a traceback (found
    by review)."""
    done = subprocess.run(CTL + ["--socket", harness.path, "publish", "-"], stdin=None, capture_output=True,
                          text=True, timeout=30, preexec_fn=lambda: os.close(0))
    assert done.returncode == 2 and done.stderr == \
        "flashlexctl: publish -: stdin is closed (give the payload as an argument)\n", done.stderr
    assert harness.call(lambda: harness.methods.handle("outbox", {})["count"]) == 0


@pytest.mark.parametrize("argv", [("messages", "--consumer", "dispaly"), ("ack", "--consumer", "dispaly", "1")])
def test_a_mistyped_consumer_name_is_refused_not_registered(harness, capsys, argv):
    """`flashlexctl messages --consumer NAME` is a peek, but the API registers any name it is
    given: a typo left a dynamic consumer of every topic holding every stored message for
    consumerIdleDays (7 days), as `consumers reset` already refused to do (found by review)."""
    harness.store.consumer_register("display", time.time())
    harness.ingest(("t", b"1"))
    code, out, err = run(harness, capsys, *argv)
    assert [c["name"] for c in harness.methods.handle("consumers", {})] == ["display"]
    assert code == 1 and out == "" and err == \
        "flashlexctl: no consumer named 'dispaly' (there are: display): see flashlexctl consumers\n"


def test_status_shows_a_consumer_backlog_that_is_a_lower_bound_as_one(harness, capsys):
    """`status` counts at most REPORT_BUDGET stored messages for the consumers' backlogs (README):
    past it `flashlexctl consumers` showed `>=500`, but the status page said `backlog 500` for a
    consumer 600 behind (found by review)."""
    from flashlexd.storeconsumers import REPORT_BUDGET
    harness.store.consumer_register("display", time.time())
    harness.ingest(*[("t", b"x")] * (REPORT_BUDGET + 100))
    code, out, _ = run(harness, capsys, "status")
    assert f"consumers display backlog >={REPORT_BUDGET} dropped 0" in out.splitlines(), out
    code, out, _ = run(harness, capsys, "consumers")
    assert out.splitlines()[1].split()[:3] == ["display", "#", f">={REPORT_BUDGET}"], out


@pytest.fixture
def cut_off(tmp_path):
    """A socket path where each connection's request is read whole and closed unanswered, as
    a daemon killed while carrying it out does."""
    path = str(tmp_path / "cut.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # shut down at teardown
                return
            with conn:
                header = conn.recv(HEADER.size, socket.MSG_WAITALL)
                conn.recv(HEADER.unpack(header)[0], socket.MSG_WAITALL)

    thread = threading.Thread(target=serve)
    thread.start()
    yield path
    server.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    server.close()


@pytest.mark.parametrize("argv, check", [
    (("ack", "1"), "flashlexctl messages"), (("purge", "--yes"), "flashlexctl status"),
    (("outbox", "retry", "1"), "flashlexctl outbox"), (("outbox", "drop", "1"), "flashlexctl outbox")])
def test_a_change_cut_off_by_the_daemon_dying_says_it_may_have_been_carried_out(cut_off, argv, check):
    """`flashlexctl purge --yes` (ack, outbox retry/drop, consumers reset/remove) cut off by the
    daemon dying said only "flashlexd closed the connection", as if nothing had happened and
    exactly like "not running", though the daemon may have done it, or part of it (found by
    review)."""
    done = subprocess.run(CTL + ["--socket", cut_off, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert done.stderr == (f"flashlexctl: flashlexd closed the connection on {cut_off}; it may have been"
                           f" carried out, or partly: check ({check}) and run it again\n"), done.stderr


@pytest.mark.parametrize("argv", [("ack", "--consumer", "app1", "1"), ("outbox", "retry", "--all"),
                                  ("consumers", "reset", "display", "--to", "latest"),
                                  ("consumers", "remove", "display")])
def test_a_change_cut_off_in_the_read_before_it_says_nothing_was_changed(cut_off, argv):
    """Each reads first (is there such a consumer? which dead letters?): cut off there, it
    changed nothing, though it said "it may have been carried out" (found by review)."""
    done = subprocess.run(CTL + ["--socket", cut_off, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr == (
        f"flashlexctl: flashlexd closed the connection on {cut_off}; only a read was under way: nothing"
        " was changed, run it again\n"), done.stderr


def test_a_read_cut_off_by_the_daemon_dying_says_only_that(cut_off):
    done = subprocess.run(CTL + ["--socket", cut_off, "messages"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr == f"flashlexctl: flashlexd closed the connection on {cut_off}\n"


def test_a_long_topic_is_cut_in_the_tables_and_whole_in_json(harness, capsys):
    """Every row was padded to the longest topic: one of 65,535 characters made each line of
    `messages` that long (20 messages: 1.3 MB of output; found by review)."""
    long_topic = "t/" + "x" * 65_533
    harness.ingest((long_topic, b"long"), ("short", b"s"))
    code, out, _ = run(harness, capsys, "messages")
    assert code == 0 and max(len(line) for line in out.splitlines()) < 150, [len(l) for l in out.splitlines()]
    assert "t/xxx" in out and "..." in out
    code, out, _ = run(harness, capsys, "--json", "messages")
    assert code == 0 and json.loads(out)[0]["topic"] == long_topic


@pytest.mark.parametrize("argv", [("status", "--json"), ("messages", "--json", "--limit", "1"),
                                  ("consumers", "--json"), ("outbox", "--json"),
                                  ("messages", "--t", "a/#", "--json")])  # --t: still --topic
def test_the_shared_options_are_taken_after_the_command_too(harness, capsys, argv):
    """`flashlexctl status --json`, the first thing a new user types, was a usage error: the
    shared options were taken only before the command (found by review)."""
    code, out, err = run(harness, capsys, *argv)
    assert code == 0 and err == "" and isinstance(json.loads(out), (dict, list)), (out, err)


def test_a_shared_option_after_the_command_wins_and_one_before_it_stays(harness, capsys):
    code, out, _ = ctl.main(["--socket", "/nonexistent/x.sock", "status", "--socket", harness.path]), *capsys.readouterr()
    assert code == 0
    code, out, _ = run(harness, capsys, "--json", "status")  # --json before, none after
    assert code == 0 and json.loads(out)["inbox"]["count"] == 0


def test_a_full_store_names_the_consumer_holding_back_the_most():
    """An app reading under a name and never acking filled the store, and the store-full line
    did not say who (review "consumers": only `flashlexctl consumers` did)."""
    status = {"workers": [{"name": "ingress", "state": "ready"}],
              "mqtt": {"ingress": {"connected": True, "store_error": "store full", "store_full": True},
                       "egress": {"connected": True}},
              "consumers": [{"name": "display", "backlog": 3, "dynamic": False},
                            {"name": "lazy", "backlog": 100, "backlog_exact": False, "dynamic": True}]}
    assert ctlview.health(status) == [
        "ingress is not storing (messages stay with the broker): store full; consumer 'lazy' (dynamic) holds"
        " back the most, >=100 unacked (an app reading without acking? see flashlexctl consumers)"]
    status["consumers"].append({"name": "zeta", "backlog": 100, "backlog_exact": False, "dynamic": False})
    assert ctlview.health(status)[0].endswith("store full; consumers 'lazy' (dynamic), 'zeta' (declared) hold"
                                              " back the most, >=100 unacked each (an app reading without acking?"
                                              " see flashlexctl consumers)")  # both at their bound (re-read 30)
    status["mqtt"]["ingress"].update(store_error="the disk is read-only", store_full=False)  # no consumer's doing
    assert ctlview.health(status) == ["ingress is not storing (messages stay with the broker): the disk is read-only"]
    status["consumers"] = []
    status["mqtt"]["ingress"].update(store_error="store full", store_full=True)
    assert ctlview.health(status) == ["ingress is not storing (messages stay with the broker): store full"]
