"""Prove it, scenarios 5-8: a full store, a full disk, hostile local clients, bad messages.

Every test runs the real daemon (`python -m flashlexd run`: supervisor + ingress/egress/expiry
workers) against a real mutual-TLS mosquitto, with independent publishers (`mosquitto_pub`,
or a raw TLS MQTT client for what mosquitto_pub refuses to send), and checks the outcome through
the client API and by opening the store afterwards. Each prints one line of figures (`-s`
shows it) that is also part of every assertion message.

Sizes are short by default (the whole file runs in about a minute on 2 cores, as part of
`make test`); FLASHLEXD_CHAOS=full (the chaos suite's switch) makes them bigger.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import yaml

from flashlexd.client import Client, RpcError, connect
from flashlexd.client.ctlview import health
from flashlexd.client.wire import MAX_LIMIT, Code
from flashlexd.config import Keys
from flashlexd.mqttclient import tls_context
from flashlexd.store import Store
from tests.broker import (HOST, INGRESS_TOPIC, Broker, open_store, publish, publish_lines,
                          wait_for, write_config, write_lines)
from tests.chaos.results import report_line
from tests.daemon import Daemon, NotifyListener
from tests.lax_broker import LaxBroker, mqtt_packet, mqtt_string, read_mqtt_packet
from tests.tmpfs import mounted_tmpfs
from tests.worker_process import cpu_seconds


# The chaos suite's size switch (tests/chaos/conftest.py: FLASHLEXD_CHAOS=full, `make chaos`);
# read here directly: that conftest is loaded by pytest, not importable as a module.
FULL = os.environ.get("FLASHLEXD_CHAOS", "").strip().lower() == "full"
pytestmark = pytest.mark.timeout(900 if FULL else 120)


# -- helpers ----------------------------------------------------------------------------------

def make_config(directory: Path, broker: Broker, db: Optional[Dict[str, Any]] = None,
                 mqtt: Optional[Dict[str, Any]] = None) -> Path:
    """write_config() with the supervision tuned for tests (as tests/daemon.py's fixture)."""
    path = write_config(directory, broker, db=db, mqtt=mqtt)
    document = yaml.safe_load(path.read_text())
    document["flashlex"]["app"]["supervisor"] = {
        "heartbeatSeconds": 0.2, "heartbeatTimeoutSeconds": 5, "stopTimeoutSeconds": 5,
        "restartBackoffMaxSeconds": 2, "crashLoopRestarts": 4, "crashLoopWindowSeconds": 30}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class Running:
    """The daemon, its NOTIFY_SOCKET listener and one API client; stopped by PID."""

    def __init__(self, config: Path, workdir: Path):
        self.config, self.workdir = config, workdir
        self.notify = NotifyListener(workdir / f"notify-{time.monotonic_ns()}.sock")
        self.daemon = Daemon(config, workdir, env={"NOTIFY_SOCKET": str(self.notify.path)})
        self.fx: Optional[Client] = None

    def start(self, timeout: float = 30) -> "Running":
        self.daemon.start()
        self.notify.wait_for("READY=1", timeout=timeout)
        self.fx = connect(str(self.daemon.socket_path), timeout=20)
        wait_for(lambda: self.mqtt("ingress").get("connected"), 20, "ingress connected")
        return self

    def status(self) -> Dict[str, Any]:
        return self.fx.status()

    def mqtt(self, name: str, status: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return (status or self.status())["mqtt"].get(name) or {}

    def worker(self, name: str, status: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return next(w for w in (status or self.status())["workers"] if w["name"] == name)

    def restarts(self) -> int:
        return sum(w["restarts"] for w in self.status()["workers"])

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def log(self) -> str:
        return self.daemon.output()

    def stop(self) -> None:
        if self.fx is not None:
            self.fx.close()
            self.fx = None
        self.daemon.stop()
        self.notify.close()


@pytest.fixture
def run_daemon(tmp_path) -> Iterator:
    """`run_daemon(config)` starts the daemon and waits for READY and ingress; all stopped."""
    started: List[Running] = []

    def start(config: Path, workdir: Optional[Path] = None) -> Running:
        running = Running(config, workdir or tmp_path)
        started.append(running)
        return running.start()

    yield start
    for running in started:
        running.stop()


def inbox(fx: Client, after: Optional[int] = None) -> List[Any]:
    """Every inbox message after `after`, oldest first (paged)."""
    found: List[Any] = []
    while True:
        page = fx.messages(limit=MAX_LIMIT, after=after)
        if not page:
            return found
        found += page
        after = page[-1].id


def line_numbers(messages: List[Any]) -> List[int]:
    """The numbers of write_lines() lines ("000042 xxx", 7 digits from 1,000,000 on) carried
    by `messages`."""
    return [int(m.payload.split(b" ", 1)[0]) for m in messages]


def drain_store_lines(store: Store) -> List[int]:
    numbers: List[int] = []
    after = None
    while True:
        page = store.messages(limit=1000, after=after)
        if not page:
            return numbers
        numbers += line_numbers(page)
        after = page[-1].id


def wait_publisher(process: subprocess.Popen, timeout: float = 60) -> None:
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"mosquitto_pub failed: {err!r}"


# -- 5. store full ----------------------------------------------------------------------------

CAP_SENT = 6000 if FULL else 2000
CAP_WIDTH = 600  # bytes a message: 2000 of them are 1.2 MB, over the 1 MB cap


def test_store_full_reject_stops_acknowledging_and_resumes_when_freed(broker, tmp_path, run_daemon):
    """whenFull: reject. At the cap ingress stops acknowledging (the broker keeps the rest),
    `status` says store_full, `publish` is refused with outbox_full; acking through the client
    frees space and every message the broker kept arrives, none twice."""
    config = make_config(tmp_path / "etc", broker, db={"capMegabytes": 1, "whenFull": "reject"})
    d = run_daemon(config)
    fx = d.fx
    lines = tmp_path / "lines"
    write_lines(lines, CAP_SENT, width=CAP_WIDTH)
    wait_publisher(publish_lines(broker, INGRESS_TOPIC, lines, client_id="full-pub"))

    wait_for(lambda: d.mqtt("ingress").get("store_full"), 30, "ingress to report store_full")
    # ingress holds what the broker has in flight; the count stops where the cap stopped it (the
    # first refusals may still take a few: the DUP marks taken off make room)
    counts = [fx.status()["inbox"]["count"]]

    def stopped() -> bool:
        time.sleep(1.5)  # a stop is seen only over a while
        counts.append(fx.status()["inbox"]["count"])
        return counts[-1] == counts[-2]
    wait_for(stopped, 20, "the inbox count to stop at the cap", interval=0)
    before = counts[-1]
    time.sleep(1.5)  # and it stays there
    status = fx.status()
    assert any("not storing" in problem for problem in health(status)), health(status)  # status: 1
    stored_before = status["inbox"]["count"]
    first = inbox(fx)
    refused = None
    try:
        fx.publish(b"p" * (2 * CAP_WIDTH))
    except RpcError as exc:
        refused = exc.code
    figures = (f"store full (reject): sent {CAP_SENT}, stored {stored_before} before full "
               f"(used {status['store']['used_bytes']} of {status['store']['cap_bytes']} bytes), "
               f"publish refused: {refused}")
    assert before == stored_before and 0 < stored_before < CAP_SENT, figures
    assert line_numbers(first) == list(range(stored_before)), figures  # in order, no gaps
    assert refused == Code.OUTBOX_FULL, figures
    assert "store full" in d.log(), figures

    # free space as an application would: read, ack; ingress resumes on its next retry
    got = line_numbers(first)
    fx.ack(first)
    after = first[-1].id
    deadline = time.monotonic() + 60
    while len(got) < CAP_SENT and time.monotonic() < deadline:
        batch = fx.wait(timeout=2, limit=MAX_LIMIT, after=after)
        if batch:
            got += line_numbers(batch)
            after = batch[-1].id
            fx.ack(batch)
    # the worker's counters reach `status` with its next heartbeat (0.2 s)
    wait_for(lambda: not d.mqtt("ingress").get("store_full"), 10, "store_full to clear")
    status = fx.status()
    published = fx.publish(b"after freeing")
    lost = CAP_SENT - len(set(got))
    figures += (f", stored {len(set(got))} after freeing, lost {lost}, "
                f"duplicates {len(got) - len(set(got))}, store_full now "
                f"{d.mqtt('ingress', status).get('store_full')}, publish ok (outbox id {published})")
    report_line(figures)
    assert sorted(got) == list(range(CAP_SENT)), figures
    assert got == list(range(CAP_SENT)), figures  # in arrival order too
    assert not d.mqtt("ingress", status).get("store_full"), figures
    assert d.restarts() == 0, figures
    d.stop()  # the end of the refusals is logged by then (after 10 s of storing, or at the stop)
    assert "resuming" in d.log(), figures


def test_store_full_drop_oldest_keeps_the_newest_and_counts_the_dropped(broker, tmp_path, run_daemon):
    """whenFull: dropOldest. Ingress never stops; the oldest inbox messages make room and are
    counted in `dropped_full`; the inbox holds exactly the newest ones. A publish at the cap is
    taken too: the oldest inbox messages make room for it (it was refused for as long as the
    inbox stayed at the cap). After freeing, new messages are kept and nothing more dropped."""
    # publishes up to 256 KiB: the one at the cap must be larger than the room left (which
    # varies with the last batch's drop: 116 KiB was seen, over a 100 KiB publish)
    config = make_config(tmp_path / "etc", broker, db={"capMegabytes": 1, "whenFull": "dropOldest"},
                         mqtt={"maxPayloadBytes": 256 * 1024})
    d = run_daemon(config)
    fx = d.fx
    lines = tmp_path / "lines"
    write_lines(lines, CAP_SENT, width=CAP_WIDTH)
    wait_publisher(publish_lines(broker, INGRESS_TOPIC, lines, client_id="full-pub"))
    wait_for(lambda: fx.status()["counters"]["received"] >= CAP_SENT, 30, "every message received")
    status = fx.status()
    counters, store = status["counters"], status["store"]
    kept = inbox(fx)
    numbers = line_numbers(kept)
    dropped = counters["dropped_full"]
    free = store["cap_bytes"] - store["used_bytes"]
    published = fx.publish(b"p" * (free + 8 * 1024))
    after = fx.status()
    room = after["counters"]["dropped_full"] - dropped
    figures = (f"store full (dropOldest): sent {CAP_SENT}, received {counters['received']}, "
               f"kept {len(kept)} newest, dropped_full {dropped}, "
               f"lost uncounted {CAP_SENT - len(kept) - dropped}, used {store['used_bytes']} "
               f"of {store['cap_bytes']} bytes; a publish of {free + 8 * 1024} bytes taken (outbox id"
               f" {published}), {room} more dropped for it, used {after['store']['used_bytes']}")
    assert counters["received"] == CAP_SENT, figures
    assert dropped > 0 and len(kept) + dropped == CAP_SENT, figures
    assert numbers == list(range(dropped, CAP_SENT)), figures  # exactly the newest, in order
    # room is made for an estimate of the batch, then the pages are counted and older messages
    # dropped until they are within the cap (it was up to 6.6 % over with the estimate alone)
    assert store["used_bytes"] <= store["cap_bytes"], figures
    assert not d.mqtt("ingress", status).get("store_full"), figures
    assert room > 0 and after["store"]["used_bytes"] <= after["store"]["cap_bytes"], figures
    kept = inbox(fx)
    assert line_numbers(kept) == list(range(dropped + room, CAP_SENT)), figures  # still the newest

    # recovery: free the store, then new messages are kept and nothing more is dropped
    fx.ack(kept)
    more = tmp_path / "more"
    write_lines(more, 100, width=CAP_WIDTH, start=CAP_SENT)
    wait_publisher(publish_lines(broker, INGRESS_TOPIC, more, client_id="full-pub"))
    wait_for(lambda: fx.status()["inbox"]["count"] >= 100, 30, "the 100 new messages")
    status = fx.status()
    fresh = line_numbers(inbox(fx))
    figures += (f"; after freeing: {len(fresh)}/100 new stored, dropped_full"
                f" {status['counters']['dropped_full']}")
    report_line(figures)
    assert fresh == list(range(CAP_SENT, CAP_SENT + 100)), figures
    assert status["counters"]["dropped_full"] == dropped + room, figures
    assert d.restarts() == 0, figures


# -- 6. disk trouble --------------------------------------------------------------------------

DISK_MB = 2


@pytest.fixture
def tiny_disk(tmp_path) -> Iterator[Path]:
    """A DISK_MB tmpfs mounted for this test, unmounted at teardown (after the daemon, which
    is requested later, has stopped)."""
    with mounted_tmpfs(tmp_path / "disk", DISK_MB) as mount_point:
        yield mount_point


def fill_disk(path: Path) -> int:
    """Write a junk file until the filesystem refuses; returns the bytes written."""
    written = 0
    chunk = b"\xa5" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError:
                return written
    finally:
        os.close(fd)


def test_disk_full_is_one_clear_error_no_crash_loop_no_loss(broker, tmp_path, tiny_disk, run_daemon):
    """The data dir is a 2 MB tmpfs, the cap 16 MB: the disk fills first, twice. (1) A junk file
    fills it: ingress logs one clear line and keeps the messages unacknowledged (the broker
    keeps them); the daemon stays up, and a restart while the disk is still full comes up
    (no crash loop); deleting the junk lets every message in. (2) The store's own messages fill
    it: an application acking what it read frees pages and ingress resumes into them.
    Afterwards the store opens and holds exactly what was committed and not acked."""
    data = tiny_disk / "data"
    config = make_config(tmp_path / "etc", broker, db={"capMegabytes": 16, "dataPath": str(data)})
    d = run_daemon(config)
    fx = d.fx
    errors_in_log = lambda: d.log().count("store error")  # noqa: E731
    width, a_count, b_count = 1000, 300, 500
    c_count = 3000 if FULL else 1500  # 2 KB each: 3 or 6 MB through a 2 MB disk

    # (1) a junk file fills the disk
    write_lines(tmp_path / "a", a_count, width=width)
    wait_publisher(publish_lines(broker, INGRESS_TOPIC, tmp_path / "a", client_id="disk-pub"))
    wait_for(lambda: fx.status()["inbox"]["count"] >= a_count, 30, "batch A stored")
    junk = tiny_disk / "junk"
    junk_bytes = fill_disk(junk)
    write_lines(tmp_path / "b", b_count, width=width, start=a_count)
    wait_publisher(publish_lines(broker, INGRESS_TOPIC, tmp_path / "b", client_id="disk-pub"))
    wait_for(lambda: errors_in_log() >= 1, 30, "the store error in the log")
    ingress_pid = d.worker("ingress")["pid"]
    time.sleep(2.5)  # a few retries
    status = fx.status()
    held = line_numbers(inbox(fx))
    error_lines = [line for line in d.log().splitlines() if "store error" in line]
    figures = (f"disk full: tmpfs {DISK_MB} MB, junk {junk_bytes} bytes; sent {a_count}+{b_count},"
               f" committed {len(held)} while full, error lines {len(error_lines)}:"
               f" {error_lines[0] if error_lines else None!r}")
    assert d.alive() and d.worker("ingress", status)["pid"] == ingress_pid, figures
    assert d.restarts() == 0, figures
    assert len(error_lines) == 1, figures  # one line per episode, not one per retry
    assert "no space left on device" in error_lines[0], figures
    assert a_count <= len(held) < a_count + b_count, figures
    assert held == list(range(len(held))), figures

    # restart while the disk is still full: the daemon must come up, not crash-loop
    d.stop()
    d = run_daemon(config)
    fx = d.fx
    wait_for(lambda: errors_in_log() >= 2, 30, "the store error after the restart")
    time.sleep(1.5)
    restarted = fx.status()
    figures += f"; restarted while full: up, worker restarts {d.restarts()}"
    assert d.alive() and d.restarts() == 0, figures
    assert d.mqtt("ingress", restarted).get("connected") and restarted["ready"], figures
    # nothing committed was lost (the new ingress may have fitted a few more into free pages)
    after_restart = line_numbers(inbox(fx))
    assert after_restart == list(range(len(after_restart))) and len(after_restart) >= len(held), figures

    # free the disk: ingress resumes on its next retry and every message the broker kept arrives
    junk.unlink()
    wait_for(lambda: fx.status()["inbox"]["count"] >= a_count + b_count, 30, "batch B after freeing")
    stored = line_numbers(inbox(fx))
    figures += f"; after deleting the junk: {len(stored)}/{a_count + b_count} stored"
    assert stored == list(range(a_count + b_count)), figures

    # (2) the store itself fills the disk. The messages wait at the broker while the daemon is
    # down, so ingress starts with a flood: big batches (up to BATCH_MAX), one of which cannot be
    # committed whole. As the application consumes (acks free pages), what fits must go in
    # rather than wait for room for the whole batch.
    d.stop()
    assert "resuming" in d.log(), figures  # the end of (1), logged at the latest as it stopped
    errors_before = errors_in_log()
    write_lines(tmp_path / "c", c_count, width=2 * width, start=a_count + b_count)
    wait_publisher(publish_lines(broker, INGRESS_TOPIC, tmp_path / "c", client_id="disk-pub"))
    d = run_daemon(config)
    fx = d.fx
    wait_for(lambda: errors_in_log() > errors_before, 60, "the store filling the disk")
    refused_batch = re.findall(r"not acknowledging (\d+) messages", d.log())[-1]
    total = a_count + b_count + c_count
    got: List[int] = []
    ack_errors = 0
    after = None
    deadline = time.monotonic() + 30
    while len(got) < total and time.monotonic() < deadline:
        batch = fx.wait(timeout=2, limit=200, after=after)
        if not batch:
            continue
        got += line_numbers(batch)
        after = batch[-1].id
        try:
            fx.ack(batch)
        except RpcError as exc:
            ack_errors += 1
            assert exc.code == Code.STORE_ERROR, figures
            time.sleep(0.2)
            fx.ack(batch)  # retried until it works (the next commit frees pages too)
    error_lines = [line for line in d.log().splitlines() if "store error" in line]
    figures += (f"; the store filled the disk itself ({errors_in_log() - errors_before} new error"
                f" lines, a batch of {refused_batch} refused), consumer read"
                f" {len(set(got))}/{total}, duplicates"
                f" {len(got) - len(set(got))}, acks refused {ack_errors}")
    # a commit cut short by the full disk fails with EIO in LMDB: still called a full disk
    assert all("no space left on device" in line for line in error_lines), error_lines
    assert got == list(range(total)), figures
    assert d.restarts() == 0, figures

    # no corruption: after a clean stop the store opens and its figures add up
    d.stop()
    store = open_store(config)
    try:
        stats = store.stats()
        left = drain_store_lines(store)
    finally:
        store.close()
    figures += (f"; reopened: received {stats['received']}, acked {stats['acked']}, inbox"
                f" {stats['inbox_count']}, duplicates {stats['duplicates']}")
    report_line(figures)
    assert stats["received"] == total and stats["acked"] == total, figures
    assert stats["inbox_count"] == 0 and left == [], figures


def test_a_write_that_fills_the_disk_is_called_a_full_disk(tiny_disk):
    """Store level, the same tmpfs: LMDB reports a commit cut short by a full disk as EIO
    ("Input/output error"), which reads like a dying SD card. Every failed append must say
    "no space left on device" in one line, leave the committed data intact, and the store must
    take appends again once space frees."""
    from flashlexd.store import Incoming, StoreError
    store = Store(tiny_disk / "data", cap_bytes=16 << 20)
    try:
        committed, errors = 0, []
        while len(errors) < 3:
            batch = [Incoming("t", f"{committed + i:06d} ".encode().ljust(1000, b"x"), mid=i + 1)
                     for i in range(50)]
            try:
                store.append(batch)
                committed += len(batch)
            except StoreError as exc:
                errors.append(str(exc))
        figures = f"full disk at store level: committed {committed} messages, errors {errors}"
        assert all("no space left on device" in e and "\n" not in e for e in errors), figures
        assert drain_store_lines(store) == list(range(committed)), figures
        store.ack(range(1, 201))  # deletes reuse the store's own pages
        store.append([Incoming("t", b"999999 after freeing", mid=60000)])
        report_line(figures + "; append after acking 200: ok")
    finally:
        store.close()



@pytest.mark.parametrize("journal", [False, True], ids=["direct", "journaled"])
@pytest.mark.parametrize("seed", range(1, 41 if FULL else 9))
def test_acks_can_always_free_a_disk_the_store_filled(tiny_disk, seed, journal):
    """Store level, the same tmpfs, twelve rounds: appends fill the disk as far as it goes
    (halving the batch down to one message, as ingress does; sizes mixed over leaf and overflow
    pages), then an application acks every other one of the oldest. A delete needs fresh pages
    too (LMDB copies each leaf it changes), so a full disk must not stop it: every ack must be
    applied, and every refused append must name the full disk. Before the space reserve, every
    seed's first ack failed ("no space left on device"), and ingest then stalled for good. Each
    round costs the reserve the pages the deletes grew the file by (0-3 here): in forty-round
    runs the 32-page reserve of this 2 MB disk first ran out in round 19. `journaled`: acks as
    the supervisor takes them (storeacks.py), each applied at once on a nearly full disk."""
    import random
    from flashlexd.store import Incoming, StoreError
    rng = random.Random(seed)
    store = Store(tiny_disk / "data", cap_bytes=16 << 20)
    if journal:
        store.open_ack_journal()
    held: List[int] = []
    mid, refusals, figures = 0, [], ""
    try:
        for round_no in range(12):
            size = 64
            while size >= 1:
                batch = []
                for _ in range(size):
                    mid = mid % 60000 + 1
                    payload = b"x" * rng.choice((100, 900, 1900, 2100, 5000))
                    batch.append(Incoming("t", payload, mid=mid, qos=1))
                try:
                    held += store.append(batch)
                except StoreError as exc:
                    refusals.append(str(exc))
                    size //= 2
            # every other one of the oldest: an application acking its own topic's messages
            acking = held[:2 * rng.choice((50, 200, 600)):2]
            disk = os.statvfs(tiny_disk)
            figures = (f"seed {seed}, round {round_no}: {len(held)} held, acking {len(acking)},"
                       f" {disk.f_bavail * disk.f_frsize} bytes free,"
                       f" {len(refusals)} appends refused")
            try:
                assert store.ack(acking) == len(acking), figures
            except StoreError as exc:
                pytest.fail(f"{figures}: the ack failed: {exc}")
            assert store.stats()["acks_waiting"] == 0, f"{figures}: the acks were not applied"
            held = [i for i in held if i not in set(acking)]
        assert refusals and all("no space left on device" in r for r in refusals), refusals[:3]
        reserve = (tiny_disk / "data" / "space.reserve").stat()
        figures += f"; every ack applied, {reserve.st_blocks * 512} bytes of reserve left"
        assert reserve.st_blocks > 0, figures
        report_line(figures)
    finally:
        store.close()

# -- 7. hostile local clients -----------------------------------------------------------------

# A separate process (its work is not this test's GIL's). While the file GO exists it storms:
# STORM connections opened at once, one hostile frame on each (random bytes, huge length
# prefixes, deep or huge-header msgpack, wrong params, a torn header), the daemon's error answers
# read while every connection is still open, a `status` on a fresh connection for every tenth
# (real calls must still be served mid-storm), then all closed and a short gap. It records each
# storm's wall-clock interval and rewrites its figures (JSON) after every storm and on pausing.
ATTACKER = r"""
import json, os, random, signal, socket, struct, sys, time
import msgpack
path, out, go, storm, gap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
HEADER = struct.Struct(">I")
rng = random.Random(7)

def frame(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body

def raw(body):
    return HEADER.pack(len(body)) + body

def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data

HOSTILE = [  # (frame, whether the daemon answers it before the connection is closed)
    lambda: (rng.randbytes(rng.randint(1, 4096)), False),              # random bytes
    lambda: (HEADER.pack(0xFFFFFFFF) + b"\0" * 4096, True),            # huge length prefixes
    lambda: (HEADER.pack(64 << 20) + rng.randbytes(1024), True),
    lambda: (raw(b"\x91" * 100000 + b"\xc0"), True),                   # 100k levels deep
    lambda: (raw((b"\xdd" + struct.pack(">I", 1024)) * 1100), True),   # deep, each level 1024 wide
    lambda: (raw(b"\xdf\xff\xff\xff\xff"), True),                      # a 4G-entry map header
    lambda: (raw(rng.randbytes(rng.randint(1, 2048))), True),          # random frame bodies
    lambda: (frame({"v": 1, "id": 3, "method": rng.choice(["ack", "publish", "wait", "messages", "x"]),
                    "params": {"ids": "x" * 100, "timeout": -1, "limit": 2 ** 64 - 1,
                               "topic": "#/+"}}), True),                # wrong params
    lambda: (b"\x00\x00", False),                                      # a torn header
]
stats = {"storms": 0, "answered": 0, "all_at_once": 0, "status_ok": 0, "hostile_frames": 0,
         "connect_errors": 0, "lost": 0, "paused": True, "intervals": []}

def save():
    with open(out + ".tmp", "w") as f:
        json.dump(stats, f)
    os.replace(out + ".tmp", out)

def answer(sock):
    return msgpack.unpackb(recv_exact(sock, HEADER.unpack(recv_exact(sock, 4))[0]))

save()
request = frame({"v": 1, "id": 1, "method": "status"})
while not stop:
    if not os.path.exists(go):
        if not stats["paused"]:
            stats["paused"] = True
            save()
        time.sleep(0.005)
        continue
    stats["paused"] = False
    began = time.time()
    socks = []
    for _ in range(storm):  # all of them open at once
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        try:
            sock.connect(path)
            socks.append(sock)
        except OSError:
            stats["connect_errors"] += 1
            sock.close()
    expected = []
    for sock in socks:
        data, answered = rng.choice(HOSTILE)()
        try:
            sock.sendall(data)
            stats["hostile_frames"] += 1
        except OSError:
            pass
        expected.append(answered)
    answered = 0
    for sock, wanted in zip(socks, expected):  # the errors, while every connection is open
        if wanted:
            try:
                answered += "error" in answer(sock)
            except (OSError, ValueError):
                stats["lost"] += 1
    for _ in socks[::10]:  # and real calls still served in the middle of it
        try:
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.settimeout(20)
            extra.connect(path)
            extra.sendall(request)
            stats["status_ok"] += "result" in answer(extra)
            extra.close()
        except (OSError, ValueError):
            stats["lost"] += 1
    for sock in socks:
        sock.close()
    stats["intervals"].append((began, time.time()))
    stats["storms"] += 1
    stats["answered"] += answered
    stats["all_at_once"] = max(stats["all_at_once"], len(socks))
    save()
    deadline = time.monotonic() + gap * rng.uniform(0.5, 1.5)
    while not stop and time.monotonic() < deadline and os.path.exists(go):
        time.sleep(0.005)
"""

STORM = 500
STORM_GAP = 0.8  # seconds between storms (randomised +-50 %); a storm itself takes 0.1-0.3 s
PHASE = 1.0  # seconds of each quiet and each hostile phase, alternated along one stream
PAIRS = 16 if FULL else 6  # hostile phases the stream lasts for at least (within STREAM_MAX messages);
#                            the phases go on while the last chunk is stored: 7-14 are judged
STREAM_MAX = 2_000_000  # 16 pairs of 1 s at ingress's ~35k msg/s here took over 1,000,000
CHUNK = 30_000  # messages a mosquitto_pub (past 65535 its packet ids wrap and it loses some); the
#                 last is stored after the phases are counted, so a smaller one ends the test sooner
GUARD = 0.05  # seconds after a storm (or a hostile phase) counted as neither (the server's tail)
# supervisor CPU seconds a storm may cost: 72-92 ms measured here on Python 3.11, 125-159 ms on
# 3.9 (its interpreter is slower; 0.15 failed CI there); the parser's pre-pass missing cost 507
STORM_CPU_MAX = 0.25


class Attacker:
    def __init__(self, socket_path: Path, workdir: Path):
        self.script = workdir / "attacker.py"
        self.script.write_text(ATTACKER)
        self.out = workdir / "attacker.json"
        self.go_file = workdir / "attacker.go"
        self.process = subprocess.Popen([sys.executable, str(self.script), str(socket_path),
                                         str(self.out), str(self.go_file), str(STORM), str(STORM_GAP)],
                                        stderr=subprocess.PIPE)
        wait_for(lambda: "storms" in self.figures(), 30, "the attacker")

    def figures(self) -> Dict[str, Any]:
        if self.process.poll() not in (None, 0):
            raise AssertionError(f"the attacker died: {self.process.stderr.read()[-1000:]!r}")
        return self.saved()

    def saved(self) -> Dict[str, Any]:
        """What the attacker last wrote."""
        try:
            import json
            return json.loads(self.out.read_text())
        except (OSError, ValueError):
            return {}

    def go(self) -> None:
        """Start storming (within a few ms)."""
        self.go_file.touch()

    def pause(self) -> None:
        """Stop storming; returns once the storm under way has finished."""
        self.go_file.unlink()
        wait_for(lambda: self.figures().get("paused"), 60, "the attacker to pause")

    def stop(self) -> Dict[str, Any]:
        died = self.process.poll()
        if died is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate(timeout=10)
        assert died in (None, 0), f"the attacker died: {err[-1000:]!r}"
        return self.saved()


class Phases:
    """Alternates quiet and hostile phases of PHASE seconds in a thread, recording each as
    (kind, start, end) in wall-clock time, the clock of the stored commit times, and the CPU
    seconds the supervisor (`pid`) used in it."""

    def __init__(self, attacker: Attacker, pid: int):
        import threading
        self.attacker, self.pid = attacker, pid
        self.phases: List[Tuple[str, float, float]] = []
        self.cpu: List[Tuple[str, float, float]] = []  # (kind, seconds long, supervisor CPU s)
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _record(self, kind: str, began: float, cpu_began: float) -> None:
        ended = time.time()
        self.phases.append((kind, began, ended))
        self.cpu.append((kind, ended - began, cpu_seconds(self.pid) - cpu_began))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                began, cpu = time.time(), cpu_seconds(self.pid)
                self._stop.wait(PHASE)
                self._record("quiet", began, cpu)
                if self._stop.is_set():
                    return
                began, cpu = time.time(), cpu_seconds(self.pid)
                self.attacker.go()
                self._stop.wait(PHASE)
                self.attacker.pause()  # the storm under way belongs to this phase
                self._record("hostile", began, cpu)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> List[Tuple[str, float, float]]:
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise self.error
        return self.phases

    def storm_cpu(self, storms: int) -> float:
        """The supervisor's CPU seconds per storm: what it used in the hostile phases beyond
        its rate in the quiet ones (serving the test's own polling, the workers' links)."""
        def total(kind: str) -> Tuple[float, float]:
            return (sum(t for k, t, _ in self.cpu if k == kind), sum(c for k, _, c in self.cpu if k == kind))
        quiet_time, quiet_cpu = total("quiet")
        hostile_time, hostile_cpu = total("hostile")
        return (hostile_cpu - quiet_cpu / max(quiet_time, 1e-9) * hostile_time) / max(storms, 1)


def count_between(stamps: List[float], a: float, b: float) -> int:
    import bisect
    return bisect.bisect_left(stamps, b) - bisect.bisect_left(stamps, a)


def phase_rates(stamps: List[float], phases: List[Tuple[str, float, float]]
                ) -> List[Tuple[str, float, float, float]]:
    """(kind, rate, start, end) of every phase wholly inside the stream; a quiet phase starts
    GUARD late (the tail of the storm before it)."""
    rates = []
    for kind, a, b in phases:
        if kind == "quiet":
            a += GUARD
        if a >= stamps[0] and b <= stamps[-1] and b > a:
            rates.append((kind, count_between(stamps, a, b) / (b - a), a, b))
    return rates


def storm_and_gap_rates(stamps: List[float], storms: List[Tuple[float, float]],
                        hostile: List[Tuple[float, float]]) -> Tuple[float, float]:
    """Commit rates (messages/s) inside the storms and in the gaps between them, within the
    hostile phases; GUARD after each storm counts as neither."""
    storm_n = gap_n = 0
    storm_s = gap_s = 0.0
    for a, b in hostile:
        inside = sorted((max(x, a), min(y, b)) for x, y in storms if y > a and x < b)
        storm_n += sum(count_between(stamps, x, y) for x, y in inside)
        storm_s += sum(y - x for x, y in inside)
        for x, y in zip([a] + [y + GUARD for _, y in inside], [x for x, _ in inside] + [b]):
            if y > x:
                gap_n += count_between(stamps, x, y)
                gap_s += y - x
    return storm_n / max(storm_s, 1e-9), gap_n / max(gap_s, 1e-9)


# the full run bounds a rate ratio on the whole machine, so nothing runs beside it under xdist;
# the short one (make test) bounds it loosely and runs beside the others: an `alone` test idles them
@(pytest.mark.alone if FULL else lambda test: test)
def test_hostile_local_clients_do_not_slow_ingress(broker, tmp_path, run_daemon):
    """While ingress runs at full rate (one stream of messages from mosquitto_pub, always ahead
    of it), a local process hammers the API socket in alternating phases of a second: quiet,
    hostile, quiet, ... A hostile phase is storms: 500 connections at once, a fuzzed frame on
    each (random bytes, huge length prefixes, deep msgpack, wrong params, torn headers), the
    daemon's error answers read while all 500 are open, a `status` for every tenth on a fresh
    connection, all closed, a gap of about 0.8 s, the next storm. Each message's commit time is
    stored with it, so the one stream gives the ingest rate of every phase; interleaved, both
    kinds of phase sample whatever else the machine is doing alike.

    What a storm costs is judged by the supervisor's CPU (from /proc, per phase): beyond its
    rate in the quiet phases, under STORM_CPU_MAX a storm (72-78 ms here; 507 ms without the
    parser's skip() pre-pass, see the next test, when the storms filled 79 % of the hostile
    time). CPU seconds hardly move with the machine's load; ingest rates do, so they only
    guard against a collapse. Within the hostile phases the rate during the storms themselves
    must be over a quarter of the rate between them (CPU sharing alone leaves half or more), as
    it would not be if the supervisor stalled its workers (in the short run, beside three other
    tests on make test's four processes, over an eighth: 0.24 read once so). Each hostile phase's rate is set
    against the quiet phases on either side of it and the median of those ratios must be over
    0.6 in the full run (alone on the machine): 0.93-0.95 on a quiet machine, 0.69-0.80 seen in
    loaded CI runs of the whole suite (the attacker's own CPU is on the same 2 cores), 0.64
    without the pre-pass; the short run, beside other tests, only guards against a collapse
    (over 0.3; 0.72-0.95 read beside other tests' load).

    Ingress is its own process and the supervisor serves the API, so what slows ingress is CPU
    sharing on this 2-core machine plus anything in the supervisor that could hold a worker up
    (the worker links, heartbeats)."""
    config = make_config(tmp_path / "etc", broker, db={"capMegabytes": 1024})  # the stream stays
    d = run_daemon(config)
    ingress_pid = d.worker("ingress")["pid"]
    warm = tmp_path / "warm"
    write_lines(warm, 5000, width=100, start=900_000)
    wait_publisher(publish_lines(broker, INGRESS_TOPIC, warm, client_id="rate-pub"))
    wait_for(lambda: d.fx.status()["inbox"]["count"] >= 5000, 30, "the warm-up messages")
    d.fx.purge(confirm=True)

    attacker = Attacker(d.daemon.socket_path, tmp_path)
    phases: Optional[Phases] = None
    published = 0
    try:
        # one stream, in chunks: a new mosquitto_pub whenever the previous one is done and
        # ingress is less than a chunk behind, until the phases are counted
        phases = Phases(attacker, d.daemon.proc.pid)
        publisher: Optional[subprocess.Popen] = None
        deadline = time.monotonic() + (600 if FULL else 90)
        while len(phases.phases) < 2 * PAIRS + 2 and time.monotonic() < deadline \
                and published + CHUNK < STREAM_MAX:
            if publisher is not None and publisher.poll() is None:
                time.sleep(0.05)
                continue
            if publisher is not None:
                wait_publisher(publisher)
            if published - d.fx.status()["inbox"]["count"] > CHUNK:
                time.sleep(0.05)
                continue
            lines = tmp_path / "stream-chunk"
            write_lines(lines, CHUNK, width=100, start=published)
            publisher = publish_lines(broker, INGRESS_TOPIC, lines, client_id="rate-pub")
            published += CHUNK
        if publisher is not None:
            wait_publisher(publisher)
        wait_for(lambda: d.fx.status()["inbox"]["count"] >= published, 120, "the stream stored",
                 interval=0.2)
    finally:
        recorded = phases.stop() if phases is not None else []
        attack = attacker.stop()
    status = d.status()
    store = open_store(config)
    try:
        stored = store.messages(limit=published + 1)
    finally:
        store.close()
    stamps = [m.timestamp for m in stored]
    rates = phase_rates(stamps, recorded)
    quiet_rates = [r for kind, r, _, _ in rates if kind == "quiet"]
    hostile_rates = [r for kind, r, _, _ in rates if kind == "hostile"]
    ratio = paired_ratio([(kind, r) for kind, r, _, _ in rates])
    storms = [tuple(i) for i in attack["intervals"]]
    hostile_spans = [(a, b) for kind, _, a, b in rates if kind == "hostile"]
    in_phases = [sum(1 for x, _ in storms if a <= x <= b) for a, b in hostile_spans]
    in_storms, in_gaps = storm_and_gap_rates(stamps, storms, hostile_spans)
    share = sum(min(y, b) - max(x, a) for a, b in hostile_spans for x, y in storms
                if x < b and y > a) / max(sum(b - a for a, b in hostile_spans), 1e-9)
    storm_cpu = phases.storm_cpu(attack["storms"])
    summary = (f"hostile clients: {published} messages in {stamps[-1] - stamps[0]:.1f}s, phases of "
               f"{PHASE:g}s: quiet {' '.join(f'{r:.0f}' for r in quiet_rates)} msg/s, hostile "
               f"{' '.join(f'{r:.0f}' for r in hostile_rates)} msg/s; median hostile/neighbouring quiet "
               f"{ratio:.2f}; inside the "
               f"hostile phases {in_storms:.0f} msg/s during storms vs {in_gaps:.0f} between them "
               f"({in_storms / max(in_gaps, 1e-9):.2f}), storms {share:.0%} of that time; attack: "
               f"{attack['storms']} storms of {STORM} connections open at once, "
               f"{attack['hostile_frames']} hostile frames ({attack['answered']} answered with an "
               f"error while all were open), {attack['status_ok']} status calls served mid-storm, "
               f"{attack['lost'] + attack['connect_errors']} lost/refused; worker restarts {d.restarts()}; "
               f"supervisor CPU {storm_cpu * 1000:.0f} ms a storm")
    report_line(summary)
    assert line_numbers(stored) == list(range(published)), summary  # each once, in order
    assert len(hostile_rates) >= PAIRS - 1 and all(n >= 1 for n in in_phases), summary
    assert attack["all_at_once"] == STORM and attack["lost"] + attack["connect_errors"] == 0, summary
    assert attack["answered"] > attack["storms"] * STORM // 2, summary
    assert attack["status_ok"] == attack["storms"] * (STORM // 10), summary
    assert d.alive() and d.worker("ingress", status)["pid"] == ingress_pid, summary
    assert d.restarts() == 0, summary
    assert in_storms / in_gaps > (0.25 if FULL else 0.12), summary
    assert storm_cpu < STORM_CPU_MAX, summary
    assert ratio > (0.6 if FULL else 0.3), summary


def paired_ratio(rates: List[Tuple[str, float]]) -> float:
    """The median over hostile phases of its rate / the mean rate of the quiet phases on either
    side of it: each hostile phase is judged against its own moment, so a machine whose load
    drifts during the run (other jobs on a shared box) does not pass for an effect of the attack."""
    ratios = []
    for index, (kind, rate) in enumerate(rates):
        neighbours = [r for k, r in rates[max(index - 1, 0):index + 2] if k == "quiet"]
        if kind == "hostile" and neighbours:
            ratios.append(rate / statistics.mean(neighbours))
    return statistics.median(ratios) if ratios else 0.0


def test_nested_container_headers_are_refused_without_the_cpu_cost():
    """The cheapest hostile frame: 5.5 KB of nested array headers, 1024 levels each declaring
    1024 elements. msgpack's unpackb preallocates every declared container (8 MiB, ~8 ms of the
    supervisor's CPU per frame: a thousandfold amplification for whoever sends them); the parser
    must refuse it without building anything. 50 frames in well under 100 ms (it was ~400 ms)."""
    from flashlexd.client.wire import DEFAULT_MAX_FRAME
    from flashlexd.ipc.protocol import RpcFailure, parse_request
    body = (b"\xdd" + struct.pack(">I", 1024)) * 1100
    began = time.perf_counter()
    for _ in range(50):
        with pytest.raises(RpcFailure) as refused:
            parse_request(body, DEFAULT_MAX_FRAME)
        assert refused.value.code == Code.BAD_REQUEST
    took = time.perf_counter() - began
    print(f"nested headers: 50 frames refused in {took * 1000:.1f} ms")
    assert took < 0.1, f"50 nested-header frames took {took * 1000:.0f} ms to refuse"


# -- 8. bad messages --------------------------------------------------------------------------

def raw_publish(broker: Broker, topic: bytes, payload: bytes, client_id: str = "raw-pub") -> str:
    """Publish one QoS 1 message whose topic is raw bytes (mosquitto_pub and paho refuse to
    send invalid UTF-8) over mutual TLS with a hand-made MQTT 3.1.1 client. Returns what the
    broker did: "acknowledged" (PUBACK) or "closed the connection"."""
    context = tls_context(Keys(broker.certs.ca, broker.certs.thing.cert, broker.certs.thing.key))
    with socket.create_connection((HOST, broker.port), timeout=10) as plain:
        with context.wrap_socket(plain, server_hostname=HOST) as sock:
            connect_body = mqtt_string(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 30) \
                + mqtt_string(client_id.encode())
            sock.sendall(mqtt_packet(0x10, connect_body))
            connack = read_mqtt_packet(sock)
            assert connack is not None and connack[0] == 0x20 and connack[1][1] == 0, connack
            sock.sendall(mqtt_packet(0x32, mqtt_string(topic) + struct.pack(">H", 1) + payload))
            try:
                answer = read_mqtt_packet(sock)
            except (ConnectionError, ssl.SSLError):
                answer = None
            if answer is not None and answer[0] == 0x40:
                sock.sendall(mqtt_packet(0xE0, b""))
                return "acknowledged"
            return "closed the connection"


def test_bad_messages_are_stored_or_dropped_as_documented_and_ingress_stays_up(
        broker, tmp_path, run_daemon):
    """Odd payloads and topics through the whole daemon; the ingress worker never restarts.

    - empty, all 256 byte values, non-JSON, invalid UTF-8 payloads: stored as they are (the
      daemon stores bytes; `Message.json()` raises ValueError for non-JSON);
    - exactly maxPayloadBytes (256 KiB) and one byte under: stored; one byte over and 1 MB:
      acknowledged and dropped, counted in `dropped_oversize` (never redelivered);
    - unusual but valid UTF-8 topic levels: stored with the exact topic;
    - invalid UTF-8 in a topic level (and likewise U+0001..U+001F control characters, which
      mosquitto_pub will not even send): mosquitto 2.0 refuses it itself. The PUBLISH is never
      acknowledged: the broker drops that publisher's connection ("Client raw-pub disconnected
      due to malformed packet" in its log) and delivers nothing, so ingress never sees it and
      stays connected. (A lax broker that does deliver one is covered by the next test.)"""
    limit = 262144
    base = INGRESS_TOPIC
    # `+/#`, not `#`: under MQTT 5 mosquitto delivers a message once per matching filter, and
    # `base/#` would also match `base` itself (README, "MQTT 5 and 3.1.1")
    config = make_config(tmp_path / "etc", broker, mqtt={"subscriptions": [f"{base}/+/#"]})
    d = run_daemon(config)
    ingress_pid = d.worker("ingress")["pid"]
    sent: List[Tuple[str, bytes]] = [
        (base, b""),
        (base, bytes(range(256))),
        (base, b"x" * (limit - 1)),
        (base, b"y" * limit),
        (base, b"not json {"),
        (base, b"\xff\xfe\xc0\x80 invalid utf-8 payload"),
        (f"{base}/ünï/😀/\u200b/ ", b'{"odd": "topic levels"}'),
    ]
    oversize = [(base, b"z" * (limit + 1)), (base, b"m" * (1024 * 1024))]
    for topic, payload in sent[:2] + oversize[:1] + sent[2:5] + oversize[1:] + sent[5:]:
        publish(broker, topic, payload)
    invalid = raw_publish(broker, base.encode() + b"/\xff\xfe/\xc3\x28", b'{"bad": "topic"}')
    control = raw_publish(broker, base.encode() + b"/\x01\x1f", b'{"control": "chars"}', "raw-pub-2")
    publish(broker, base, b"last")
    sent.append((base, b"last"))
    wait_for(lambda: d.fx.status()["inbox"]["count"] >= len(sent), 30, "every storable message")
    # the worker's counters reach `status` with its next heartbeat
    wait_for(lambda: d.mqtt("ingress").get("received", 0) >= len(sent) + len(oversize), 10,
             "ingress's counters")
    status = d.status()
    stored = inbox(d.fx)
    ingress = d.mqtt("ingress", status)
    not_json = sum(1 for m in stored if _not_json(m))
    figures = (f"bad messages: sent {len(sent) + len(oversize) + 2}, stored {len(stored)} "
               f"(of which {not_json} not JSON), dropped_oversize {ingress.get('dropped_oversize')}, "
               f"invalid UTF-8 topic: broker {invalid}, control characters in a topic: broker "
               f"{control}; ingress pid "
               f"{'unchanged' if d.worker('ingress', status)['pid'] == ingress_pid else 'CHANGED'}"
               f", worker restarts {d.restarts()}")
    report_line(figures)
    assert [(m.topic, m.payload) for m in stored] == sent, figures
    assert ingress.get("dropped_oversize") == 2, figures
    assert ingress.get("received") == len(sent) + len(oversize), figures
    assert invalid == "closed the connection", figures
    assert control == "closed the connection", figures
    assert "Client raw-pub disconnected due to malformed packet" in broker.log_text(), figures
    assert "Client raw-pub-2 disconnected due to malformed packet" in broker.log_text(), figures
    assert not_json == 7, figures  # all but the odd-topic one: empty, binary, x.., y.., "not json {",
    #                                 the invalid UTF-8 payload and "last"
    assert d.worker("ingress", status)["pid"] == ingress_pid and d.restarts() == 0, figures
    assert ingress.get("connected"), figures
    assert f"dropped a {1024 * 1024}-byte message" in d.log(), figures

    # acked-and-dropped means the broker does not hold them: a restart gets only the new one
    d.stop()
    d = run_daemon(config)
    publish(broker, base, b"marker")
    wait_for(lambda: d.fx.status()["inbox"]["count"] >= len(sent) + 1, 30, "the marker")
    wait_for(lambda: d.mqtt("ingress").get("received") == 1, 10, "the new ingress's counters")
    assert d.mqtt("ingress").get("dropped_oversize") == 0, figures


def _not_json(message: Any) -> bool:
    try:
        message.json()
        return False
    except ValueError:
        return True


def test_an_invalid_utf8_topic_from_a_lax_broker_is_dropped_not_a_crash_loop(
        broker, tmp_path, start_worker):
    """If a broker did deliver a topic that is not UTF-8 (mosquitto does not, see above), paho
    cannot decode it (`MQTTMessage.topic` raises UnicodeDecodeError) and, unacknowledged, it
    would be redelivered after every reconnect: a poison message. Ingress must acknowledge and
    drop it, count it, and go on with the next message on the same connection."""
    bad_topic = INGRESS_TOPIC.encode() + b"/\xff\xfe/\xc3\x28"
    lax = LaxBroker(broker.certs, [(bad_topic, b'{"bad": "topic"}'), (INGRESS_TOPIC.encode(), b"after")])
    try:
        config = write_config(tmp_path / "etc", broker, port=lax.port,
                              mqtt={"protocol": "3.1.1"})  # the lax broker speaks 3.1.1 only
        store = open_store(config)
        worker = start_worker("ingress", config)
        worker.wait(lambda w: w.counters.get("stored") == 1, 20, "the good message stored")
        wait_for(lambda: sorted(lax.acked) == [1, 2], 10, "both acknowledged")
        time.sleep(0.5)
        worker.pump()
        stored = [(m.topic, m.payload) for m in store.messages()]
        counters = {k: worker.counters.get(k) for k in ("received", "stored", "dropped_bad_topic")}
        figures = (f"invalid UTF-8 topic from a lax broker: acked {sorted(lax.acked)}, stored {stored},"
                   f" counters {counters}, connects {lax.connects}, worker alive {worker.alive()}")
        report_line(figures)
        assert worker.alive() and lax.connects == 1, figures
        assert stored == [(INGRESS_TOPIC, b"after")], figures
        assert worker.counters.get("dropped_bad_topic") == 1, figures
        assert "not valid UTF-8" in worker.log_text(), figures
        store.close()
    finally:
        lax.close()
