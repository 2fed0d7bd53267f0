"""Shared pieces of the fault-injection ("chaos") scenarios.

Two sizes: short (the default, part of `make test`) and full (`make chaos`, which sets
FLASHLEXD_CHAOS=full). `scale(short, full)` picks a figure for the current size and
`chaos_timeout(short, full)` the matching per-test pytest timeout.

Every scenario ends with one result line (`Result`): printed at once (visible with -s), repeated
in pytest's terminal summary, and attached to assertion messages so a failure carries it too.

Everything runs for real: the daemon (`tests.daemon.Daemon`), a mutual-TLS mosquitto (the
`broker` fixture of tests/conftest.py), independent peers (mosquitto_pub/_sub, or
`AckedPublisher`, a paho process that logs each PUBACK) and the client API (`OutboxFeeder`).
"""
from __future__ import annotations

import collections
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import yaml

from flashlexd.client import FlashlexError, RpcError, connect
from flashlexd.store import Store, StoreBusy
from tests.broker import INGRESS_TOPIC, Broker, open_store, publish, wait_for, write_config
from tests.chaos.results import take_lines
from tests.daemon import Daemon

CHAOS_ENV = "FLASHLEXD_CHAOS"
FULL = os.environ.get(CHAOS_ENV, "").strip().lower() == "full"
SETTLE_PREFIX = b"settle-"  # marker payloads (`settle_ingress`), left out of every tally
PUBLISHER = Path(__file__).with_name("acked_publisher.py")

_results: List[str] = []  # every Result line of the session, for the terminal summary


def scale(short, full):
    """The figure for this run: `full` under FLASHLEXD_CHAOS=full (make chaos), else `short`."""
    return full if FULL else short


def chaos_timeout(short: float, full: float):
    """A pytest-timeout mark sized for the current mode (the suite default is 120 s)."""
    return pytest.mark.timeout(scale(short, full))


def eventually(predicate, timeout: float) -> bool:
    """Like `wait_for`, but False at the deadline instead of failing, so that the caller's own
    assertion (with its result line) tells what is missing."""
    try:
        wait_for(predicate, timeout, "")
        return True
    except AssertionError:
        return False


def rng(name: str) -> random.Random:
    """A seeded random source, the seed printed so a failing run can be replayed with
    FLASHLEXD_CHAOS_SEED."""
    seed = int(os.environ.get("FLASHLEXD_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\n{name}: seed {seed}", flush=True)
    return random.Random(seed)


# -- the one-line results, in pytest's "chaos results" summary -------------------------------

_summary: List[str] = []  # the lines of every test reported to this process


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test's result lines travel in its report (so from pytest-xdist's workers too)."""
    outcome = yield
    if call.when == "call":
        outcome.get_result().user_properties.extend(("chaos result", line) for line in take_lines())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _summary.extend(value for key, value in report.user_properties if key == "chaos result")


def pytest_terminal_summary(terminalreporter) -> None:
    if _summary:
        terminalreporter.section("chaos results")
        for line in _summary:
            terminalreporter.write_line(line)


# -- config and daemon ------------------------------------------------------------------------

def chaos_config(broker: Broker, directory: Path, *, mqtt: Optional[dict] = None,
                 supervisor: Optional[dict] = None, db: Optional[dict] = None) -> Path:
    """A config for the chaos runs: heartbeats every 0.2 s, a hung worker killed after 3 s,
    restarts backed off at most 0.5 s, and a crash-loop limit no chaos run reaches (the
    scenarios kill workers on purpose, far more often than a crash loop)."""
    path = write_config(directory, broker, mqtt=mqtt, db=db)
    document = yaml.safe_load(path.read_text())
    document["flashlex"]["app"]["supervisor"] = dict(
        {"heartbeatSeconds": 0.2, "heartbeatTimeoutSeconds": 3, "stopTimeoutSeconds": 5,
         "restartBackoffMaxSeconds": 0.5, "crashLoopRestarts": 1_000_000,
         "crashLoopWindowSeconds": 1}, **(supervisor or {}))
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class Daemons:
    """Start the real daemon (again and again) on one config; all stopped by PID at teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: List[Daemon] = []

    def start(self, config: Path, ready: bool = True, timeout: float = 30) -> Daemon:
        daemon = Daemon(config, self.workdir).start()  # every run appends to one daemon.log
        self.started.append(daemon)
        if ready:
            wait_ready(daemon, timeout)
        return daemon

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    running = Daemons(tmp_path / "daemon")
    yield running
    running.stop_all()


def daemon_status(daemon: Daemon) -> Optional[dict]:
    """The API's status, or None while the daemon does not answer."""
    try:
        with connect(str(daemon.socket_path), timeout=2) as client:
            return client.status()
    except FlashlexError:
        return None


def wait_ready(daemon: Daemon, timeout: float = 30, connected: Sequence[str] = ("ingress", "egress")
               ) -> dict:
    """Wait until the daemon said READY (every worker up) and the named links are connected."""
    def ready() -> Optional[dict]:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({daemon.proc.returncode}):\n"
                                 f"{daemon.output()[-3000:]}")
        status = daemon_status(daemon)
        if status and status.get("ready") and all(
                status["mqtt"].get(name, {}).get("connected") for name in connected):
            return status
        return None
    return wait_for(ready, timeout, f"the daemon ready with {', '.join(connected)} connected")


def power_cut(daemon: Daemon) -> None:
    """SIGKILL the daemon's whole process group (supervisor and workers at once) and reap it."""
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    wait_for(lambda: not _group_alive(daemon.pid), 10, "the daemon's process group gone")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# -- hangs ------------------------------------------------------------------------------------

# pwrite64, fsync, fdatasync, pwritev: where LMDB's commit spends its time, holding the lock
_STORE_WRITE_SYSCALLS = {"x86_64": {"18", "74", "75", "296"},
                         "aarch64": {"68", "82", "83", "70"}}.get(platform.machine(), set())


def stop_inside_commit(pid: int, timeout: float = 2) -> bool:
    """SIGSTOP `pid`, if possible while it is inside a store write (pwrite or fdatasync, seen
    in /proc/PID/syscall), so that it hangs holding LMDB's write lock. Returns whether it did
    (else it is stopped wherever it was at `timeout`)."""
    deadline = time.monotonic() + timeout
    syscall = Path(f"/proc/{pid}/syscall")
    while time.monotonic() < deadline:
        try:
            number = syscall.read_text().split(" ", 1)[0]
        except OSError:
            break
        if number in _STORE_WRITE_SYSCALLS:
            os.kill(pid, signal.SIGSTOP)
            return True
    os.kill(pid, signal.SIGSTOP)
    return False


def write_lock_held(store: Store, wait: float = 0.5) -> bool:
    """Whether another process holds the store's write lock: a write transaction that changes
    nothing does not get it within `wait` (its helper thread then waits on, called off, and
    aborts once the lock is free)."""
    previous, store.write_wait = store.write_wait, wait
    try:
        store.ack([2 ** 64 - 1])  # an id that is never used
        return False
    except StoreBusy:
        return True
    finally:
        store.write_wait = previous


def hang_holding_write_lock(pid: int, store: Store, attempts: int = 10) -> Optional[float]:
    """SIGSTOP `pid` (an ingress under a steady flood: it commits all the time) inside a
    commit, retried until it holds the store's write lock. Returns when (time.monotonic())
    the stop that held it was sent, or None: stopped, but not holding the lock."""
    for _ in range(attempts):
        stopped_at = time.monotonic()
        if stop_inside_commit(pid) and write_lock_held(store):
            return stopped_at
        os.kill(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGSTOP)
    return None


# -- the store, seen from the test ------------------------------------------------------------

def inbox_payloads(store: Store) -> List[bytes]:
    """Every inbox payload, oldest first, without the settle markers."""
    return [p for _, p in inbox_records(store)]


def inbox_records(store: Store) -> List[Tuple[int, bytes]]:
    """(id, payload) of every inbox message, oldest first, without the settle markers."""
    return [(m.id, m.payload) for m in store.messages(limit=10_000_000)
            if not m.payload.startswith(SETTLE_PREFIX)]


def reopen(store: Store, config: Path) -> Store:
    """Close the test's handle and open the store again (proves it still opens)."""
    store.close()
    return open_store(config)


_settle_count = 0
TAIL_PAGE = 10_000  # inbox messages read per page while waiting for a settle marker


def settle_ingress(broker: Broker, store: Store, stall: float = 30) -> float:
    """Publish a marker to the ingress topic and wait until it is stored: the broker delivers to
    a session in order, redeliveries first, so everything it held for the daemon before the
    marker has then been through ingress. Returns the seconds it took.

    The wait fails only when nothing new is stored for `stall` seconds (a link that is up but
    delivers nothing: the failure that matters); the test's timeout bounds the rest. A full-size
    run can leave a long backlog to drain first: 20 power cuts on RabbitMQ leave ~170,000
    messages queued (its prefetch of 10 lets ~2,500 a second through), over a minute of work.
    Only the messages stored since the last look are read: a whole-inbox scan per poll took
    1.6 s of CPU at that size, taken from the daemon it waits for."""
    global _settle_count
    _settle_count += 1
    marker = SETTLE_PREFIX + str(_settle_count).encode()
    after = store.stats()["inbox_last_id"]
    publish(broker, INGRESS_TOPIC, marker)
    started = progressed = time.monotonic()
    while True:
        page = store.messages(limit=TAIL_PAGE, after=after)
        if any(m.payload == marker for m in page):
            return time.monotonic() - started
        if page:
            after, progressed = page[-1].id, time.monotonic()
        elif time.monotonic() - progressed > stall:
            raise AssertionError(f"the settle marker {marker.decode()} not stored: nothing stored for"
                                 f" {stall:g}s (the last stored id is {after})")
        else:
            time.sleep(0.05)


def tally(sent: Sequence[bytes], stored: Sequence[bytes]) -> Dict[str, int]:
    """lost: sent, never stored; duplicated: extra copies; unknown: stored, never sent;
    out_of_order: first copies not in the order sent."""
    counts = collections.Counter(stored)
    wanted = set(sent)
    position = {p: i for i, p in enumerate(sent)}
    firsts = [position[p] for p in dict.fromkeys(stored) if p in position]
    return {"lost": sum(1 for p in wanted if p not in counts),
            "duplicated": sum(n - 1 for n in counts.values() if n > 1),
            "unknown": sum(1 for p in counts if p not in wanted),
            "out_of_order": sum(1 for a, b in zip(firsts, firsts[1:]) if b < a)}


# -- load: the outbox through the client API --------------------------------------------------

class OutboxFeeder(threading.Thread):
    """An application publishing numbered payloads through `flashlexd.client`, as fast as the
    daemon takes them, until `stop()` (or `count`). A call that fails (daemon gone) is retried
    with the same payload once the daemon answers again, like an application that must not drop
    its data; so a payload may be queued twice, and every one was queued at least once. A
    `busy` answer (the store is busy: a hung worker holds its write lock, past the client's own
    retries) is retried too.

    `attempted`: payloads in the order first tried; `returned`: (payload, outbox id) of every
    publish() that returned, i.e. committed to the outbox."""

    RETRY_PAUSE = 0.05  # between attempts while the daemon does not answer

    def __init__(self, socket_path: Path, prefix: str = "out", count: Optional[int] = None):
        super().__init__(daemon=True, name="outbox-feeder")
        self.socket_path = str(socket_path)
        self.prefix = prefix
        self.count = count
        self.attempted: List[bytes] = []
        self.returned: List[Tuple[bytes, int]] = []
        self.failed_calls = 0  # the daemon did not answer
        self.busy_calls = 0    # busy: the store was busy past the client's retries
        self.error: Optional[BaseException] = None
        self._halt = threading.Event()

    def run(self) -> None:
        client = None
        index = 0
        try:
            while not self._halt.is_set() and (self.count is None or index < self.count):
                payload = f"{self.prefix}-{index:07d}".encode()
                if not self.attempted or self.attempted[-1] != payload:
                    self.attempted.append(payload)
                try:
                    if client is None:
                        client = connect(self.socket_path, timeout=5)
                    self.returned.append((payload, client.publish(payload)))
                    index += 1
                except RpcError as exc:
                    if exc.code != "busy":
                        raise  # refused (outbox_full, bad_params...): not a chaos effect
                    self.busy_calls += 1
                    self._halt.wait(self.RETRY_PAUSE)
                except FlashlexError:
                    self.failed_calls += 1
                    if client is not None:
                        client.close()
                        client = None
                    self._halt.wait(self.RETRY_PAUSE)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            if client is not None:
                client.close()

    @property
    def progress(self) -> int:
        return len(self.returned)

    def stop(self, timeout: float = 30) -> None:
        self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), "the outbox feeder did not stop"
        if self.error is not None:
            raise AssertionError(f"the outbox feeder failed: {self.error!r}")


# -- load: an independent publisher that logs its PUBACKs -------------------------------------

class AckedPublisher:
    """tests/chaos/acked_publisher.py as a process: QoS 1 numbered payloads to `topic`, every
    PUBACK logged with its time; a dropped connection's unacknowledged messages are never sent
    again. `stop()` lets it collect the PUBACKs still due."""

    def __init__(self, broker: Broker, topic: str, log: Path, *, rate: float = 0, count: int = 0,
                 width: int = 32, inflight: int = 50, client_id: str = "chaos-acked-pub"):
        self.log = log
        identity = broker.certs.thing
        argv = [sys.executable, str(PUBLISHER), "--port", str(broker.port), "--cafile",
                str(broker.certs.ca), "--cert", str(identity.cert), "--key", str(identity.key),
                "--topic", topic, "--log", str(log), "--rate", str(rate), "--count", str(count),
                "--width", str(width), "--inflight", str(inflight), "--client-id", client_id]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        broker.peers.append(self.process)  # killed by broker.close() if still running

    def _entries(self) -> Iterator[List[str]]:
        text = self.log.read_text() if self.log.exists() else ""
        for line in text.splitlines():
            fields = line.split(" ", 3)
            if len(fields) >= 3:
                yield fields

    def acks(self) -> List[Tuple[int, float, bytes]]:
        """(connection, time, payload) of every PUBACK so far, in order."""
        return [(int(f[1]), float(f[2]), f[3].encode()) for f in self._entries()
                if f[0] == "A" and len(f) == 4]

    def published(self) -> List[bytes]:
        """Every payload handed to a connection, in order (each at most once)."""
        return [f[3].encode() for f in self._entries() if f[0] == "P" and len(f) == 4]

    def connections(self) -> Dict[int, float]:
        """connection number -> when it came up."""
        return {int(f[1]): float(f[2]) for f in self._entries() if f[0] == "C"}

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        assert code == 0, f"acked_publisher exited {code}: {self.process.stderr.read().decode()[-2000:]}"
