"""The daemon on a disk whose writes stall for seconds (an SD card), stalled for real: the data
dir on an ext4 loop device whose writes a blkio cgroup holds back while the test says so."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from flashlexd.client import connect
from tests.broker import EGRESS_TOPIC, INGRESS_TOPIC, Subscriber, publish, wait_for
from tests.daemon import Daemon, NotifyListener, default_sigint
from tests.tmpfs import mounted_ext4, stalled_writes

WATCHDOG_USEC = 4_000_000  # WatchdogSec=4: a ping due every 2 s
STALL = 9.0  # seconds: over twice WatchdogSec


@pytest.mark.parametrize("call", ["ack", "publish"])
def test_a_write_stalled_by_the_disk_keeps_feeding_the_watchdog(daemon_config: Path, tmp_path: Path,
                                                                 broker, call: str):
    """Review "slowdisk": an app's `ack` (an ack journal record) or `publish` (a store commit)
    is written while the supervisor's loop waits, and on a stalling SD card that wait lasted as
    long as the stall: no WATCHDOG=1 for 31.5 s in an 18 s stall, and systemd (WatchdogSec=30)
    would have killed a healthy daemon. The loop waiting for its own write is not hung: the
    watchdog is fed meanwhile, and the call is answered, nothing lost, once the disk writes."""
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["app"]["db"]["dataPath"] = str(tmp_path / "disk" / "data")
    daemon_config.write_text(yaml.safe_dump(document, sort_keys=False))
    notify = NotifyListener(tmp_path / "notify.sock")
    with mounted_ext4(tmp_path / "disk") as device, \
            stalled_writes(device, f"flashlexd-test-{tmp_path.name}") as disk:
        daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path),
                                                      "WATCHDOG_USEC": str(WATCHDOG_USEC)},
                        preexec=lambda: (default_sigint(), disk.join()))
        daemon.start()
        try:
            notify.wait_for("READY=1", timeout=30)
            subscriber = Subscriber(broker, EGRESS_TOPIC, tmp_path / "received").start()
            with connect(str(daemon.socket_path), timeout=60) as fx:
                publish(broker, INGRESS_TOPIC, b"before the stall")
                def listened(thread: threading.Thread, seconds: float) -> None:
                    """Join `thread` for up to `seconds`, reading NOTIFY_SOCKET as it goes (the
                    listener times what it reads as it reads it)."""
                    deadline = time.monotonic() + seconds
                    while thread.is_alive() and time.monotonic() < deadline:
                        notify.lines()
                        thread.join(0.02)

                stored = wait_for(lambda: fx.messages(), 15, "the message stored")
                outcome: Dict[str, object] = {}

                def write() -> None:
                    if call == "ack":
                        outcome["answer"] = fx.ack(stored)
                    else:
                        outcome["answer"] = fx.publish(b"during the stall")

                disk.stall()
                stalled_at = time.monotonic()
                writer = threading.Thread(target=write, daemon=True)
                writer.start()
                listened(writer, STALL)
                assert writer.is_alive(), f"the {call} was not held back by the stall: {outcome}"
                disk.resume()
                resumed_at = time.monotonic()
                listened(writer, 30)
                assert not writer.is_alive() and "answer" in outcome, f"the {call} never returned"
                pings: List[float] = [t for t, f in notify.lines() if f == "WATCHDOG=1"]
                during = [t for t in pings if t <= resumed_at]
                times = [max(t for t in during if t < stalled_at)] + [t for t in during if t >= stalled_at] \
                    + [resumed_at]
                gaps = [b - a for a, b in zip(times, times[1:])]
                assert max(gaps) < WATCHDOG_USEC / 1e6, f"WATCHDOG=1 at {times}"
                if call == "ack":
                    assert outcome["answer"] == 1 and fx.messages() == []
                else:
                    wait_for(lambda: subscriber.lines() == [b"during the stall"], 15, "the entry sent")
            assert daemon.proc.poll() is None
        finally:
            disk.resume()
            daemon.stop()
            notify.close()
