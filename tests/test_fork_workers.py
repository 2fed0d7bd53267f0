"""Workers forked without exec (from the fork server) keep what exec gave: no LMDB environment,
descriptor, thread, signal handler or systemd variable of the supervisor crosses the fork, and
the process tree stays a supervisor with three workers it reaps itself. Real daemon, real forks."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Dict, List

import pytest

from flashlexd.client import FlashlexError, connect
from tests.broker import wait_for
from tests.daemon import Daemon


@pytest.fixture
def daemon(daemon_config, tmp_path):
    running = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "no-systemd")}).start()
    running.wait_workers()
    # ready: every spawn finished, so the supervisor has closed its copy of each worker's end
    # of the link (a worker's pid shows before the fork server's answer reaches the supervisor)
    wait_for(lambda: _ready(running), 20, "the daemon ready")
    yield running
    running.stop()


def _ready(daemon: Daemon) -> bool:
    try:
        with connect(str(daemon.socket_path), timeout=2) as client:
            return bool(client.status().get("ready"))
    except FlashlexError:  # not listening yet
        return False


def links(pid: int) -> List[str]:
    """What each descriptor above stdio of `pid` points to."""
    found = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        if int(entry.name) > 2:
            try:
                found.append(os.readlink(entry))
            except OSError:
                pass  # closed meanwhile
    return found


def mapped_files(pid: int) -> List[str]:
    return [line.split(None, 5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split(None, 5)) == 6]


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def signal_set(mask: str) -> set:
    bits = int(mask, 16)
    return {signum for signum in range(1, 65) if bits & (1 << (signum - 1))}


def api_socket_inode(path: Path) -> str:
    """The listening socket's inode: an accepted connection shows the same path, without
    __SO_ACCEPTCON (0x10000) in its flags."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
            return fields[6]
    raise AssertionError(f"{path} is not a listening socket")


def processes(daemon: Daemon) -> Dict[str, int]:
    return daemon.children(fork_server=True)


def test_the_fork_server_holds_no_store_and_every_worker_opened_exactly_its_own(daemon):
    found = processes(daemon)
    assert set(found) == {"forkserver", "ingress", "egress", "expiry"}
    server = found.pop("forkserver")
    assert not any(name.endswith((".mdb", ".mdb (deleted)")) for name in mapped_files(server))
    assert not any(".mdb" in target for target in links(server))
    for name, pid in found.items():
        wait_for(lambda: [t for t in links(pid) if t.endswith("/lock.mdb")], 10, f"{name}'s store")
        assert len([t for t in links(pid) if t.endswith("/lock.mdb")]) == 1, (name, links(pid))
        assert len({m for m in mapped_files(pid) if m.endswith("/lock.mdb")}) == 1


def test_a_worker_inherits_no_descriptor_of_the_supervisor_or_the_fork_server(daemon):
    listener = f"socket:[{api_socket_inode(daemon.socket_path)}]"
    assert listener in links(daemon.pid)
    supervisor_links = set(links(daemon.pid))
    found = processes(daemon)
    server_links = set(links(found["forkserver"]))
    assert len(server_links) == 1  # its request socket, nothing else above stdio
    for name, pid in found.items():
        if name != "forkserver":
            assert not server_links & set(links(pid)), name
        held = links(pid)
        assert listener not in held, name
        assert not any("flashlexd-config" in target for target in held), name  # the memfd
        # the only socket shared with the supervisor is the worker's own link (or, for the
        # fork server, its request socket): one peer each, never another worker's
        shared_sockets = [t for t in held if t.startswith("socket:") and t in supervisor_links]
        assert shared_sockets == [], (name, shared_sockets)


def test_signals_are_reset_and_no_thread_is_inherited(daemon):
    for name, pid in processes(daemon).items():
        assert signal_set(status_field(pid, "SigBlk")) == set(), name
        caught = signal_set(status_field(pid, "SigCgt"))
        assert signal.SIGCHLD not in caught, name  # the supervisor's handler is not carried over
        if name == "forkserver":
            assert status_field(pid, "Threads") == "1"
            ignored = signal_set(status_field(pid, "SigIgn"))
            assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= ignored  # stops on EOF
        else:
            assert {signal.SIGTERM, signal.SIGINT} <= caught, name  # the worker's own loop's
            assert signal.SIGHUP in signal_set(status_field(pid, "SigIgn")), name


def test_the_mqtt_workers_keep_no_resolver_thread_once_connected(daemon):
    """The broker's name is looked up in a thread that ends with the lookup (dialer.Lookup):
    none is kept alive, with its stack and state, in the connected ingress and egress. Their
    second thread is the lock-wait beat (workers/lockwait.py)."""
    with connect(str(daemon.socket_path)) as fx:
        wait_for(lambda: all(fx.status()["mqtt"][name].get("connected") for name in ("ingress", "egress")),
                 20, "both links up")
    for name in ("ingress", "egress"):
        pid = daemon.children()[name]
        wait_for(lambda: status_field(pid, "Threads") == "2", 5, f"{name}: its main and lock-wait threads only")


def test_workers_are_the_supervisors_children_and_reaped_by_it(daemon):
    before = daemon.children()
    for pid in before.values():
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == daemon.pid
    killed_at = time.monotonic()
    os.kill(before["egress"], signal.SIGKILL)
    wait_for(lambda: daemon.children().get("egress") not in (None, before["egress"]), 5, "a new egress")
    assert time.monotonic() - killed_at < 1.0
    assert "egress died (signal SIGKILL)" in daemon.output()
    assert daemon.zombies() == []


def test_a_dead_fork_server_stops_the_daemon_with_a_clear_error(daemon):
    os.kill(processes(daemon)["forkserver"], signal.SIGKILL)
    assert daemon.wait_exit(timeout=20) == 1
    assert "the fork server died (signal SIGKILL)" in daemon.output()


def _dead(pid: int) -> bool:
    """Gone, or a zombie (its parent gone too, nobody may reap it here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def test_a_stuck_fork_server_is_named_as_stuck(daemon):
    """Found by review: a fork server that stopped answering was told as "[Errno 32] the fork
    server did not answer: timed out" and "stopping: the fork server is gone"."""
    found = processes(daemon)
    server = found["forkserver"]
    os.kill(server, signal.SIGSTOP)
    try:
        os.kill(found["egress"], signal.SIGKILL)
        assert daemon.wait_exit(timeout=30) == 1
        # it outlived the daemon, stopped (found by re-read)
        wait_for(lambda: _dead(server), 10, "the stuck fork server gone with the daemon")
    finally:
        if not _dead(server):
            os.kill(server, signal.SIGCONT)
    output = daemon.output()
    said = f"the fork server (pid {server}) did not answer within 5s (stuck?)"
    assert f"cannot start egress: {said}" in output and f"stopping: no worker can be started: {said}" in output
    assert "Errno" not in output


def test_the_fork_server_and_workers_go_when_the_supervisor_is_killed(daemon):
    found = processes(daemon)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait_exit(timeout=10)

    def gone() -> bool:
        for pid in found.values():
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    return False
            except OSError:
                pass
        return True
    wait_for(gone, 15, "the fork server and the workers to exit")
