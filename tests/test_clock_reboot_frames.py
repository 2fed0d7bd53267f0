"""A step the daemon saw must survive a reboot even when nothing was written after it.

Under libfaketime, with a real mosquitto and the real forked daemon. The boot's clock offset
(its BootFrame `last`) is what re-bases the boot's stamps after a reboot; it must be recorded
when the clock steps, not only when a later message or sweep happens to write."""
from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

import lmdb
import msgpack
import pytest

from flashlexd import config as config_module
from tests.broker import INGRESS_TOPIC, Broker, publish, wait_for
from tests.daemon import Daemon
from tests.faketime import DAY
from tests.test_clock_steps import api, faketime, ingress_connected, old_certs, run_daemon  # noqa: F401 (fixtures)

SLACK = 3.0


def recorded_step(config: Path) -> float:
    """How far the latest boot frame's recorded offset has moved from its first (seconds),
    read from the store's meta database as a reader beside the daemon."""
    data_dir = config_module.load(str(config)).store.data_dir
    env = lmdb.open(str(data_dir), readonly=True, max_dbs=32, lock=True)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            seq = struct.unpack(">Q", txn.get(b"boot_seq", db=meta))[0]
            _, first, last = msgpack.unpackb(txn.get(b"frame" + struct.pack(">I", seq), db=meta))
    finally:
        env.close()
    return last - first


def power_cut(daemon: Daemon) -> None:
    """The plug pulled: every process of the daemon killed at once, nothing written on the way."""
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(timeout=10)


@pytest.mark.parametrize("sweep", [0.5, 3600])
def test_a_step_with_no_write_after_it_still_rebases_the_boots_messages_after_a_reboot(
        old_certs, tmp_path, faketime, run_daemon, sweep):  # noqa: F811
    """Boot A starts 2 days behind (fake-hwclock after a power-off), stores 2 messages, then
    NTP steps the clock right and no more messages come; seconds later the power is cut (a Pi
    is rarely shut down cleanly). After a reboot (clock right), those
    messages must read as arriving when they did, not 2 days earlier (and 2 days old).
    Found by review: the step was recorded at the expiry worker's sweep, every `sweepSeconds`
    (unbounded): a power cut before it made the next boot expire 10 s old messages as 2 days
    old (4 of 4). The supervisor records it within a second, whatever sweepSeconds is."""
    broker = Broker(old_certs, tmp_path / "broker").start()
    try:
        faketime.step_to(-2 * DAY)
        daemon = run_daemon(broker, "boot-a", db={"expireSeconds": None, "sweepSeconds": sweep})
        with api(daemon) as fx:
            wait_for(lambda: ingress_connected(fx), 20, "ingress connected")
            arrived = time.time()  # the true time (the test is not under faketime)
            for n in range(2):
                publish(broker, INGRESS_TOPIC, b"m%d" % n)
            wait_for(lambda: len(fx.messages()) == 2, 15, "2 messages in the inbox")
            stored = time.monotonic()  # the ingress's follow-up commits (settled marks) done
            wait_for(lambda: time.monotonic() >= stored + 3, 10, "3 s to pass after the messages")
            faketime.step_to(0)  # NTP: the clock is right from now on
            # within this boot the API re-bases at once (it reads the clock on every call)
            wait_for(lambda: abs(fx.messages()[0].timestamp - arrived) < SLACK, 5,
                     "the arrival re-based within boot A")
            # the daemon runs on, as a device does, and records the step within a second
            wait_for(lambda: recorded_step(tmp_path / "etc" / "flashlex.yml") > DAY, 10,
                     "the step recorded in boot A's frame")
            wait_for(lambda: "the wall clock stepped +172800 s; recorded in the store" in daemon.output(),
                     5, "the step logged")
        power_cut(daemon)
        daemon = run_daemon(broker, "boot-b")  # a reboot with the clock right
        with api(daemon) as fx:
            [first, _] = wait_for(lambda: fx.messages(), 15, "the messages after the reboot")
            assert abs(first.timestamp - arrived) < SLACK, (
                f"arrival shown {(arrived - first.timestamp) / 3600:.1f} h early after the reboot")
            assert first.age < 60, f"age {first.age:.0f} s after the reboot"
    finally:
        broker.close()
