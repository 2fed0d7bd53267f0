"""RpcServer over real Unix sockets, hosted on a real selector loop (ServerLoop) with a real Store.

`Harness` and `until` are imported by the other API test modules.
"""
import grp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import msgpack
import pytest

from flashlexd import fds
from flashlexd.client import Client, RpcError, connect
from flashlexd.client.wire import HEADER, PROTOCOL_VERSION, RESENDS, Code, encode_frame
from flashlexd.ipc import Limits, Pending, RpcServer, ServerError
from tests.server_loop import ServerLoop
from flashlexd.ipc.methods import Methods
from flashlexd.runtime import ApiRules
from flashlexd.topics import DEFAULT_MAX_TOPIC_BYTES
from flashlexd.store import Incoming, Store
from tests.broker import wait_for

MAX_PAYLOAD = 256 * 1024
EGRESS_TOPIC = "things/dev1/egress"


def until(condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll `condition` until truthy or the deadline passes (then fail)."""
    return wait_for(condition, timeout, what, interval=0.002)


class Harness:
    """A real Store + Methods + RpcServer on a ServerLoop; plays the supervisor's part."""

    def __init__(self, root: Path, limits: Optional[Limits] = None, queueing: int = -1,
                 path: Optional[str] = None, **server_options: Any):
        self.store = Store(root / "data", cap_bytes=64 << 20)
        self.egress_online = True
        self.outbox_wakeups = 0
        self.workers: List[Dict[str, Any]] = [
            {"name": n, "pid": 100 + i, "state": "ready", "restarts": 0, "heartbeat_age": 0.2}
            for i, n in enumerate(("ingress", "egress", "expiry"))]
        self.mqtt = {"ingress": {"connected": True}, "egress": {"connected": True}}
        self.reload: Dict[str, Any] = {"done": 0, "refused": None}
        self.rules = ApiRules(EGRESS_TOPIC, queueing, MAX_PAYLOAD, DEFAULT_MAX_TOPIC_BYTES, MAX_PAYLOAD)
        self.methods = Methods(lambda: self.store, self.supervisor_status, self.outbox_added,
                               lambda: self.egress_online, lambda: self.rules,
                               lambda: self.mqtt["egress"], on_replay=lambda: self.server.notify_inbox())
        self.path = path or str(root / "run" / "flashlexd.sock")
        self.limits = limits or Limits.for_payload(MAX_PAYLOAD)
        self.loop = ServerLoop(lambda selector: RpcServer(self.path, self.methods, self.limits,
                                                          selector, **server_options))

    def supervisor_status(self) -> Dict[str, Any]:
        return {"version": "0.1.0", "uptime": 12.5, "workers": self.workers, "mqtt": self.mqtt,
                "counters": {"restarts": 0}, "reload": self.reload}

    def outbox_added(self) -> None:
        self.outbox_wakeups += 1

    @property
    def server(self) -> RpcServer:
        return self.loop.server  # type: ignore[return-value]

    def start(self) -> "Harness":
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()
        self.store.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the loop thread, as the supervisor runs its own work."""
        return self.loop.call(fn)

    def ingest(self, *messages: Any, notify: bool = True) -> List[int]:
        """Commit messages as ingress would, then tell the server (as the supervisor does)."""
        batch = [m if isinstance(m, Incoming) else Incoming(m[0], m[1]) for m in messages]

        def work() -> List[int]:
            ids = self.store.append(batch)
            if notify:
                self.server.notify_inbox()
            return ids
        return self.call(work)


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path).start()
    yield h
    h.stop()


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)  # blocking: waits for room in the listen backlog
    sock.settimeout(5)
    return sock


def _exactly(sock: socket.socket, count: int) -> bytes:
    buf = b""
    while len(buf) < count:
        chunk = sock.recv(count - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {count} bytes")
        buf += chunk
    return buf


def read_frame(sock: socket.socket) -> Any:
    """One response frame, read exactly (the rest stays in the socket)."""
    (length,) = HEADER.unpack(_exactly(sock, HEADER.size))
    return msgpack.unpackb(_exactly(sock, length), raw=False)


def req(method: str, rid: int = 1, **params: Any) -> bytes:
    return encode_frame({"v": PROTOCOL_VERSION, "id": rid, "method": method, "params": params})


# -- socket file ----------------------------------------------------------------------------------

def test_socket_is_created_0660_in_a_new_0755_directory(harness):
    assert oct(os.stat(harness.path).st_mode & 0o777) == oct(0o660)
    assert oct(os.stat(os.path.dirname(harness.path)).st_mode & 0o777) == oct(0o755)


def test_socket_group_is_applied(tmp_path):
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getegid())
    h = Harness(tmp_path, group=group.gr_name).start()
    try:
        assert os.stat(h.path).st_gid == group.gr_gid
    finally:
        h.stop()


def test_unknown_group_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="socket group 'no-such-group-x' does not exist"):
        RpcServer(str(tmp_path / "s.sock"), None, group="no-such-group-x")  # type: ignore[arg-type]


def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: a daemon killed with SIGKILL
    h = Harness(tmp_path, path=path).start()
    try:
        with connect(path) as fx:
            assert fx.status()["version"] == "0.1.0"
    finally:
        h.stop()


def test_second_daemon_refuses_to_start(harness):
    with pytest.raises(ServerError, match=f"another flashlexd is running on {harness.path}"):
        RpcServer(harness.path, harness.methods)
    with connect(harness.path) as fx:  # and the first one is untouched
        assert fx.status()["inbox"]["count"] == 0


def test_a_regular_file_is_never_deleted(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(ServerError, match="exists and is not a socket"):
        RpcServer(str(path), None)  # type: ignore[arg-type]
    assert path.read_text() == "precious"


def test_socket_file_is_removed_on_close_unless_replaced(tmp_path):
    h = Harness(tmp_path).start()
    h.stop()
    assert not os.path.exists(h.path)
    h2 = Harness(tmp_path / "b").start()
    os.unlink(h2.path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(h2.path)  # another daemon took the path over
    h2.stop()
    assert os.path.exists(h2.path)
    other.close()


# -- peer credentials -----------------------------------------------------------------------------

def run_as_nobody(work: Callable[[], str]) -> str:
    """Fork a child that becomes uid/gid 65534 and runs `work`; returns what it returned (or
    the exception it raised, as text)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        outcome = "?"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            outcome = work()
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


def _as_nobody(path: str) -> str:
    """Call status as uid 65534: "ok", or the error code it got."""
    def status() -> str:
        try:
            with Client(path, timeout=5) as fx:
                fx.status()
            return "ok"
        except RpcError as exc:
            return exc.code
    return run_as_nobody(status)


@pytest.fixture
def world_dir():
    if os.geteuid() != 0:
        pytest.skip("needs root to become another uid")
    path = tempfile.mkdtemp(prefix="flashlexd-uid-")
    os.chmod(path, 0o755)  # nobody must reach the socket: the uid check is what is tested
    yield Path(path)
    for child in Path(path).rglob("*"):
        if child.is_file() or child.is_socket():
            child.unlink()
    for child in sorted(Path(path).rglob("*"), reverse=True):
        child.rmdir()
    os.rmdir(path)


@pytest.mark.parametrize("allowed, expected", [((), Code.FORBIDDEN), ((65534,), "ok")])
def test_uid_outside_the_allow_list_is_refused(world_dir, allowed, expected):
    h = Harness(world_dir, path=str(world_dir / "api.sock"), mode=0o666, allow_uids=allowed).start()
    try:
        assert _as_nobody(h.path) == expected
        with connect(h.path) as fx:  # root always may
            assert fx.status()["version"] == "0.1.0"
        assert h.call(lambda: h.server.counters["refused"]) == (1 if expected != "ok" else 0)
    finally:
        h.stop()


# -- long poll ------------------------------------------------------------------------------------

def test_wait_returns_within_50ms_of_notify(harness):
    with connect(harness.path) as fx:
        outcome: Dict[str, Any] = {}

        def waiter() -> None:
            outcome["messages"] = fx.wait(timeout=10)
            outcome["at"] = time.monotonic()
        thread = threading.Thread(target=waiter)
        thread.start()
        until(lambda: harness.call(lambda: harness.server.parked_count) == 1, what="a parked wait")

        def commit_and_notify() -> float:
            harness.store.append([Incoming("t/1", b"hello")])
            notified = time.monotonic()
            harness.server.notify_inbox()
            return notified
        notified = harness.call(commit_and_notify)
        thread.join(5)
        assert [m.payload for m in outcome["messages"]] == [b"hello"]
        assert outcome["at"] - notified < 0.05


def test_wait_without_notify_times_out_empty(harness):
    with connect(harness.path) as fx:
        harness.ingest(("t/1", b"x"), notify=False)
        start = time.monotonic()
        last = fx.messages()[-1].id
        assert fx.wait(timeout=0.3, after=last) == []
        assert 0.25 <= time.monotonic() - start < 2.0


def test_notify_with_no_match_keeps_waiting(harness):
    with connect(harness.path) as fx:
        result: Dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.setdefault("m", fx.wait(timeout=10, topic="a/#")))
        thread.start()
        until(lambda: harness.call(lambda: harness.server.parked_count) == 1)
        harness.ingest(("b/1", b"other topic"))
        assert harness.call(lambda: harness.server.parked_count) == 1
        harness.ingest(("a/1", b"mine"))
        thread.join(5)
        assert [m.topic for m in result["m"]] == ["a/1"]


def test_closing_a_waiting_connection_unparks_it(harness):
    sock = raw_connect(harness.path)
    sock.sendall(req("wait", timeout=60))
    until(lambda: harness.call(lambda: harness.server.parked_count) == 1)
    sock.close()
    until(lambda: harness.call(lambda: harness.server.parked_count) == 0, what="unpark on close")


def test_a_waiting_connection_with_a_request_behind_is_closed_when_its_peer_leaves(harness):
    """Found by review: an app that exited mid-wait with a next request sent behind the wait
    kept its connection (and a place under maxConnections) until the wait ended, an hour at
    most: input behind a parked wait is not read, so the end-of-file went unseen."""
    sock = raw_connect(harness.path)
    sock.sendall(req("wait", 1, timeout=3600) + req("status", 2))
    until(lambda: harness.call(lambda: [c.header_held for c in harness.server._parked]) == [True],
          what="the wait parked with a request behind it")
    sock.close()
    until(lambda: harness.call(lambda: harness.server.connection_count) == 0, what="closed when its peer left")


def test_a_half_closed_client_gets_its_parked_answer_then_is_closed(harness):
    """Found by review: a client that sent its wait and then shut down its sending side
    (shutdown(SHUT_WR), `socat`, `nc -N`) is still reading, but got a bare end-of-file instead
    of the answer. It now gets the answer, then the end-of-file; and if it leaves altogether
    before the answer, its connection is closed without waiting for the wait to end."""
    sock, gone = raw_connect(harness.path), raw_connect(harness.path)
    for waiter in (sock, gone):
        waiter.sendall(req("wait", 1, timeout=3600))
        waiter.shutdown(socket.SHUT_WR)  # done sending, still reading
    until(lambda: harness.call(lambda: [c.closing for c in harness.server._parked]) == [True, True],
          what="the server saw both end-of-files")
    gone.close()
    until(lambda: harness.call(lambda: harness.server.connection_count) == 1, what="the one that left closed")
    harness.ingest(("s/1", b"one"))
    answer = read_frame(sock)
    assert answer["id"] == 1 and [m["payload"] for m in answer["result"]] == [b"one"]
    assert sock.recv(10) == b""  # then closed
    until(lambda: harness.call(lambda: harness.server.connection_count) == 0, what="closed after the answer")
    sock.close()


def test_requests_after_a_wait_are_answered_in_order(harness):
    sock = raw_connect(harness.path)
    sock.sendall(req("wait", 1, timeout=10) + req("status", 2))
    until(lambda: harness.call(lambda: harness.server.parked_count) == 1)
    harness.ingest(("t", b"1"))
    assert read_frame(sock)["id"] == 1
    assert read_frame(sock)["id"] == 2
    sock.close()


@pytest.mark.parametrize("settle", ["new message", "deadline"])
def test_replays_queued_behind_waits_are_answered(harness, settle):
    """Found by review: a replay (`reset`) queued behind a parked wait is handled while the
    server settles that wait, and it settles the parked waits itself (`on_replay`); the outer
    walk then reached a wait already answered: `internal` to the replay, a traceback logged,
    later waits left parked. Two such connections, so whichever the server settles first,
    the other is answered re-entrantly while still in the outer walk's list."""
    control = raw_connect(harness.path)
    control.sendall(req("messages", 1, consumer="c", paged=True))  # registers c
    assert "result" in read_frame(control)
    apps = [raw_connect(harness.path) for _ in range(2)]
    for n, sock in enumerate(apps):
        sock.sendall(req("wait", 10 + n, consumer="c", paged=True, timeout=60)
                     + req("reset", 20 + n, consumer="c", to="earliest"))
    until(lambda: harness.call(lambda: harness.server.parked_count) == 2, what="both waits parked")
    if settle == "new message":
        harness.ingest(("s/1", b"one"))
    else:
        harness.call(lambda: harness.server.tick(time.monotonic() + 3600))
    for n, sock in enumerate(apps):
        assert read_frame(sock)["id"] == 10 + n
        reset = read_frame(sock)
        assert reset["id"] == 20 + n and "result" in reset, reset
        sock.close()
    assert harness.call(lambda: harness.server.parked_count) == 0
    control.close()


def test_a_failing_pending_poll_answers_with_an_error(tmp_path):
    class Failing:
        def handle(self, method, params, uid=None):
            return Pending(time.monotonic() + 30, poll=lambda: 1 / 0)
    loop = ServerLoop(lambda sel: RpcServer(str(tmp_path / "f.sock"), Failing(), selector=sel)).start()
    try:
        sock = raw_connect(str(tmp_path / "f.sock"))
        sock.sendall(req("anything"))
        until(lambda: loop.call(lambda: loop.server.parked_count) == 1)
        loop.call(lambda: loop.server.notify_inbox())
        assert read_frame(sock)["error"]["code"] == Code.INTERNAL
    finally:
        loop.stop()


def test_a_read_from_a_peer_that_hung_up_is_not_carried_out_and_a_write_is(tmp_path):
    """Found by review: a local user cycling connections that each sent `messages(limit=1000)`
    and closed unread held the loop ~20 ms an answer nobody would read: every other app's call
    went unanswered until ~50 s after the attack stopped. A read for a peer gone changes
    nothing and is skipped; a write it sent before going is still carried out."""
    handled: List[str] = []

    class Recording:
        def handle(self, method, params, uid=None):
            handled.append(method)
    loop = ServerLoop(lambda sel: RpcServer(str(tmp_path / "r.sock"), Recording(), selector=sel)).start()
    try:
        held, release = threading.Event(), threading.Event()
        blocker = threading.Thread(target=loop.call, args=(lambda: held.set() or release.wait(10),))
        blocker.start()
        assert held.wait(5)  # the loop is busy: the peer's requests and its end all wait for it
        sock = raw_connect(str(tmp_path / "r.sock"))
        sock.sendall(req("messages", 1, limit=1000) + req("ack", 2, ids=[1]) + req("status", 3))
        sock.close()
        release.set()
        blocker.join(10)
        until(lambda: loop.call(lambda: loop.server.connection_count) == 0, what="the peer's end seen")
        assert handled == ["ack"]  # the status after it is not read: the ack's answer found the peer gone
        assert loop.call(lambda: loop.server.counters["unread_gone"]) == 1
    finally:
        loop.stop()


# -- limits ---------------------------------------------------------------------------------------

def test_a_method_crash_is_an_internal_error_not_a_dead_server(tmp_path):
    class Crashing:
        def handle(self, method, params, uid=None):
            if method == "crash":
                raise KeyError("boom")
    loop = ServerLoop(lambda sel: RpcServer(str(tmp_path / "c.sock"), Crashing(), selector=sel)).start()
    try:
        sock = raw_connect(str(tmp_path / "c.sock"))
        sock.sendall(req("crash", 1) + req("fine", 2))
        error = read_frame(sock)["error"]
        assert error == {"code": "internal", "message": "internal error: KeyError: 'boom'"}
        assert read_frame(sock) == {"id": 2, "result": None}
    finally:
        loop.stop()


def test_huge_length_prefix_closes_without_allocating(harness):
    sock = raw_connect(harness.path)
    sock.sendall(HEADER.pack(0xFFFFFFFF) + b"x" * 100)
    error = read_frame(sock)
    assert error["id"] is None and error["error"]["code"] == Code.FRAME_TOO_LARGE
    assert sock.recv(10) == b""
    with connect(harness.path) as fx:
        assert fx.status()


def test_more_connections_than_the_limit_get_busy(tmp_path):
    h = Harness(tmp_path, limits=Limits(max_connections=2)).start()
    try:
        a, b, *privileged = [raw_connect(h.path) for _ in range(2 + fds.PRIVILEGED_CONNECTIONS)]
        until(lambda: h.call(lambda: h.server.connection_count) == 2 + fds.PRIVILEGED_CONNECTIONS)
        c = raw_connect(h.path)  # root, past its slots beyond the cap
        assert read_frame(c)["error"]["code"] == Code.BUSY
        a.sendall(req("status"))
        assert "result" in read_frame(a)
        for sock in [b, *privileged]:
            sock.close()
        until(lambda: h.call(lambda: h.server.connection_count) == 1)
        with Client(h.path) as fx:
            assert fx.status()
    finally:
        h.stop()


def test_the_slots_past_the_cap_are_roots_alone_not_the_daemons_users(monkeypatch):
    """Found by review: the daemon's own user had the 8 slots past maxConnections too and no
    per-uid cap, and apps often run as it (`--user` defaults to $SUDO_USER): they could take
    every slot, and `sudo flashlexctl status` was refused."""
    from flashlexd.ipc.admission import Admission, per_uid_cap
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the daemon runs as uid 1000
    admission = Admission()
    assert admission.over_cap(1000, per_uid_cap(8), 2, 8) is not None  # capped as any uid
    assert admission.over_cap(1000, 0, 8, 8) is not None  # no slot past the cap for it
    assert admission.over_cap(0, 100, 8 + 7, 8) is None  # root's reserve


def test_one_user_cannot_take_every_connection(world_dir):
    """Found by review: 1,100 idle connections from one permitted uid (parked waits are never
    idle) took all of maxConnections, and every other app and root got `busy`. Now one uid
    holds a quarter of them at most, and root has slots beyond the cap."""
    h = Harness(world_dir, limits=Limits(max_connections=4), path=str(world_dir / "api.sock"),
                mode=0o666, allow_uids=(65534,)).start()
    held: List[socket.socket] = []
    try:
        def second_connection() -> str:
            with Client(h.path, timeout=5) as first:
                first.status()
                try:
                    with Client(h.path, timeout=5) as second:
                        return str(second.status()["version"])
                except RpcError as exc:
                    return exc.message
        assert run_as_nobody(second_connection) == "too many connections from uid 65534 (1, a quarter of" \
            " maxConnections)"
        held = [raw_connect(h.path) for _ in range(4)]  # root is not capped per uid
        until(lambda: h.call(lambda: h.server.connection_count) == 4)
        assert _as_nobody(h.path) == Code.BUSY
        with Client(h.path, timeout=5) as fx:  # root still gets in
            assert fx.status()["version"] == "0.1.0"
    finally:
        for sock in held:
            sock.close()
        h.stop()


def test_idle_connections_are_closed_and_the_client_reconnects(tmp_path):
    h = Harness(tmp_path, limits=Limits(idle_timeout=0.2)).start()
    try:
        with Client(h.path) as fx:
            fx.status()
            until(lambda: h.call(lambda: h.server.connection_count) == 0, what="idle close")
            assert fx.status()["version"] == "0.1.0"  # transparently reconnected
    finally:
        h.stop()


def test_a_reader_that_stops_reading_is_dropped(tmp_path):
    h = Harness(tmp_path, limits=Limits(write_timeout=0.3, pipeline_high_water=64 * 1024)).start()
    try:
        h.ingest(*[("big", b"x" * 100_000) for _ in range(30)])
        sock = raw_connect(h.path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"".join(req("messages", i, limit=30) for i in range(5)))
        until(lambda: h.call(lambda: h.server.counters["dropped_slow"]) == 1, what="slow reader dropped")
        assert h.call(lambda: h.server.connection_count) == 0
        with connect(h.path) as fx:
            assert len(fx.messages(limit=1)) == 1
    finally:
        h.stop()


def test_write_buffer_is_bounded(tmp_path):
    h = Harness(tmp_path, limits=Limits(max_write_buffer=2 * 1024 * 1024, pipeline_high_water=4 * 1024 * 1024,
                                        write_timeout=60)).start()
    try:
        h.ingest(*[("big", b"y" * 200_000) for _ in range(8)])
        sock = raw_connect(h.path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"".join(req("messages", i, limit=8) for i in range(4)))
        until(lambda: h.call(lambda: h.server.counters["dropped_slow"]) == 1, what="write buffer cap")
    finally:
        h.stop()


def test_pipelined_requests_are_answered_in_order(harness):
    sock = raw_connect(harness.path)
    sock.sendall(b"".join(req("status", i) for i in range(1, 51)))
    assert [read_frame(sock)["id"] for _ in range(50)] == list(range(1, 51))


def test_idle_connections_do_not_slow_others(tmp_path):
    h = Harness(tmp_path).start()
    idle: List[socket.socket] = []
    try:
        with connect(h.path) as fx:
            def median_status() -> float:
                samples = []
                for _ in range(60):
                    start = time.perf_counter()
                    fx.status()
                    samples.append(time.perf_counter() - start)
                return statistics.median(samples)
            baseline = median_status()
            for i in range(200):
                sock = raw_connect(h.path)
                if i % 2:
                    sock.sendall(HEADER.pack(500) + b"\x81")  # a request that never completes
                idle.append(sock)
            until(lambda: h.call(lambda: h.server.connection_count) == 201, what="200 idle connections")
            loaded = median_status()
        assert loaded < max(3 * baseline, baseline + 0.002), (baseline, loaded)
    finally:
        for sock in idle:
            sock.close()
        h.stop()


# -- a stop with requests unread ------------------------------------------------------------------

def _close_once_readable(server: RpcServer, after: float = 0.0) -> None:
    """In the loop's thread (nothing read meanwhile): close once the one connection's request
    is in its socket, unread, and `after` more seconds (a stalled loop) have passed."""
    (conn,) = list(server._conns)
    import select
    assert select.select([conn.sock], [], [], 10)[0], "the request never came"
    time.sleep(after)
    server.close()


def test_a_request_unread_at_the_stop_is_answered_not_carried_out(harness):
    """Review "compat": a request that reached the socket but not the loop when the daemon
    stopped was cut off (a reset): a publish was "may have been queued", and `collectMessage`
    a 500 during `systemctl restart` (4 of 18 restarts)."""
    sock = raw_connect(harness.path)
    sock.sendall(req("status", 1))
    assert read_frame(sock)["id"] == 1

    def send_then_close() -> None:
        frame = msgpack.unpackb(req("publish", 2, payload=b"reading", qos=1, retain=False)[HEADER.size:])
        sock.sendall(encode_frame({**frame, RESENDS: True}))  # a client that sends it again
        _close_once_readable(harness.server)
    harness.call(send_then_close)
    answer = read_frame(sock)
    assert answer["id"] == 2 and answer["error"]["code"] == Code.STOPPING, answer
    assert "not carried out" in answer["error"]["message"]
    assert harness.store.outbox_count() == 0


def test_a_request_of_an_older_client_unread_at_the_stop_is_cut_off_as_before(tmp_path):
    """Re-read 34: an older client took `stopping` for a failure (its `stream()` ended at each
    restart): its request is cut off as before, read first so that the close is no reset."""
    harness = Harness(tmp_path).start()
    try:
        sock = raw_connect(harness.path)
        sock.sendall(req("status", 1))
        assert read_frame(sock)["id"] == 1

        def send_then_close() -> None:
            sock.sendall(req("publish", 2, payload=b"reading", qos=1, retain=False))
            _close_once_readable(harness.server)
        harness.call(send_then_close)
        assert sock.recv(1024) == b""  # EOF, not ECONNRESET
        assert harness.store.outbox_count() == 0
    finally:
        harness.stop()


class _Restart:
    """A daemon on a socket, calls made in threads of their own, and the daemon started on the
    socket once the first is stopped (a restart)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.first = Harness(tmp_path / "first", path=str(tmp_path / "api.sock")).start()
        self.second: Optional[Harness] = None
        self.clients: List[Client] = []
        self.callers: List[threading.Thread] = []
        self.results: List[Any] = []

    def client(self, timeout: float = 20.0) -> Client:
        self.clients.append(Client(self.first.path, timeout=timeout))  # connects now
        return self.clients[-1]

    def calling(self, call: Callable[[], Any]) -> None:
        self.callers.append(threading.Thread(target=lambda: self.results.append(call())))
        self.callers[-1].start()

    def parked(self, what: str) -> None:
        wait_for(lambda: self.first.call(lambda: any(c.parked for c in self.first.server._conns)), 5, what)

    def back(self) -> List[Any]:
        """The daemon back on the socket; what the calls returned once done."""
        self.second = Harness(self.tmp_path / "second", path=self.first.path).start()
        for caller in self.callers:
            caller.join(30)
        return self.results

    def published_to_the_second_only(self) -> None:
        assert self.back() == [1], self.results  # not an RpcError `stopping`, nor a ConnectionLost
        assert self.first.store.outbox_count() == 0 and self.second.store.outbox_count() == 1  # type: ignore[union-attr]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.first.stop()
        if self.second is not None:
            self.second.stop()


@pytest.fixture
def restart(tmp_path) -> Iterator[_Restart]:
    running = _Restart(tmp_path)
    yield running
    running.close()


def test_a_wait_parked_at_a_stop_goes_on_with_the_time_left_at_the_daemon_back(restart):
    """Re-read 34: answered `stopping`, a parked wait was sent again whole, past the client's
    deadline: RpcTimeout, out of `stream()` too (a restart 15 s into a 30 s wait)."""
    client = restart.client(timeout=2)
    started = time.monotonic()
    restart.calling(lambda: client.wait(timeout=5))
    restart.parked("the wait parked")
    time.sleep(2.5)  # into the wait past the client's own timeout (2 s)
    restart.first.call(restart.first.server.close)
    assert restart.back() == [[]], restart.results  # not RpcTimeout
    assert time.monotonic() - started < 8


def test_the_client_sends_a_request_the_stop_turned_away_to_the_daemon_back(restart):
    client = restart.client()
    client.status()

    def publish_then_close() -> None:  # in the loop's thread: the publish is not read first
        restart.calling(lambda: client.publish(b"reading"))
        _close_once_readable(restart.first.server)
    restart.first.call(publish_then_close)
    restart.published_to_the_second_only()


def test_a_request_on_a_connection_still_in_the_backlog_at_the_stop_goes_to_the_daemon_back(restart):
    """Review "restarts": a connection the stopping daemon had not accepted yet was reset with
    the listener, its publish a ConnectionLost ("may have been queued"; 88 in 25 restarts)."""
    def connect_then_close() -> None:  # in the loop's thread: nothing is accepted meanwhile
        import select
        client = restart.client()  # its connection waits in the backlog
        restart.calling(lambda: client.publish(b"reading"))
        assert select.select([restart.first.server._listener], [], [], 10)[0], "no connection came"
        restart.first.server.close()
    restart.first.call(connect_then_close)
    restart.published_to_the_second_only()


def test_every_connection_of_the_backlog_is_turned_away_at_the_stop_not_only_a_batch(tmp_path):
    """Re-read 35: the backlog was taken one accept batch (64) deep; the 65th on were reset."""
    harness = Harness(tmp_path).start()
    socks: List[socket.socket] = []
    try:
        def connect_then_close() -> None:  # in the loop's thread: nothing accepted meanwhile
            frame = msgpack.unpackb(req("publish", 1, payload=b"r", qos=1, retain=False)[HEADER.size:])
            for _ in range(100):
                socks.append(raw_connect(harness.path))
                socks[-1].sendall(encode_frame({**frame, RESENDS: True}))
            harness.server.close()
        harness.call(connect_then_close)
        codes = [read_frame(sock)["error"]["code"] for sock in socks]
        assert codes == [Code.STOPPING] * 100 and harness.store.outbox_count() == 0
    finally:
        for sock in socks:
            sock.close()
        harness.stop()


def test_a_publish_parked_for_its_shared_commit_at_the_stop_goes_to_the_daemon_back(restart):
    """Re-read 35: with apiCommitMs, a publish waiting to share a commit is parked; cut off at
    the stop, it was never queued and its client was told it may have been."""
    import dataclasses
    restart.first.rules = dataclasses.replace(restart.first.rules, write_window=2.0)
    client = restart.client()
    restart.calling(lambda: client.publish(b"reading"))
    restart.parked("the publish parked")
    restart.first.call(restart.first.server.close)
    restart.published_to_the_second_only()


def test_a_connect_flood_does_not_hold_the_stop(tmp_path):
    """Re-read 36: the stop took the backlog until it was empty, the socket file still there:
    a local peer connecting in a loop held `systemctl stop` as long as it went on (5-7 s)."""
    harness = Harness(tmp_path).start()
    flood = (f"import socket, time\nend = time.monotonic() + 6\nwhile time.monotonic() < end:\n"
             f"    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n    s.setblocking(False)\n"
             f"    try:\n        s.connect({harness.path!r})\n    except OSError:\n        pass\n    s.close()\n")
    flooders = [subprocess.Popen([sys.executable, "-c", flood]) for _ in range(2)]
    try:
        wait_for(lambda: harness.server.counters["accepted"] + harness.server.counters["refused"] > 100, 5,
                 "the flood under way")
        started = time.monotonic()
        harness.call(harness.server.close)
        assert time.monotonic() - started < 2, time.monotonic() - started
    finally:
        for flooder in flooders:
            flooder.kill()
            flooder.wait()
        harness.stop()


def test_a_call_turned_away_at_the_stop_with_little_time_left_is_said_not_carried_out(restart):
    """Re-read 37: answered `stopping` 0.1 s before its deadline, a publish was sent again with
    that 0.1 s, timed out (RpcTimeout: "may have been queued") and was queued by the daemon
    back all the same. Sent again only with a second or more left, it is `stopping` here."""
    client = restart.client(timeout=2)
    client.status()
    errors: List[Exception] = []

    def publish() -> None:
        try:
            client.publish(b"reading")
        except RpcError as exc:
            errors.append(exc)

    def stall_then_close() -> None:  # in the loop's thread: the request sits unread until the stop
        caller = threading.Thread(target=publish)
        caller.start()
        restart.callers.append(caller)
        _close_once_readable(restart.first.server, after=1.6)
    restart.first.call(stall_then_close)
    restart.back()
    assert [type(e) for e in errors] == [RpcError] and errors[0].code == Code.STOPPING, errors
    assert restart.second.store.outbox_count() == 0  # type: ignore[union-attr]
