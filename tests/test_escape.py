"""Text from the broker or from applications is escaped wherever it is printed.

Mosquitto refuses control characters in topics (it drops the publisher as malformed), so the
end-to-end test uses `LaxBroker`, a broker that delivers any topic bytes, in front of the real
daemon, and reads the messages back with the real `flashlexctl` and the daemon's own log.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

from flashlexd.client import connect
from flashlexd.client.escape import printable
from tests.broker import INGRESS_TOPIC, wait_for, write_config
from tests.daemon import Daemon, default_sigint, under_the_unit
from tests.lax_broker import LaxBroker

CTL = [sys.executable, "-m", "flashlexd.client.ctl"]
FORGED = "\n<0>flashlexd: FORGED"
TOPICS = [f"{INGRESS_TOPIC}/\x1b[2J\x1b]0;pwned\x07", f"{INGRESS_TOPIC}/bell\x07",
          f"{INGRESS_TOPIC}/nl{FORGED}", f"{INGRESS_TOPIC}/c1\u009b31m\x7f\\x1b"]
RAW = ("\x1b", "\x07", "\x7f", "\u009b")


def test_printable_escapes_controls_del_c1_and_backslash() -> None:
    assert printable("plain/topic ünï 😀") == "plain/topic ünï 😀"
    assert printable("a\nb\x1b[31m\x07") == "a\\x0ab\\x1b[31m\\x07"
    assert printable("\x7f\u0085\u009b\t\r") == "\\x7f\\x85\\x9b\\x09\\x0d"
    assert printable("\\x1b") == "\\\\x1b" != printable("\x1b")  # unambiguous
    assert printable("rtl\u202eevil\u2028") == "rtl\\u202eevil\\u2028"
    assert all(c.isprintable() for c in printable("".join(map(chr, range(0x200)))))


def test_a_log_line_cannot_forge_a_second_journal_line() -> None:
    code = ("import logging; from flashlexd import logs; logs.setup('info', 'flashlexd');"
            f"logging.getLogger('x').warning('dropped on %s', {FORGED + chr(27) + '[2J'!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"INVOCATION_ID": "abc", "PATH": "/usr/bin"})
    assert result.stderr.splitlines() == ["<4>flashlexd: dropped on \\x0a<0>flashlexd: FORGED\\x1b[2J"]


def _tail_lines(socket_path: Path, count: int, timeout: float = 20) -> List[str]:
    """The first `count` lines `flashlexctl tail --all` prints, then Ctrl-C."""
    proc = subprocess.Popen([*CTL, "--socket", str(socket_path), "tail", "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while data.count(b"\n") < count and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.1)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    return data.decode().splitlines()


def test_control_characters_from_a_lax_broker_are_escaped_in_flashlexctl_and_the_log(
        broker, tmp_path: Path) -> None:
    deliveries = [(t.encode(), b"payload \x1b[5m\x07") for t in TOPICS]
    deliveries.append(((INGRESS_TOPIC + FORGED).encode(), b"x" * 2000))  # oversize: logged, dropped
    lax = LaxBroker(broker.certs, deliveries)
    daemon = None
    try:
        config = write_config(tmp_path / "etc", broker, port=lax.port, db={"maxPayloadBytes": 1000})
        daemon = Daemon(config, tmp_path / "run", env=under_the_unit()).start()

        def stored() -> bool:
            try:
                with connect(str(daemon.socket_path), timeout=2) as fx:
                    return fx.status()["inbox"]["count"] == len(TOPICS)
            except Exception:
                return False
        wait_for(stored, 30, "the lax broker's messages stored")
        with connect(str(daemon.socket_path)) as fx:  # the API itself returns the exact topics
            assert [m.topic for m in fx.messages()] == TOPICS

        listing = subprocess.run([*CTL, "--socket", str(daemon.socket_path), "messages"],
                                 capture_output=True, text=True, timeout=30)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert len(lines) == 1 + len(TOPICS), listing.stdout  # one row per message, no more
        assert not any(c in listing.stdout for c in RAW), listing.stdout
        for topic, line in zip(TOPICS, lines[1:]):
            assert printable(topic) in line and "payload \\x1b[5m\\x07" in line

        tail = _tail_lines(daemon.socket_path, len(TOPICS))
        assert len(tail) == len(TOPICS), tail
        assert not any(c in "\n".join(tail) for c in RAW), tail
        assert all(printable(t) in line for t, line in zip(TOPICS, tail)), tail

        as_json = subprocess.run([*CTL, "--socket", str(daemon.socket_path), "--json", "messages"],
                                 capture_output=True, text=True, timeout=30)
        assert not any(c in as_json.stdout for c in RAW)
        assert [m["topic"] for m in json.loads(as_json.stdout)] == TOPICS  # JSON keeps them exact

        wait_for(lambda: "FORGED" in daemon.output(), 10, "the oversize message logged")
        log = daemon.output()
        assert not any(line.startswith("<0>") or line.startswith("flashlexd: FORGED")
                       for line in log.splitlines()), log
        assert f"dropped a 2000-byte message on {INGRESS_TOPIC}\\x0a<0>flashlexd: FORGED" in log, log
    finally:
        if daemon is not None:
            daemon.stop()
        lax.close()


def test_status_and_outbox_renderings_escape_what_the_daemon_reports() -> None:
    from flashlexd.client import ctlview
    status = {"version": "1\x1b[2J", "uptime": 5, "workers": [
        {"name": "ingress\x07", "pid": 1, "state": "ready", "restarts": 0, "heartbeat_age": 0.1}],
        "mqtt": {"ingress": {"connected": False, "error": "broker said \x1b]0;owned\x07\n<0>x"}}}
    text = ctlview.render_status(status, "/run/x\x1b.sock")
    assert not any(c in text for c in RAW), text
    assert "broker said \\x1b]0;owned\\x07\\x0a<0>x" in text and "ingress\\x07" in text
    assert len(text.splitlines()) == len(ctlview.render_status(
        {**status, "mqtt": {"ingress": {"connected": False, "error": "plain"}}}, "/p").splitlines())
    rows = ctlview.table(("ID", "TOPIC"), [(1, "out/\x1b[31m\u009b")])
    assert rows.splitlines()[1] == "1   out/\\x1b[31m\\x9b"


def test_table_columns_stay_aligned_after_wide_and_combining_characters() -> None:
    from flashlexd.client import ctlview
    text = ctlview.table(("TOPIC", "N", "NOTE"), [("温度/传感器", 1, "x"), ("cafe\u0301", 22, "y"),
                                                  ("plain", 333, "z")], right=(1,))
    assert text.splitlines() == ["TOPIC          N  NOTE", "温度/传感器    1  x",
                                 "cafe\u0301          22  y", "plain        333  z"]
