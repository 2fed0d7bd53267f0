"""The local API server, hosted by the supervisor's single-threaded selector loop.

Nothing here blocks: the listening socket and each connection are registered on the selector
the host gives us, with `key.data` pointing back here (`owns(key)`). The host calls
`dispatch(key, mask)` for our keys, `tick()` at least by `next_deadline()` (idle connections,
stalled readers and senders, long-poll deadlines), `notify_inbox()` after ingress committed
messages (it completes parked `wait` calls) and `close()` at shutdown.

Each connection is answered in request order; a parked `wait` holds back its later requests.
Bounded: connections (below the fd limit, `flashlexd.fds`; a quarter of them per uid but root's
and the daemon's, which have a few more beyond the cap: `admission.Admission.over_cap`; `busy`
at once beyond, even out of descriptors), incoming frame bytes of all connections (`connection.ByteBudget`), the time a
frame may take to arrive, unread responses per connection and of all connections (`unsent`:
once spent, a connection still owed data is not served, and an answer over SMALL_ANSWER gets
`busy`). A frame over the limit gets one error and its connection is closed, before anything is
allocated for it.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import selectors
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Protocol, Set, Tuple, Union

from flashlexd import fds
from flashlexd.ipc.admission import Admission, peer_credentials
from flashlexd.ipc.connection import Connection, ByteBudget, Received
from flashlexd.ipc.protocol import (Code, Limits, Pending, RpcFailure, encode_error, encode_result,
                                    parse_request)
from flashlexd.ipc.socketfile import ServerError, bind_socket, socket_file_state
from flashlexd.logs import KindThrottle, LineThrottle
from flashlexd.paths import SOCKET_DIR_MODE, UnsafePath, prepare_dir
from flashlexd.wire import READS

__all__ = ["Handler", "RpcServer", "ServerError"]

log = logging.getLogger("flashlexd.ipc")
_ACCEPT_BATCH = 64
_FRAMES_PER_TURN = 64  # reads of one connection per dispatch, so one peer cannot hog the loop
WALK_STEPS_PER_TURN = 4  # steps all walking parked calls share per turn: pages of SCAN_BUDGET records (~1 ms)
POLLS_PER_TURN = 16  # parked waits polled per turn after a commit: each reads a page at most
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
SMALL_ANSWER = 16 * 1024  # an answer queued even when the unsent budget is spent (status: 2.4 KB)
PRESSURE_WRITE_TIMEOUT = 2.0  # seconds without reading after which a reader is dropped when its room is needed
STOPPING = "flashlexd is stopping: not carried out; send it again once it is back"
FIRST_REQUEST_WAIT = 0.05  # seconds, at a stop, for the requests of the connections in the backlog


class Handler(Protocol):
    def handle(self, method: str, params: Dict[str, Any], uid: int) -> Any:
        """The result, a `Pending` to park the request, or raise RpcFailure."""


class RpcServer:
    """Serves `methods.handle(name, params)` on a Unix socket from the host's selector loop."""

    def __init__(self, path: str, methods: Handler,
                 limits: Union[Limits, Callable[[], Limits], None] = None,
                 selector: Optional[selectors.BaseSelector] = None, *, mode: int = 0o660,
                 group: Optional[str] = None, allow_uids: Iterable[int] = ()):
        """`limits` is fixed, or a callable read on every use (the supervisor's runtime, which
        a reload replaces)."""
        self.path = path
        if limits is None or isinstance(limits, Limits):
            fixed = limits or Limits()
            self._limits: Callable[[], Limits] = lambda: fixed
        else:
            self._limits = limits
        self._methods = methods
        self._own_selector = selector is None
        self.selector = selector or selectors.DefaultSelector()
        self._admission = Admission(allow_uids, group)
        self._mode, self._group = mode, group
        self._listener, self._inode = bind_socket(path, mode, group)
        self.socket_trouble: Optional[str] = None  # why apps cannot reach the socket file now
        self.selector.register(self._listener, selectors.EVENT_READ, self)
        self._spare = fds.SpareFd()
        self._out_of_fds = False  # logged once per episode
        self.budget = ByteBudget(self.limits.max_buffered)
        self.unsent = ByteBudget(self.limits.max_unsent)
        self._refused_size = 0  # the last answer refused for lack of room: reads wait for as much
        self._conns: Set[Connection] = set()
        self._per_uid: Dict[int, int] = {}  # open connections of each uid
        self._parked: Dict[Connection, None] = {}  # in walking order: a stepped walk goes to the back
        self._due: Dict[Connection, None] = {}  # parked waits to poll since a commit, in order
        self._accept_paused_until: Optional[float] = None
        self._next_sweep = time.monotonic() + self._sweep_every()
        self.counters = {"accepted": 0, "refused": 0, "requests": 0, "errors": 0, "dropped_slow": 0,
                         "refused_budget": 0, "dropped_partial": 0, "refused_unsent": 0, "unread_gone": 0}
        self.closed = False
        self._busy_lines, self._budget_lines, self._unsent_lines = LineThrottle(), LineThrottle(), LineThrottle()
        self._drop_lines = KindThrottle(60.0)

    @property
    def limits(self) -> Limits:
        return self._limits()

    def _sweep_every(self) -> float:
        limits = self.limits
        return max(0.01, min(1.0, limits.idle_timeout / 4, limits.write_timeout / 4,
                             limits.frame_timeout / 4))

    # -- what the host loop calls -------------------------------------------------------------

    def owns(self, key: selectors.SelectorKey) -> bool:
        data = key.data
        return data is self or (isinstance(data, Connection) and data.owner is self)

    def dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data is self:
            self._accept()
            return
        conn: Connection = key.data
        if conn.closed:  # closed earlier in the same select batch
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read(conn)
        else:
            self._pump(conn)

    def next_deadline(self) -> float:
        """The time.monotonic() by which `tick()` must run again."""
        deadline = 0.0 if self._due else self._next_sweep  # 0: next turn
        if self._accept_paused_until is not None:
            deadline = min(deadline, self._accept_paused_until)
        for conn in self._parked:
            parked: Pending = conn.parked  # type: ignore[assignment]
            deadline = min(deadline, 0.0 if parked.walking else parked.deadline)  # 0: next turn
        return deadline

    def tick(self, now: Optional[float] = None) -> None:
        """Time-driven work; cheap when nothing is due, so the host may call it every turn."""
        if self.closed:  # its sweep would bind the socket file again (re-read 36)
            return
        now = time.monotonic() if now is None else now
        if self._parked:
            self._poll_turn()
            self._walk_turn()
            for conn, parked in self._each_parked(lambda p: not p.walking and p.deadline <= now):
                if parked.resolve is None:
                    self._complete(conn, parked.timeout_result)
                else:
                    self._settle(conn, parked.resolve, "shared commit")
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self.selector.register(self._listener, selectors.EVENT_READ, self)
        self.budget.limit = self.limits.max_buffered  # a reload may have changed it
        self.unsent.limit = self.limits.max_unsent
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every()
        for conn in list(self._conns):
            if conn.reading and now - conn.frame_started > self.limits.frame_timeout:  # type: ignore[operator]
                got, announced = conn.frame_progress()
                self._log_drop(conn, "partial sender", f"{got} of {announced} frame bytes in"
                               f" {self.limits.frame_timeout:g}s", now)
                self.counters["dropped_partial"] += 1
                self._refuse_frame(conn, Code.FRAME_TIMEOUT, f"a request frame must arrive whole within"
                                   f" {self.limits.frame_timeout:g}s of its first byte ({got} of"
                                   f" {announced} bytes came)")
            elif conn.wbuf and now - conn.last_write > self.limits.write_timeout:
                self._drop_slow_reader(conn, f"it read nothing for {self.limits.write_timeout:g}s", now)
            elif conn.parked is None and not conn.reading and now - conn.last_active > self.limits.idle_timeout:
                self._close_conn(conn)
            elif conn.parked is not None and (conn.header_held or conn.closing) and conn.hung_up():
                self._close_conn(conn)  # its peer left mid-wait: not read, so not seen before
        self._keep_socket_file()  # after the sweep: what it closed frees fds for a new listener

    def _walk_turn(self) -> None:
        """Step the first WALK_STEPS_PER_TURN walking parked calls, each of which then goes to
        the back: one turn's work is bounded however many walk (1,000 parked waits with a
        filter matching nothing stalled the loop 1.5 s at each burst of messages), and the
        loop serves other requests between turns."""
        walking = self._each_parked(lambda p: p.walking)
        for conn, parked in itertools.islice(walking, WALK_STEPS_PER_TURN):
            self._settle(conn, parked.walk.step, "walk")  # type: ignore[union-attr]
            if conn in self._parked:
                self._parked[conn] = self._parked.pop(conn)

    def _drop_slow_reader(self, conn: Connection, why: str, now: float) -> None:
        self._log_drop(conn, "slow reader", why, now)
        self.counters["dropped_slow"] += 1
        self._close_conn(conn)

    def _log_drop(self, conn: Connection, kind: str, why: str, now: float) -> None:
        """One line a minute per kind of dropped connection, with a count: an app crash-looping
        mid-request (or never reading its answers) would otherwise write one per connection."""
        count = self._drop_lines.due(kind, now)
        if count:
            log.warning("API: dropped %d %s%s (last uid %d pid %d: %s)", count, kind,
                        "" if count == 1 else "s", conn.uid, conn.pid, why)

    def notify_inbox(self) -> None:
        """New messages were committed: every parked wait is due a poll (it completes if it
        now has some; a walk only resumes: `tick()` steps it, within WALK_STEPS_PER_TURN).
        POLLS_PER_TURN now, the rest in the next turns: a poll reads a page (SCAN_BUDGET
        records) with a filter, and hundreds of parked waits with a filter that matches little
        polled at once stalled the loop for a second at each burst of messages."""
        self._due.update(dict.fromkeys(self._parked))
        self._poll_turn()

    def _poll_turn(self) -> None:
        for conn in list(itertools.islice(self._due, POLLS_PER_TURN)):
            self._due.pop(conn, None)
            parked = conn.parked
            if parked is not None:  # settling an earlier one may have answered it (a replay)
                self._settle(conn, parked.poll, "wait")

    def _each_parked(self, wanted: Callable[[Pending], bool]) -> Iterator[Tuple[Connection, Pending]]:
        """The parked calls `wanted` picks, each only while it is still parked: settling one
        answers the requests queued behind it, and one of those (a replay: `on_replay`) may
        settle the others re-entrantly."""
        for conn, parked in [(c, c.parked) for c in self._parked if wanted(c.parked)]:  # type: ignore[arg-type]
            if conn.parked is parked:
                yield conn, parked  # type: ignore[misc]

    def _settle(self, conn: Connection, produce: Callable[[], Any], what: str) -> None:
        """Complete parked `conn` with what `produce()` returns (None: not yet), or its error."""
        try:
            result = produce()
        except RpcFailure as failure:
            self._complete_error(conn, failure.code, failure.message)
            return
        except Exception as exc:  # a store failure must not take the loop down
            log.exception("API: %s failed", what)
            self._complete_error(conn, Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            return
        if result is not None:
            self._complete(conn, result)

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def parked_count(self) -> int:
        return len(self._parked)

    def _keep_socket_file(self) -> None:
        """Bind again when the socket file was removed under the running daemon: a second unit
        sharing its RuntimeDirectory= removed the directory when it stopped, and the daemon
        looked healthy while no app could reach it. Another process's socket at the path is
        left alone. Each change is logged once; `socket_trouble` says it in the STATUS= line."""
        state = socket_file_state(self.path, self._inode)
        if state == "ours":
            return
        if state == "other":
            trouble = (f"API socket {self.path} was replaced by another process's (another flashlexd"
                       " with the same socket.path?): apps reach that one, not this daemon")
        else:
            try:
                # its directory checked as at the start: gone too, another user may have made it
                # anew in a sticky /tmp and read every call (review "security")
                prepare_dir(Path(os.path.abspath(self.path)).parent, SOCKET_DIR_MODE, "socket dir")
                listener, inode = bind_socket(self.path, self._mode, self._group)
            except (ServerError, UnsafePath, OSError) as exc:  # OSError: no fd left for it (EMFILE)
                reason = exc if isinstance(exc, (ServerError, UnsafePath)) else exc.strerror or exc
                trouble = (f"API socket {self.path} was removed under the running daemon and binding"
                           f" it again failed ({reason}): apps cannot reach it; trying every second")
            else:
                if self._accept_paused_until is None:
                    self.selector.unregister(self._listener)
                    self.selector.register(listener, selectors.EVENT_READ, self)
                self._listener.close()
                self._listener, self._inode, self.socket_trouble = listener, inode, None
                log.warning("API socket %s was removed under the running daemon (by a unit sharing"
                            " its directory, or by hand); listening on it again", self.path)
                return
        if trouble != self.socket_trouble:
            log.error("%s", trouble)
        self.socket_trouble = trouble

    def close(self) -> None:
        """Remove the socket file if it is still ours, take the listener's backlog, close the
        listener, then turn away and close every connection. In that order: a client whose
        call the close cut off connects again at once (its read sent again), and in the
        listener's backlog that connection was reset, which it took for a second loss (not for
        a daemon gone, which it waits for)."""
        if self.closed:
            return
        self.closed = True
        if self._accept_paused_until is None:
            self.selector.unregister(self._listener)
        try:  # first: no new peer joins the backlog taken next (a connect flood held the stop)
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        waiting = self._take_the_backlog()
        self._listener.close()
        self._spare.close()
        self._await_first_requests(waiting)
        for conn in list(self._conns):
            self._turn_away(conn)
            self._close_conn(conn)
        if self._own_selector:
            self.selector.close()

    def _take_the_backlog(self) -> Set[Connection]:
        """The connections waiting in the listen backlog, accepted so that their requests are
        turned away (`_turn_away`), not reset with the listener: a publish on a fresh
        connection was "may have been queued", a compat `collectMessage` 500 (review
        "restarts": 88 in 25 restarts)."""
        before = set(self._conns)
        while self._accept() == _ACCEPT_BATCH:  # a batch at a time (re-read 35: the 65th on was reset)
            pass
        return self._conns - before

    def _await_first_requests(self, waiting: Set[Connection]) -> None:
        """A connection taken from the backlog has its client's request on the way (sent right
        after the connect): up to FIRST_REQUEST_WAIT for each to arrive."""
        poller = select.poll()
        unheard = {conn.sock.fileno() for conn in waiting}  # one discard per answer: a backlog may hold thousands
        for fd in unheard:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + FIRST_REQUEST_WAIT
        while unheard and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                poller.unregister(fd)
                unheard.discard(fd)

    def _turn_away(self, conn: Connection) -> None:
        """At close, the requests that reached the socket but not the loop are read, not
        carried out, and those whose client resends them (RESENDS) answered `stopping`: a
        publish cut off was a ConnectionLost, "may have been queued", and the compat layer's
        `collectMessage` a 500 during a `systemctl restart` (review "compat", 4 of 18
        restarts; the unread input made the close a reset). The client sends it again to the
        restarted daemon. So too a parked call that resends: a publish or ack waiting for its
        shared commit (apiCommitMs), never made now (re-read 35: cut off, the publish was lost
        to an app that does not resend after a ConnectionLost). A parked `wait` is cut off as
        before: its client sends it again with the time left (re-read 34: answered
        `stopping`, it was resent whole)."""
        if conn.parked is not None and conn.parked.resolve is not None and conn.parked_resends:
            # a shared commit's (`resolve`), not made: not carried out. Steps (an unpaged reset)
            # may be half done: cut off like a wait (re-read 36)
            self._complete_error(conn, Code.STOPPING, STOPPING)  # reads on: the rest turned away too
        elif conn.parked is None:
            self._read(conn)  # `_handle` answers or drops each frame
        self._flush(conn)

    # -- connections --------------------------------------------------------------------------

    def _accept(self) -> int:
        """Accept up to a batch of waiting peers; how many were taken (admitted or refused)."""
        for taken in range(_ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError as exc:
                self._accept_failed(exc)
                return taken
            if self._out_of_fds:
                log.info("API: file descriptors available again (%d connections open)", len(self._conns))
                self._out_of_fds = False
            sock.setblocking(False)
            try:
                pid, uid, gid = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            if not self._admission.admits(sock, uid, gid):
                self._admission.note_refused(uid, pid, time.monotonic())
                self._refuse(sock, Code.FORBIDDEN, f"uid {uid} may not use flashlexd: ask the "
                             "administrator to add it to flashlex.app.socket.allowUids or to the"
                             " socket's group (flashlex.app.socket.group)")
            else:
                self._admit(sock, uid, pid)
        return _ACCEPT_BATCH

    def _admit(self, sock: socket.socket, uid: int, pid: int) -> None:
        """Serve an admitted peer, or answer `busy` naming the cap it met."""
        busy = self._admission.over_cap(uid, self._per_uid.get(uid, 0), len(self._conns),
                                        self.limits.max_connections)
        if busy:
            count = self._busy_lines.due(time.monotonic())
            if count:
                log.warning("API: refused %d connection%s (last uid %d pid %d: %s): %d connections open",
                            count, "" if count == 1 else "s", uid, pid, busy, len(self._conns))
            self._refuse(sock, Code.BUSY, busy)
            return
        conn = Connection(self, sock, uid, pid, time.monotonic())
        self._conns.add(conn)
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        self.selector.register(sock, selectors.EVENT_READ, conn)
        self.counters["accepted"] += 1

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors: answer the waiting peer `busy` through the spare one, so it is
        told at once instead of timing out in the backlog. Any other failure, or no spare:
        pause accepting for a second instead of spinning on the listener's readiness."""
        if exc.errno in _OUT_OF_FDS and not self._out_of_fds:
            log.error("API: out of file descriptors (%s) with %d connections open: answering busy",
                      exc.strerror, len(self._conns))
            self._out_of_fds = True
        if exc.errno in _OUT_OF_FDS and self._spare.release():
            try:
                sock, _ = self._listener.accept()
                self._refuse(sock, Code.BUSY, "flashlexd is out of file descriptors; retry later")
            except OSError:
                pass
            finally:
                self._spare.take()
            return
        if exc.errno not in _OUT_OF_FDS:
            log.warning("API: cannot accept connections: %s; pausing 1s", exc.strerror or exc)
        if not self.closed:  # closing: not registered any more (re-read 35: a KeyError out of the stop)
            self.selector.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + 1.0

    def _refuse(self, sock: socket.socket, code: str, message: str) -> None:
        self.counters["refused"] += 1
        try:
            sock.send(encode_error(None, code, message))  # small: fits the empty socket buffer
        except OSError:
            pass
        sock.close()

    def _read(self, conn: Connection) -> None:
        """Read and answer frames while the peer sends and reads; then set interest. A frame
        being received is always read on (its deadline runs); a complete one waits for its
        turn (a parked wait, unread responses) and nothing more is read meanwhile."""
        max_frame = self.limits.max_frame
        for _ in range(_FRAMES_PER_TURN):
            if conn.closed or conn.closing or (conn.frame_ready and not self._answer_ready(conn)):
                break
            outcome = conn.receive(self.budget, max_frame, time.monotonic(), hold=self._holds(conn))
            if outcome is Received.AGAIN or outcome is Received.HELD:
                break
            if outcome is Received.EOF:
                if (conn.parked is None and not conn.wbuf) or conn.hung_up():
                    self._close_conn(conn)
                    return
                conn.drop_frame(self.budget)  # half-closed (shutdown(SHUT_WR), `nc -N`): it still
                conn.closing = True           # reads, so it gets what it is owed, then is closed
                break
            if outcome is Received.TOO_LARGE:
                self._refuse_frame(conn, Code.FRAME_TOO_LARGE,
                                   f"frame of {conn.announced} bytes exceeds the limit of {max_frame}")
            elif outcome is Received.NO_BUDGET:
                self.counters["refused_budget"] += 1
                count = self._budget_lines.due(time.monotonic())
                if count:
                    log.warning("API: refused %d request%s (last %d bytes from uid %d pid %d): %d of %d"
                                " bytes of incoming requests are held (flashlex.app.socket.maxBufferedBytes)",
                                count, "" if count == 1 else "s", conn.announced, conn.uid, conn.pid,
                                self.budget.used, self.budget.limit)
                self._refuse_frame(conn, Code.BUSY, "flashlexd holds too many incoming request bytes;"
                                   " retry")
        self._pump(conn)

    def _holds(self, conn: Connection) -> bool:
        """Whether the next request must wait its turn: behind a parked wait, or behind
        responses its peer has not read (up to `pipeline_high_water`, or any while all
        connections' unsent answers fill their budget: its peer's reading wakes it)."""
        return conn.parked is not None or len(conn.wbuf) >= self.limits.pipeline_high_water \
            or (bool(conn.wbuf) and self.unsent.spent)

    def _answer_ready(self, conn: Connection) -> bool:
        """Handle the complete frame if its turn has come; True when it was handled."""
        if conn.closing or self._holds(conn):
            return False
        self._handle(conn, conn.take_frame(self.budget))
        self._flush(conn)
        return not conn.closed

    def _refuse_frame(self, conn: Connection, code: str, message: str) -> None:
        """One connection-level error for the frame being read, then close once it is sent."""
        conn.drop_frame(self.budget)
        self._send(conn, encode_error(None, code, message))
        conn.closing = True
        self._pump(conn)

    def _pump(self, conn: Connection) -> None:
        """Answer the complete frame if its turn has come; flush; set interest."""
        if conn.closed:
            return
        if conn.header_held and not self._holds(conn):  # its turn came: reserve and read it now
            self._read(conn)
            return
        if conn.frame_ready:
            self._answer_ready(conn)
        self._flush(conn)
        if not conn.closed:
            self._update_interest(conn)

    def _handle(self, conn: Connection, body: bytearray) -> None:
        self.counters["requests"] += 1
        request_id, method = None, "request"
        try:
            request = parse_request(body, self.limits.max_frame)
            request_id, method = request.id, request.method
            if self.closed:  # stopping: not carried out (`_turn_away`)
                if not request.resends:
                    return  # an older client: cut off with the connection, as before
                raise RpcFailure(Code.STOPPING, STOPPING, request_id)
            if method in READS:
                if conn.hung_up():
                    # nobody to answer, nothing to change: a peer sending a large read and hanging
                    # up, over and over, held the loop ~20 ms a call, every other app's call waiting
                    self.counters["unread_gone"] += 1
                    return
                if method != "status" and not self._room_for_a_large_answer(conn.uid):
                    # it would be built (~20 ms for 1.3 MB) only to be refused: 250 clients not
                    # reading held the loop 4 s a round; `status` (2.4 KB) is always answered
                    self._send(conn, self._no_room(conn, request_id, None))
                    return
            result = self._methods.handle(method, request.params, conn.uid)
        except RpcFailure as failure:
            self.counters["errors"] += 1
            rid = failure.request_id if failure.request_id is not None else request_id
            self._send(conn, encode_error(rid, failure.code, failure.message))
            return
        except Exception as exc:
            log.exception("API: %s failed", method)
            self.counters["errors"] += 1
            self._send(conn, encode_error(request_id, Code.INTERNAL,
                                          f"internal error: {type(exc).__name__}: {exc}"))
            return
        if isinstance(result, Pending):
            conn.parked, conn.parked_id, conn.parked_resends = result, request_id, request.resends
            self._parked[conn] = None
        else:
            self._send_result(conn, request_id, result)

    def _send_result(self, conn: Connection, request_id: Any, result: Any) -> None:
        try:
            frame = encode_result(request_id, result)
        except Exception as exc:  # an unencodable result is a bug in a method, not the peer's
            log.exception("API: cannot encode a result")
            frame = encode_error(request_id, Code.INTERNAL, f"internal error: {type(exc).__name__}")
        if len(frame) > SMALL_ANSWER and not self.unsent.fits(len(frame)):
            limit = self.unsent.limit  # one larger than it goes once at most half is held:
            self._evict_stalled_readers(len(frame) if len(frame) <= limit else limit - limit // 2)
            # an answer larger than the whole budget (one record stored under a larger
            # maxPayloadBytes than a reload left) never fits: it goes while at most half the
            # budget is held (it was `busy` for good, found by review; beside a reader holding a
            # few KB unread too, found by re-read), so what is held stays under budget + one record
            never_fits = len(frame) > self.unsent.limit and self.unsent.used <= self.unsent.limit // 2
            if not self.unsent.fits(len(frame)) and not never_fits:
                self._refused_size = len(frame)
                frame = self._no_room(conn, request_id, len(frame))
        self._send(conn, frame)

    def _room_for_a_large_answer(self, uid: int) -> bool:
        """False: there is no room for an answer as large as the last one refused for the lack
        of it (once stalled readers are dropped for it), and `uid` has answers of its own
        waiting unread, so this read would most likely be built only to be refused too. A uid
        with none waiting is answered as before: another user's slow reading does not turn
        its small reads away (a read of one message was `busy` 1 time in 4 so, found by re-read)."""
        if not self._refused_size:
            return True
        needed = min(self._refused_size, self.unsent.limit)  # a reload may have lowered the limit
        if not self.unsent.fits(needed):
            self._evict_stalled_readers(needed)
        if self.unsent.fits(needed):
            self._refused_size = 0
            return True
        return not any(c.wbuf for c in self._conns if c.uid == uid)

    def _evict_stalled_readers(self, needed: int) -> None:
        """Make room for an answer of `needed` bytes by dropping connections that have read
        nothing of theirs for PRESSURE_WRITE_TIMEOUT, the longest stalled first: a few clients
        that never read (16 were enough) otherwise held the room until `write_timeout` (30 s)
        and every other app's reads got `busy` meanwhile. A reader that reads is never stalled
        that long: its answers leave in milliseconds."""
        now = time.monotonic()
        stalled = sorted((c for c in self._conns if c.wbuf and now - c.last_write > PRESSURE_WRITE_TIMEOUT),
                         key=lambda c: c.last_write)
        for conn in stalled:
            if self.unsent.fits(needed):
                return
            self._drop_slow_reader(conn, f"it read nothing for {now - conn.last_write:.1f}s while the"
                                   " room for unsent answers was needed", now)

    def _no_room(self, conn: Connection, request_id: Any, size: Optional[int]) -> bytes:
        """`busy` for an answer the unsent budget has no room for (only reads answer this
        big: asked again, they lose nothing); logged once a minute with a count."""
        self.counters["refused_unsent"] += 1
        count = self._unsent_lines.due(time.monotonic())
        if count:
            last = "not built" if size is None else f"{size} bytes"
            log.warning("API: refused %d answer%s (last %s, to uid %d pid %d): %d of %d bytes of"
                        " unsent answers are held", count, "" if count == 1 else "s", last, conn.uid,
                        conn.pid, self.unsent.used, self.unsent.limit)
        return encode_error(request_id, Code.BUSY, "flashlexd holds too many unsent answer bytes"
                            " (clients not reading theirs); retry")

    def _send(self, conn: Connection, frame: bytes) -> None:
        """Queue a frame. One response always fits; unread ones piling up past the cap do not."""
        if conn.closed:
            return
        if not conn.wbuf:
            conn.last_write = time.monotonic()  # the stall clock starts when data is owed
        elif len(conn.wbuf) + len(frame) > self.limits.max_write_buffer:
            self._drop_slow_reader(conn, f"{len(conn.wbuf) + len(frame)} unread response bytes",
                                   time.monotonic())
            return
        conn.wbuf += frame
        self.unsent.charge(len(frame))

    def _flush(self, conn: Connection) -> None:
        if conn.closed or not conn.wbuf:
            return
        try:
            sent = conn.sock.send(conn.wbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close_conn(conn)
            return
        if sent:
            del conn.wbuf[:sent]
            self.unsent.release(sent)
            conn.last_write = conn.last_active = time.monotonic()
        if not conn.wbuf and conn.closing:
            conn.discard_input()
            self._close_conn(conn)

    def _complete(self, conn: Connection, result: Any) -> None:
        self._unpark(conn)
        self._send_result(conn, conn.parked_id, result)
        if not conn.closed:
            self._pump(conn)

    def _complete_error(self, conn: Connection, code: str, message: str) -> None:
        self._unpark(conn)
        self._send(conn, encode_error(conn.parked_id, code, message))
        if not conn.closed:
            self._pump(conn)

    def _unpark(self, conn: Connection) -> None:
        conn.parked = None
        conn.last_active = time.monotonic()
        self._parked.pop(conn, None)
        self._due.pop(conn, None)

    def _update_interest(self, conn: Connection) -> None:
        events = conn.wanted_events(self._holds(conn))
        if events == conn.events:
            return
        if conn.events and events:
            self.selector.modify(conn.sock, events, conn)
        elif events:
            self.selector.register(conn.sock, events, conn)
        else:
            self.selector.unregister(conn.sock)  # nothing to do until a parked wait completes
        conn.events = events

    def _forget_uid(self, uid: int) -> None:
        left = self._per_uid[uid] - 1
        if left:
            self._per_uid[uid] = left
        else:
            del self._per_uid[uid]

    def _close_conn(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.drop_frame(self.budget)
        self.unsent.release(len(conn.wbuf))
        self._conns.discard(conn)
        self._parked.pop(conn, None)
        self._due.pop(conn, None)
        self._forget_uid(conn.uid)
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()

