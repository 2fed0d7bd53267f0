"""Bad key files are a bad config: `flashlexd run` exits 2 with one line naming the file before
any worker starts, a reload to them is refused (the running config stays), a private key
readable by others needs --allow-insecure-key, and a denied client is told what to do."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import pytest
import yaml

from flashlexd.check import check_config
from flashlexd.client import Client, PermissionDenied
from flashlexd.client.connection import _group_hint
from tests.broker import THING, Broker, wait_for, write_config
from tests.chaos.conftest import wait_ready
from tests.daemon import Daemon
from tests.test_ipc_server import run_as_nobody

CERT, KEY, CA = f"{THING}-certificate.pem", f"{THING}-keypair-private.pem", "root-ca-cert.pem"


def run(config: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlexd", "run", "--config", str(config), *flags],
                          capture_output=True, text=True, timeout=60)


def _garbage(name: str) -> Callable[[Path, Broker], None]:
    def damage(directory: Path, broker: Broker) -> None:
        (directory / name).write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                                      "-----END CERTIFICATE-----\n")
    return damage


def _stranger_key(directory: Path, broker: Broker) -> None:
    (directory / KEY).write_bytes(broker.certs.stranger.key.read_bytes())


def _empty_key(directory: Path, broker: Broker) -> None:
    (directory / KEY).write_text("")


DAMAGES: Dict[str, Callable[[Path, Broker], None]] = {
    "garbage CA": _garbage(CA),
    "garbage certificate": _garbage(CERT),
    "garbage key": _garbage(KEY),
    "empty key": _empty_key,
    "key of another certificate": _stranger_key,
}
EXPECTED = {
    "garbage CA": f"flashlex.thing.keys.rootCA: {{dir}}/{CA} is not a PEM CA certificate",
    "garbage certificate": f"flashlex.thing.keys.cert: {{dir}}/{CERT} is not a PEM certificate",
    "garbage key": f"flashlex.thing.keys.privateKey: {{dir}}/{KEY} is not a PEM private key",
    "empty key": f"flashlex.thing.keys.privateKey: {{dir}}/{KEY} is not a PEM private key",
    "key of another certificate": f"flashlex.thing.keys.privateKey: {{dir}}/{KEY} does not match the"
                                  f" certificate {{dir}}/{CERT}",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_bad_key_files_are_one_line_and_exit_2(broker: Broker, tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "etc"
    config = write_config(directory, broker)
    DAMAGES[damage](directory, broker)
    (directory / KEY).chmod(0o600)
    started = time.monotonic()
    result = run(config)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("flashlexd: " + EXPECTED[damage].format(dir=directory.resolve())), \
        result.stderr
    assert took < 10, f"{took:.1f}s"  # no crash loop first


def test_a_reload_to_bad_key_files_keeps_the_running_config(daemon_config: Path, tmp_path: Path) -> None:
    daemon = Daemon(daemon_config, tmp_path / "run").start()
    try:
        status = wait_ready(daemon, 30)
        pids = [w["pid"] for w in status["workers"]]
        document = yaml.safe_load(daemon_config.read_text())
        bad = daemon_config.parent / "garbage.pem"
        bad.write_text("garbage\n")
        bad.chmod(0o600)
        document["flashlex"]["thing"]["keys"]["privateKey"] = bad.name
        document["flashlex"]["thing"]["mqtt"]["keepalive"] = 40  # a change that restarts workers
        daemon_config.write_text(yaml.safe_dump(document))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in daemon.output(), 15, "the reload refused")
        assert f"privateKey: {bad.resolve()} is not a PEM private key" in daemon.output()
        status = wait_ready(daemon, 10)
        assert [w["pid"] for w in status["workers"]] == pids  # nothing restarted
        assert "Traceback" not in daemon.output()
    finally:
        daemon.stop()


def test_a_private_key_readable_by_others_needs_allow_insecure_key(daemon_config: Path,
                                                                   tmp_path: Path) -> None:
    key = daemon_config.parent / KEY
    key.chmod(0o640)
    result = run(daemon_config)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{key.resolve()} is readable by other users (mode 0640)" in result.stderr
    assert "--allow-insecure-key" in result.stderr

    daemon = Daemon(daemon_config, tmp_path / "run", args=("--allow-insecure-key",)).start()
    try:
        wait_ready(daemon, 30)
        assert "is readable by other users" in daemon.output()  # still said, as a warning
    finally:
        daemon.stop()


def test_a_config_or_key_file_another_user_can_change_is_warned_of(daemon_config: Path,
                                                                   tmp_path: Path) -> None:
    """Found by review: a config writable by everyone and a private key owned by another
    (non-root) user were taken without a word; whoever can change them controls the daemon
    (its `allowUids`, its endpoint, its identity)."""
    key = (daemon_config.parent / KEY).resolve()
    os.chown(key, 1001, -1)
    daemon_config.chmod(0o666)
    daemon = Daemon(daemon_config, tmp_path / "run").start()
    try:
        wait_ready(daemon, 30)
        output = daemon.output()
        assert (f"privateKey {key} is owned by uid 1001, not by root or the daemon's user (uid 0):"
                f" chown root {key} (whoever can change it controls what the daemon does)") in output
        config = daemon_config.resolve()
        assert (f"config {config} is writable by group or others (mode 0666): chmod go-w {config}"
                " (whoever can change it controls what the daemon does)") in output
        assert "rootCA" not in output and "cert " not in output  # root's and not writable: nothing said
    finally:
        daemon.stop()
    detail, _ = check_config(str(daemon_config), None, None)  # `check` says so too (found by re-read)
    assert f"warning: privateKey {key} is owned by uid 1001" in detail, detail
    assert f"warning: config {daemon_config.resolve()} is writable by group or others" in detail, detail
    # before a service's first start (no data dir yet) the key's owner is taken for its user:
    # `sudo flashlexd check` of a `--user` install does not warn of the key it made that user's
    detail, _ = check_config(str(daemon_config), None, str(tmp_path / "not-yet"))
    assert "privateKey" not in detail and "config " in detail, detail


# -- the client's hint when the socket is closed to it ------------------------------------------

def _denied_as_nobody(path: str) -> str:
    """The message a uid-65534 client gets connecting to `path`."""
    def attempt() -> str:
        try:
            Client(path, timeout=2).close()
            return "connected"
        except PermissionDenied as exc:
            return str(exc)
    return run_as_nobody(attempt)


def test_the_permission_hint_names_the_socket_group_or_how_to_be_let_in() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another uid")
    directory = tempfile.mkdtemp(prefix="flashlexd-hint-")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "api.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        os.chmod(path, 0o660)
        os.chown(path, 0, 0)
        message = _denied_as_nobody(path)
        assert "flashlex.app.socket.group or flashlex.app.socket.allowUids" in message \
            and "--install" in message and "'root'" not in message, message
        os.chown(path, 0, 4)  # adm on Debian; any non-root group will do
        message = _denied_as_nobody(path)
        assert "add this user to group " in message and "'root'" not in message, message
        # the group alone lets the user in: allowUids is the other way, not a second step
        assert "(then log in again), or its uid to flashlex.app.socket.allowUids" in message \
            and "0666" in message, message
        assert _group_hint(path) == message.split(": ", 1)[1]
        # a config given by mistake, which this user may not write: denied, but not a socket at
        # all ("permission denied ... the socket is root's only" before; found by review)
        config = os.path.join(directory, "config.yml")
        with open(config, "w") as f:
            f.write("flashlex: {}\n")
        assert _denied_as_nobody(config) == f"DaemonNotRunning: {config} is not a socket (the daemon" \
            " listens on its config's flashlex.app.socket.path)"
        listener.close()
        os.chmod(directory, 0o700)
        message = _denied_as_nobody(path)
        assert f"its directory {directory} is closed to this user" in message, message
        assert "flashlex.app.socket.allowUids" in message and "--install" in message, message
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def test_the_key_check_run_by_hand_without_files_says_its_usage() -> None:
    """README names `python -m flashlexd.credentials`; run without its three files it printed a
    traceback (found by review)."""
    ran = subprocess.run([sys.executable, "-m", "flashlexd.credentials"], capture_output=True,
                         text=True, timeout=30)
    assert (ran.returncode, ran.stdout, ran.stderr) == (
        2, "usage: python -m flashlexd.credentials ROOT_CA CERT KEY\n", "")
