"""The daemon on a disk whose writes stall for seconds (an SD card), stalled for real: the data
dir on an ext4 loop device whose writes a blkio cgroup holds back while the test says so."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest
import yaml

from flashlexd.client import Client, connect
from flashlexd.workerproc import process_state
from tests.broker import EGRESS_TOPIC, INGRESS_TOPIC, Subscriber, publish, wait_for
from tests.daemon import Daemon, NotifyListener, default_sigint
from tests.test_ack_journal import inbox_ids, store_then_crash
from tests.tmpfs import WriteStall, mounted_ext4, stalled_writes

WATCHDOG_USEC = 4_000_000  # WatchdogSec=4: a ping due every 2 s
STALL = 9.0  # seconds: over twice WatchdogSec
DATA = "disk/data"  # the data dir, under tmp_path


class Stalled(NamedTuple):
    daemon: Daemon
    disk: WriteStall
    notify: NotifyListener
    fx: Client


@contextlib.contextmanager
def on_a_stalling_disk(daemon_config: Path, tmp_path: Path) -> Iterator[Tuple[Daemon, WriteStall, NotifyListener]]:
    """The daemon (not started) under a fake systemd (NOTIFY_SOCKET, WATCHDOG_USEC), its data
    dir (DATA under tmp_path) and its processes on a disk whose writes the test stalls (with
    over storeacks.LOW_DISK free, so that acks are journaled, not applied at once)."""
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["app"]["db"]["dataPath"] = str(tmp_path / DATA)
    daemon_config.write_text(yaml.safe_dump(document, sort_keys=False))
    notify = NotifyListener(tmp_path / "notify.sock")
    with mounted_ext4(tmp_path / "disk", size_mb=160) as device, \
            stalled_writes(device, f"flashlexd-test-{os.getpid()}-{tmp_path.name}") as disk:
        daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path),
                                                      "WATCHDOG_USEC": str(WATCHDOG_USEC)},
                        preexec=lambda: (default_sigint(), disk.join()))
        try:
            yield daemon, disk, notify
        finally:
            disk.resume()
            daemon.stop()
            notify.close()


@contextlib.contextmanager
def stalled_daemon(daemon_config: Path, tmp_path: Path) -> Iterator[Stalled]:
    """`on_a_stalling_disk`'s daemon, READY, with a client."""
    with on_a_stalling_disk(daemon_config, tmp_path) as (daemon, disk, notify):
        daemon.start()
        notify.wait_for("READY=1", timeout=30)
        with connect(str(daemon.socket_path), timeout=60) as fx:
            # the workers' writes at their connects done first: one the stall held would hold
            # the write lock, and the call's write wait for it, not for the disk
            wait_for(lambda: all((fx.status()["mqtt"].get(side) or {}).get("connected")
                                 for side in ("ingress", "egress")), 30, "both links up")
            yield Stalled(daemon, disk, notify, fx)


def listened(notify: NotifyListener, thread: Optional[threading.Thread], seconds: float) -> None:
    """Join `thread` (if any) for up to `seconds`, reading NOTIFY_SOCKET as it goes (the
    listener times what it reads as it reads it)."""
    deadline = time.monotonic() + seconds
    while (thread is None or thread.is_alive()) and time.monotonic() < deadline:
        notify.lines()
        if thread is None:
            time.sleep(0.02)
        else:
            thread.join(0.02)


def writing_to_disk(pid: int) -> bool:
    """Whether a thread of process `pid` is blocked on the disk (state D)."""
    return any(process_state(int(task)) == "D" for task in os.listdir(f"/proc/{pid}/task"))


def stalled_call(stalled: Stalled, call: Callable[[], object], during: Callable[[], None] = lambda: None
                 ) -> Dict[str, object]:
    """`call()` made in a thread while the disk stalls for STALL seconds (`during()` called once
    the daemon's write for it waits on the disk); its outcome once the disk writes again."""
    outcome: Dict[str, object] = {}

    def write() -> None:
        outcome["answer"] = call()

    stalled.disk.stall()
    began = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    # not a second's wait: on a loaded machine the call had not reached its write by then, and
    # a SIGTERM came before it (the stop test's call then went unanswered)
    wait_for(lambda: (stalled.notify.lines(), writing_to_disk(stalled.daemon.pid))[1], 10,
             "the call's write held back by the disk (a supervisor thread in state D)")
    during()
    listened(stalled.notify, writer, STALL - (time.monotonic() - began))
    assert writer.is_alive(), f"the call was not held back by the stall: {outcome}"
    stalled.disk.resume()
    outcome["resumed_at"] = time.monotonic()
    listened(stalled.notify, writer, 30)
    assert not writer.is_alive(), "the call never returned"
    return outcome


@pytest.mark.parametrize("call", ["ack", "publish"])
def test_a_write_stalled_by_the_disk_keeps_feeding_the_watchdog(daemon_config: Path, tmp_path: Path,
                                                                 broker, call: str):
    """Review "slowdisk": an app's `ack` (an ack journal record) or `publish` (a store commit)
    is written while the supervisor's loop waits, and on a stalling SD card that wait lasted as
    long as the stall: no WATCHDOG=1 for 31.5 s in an 18 s stall, and systemd (WatchdogSec=30)
    would have killed a healthy daemon. The loop waiting for its own write is not hung: the
    watchdog is fed meanwhile, and the call is answered, nothing lost, once the disk writes."""
    with stalled_daemon(daemon_config, tmp_path) as stalled:
        fx = stalled.fx
        subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
        publish(broker, INGRESS_TOPIC, b"before the stall")
        stored = wait_for(lambda: fx.messages(), 15, "the message stored")
        last_ping = max(t for t, f in stalled.notify.lines() if f == "WATCHDOG=1")
        outcome = stalled_call(stalled, lambda: fx.ack(stored) if call == "ack" else fx.publish(b"during the stall"))
        resumed_at = outcome["resumed_at"]
        pings: List[float] = [t for t, f in stalled.notify.lines() if f == "WATCHDOG=1"]
        times = [last_ping] + [t for t in pings if last_ping < t <= resumed_at] + [resumed_at]  # type: ignore[operator]
        assert max(b - a for a, b in zip(times, times[1:])) < WATCHDOG_USEC / 1e6, f"WATCHDOG=1 at {times}"
        if call == "ack":
            assert outcome["answer"] == 1 and fx.messages() == []
        else:
            wait_for(lambda: subscriber.lines() == [b"during the stall"], 15, "the entry sent")
        assert stalled.daemon.proc.poll() is None


def test_a_stop_asked_while_a_write_is_stalled_by_the_disk_is_told_to_systemd_at_once(
        daemon_config: Path, tmp_path: Path):
    """Review "slowdisk2": a SIGTERM arriving while an app's `ack` waited on a stalled disk was
    told to systemd (STOPPING=1, and the stop's budget) only once the disk wrote again, 25 s
    later: systemd's stop timeout runs from its SIGTERM, so a long stall got the daemon killed
    in its write, with no line saying a stop was seen. Now told within a beat of the wait."""
    with stalled_daemon(daemon_config, tmp_path) as stalled:
        fx = stalled.fx
        signalled = {}

        def stop() -> None:
            signalled["at"] = time.monotonic()
            stalled.daemon.signal(signal.SIGTERM)

        stalled_call(stalled, lambda: fx.publish(b"during the stall"), during=stop)
        stopping = [t for t, f in stalled.notify.lines() if f == "STOPPING=1" and t >= signalled["at"]]
        assert stopping and stopping[0] - signalled["at"] < 2.5, (signalled, stalled.notify.lines()[-10:])
        assert "stop asked while a store write waits on the disk" in stalled.daemon.output()
        assert stalled.daemon.wait_exit(timeout=30) == 0


@pytest.mark.parametrize("stopped", [False, True])
def test_a_start_whose_journal_apply_is_stalled_by_the_disk_extends_the_start_timeout(
        daemon_config: Path, tmp_path: Path, stopped: bool):
    """The start applies the acks a crash left in the ack journal (a store write) before it
    serves: on a stalling disk no word went to systemd meanwhile, and its TimeoutStartSec ran
    through the stall (session 41's re-read). The start's timeout is now extended while the
    write waits, as the start-up page check does, and the acks are applied once it writes. A
    stop asked meanwhile is done once it returns, nothing more started (the API and the
    workers were, re-read 27)."""
    with on_a_stalling_disk(daemon_config, tmp_path) as (daemon, disk, notify):
        store_then_crash(tmp_path / DATA, 3, [1, 3])  # 2 acks journaled, not applied
        disk.stall()
        daemon.start()
        wait_for(lambda: "ack journal: applying" in daemon.output(), 30, "the journal's apply")
        began = time.monotonic()
        listened(notify, None, STALL)
        extended = [t for t, f in notify.lines() if f.startswith("EXTEND_TIMEOUT_USEC=") and t >= began]
        assert not any(f == "READY=1" for _, f in notify.lines()), "READY before the journal's apply"
        times = [began] + extended + [time.monotonic()]
        assert max(b - a for a, b in zip(times, times[1:])) < 3, f"EXTEND_TIMEOUT_USEC at {times}"
        if stopped:
            daemon.signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1", timeout=5)
        disk.resume()
        if stopped:
            assert daemon.wait_exit(timeout=30) == 0
            assert "received SIGTERM during the start-up ack journal's apply" in daemon.output()
            assert "ingress started" not in daemon.output()
        else:
            notify.wait_for("READY=1", timeout=30)
        assert inbox_ids(tmp_path / DATA) == [2]
