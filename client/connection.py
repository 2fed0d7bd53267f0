"""A blocking connection to flashlexd's local API (stdlib + msgpack only)."""
from __future__ import annotations

import grp
import json
import logging
import os
import select
import socket
import stat
import threading
import time
import weakref
from collections import abc
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import msgpack

from flashlexd.client.calllock import CallLock
from flashlexd.client.errors import (ConnectionLost, DaemonNotRunning, Forbidden, PermissionDenied,
                                     ProtocolError, RpcError, RpcTimeout)
from flashlexd.client.message import Message, OutboxEntry
from flashlexd.client.wire import (CONSUMER_NAME_RULE, DEFAULT_SOCKET, HEADER,
                                   MAX_IDS_PER_ACK, MAX_RESPONSE_FRAME, MAX_WAIT_SECONDS,
                                   PROTOCOL_VERSION, RESENDS, SOCKET_ENV, Code, encode_frame,
                                   valid_consumer_name)

IdLike = Union[int, str, Message]
log = logging.getLogger("flashlexd.client")
RECONNECT_PAUSES = (0.1, 0.2, 0.5, 1.0, 2.0)  # seconds between tries while the daemon is away
BUSY_PAUSE = 1.0  # seconds a follower waits before asking a busy daemon again
BUSY_RETRY_FIRST = 0.05  # seconds before a call answered `busy` is first asked again (doubling)
# seconds a call answered `stopping` must have left to be sent again: one sent with less timed out
# though the daemon back carried it out (re-read 37), where `stopping` said plainly "not done"
STOPPING_RESEND_FLOOR = 1.0


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:  # gone since: as a dead socket
        return True


def socket_path(path: Optional[str] = None) -> str:
    """The socket to use: `path`, else $FLASHLEXD_SOCKET, else the packaged default."""
    return os.fspath(path) if path else (os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


# the client cannot read the config: either key may be the cure, and under systemd either one
# set after the install needs the unit rendered again (its Group= or its runtime dir's mode)
ASK_ADMIN = ("ask the administrator to add this user to flashlex.app.socket.group or"
             " flashlex.app.socket.allowUids (then, under systemd, `flashlexd service ... --install`"
             " and a restart)")


def _group_hint(path: str) -> str:
    """What to do about a denied socket: join its group, when it has one besides root's."""
    try:
        gid = os.stat(path).st_gid
    except OSError:
        directory = os.path.dirname(path) or "."
        return f"its directory {directory} is closed to this user: run as root, or {ASK_ADMIN}"
    if gid == 0:
        return f"the socket is root's only: run as root, or {ASK_ADMIN}"
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    # either one lets the user in: allowUids makes the socket 0666 and leaves it to the peer check
    return (f"add this user to group {group!r} (then log in again), or its uid to"
            " flashlex.app.socket.allowUids (the socket is then 0666 and the daemon's peer check"
            " decides), or run as root")


_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()  # reset in a forked child


def _after_fork_in_child() -> None:
    """multiprocessing forks by default on Linux, possibly while another thread is in a call."""
    for client in list(_CLIENTS):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Client:
    """One connection to flashlexd. Use as a context manager, or call `close()`.

    Thread-safety: calls are serialised by a lock, so the Client may be shared, but a long
    `wait` then holds up the other threads' calls; give each thread its own Client (one
    connection per thread) when they should not wait on each other. A connection the daemon
    closed while idle is remade transparently on the next call."""

    def __init__(self, path: Optional[str] = None, timeout: float = 10.0,
                 consumer: Optional[str] = None):
        self.path = socket_path(path)
        self.timeout = seconds(timeout, "timeout")
        if consumer is not None and not valid_consumer_name(consumer):
            raise ValueError(f"consumer must be {CONSUMER_NAME_RULE}, not {consumer!r}")
        self.consumer = consumer  # None: the default consumer (the shared inbox)
        self._sock: Optional[socket.socket] = None
        self._poller = select.poll()
        self._buf = bytearray()
        self._next_id = 0
        self._resume: Dict[str, int] = {}  # a timed-out wait's query -> where its walk stopped
        # (the daemon's run, the mark of its last replay of this client's consumer): marks are per run
        self._replays: Optional[Tuple[Optional[int], int]] = None
        self._replay_events = 0  # replays noticed: what `stream` watches
        self._voided = 0  # replays and reconnects noticed: remembered places void at each
        # re-entrant: a signal handler's call may come in while this thread holds it (CallLock)
        self._replays_lock = threading.RLock()
        self._busy_told = False  # `follow` warned of a busy daemon since its last read
        self._was_connected = False  # a later connect is a reconnect: the daemon may be restarting
        self._away_told = False  # warned that the daemon is away, since the last connect
        self._warn_away = True  # False: the layer above says so itself (the old SDK's compat)
        self._lock = CallLock()
        with self._lock.held():
            self._connect()
        _CLIENTS.add(self)

    # -- plumbing -----------------------------------------------------------------------------

    def _connect(self) -> None:
        deadline, pause = time.monotonic() + self.timeout, 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                break
            except BlockingIOError as exc:  # the listen backlog is full: retry until the deadline
                sock.close()
                if time.monotonic() + pause > deadline:
                    raise self._connect_error(exc) from None
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
            except BaseException as exc:
                sock.close()
                raise self._connect_error(exc) from None
        if self._was_connected:
            with self._replays_lock:
                self._void_places()
        self._sock, self._buf, self._was_connected, self._away_told = sock, bytearray(), True, False
        self._poller = select.poll()  # poll, not select: the fd may be above FD_SETSIZE
        self._poller.register(sock, select.POLLIN)

    def _connect_error(self, exc: BaseException) -> BaseException:
        path = self.path
        if isinstance(exc, FileNotFoundError):
            return DaemonNotRunning(f"flashlexd is not running: no socket at {path} "
                                    f"(set ${SOCKET_ENV} or --socket if it listens elsewhere)", path)
        if isinstance(exc, (ConnectionRefusedError, PermissionError)) and os.path.lexists(path) \
                and not _is_socket(path):  # a config file or a log given by mistake (not writable: denied)
            return DaemonNotRunning(f"{path} is not a socket (the daemon listens on its config's "
                                    "flashlex.app.socket.path)", path)
        if isinstance(exc, ConnectionRefusedError):
            return DaemonNotRunning(f"flashlexd is not running: nothing listens on {path}", path)
        if isinstance(exc, PermissionError):
            return PermissionDenied(f"permission denied on {path}: {_group_hint(path)}")
        if isinstance(exc, (socket.timeout, BlockingIOError)):
            return DaemonNotRunning(f"flashlexd does not accept connections on {path} (overloaded?)", path)
        if isinstance(exc, OSError):
            return DaemonNotRunning(f"cannot connect to flashlexd on {path}: {exc.strerror or exc}", path)
        return exc

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, bytearray()

    def _forked(self) -> None:
        """In a child forked from this process: the connection is the parent's (shared, the
        answers would cross) and the lock may be held by a thread that does not exist here."""
        if self._sock is not None:
            self._sock.close()  # this process's copy only: the parent's connection goes on
        self._sock, self._buf = None, bytearray()
        self._lock, self._replays_lock = CallLock(), threading.RLock()

    def _await_daemon(self, until: float) -> None:
        """Before a call of a client that has been connected and whose connection is gone (a
        restart, likely): wait for the daemon until `until`, outside the lock (other threads'
        calls go on meanwhile, each waiting within its own). Nothing was sent yet, so any call
        may wait; the call's own deadline starts after it. A first connect fails at once."""
        with self._lock.held():
            self._notice_close()
            missing = self._sock is None
        if missing and self._was_connected:
            self._until_back(self._connect_if_missing, until)

    def _connect_if_missing(self) -> None:
        with self._lock.held():
            if self._sock is None:
                self._connect()

    def _ready(self, until: float) -> Optional[socket.socket]:
        """A connected socket; remade if the daemon closed the idle one (or said why it did).
        None: lost again since `_await_daemon` (another thread's call saw the daemon go), to be
        waited for again outside the lock while `until` allows."""
        self._notice_close()
        if self._sock is None:
            if self._was_connected and time.monotonic() < until:
                return None
            self._connect()
        return self._sock

    def _notice_close(self) -> None:
        """Drop a connection the daemon closed while it was idle, raising the reason it gave."""
        if self._sock is not None and self._poller.poll(0):
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            self._buf += data
            notice = self._parse_frame() if data else None
            self._drop()
            if isinstance(notice, dict) and isinstance(notice.get("error"), dict):
                raise _rpc_error(notice["error"], "", whole_connection=True)

    def _parse_frame(self) -> Any:
        """The next whole frame in the buffer, or None."""
        if len(self._buf) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf)
        if length > MAX_RESPONSE_FRAME:
            self._drop()
            raise ProtocolError(f"{self.path} sent a {length}-byte frame: is it a flashlexd socket?")
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER.size:end])
        del self._buf[:end]
        try:
            return msgpack.unpackb(body, raw=False)
        except Exception as exc:
            self._drop()
            raise ProtocolError(f"undecodable response from {self.path}: {type(exc).__name__}") from None

    def _missing(self) -> int:
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        return HEADER.size + HEADER.unpack_from(self._buf)[0] - len(self._buf)

    def _receive(self, sock: socket.socket, deadline: float) -> Any:
        while True:
            frame = self._parse_frame()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            sock.settimeout(remaining)
            chunk = sock.recv(max(65536, min(self._missing(), 4 << 20)))
            if not chunk:
                raise ConnectionLost(f"flashlexd closed the connection on {self.path}", self.path)
            self._buf += chunk

    def call(self, method: str, _timeout: Optional[float] = None, **params: Any) -> Any:
        """Send one request and return its raw result (what `--json` prints). A `busy` answer
        to it (a store write that did not get the write lock in time, or no room for a big
        answer: the daemon did nothing) is asked again after a pause, until `timeout` is spent."""
        timeout = self.timeout if _timeout is None else _timeout
        deadline = time.monotonic() + timeout
        pause = BUSY_RETRY_FIRST
        while True:
            started = time.monotonic()
            error, result = self._call_once(method, timeout, params)
            if error is None:
                return result
            refused = _rpc_error(error, method)
            if refused.code == Code.STOPPING and deadline - time.monotonic() >= STOPPING_RESEND_FLOOR:
                timeout = deadline - time.monotonic()  # not carried out: sent again once the
                continue                               # daemon is back (`_call_once` waits)
            # asked again only with time for the daemon to answer it as slowly as it answered
            # this (its 1 s write wait, a shared commit's window): a retry cut short by the
            # timeout could be carried out unseen, and a publish be repeated by the app
            needed = 1.5 * (time.monotonic() - started) + 0.5
            if refused.code != Code.BUSY or time.monotonic() + pause + needed > deadline:
                raise refused
            time.sleep(pause)
            pause = min(2 * pause, BUSY_PAUSE)
            timeout = deadline - time.monotonic()

    def _call_once(self, method: str, timeout: float, params: Dict[str, Any]
                   ) -> Tuple[Optional[Dict[str, Any]], Any]:
        """(the daemon's error for this request or None, the result). A failure of the
        connection itself, or an error for the whole connection, is raised."""
        until = time.monotonic() + self.timeout  # for a restarting daemon, before anything is sent
        while True:
            self._await_daemon(until)
            with self._lock.held():
                sock = self._ready(until)
                if sock is not None:
                    return self._exchange(sock, method, timeout, params)
            # lost again at once (a daemon stopping, or one closing what it accepts): no spin
            time.sleep(min(RECONNECT_PAUSES[0], max(0.0, until - time.monotonic())))

    def _exchange(self, sock: socket.socket, method: str, timeout: float, params: Dict[str, Any]
                  ) -> Tuple[Optional[Dict[str, Any]], Any]:
        """One request and its response on `sock`, the lock held."""
        deadline = time.monotonic() + timeout
        self._next_id += 1
        request_id = self._next_id
        frame = _request_frame(request_id, method, params)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))  # > 0: 0 is non-blocking
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                self._explain_close(sock, method, len(frame))
                raise ConnectionLost(f"flashlexd closed the connection on {self.path}", self.path)
            response = self._receive(sock, deadline)
        except socket.timeout:
            self._drop()
            raise RpcTimeout(f"flashlexd did not answer {method} within {timeout:g}s", method) from None
        except ConnectionLost as lost:
            self._drop()
            raise ConnectionLost(str(lost), self.path, method) from None
        except OSError as exc:
            self._drop()
            raise ConnectionLost(f"connection to flashlexd lost: {exc.strerror or exc}",
                                 self.path, method) from None
        except BaseException:  # e.g. KeyboardInterrupt mid-read: the stream is out of step
            self._drop()
            raise
        if not isinstance(response, dict) or "id" not in response:
            self._drop()
            raise ProtocolError(f"malformed response from {self.path}")
        error = response.get("error")
        if response["id"] != request_id:
            self._drop()  # a connection-level error (id None) or a stream out of step
            if isinstance(error, dict):
                raise _unread(error, method, len(frame))
            raise ProtocolError(f"response id {response['id']!r} does not match request {request_id}")
        if error is not None and not isinstance(error, dict):
            error = {"message": error}
        if error is not None and error.get("code") == Code.STOPPING:
            self._drop()  # the daemon closes it next: the request goes again to the one back
        return error, response.get("result")

    def _explain_close(self, sock: socket.socket, method: str, sent: int) -> None:
        """After a failed send of `method`'s request of `sent` bytes: raise the daemon's parting
        error frame if it sent one."""
        frame = None
        try:
            sock.settimeout(0.5)
            while frame is None:
                frame = self._parse_frame()
                if frame is None:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    self._buf += chunk
        except OSError:
            pass
        if isinstance(frame, dict) and isinstance(frame.get("error"), dict):
            self._drop()
            raise _unread(frame["error"], method, sent)

    def follow(self, limit: int, topic: Optional[str], after: Optional[int], wait: float,
               until_replay: Optional[int] = None,
               user_property: Optional[Tuple[str, str]] = None) -> List[Dict[str, Any]]:
        """`records(..., wait=)` for a follower that runs for ever (`stream`, `flashlexctl
        tail`): a daemon that goes away (a restart) is waited for (`reconnect`), and one that
        answers `busy` (its connections, or its room for unsent answers, taken by clients that
        do not read) is asked again after a pause; [] then. The wait is a read: safe to repeat."""
        try:
            found = self.records(limit, topic, after, wait, user_property, until_replay=until_replay)
        except DaemonNotRunning:  # ConnectionLost is one
            self.reconnect()
            return []
        except RpcError as refused:
            if refused.code != Code.BUSY:
                raise
            if not self._busy_told:  # once until a read gets through
                log.warning("%s; asking again every %g s", refused, BUSY_PAUSE)
                self._busy_told = True
            time.sleep(BUSY_PAUSE)
            return []
        self._busy_told = False
        return found

    def reconnect(self) -> None:
        """After `DaemonNotRunning` (or `ConnectionLost`): block until the daemon answers
        again, as after `systemctl restart flashlexd` or an upgrade, trying every 2 s at most;
        one WARNING says it is waiting. A socket this user may not open (`PermissionDenied`)
        is raised: waiting would not cure it."""
        self._until_back(self._connect_afresh, None)

    def _connect_afresh(self) -> None:
        """One try of `reconnect`: the lock is taken per try, so other threads' calls go on
        meanwhile (and wait for the daemon within their own timeouts)."""
        with self._lock.held():
            self._drop()
            self._connect()

    def _until_back(self, connect: Callable[[], None], deadline: Optional[float]) -> None:
        """`connect`, tried again while the daemon is away (DaemonNotRunning) until `deadline`
        (None: for ever); one WARNING per outage says it is waiting (not one per call: an app
        calling every second would log one each `timeout`, for as long as the daemon is down)."""
        tries = 0
        while True:
            try:
                connect()
                return
            except DaemonNotRunning as away:
                left = float("inf") if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise
                if not self._away_told and self._warn_away:
                    log.warning("%s; waiting for it to come back", away)
                    self._away_told = True
                time.sleep(min(RECONNECT_PAUSES[min(tries, len(RECONNECT_PAUSES) - 1)], left))
                tries += 1

    def close(self) -> None:
        """Close the connection; a later call connects again."""
        with self._lock.held():
            self._drop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the API --------------------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """The daemon's health and figures (workers, links, inbox, outbox, store): README's
        `status()` keys, what `flashlexctl status` shows."""
        return self.call("status")

    def messages(self, limit: int = 100, topic: Optional[str] = None,
                 after: Optional[IdLike] = None,
                 user_property: Optional[Tuple[str, str]] = None) -> List[Message]:
        """Unacknowledged messages, oldest first; `topic` is an MQTT filter, `after` an id,
        `user_property` a (name, value) MQTT 5 user property the messages must carry."""
        return [Message.from_wire(m) for m in self.records(limit, topic, after, None, user_property)]

    def wait(self, timeout: float = 30.0, limit: int = 100, topic: Optional[str] = None,
             after: Optional[IdLike] = None,
             user_property: Optional[Tuple[str, str]] = None) -> List[Message]:
        """Messages as soon as there are any (oldest first); [] after `timeout` seconds."""
        seconds(timeout, "timeout", zero=True)  # None is no wait: a loop of them spun (review)
        return [Message.from_wire(m) for m in self.records(limit, topic, after, timeout, user_property)]

    def records(self, limit: int = 100, topic: Optional[str] = None, after: Optional[IdLike] = None,
                wait: Optional[float] = None, user_property: Optional[Tuple[str, str]] = None,
                until_replay: Optional[int] = None) -> List[Dict[str, Any]]:
        """The wire records of `messages` (or of `wait`, given its timeout). With a filter
        the daemon looks at a bounded number of messages per call and answers where to go on
        (`paged`), so one call never holds its loop for long: this calls again from there until
        `limit` are found or none are left (`wait`: until any are found or time is up).
        `until_replay`: a wait also ends when the consumer is replayed after the replays noticed
        numbered this (`stream`'s count when it asked: another thread may notice one first)."""
        if wait is not None:  # wait(timeout=), stream(timeout_per_wait=): 0 is a look
            seconds(wait, "timeout", zero=True)
        params = self._query(limit, topic, after, user_property)
        start = params.get("after")  # the caller's: where a walk whose place went void goes back to
        deadline = None if wait is None else time.monotonic() + wait
        # a wait whose time ran out mid-walk: the same wait again goes on from there (what it
        # passed matched nothing), so short waits in a loop still get through a large inbox
        resume = None if wait is None else repr(sorted(params.items()))
        if resume is not None:  # a daemon started again meanwhile voids the place (a reconnect)
            self._await_daemon(time.monotonic() + self.timeout)
        with self._replays_lock:  # threads share both: the place is taken with the epoch it is of
            epoch = self._voided
            resumed = None if resume is None else self._resume.pop(resume, None)
        if resumed is not None:
            params["after"] = resumed
        found: List[Dict[str, Any]] = []
        while True:
            # reads, safe to repeat: sent again once when a restart cuts them off (a wait parked
            # in the daemon raised ConnectionLost, ending README's logger.py at every restart)
            page = self._sent("messages", True, paged=True, **params) if deadline is None \
                else self._wait_page(deadline, params, start)
            found += page["messages"]
            replayed = self._note_replays(page.get("replays"), page.get("run"))
            if until_replay is not None and (replayed or self._replay_events != until_replay):
                return found  # a stream starts over at once, whichever thread's answer told it
            if self._voided != epoch:  # a replay, or a reconnect: the walk's place is void
                epoch, resume = self._voided, None  # and this call remembers none (found by re-read)
                if not found and (deadline is None or time.monotonic() < deadline):
                    params.pop("after", None)
                    params.update({} if start is None else {"after": start}, limit=limit)
                    continue
            if deadline is not None and not found and page["cursor"] is None and \
                    time.monotonic() < deadline:
                # a replay answered a parked wait early, or a wait longer than one call's
                # MAX_WAIT_SECONDS timed out at the end (on from there): the caller waits on
                if page.get("seen") is not None:
                    params["after"] = page["seen"]
                continue
            if page["cursor"] is None or len(found) >= limit or (deadline is not None and found):
                if deadline is not None and not found and page.get("seen") is not None:
                    self._remember(resume, page["seen"], epoch)  # timed out at the end: on from there
                return found
            if deadline is not None and time.monotonic() >= deadline:  # [] on timeout, on time
                self._remember(resume, page["cursor"], epoch)
                return found
            params.update(after=page["cursor"], limit=limit - len(found))

    def _remember(self, query: Optional[str], position: int, epoch: int) -> None:
        """Where a timed-out wait's walk stopped, for the next wait of the same query, unless
        places went void since the walk's began (another thread's call saw it)."""
        with self._replays_lock:
            if query is None or self._voided != epoch:
                return
            if len(self._resume) >= 16:
                self._resume.clear()
            self._resume[query] = position

    def _wait_page(self, deadline: float, params: Dict[str, Any], start: Optional[int]) -> Dict[str, Any]:
        """One `wait` call towards `deadline`, sent again once if a restart cuts it off, with the
        time then left (sent again as it was, a wait cut near its end took twice its timeout),
        from the caller's `start`: the daemon started again may hold another store."""
        try:
            return self._wait_call(deadline, params)
        except ConnectionLost:
            self._await_daemon(time.monotonic() + self.timeout)  # then what is left of the wait
            params.pop("after", None)
            params.update({} if start is None else {"after": start})
            return self._wait_call(deadline, params)

    def _wait_call(self, deadline: float, params: Dict[str, Any]) -> Dict[str, Any]:
        # the daemon waits at most MAX_WAIT_SECONDS a call: a longer wait is several calls
        left = min(max(0.0, deadline - time.monotonic()), MAX_WAIT_SECONDS)
        return self.call("wait", _timeout=left + self.timeout, timeout=left, paged=True, **params)

    def _note_replays(self, replays: Optional[int], run: Optional[int]) -> bool:
        """Whether the daemon replayed this client's consumer since its last answer said. A
        daemon's replay marks start from 0 in each run (`run`, its token): in a new run only a
        mark above 0 is a replay (made there, maybe before this client's first call to it). A
        daemon that sends no run (older) is compared by its mark alone. Marks only grow within a
        run: a lower one is an answer overtaken by another thread's, not a replay (it restarted
        a stream for nothing)."""
        if replays is None:
            return False
        with self._replays_lock:  # answers of several threads' calls
            seen = self._replays
            if seen is None:
                replayed, self._replays = False, (run, replays)
            elif run is None:  # a daemon from before `run`: its count restarts at 0 with it
                replayed, self._replays = replays != seen[1], (run, replays)
            elif run == seen[0]:
                replayed, self._replays = replays > seen[1], (run, max(replays, seen[1]))
            else:
                replayed, self._replays = replays > 0, (run, replays)
            if replayed:
                self._replay_events += 1
                self._void_places()  # a timed-out walk's place stands past what comes back
        return replayed

    def _void_places(self) -> None:
        """Forget where timed-out walks stood: a replay put messages back behind them, and a
        daemon started again (a reconnect) may hold another store, with lower ids (found by
        re-read: a wait skipped what came below its old place for good). Under `_replays_lock`."""
        self._resume.clear()
        self._voided += 1

    def ack(self, ids: Union[IdLike, Iterable[IdLike]]) -> int:
        """Remove messages (ids, pk strings or Messages); idempotent. Returns how many went.
        For a named consumer: acknowledge them for it; a message leaves the inbox once every
        consumer whose filter matches it has acknowledged it (returns the new acks)."""
        named = {} if self.consumer is None else {"consumer": self.consumer}
        wire = [_wire_id(i) for i in _listed(ids, (int, str, Message))]
        return sum(self._in_chunks("ack", wire, idempotent=True, **named))

    def _in_chunks(self, method: str, wire: List[Any], idempotent: bool = False, **params: Any) -> List[Any]:
        """One call per MAX_IDS_PER_ACK ids (the daemon's bound on a call); their results."""
        return [self._sent(method, idempotent, ids=wire[start:start + MAX_IDS_PER_ACK], **params)
                for start in range(0, len(wire), MAX_IDS_PER_ACK)]

    def _sent(self, method: str, idempotent: bool, **params: Any) -> Any:
        """`call`; an idempotent one (ack, drop, the reads) is sent again once when the
        connection is lost under it (a restart): an app's loop that went on after that
        ConnectionLost left the message unacked, never yielded again by its `stream()`. What
        the lost call did is not in the result."""
        try:
            return self.call(method, **params)
        except ConnectionLost:
            if not idempotent:
                raise
            return self.call(method, **params)

    def publish(self, payload: Any, topic: Optional[str] = None, qos: int = 1,
                retain: bool = False, properties: Optional[Dict[str, Any]] = None,
                expiry: Optional[int] = None) -> int:
        """Queue a message for the cloud (the egress topic unless `topic`); durable once this
        returns. bytes and str go as they are, anything else as JSON. Returns the outbox id.
        MQTT 5 (ignored under 3.1.1): `properties` with `user_properties` ([(name, value), ...]),
        `content_type`, `response_topic`, `correlation_data`; `expiry` in seconds: the entry is
        dropped if not sent by then, and the broker gets the time left."""
        if isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        elif not isinstance(payload, (bytes, str)):
            payload = json.dumps(payload, separators=(",", ":")).encode()
        params: Dict[str, Any] = {"payload": payload, "qos": qos, "retain": retain}
        if topic is not None:
            params["topic"] = topic
        if properties:
            params["properties"] = properties  # as given: a dict of user_properties is the daemon's to refuse
        if expiry is not None:
            params["expiry"] = expiry
        return self.call("publish", **params)["id"]

    def outbox(self, limit: int = 100, dead: bool = False,
               after: Union[None, int, str, OutboxEntry] = None) -> Dict[str, Any]:
        """{"count", "dead", "oldest_age", "limit", "entries": [OutboxEntry, oldest first]}:
        the entries queued for the cloud or, with `dead=True`, the dead letters (entries the
        broker kept refusing, set aside with their `reason` and `attempts` so the rest of the
        outbox keeps flowing). `after` is an exclusive id, for paging."""
        params: Dict[str, Any] = {"limit": limit, "dead": dead}
        if isinstance(after, str):  # as flashlexctl passes one; "-1" said "not str", though "5" is taken
            if not (after.isascii() and after.isdigit()):
                raise ValueError(f"after must be an outbox entry id (digits), not {after!r}")
            after = int(after)
        if after is not None:
            params["after"] = _entry_id(after)
        result = self._outbox_answer(**params)
        result["entries"] = [OutboxEntry.from_wire(e) for e in result.get("entries", [])]
        return result

    def _outbox_answer(self, **params: Any) -> Dict[str, Any]:
        """The `outbox` call's answer as sent, with entries read on until `limit`: an answer
        holds what fits its size (9 of 100 entries of 128 KiB), and one cut so looked like the
        end (found by review)."""
        result = self.call("outbox", **params)
        entries = result.get("entries", [])
        while entries and len(entries) < params["limit"]:
            more = self.call("outbox", **dict(params, limit=params["limit"] - len(entries),
                                               after=entries[-1]["id"])).get("entries", [])
            if not more:
                break
            entries += more
        return result

    def retry(self, ids: Union[int, OutboxEntry, Iterable[Union[int, OutboxEntry]]]) -> List[int]:
        """Move dead letters (ids or OutboxEntry records) back to the tail of the outbox, to be
        sent again with a fresh attempt count; ids that are not dead letters are skipped.
        Returns their new outbox ids."""
        wire = [_entry_id(i) for i in _listed(ids, (int, OutboxEntry))]
        return [new for chunk in self._in_chunks("retry", wire) for new in chunk]

    def drop(self, ids: Union[int, OutboxEntry, Iterable[Union[int, OutboxEntry]]], dead: bool = False) -> int:
        """Delete queued outbox entries or, with `dead=True`, dead letters; ids not in that
        list are skipped. Returns how many were deleted. A queued entry already handed to the
        broker may still be delivered."""
        return sum(self._in_chunks("drop", [_entry_id(i) for i in _listed(ids, (int, OutboxEntry))],
                                   idempotent=True, dead=dead))

    def purge(self, confirm: bool = False) -> int:
        """Remove every inbox message; refused unless confirm=True. Returns how many."""
        return self.call("purge", confirm=confirm)

    def consumers(self) -> List[Dict[str, Any]]:
        """Every named consumer: name, filter, backlog, oldest_age, dropped, last_seen,
        acked_through, dynamic, max_backlog."""
        return self.call("consumers")

    def reset(self, consumer: str, to: Union[str, IdLike] = "earliest") -> int:
        """Move a named consumer: "earliest" replays what is stored, "latest" skips it all, a
        message id starts there. Returns the id it has now acknowledged through. The daemon
        moves it a bounded step per call (`paged`): this calls on until it is there. A name the
        daemon does not know is refused (a typo's skip would release every stored message),
        unless it is this connection's own consumer, which this call registers."""
        target = to if to in ("earliest", "latest") else _wire_id(to)  # type: ignore[arg-type]
        going: Dict[str, Any] = {}  # after the first call: the way it goes (skip, start or replay)
        if consumer == self.consumer:
            going["register"] = True
        while True:
            try:
                answer = self.call("reset", consumer=consumer, to=target, paged=True, **going)
            except RpcError as refused:  # a daemon from before `register` registers it by use
                if not (going.pop("register", False) and "unknown param 'register'" in refused.message):
                    raise
                continue
            if answer["done"]:
                return answer["acked_through"]
            target = answer["to"]
            going = {"way": answer["way"]} if answer.get("way") else {}  # registered by the first

    def remove_consumer(self, consumer: str) -> bool:
        """Remove a dynamic (app-registered) consumer now, as `consumerIdleDays` would once it
        went unused: the messages it alone still held back leave (those no other consumer matches stay, for unnamed apps and expiry). True when it is gone (False: a reload
        declared it meanwhile). A declared consumer is removed from the config instead. The
        daemon works a bounded step per call (`paged`): this calls on until it is done."""
        while True:
            answer = self.call("remove_consumer", consumer=consumer, paged=True)
            if answer["done"]:
                return bool(answer["removed"])

    def _query(self, limit: int, topic: Optional[str], after: Optional[IdLike],
               user_property: Optional[Tuple[str, str]] = None) -> Dict[str, Any]:
        params = _query(limit, topic, after, user_property)
        if self.consumer is not None:
            params["consumer"] = self.consumer
        return params

    def stream(self, timeout_per_wait: float = 30.0, limit: int = 100, topic: Optional[str] = None,
               after: Optional[IdLike] = None,
               user_property: Optional[Tuple[str, str]] = None) -> Iterator[Message]:
        """Every message as it arrives (with `user_property`, those carrying it, as `wait`
        keeps them), forever (oldest unacknowledged first). Uses `wait` with
        the last id seen, so it yields each message once even if it is never acknowledged; a
        replay of its consumer (`reset`, from any client) starts it over from `after`. A daemon
        that goes away (a restart) or is busy is waited for (`follow`), and the stream goes on
        from its last message."""
        seconds(timeout_per_wait, "timeout_per_wait", zero=True)
        start = last = None if after is None else int(_wire_id(after))
        while True:
            replays = self._replay_events
            batch = self.follow(limit, topic, last, timeout_per_wait, replays, user_property)
            for message in map(Message.from_wire, batch):
                last = message.id
                yield message
            if self._replay_events != replays:
                last = start


def _listed(ids: Any, single: Tuple[type, ...]) -> Iterable[Any]:
    """`ids` as a list of ids: one id alone is one, not its characters (`ack("12")` acked
    messages 1 and 2); bytes are refused (their items are byte values), and so are a mapping
    (its keys were taken for ids) and what is not iterable (`ack(1.5)` was Python's own words)."""
    if isinstance(ids, single):
        return [ids]
    if isinstance(ids, (bytes, bytearray, memoryview, abc.Mapping)) or not isinstance(ids, abc.Iterable):
        raise TypeError(f"ids must be ids or a list of them, not {type(ids).__name__}")
    return ids


def seconds(value: Any, name: str, zero: bool = False) -> float:
    """A positive (or with `zero`, not negative), finite number of seconds (a socket timeout, a
    wait), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
            (0 <= value if zero else 0 < value) or not value < 1e9:
        what = "a number of seconds, 0 or more" if zero else "a positive number of seconds"
        raise ValueError(f"{name} must be {what} and under 1e9, not {value!r}")
    return float(value)


def _request_frame(request_id: int, method: str, params: Dict[str, Any]) -> bytes:
    """The request's frame. A param msgpack cannot carry (an integer past 64 bits, a set) is
    the caller's `bad_params`, named as the daemon names one, not a bare OverflowError."""
    try:
        request = {"v": PROTOCOL_VERSION, "id": request_id, "method": method, "params": params}
        if method != "wait":  # a `wait` cut off at a stop goes again with the time left (`_wait_page`)
            request[RESENDS] = True
        return encode_frame(request)
    except (OverflowError, TypeError, ValueError) as exc:
        name = next((key for key, value in params.items() if not _packs(value)), "params")
        raise RpcError(Code.BAD_PARAMS, f"{method}: '{name}' cannot be sent ({exc})", method) from None


def _packs(value: Any) -> bool:
    """Whether msgpack can carry `value` (to name the param that it cannot)."""
    try:
        encode_frame(value)
    except (OverflowError, TypeError, ValueError):
        return False
    return True


def _wire_id(value: IdLike) -> Union[int, str]:
    if isinstance(value, Message):
        return value.id
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    raise TypeError(f"a message id must be an int, a pk string or a Message, not {type(value).__name__}")


def _entry_id(value: Union[int, OutboxEntry]) -> int:
    if isinstance(value, OutboxEntry):
        return value.id
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"an outbox entry id must be an int or an OutboxEntry, not {type(value).__name__}")


def _query(limit: int, topic: Optional[str], after: Optional[IdLike],
           user_property: Optional[Tuple[str, str]] = None) -> Dict[str, Any]:
    params: Dict[str, Any] = {"limit": limit}
    if user_property is not None:
        params["user_property"] = list(user_property)
    if topic is not None:
        params["topic"] = topic
    if after is not None:
        params["after"] = _wire_id(after)
    return params


def _rpc_error(error: Dict[str, Any], method: str, whole_connection: bool = False) -> RpcError:
    """The daemon's error; `forbidden` for the whole connection (not for one consumer) is
    `Forbidden`: this user may not use the daemon at all."""
    code = str(error.get("code", "error"))
    kind = Forbidden if whole_connection and code == Code.FORBIDDEN else RpcError
    return kind(code, str(error.get("message", "")), method)


def _unread(error: Dict[str, Any], method: str, sent: int) -> RpcError:
    """A connection-level error: the daemon refused the request of `sent` bytes unread. A
    publish too large to read is `payload_too_large`, the code README gives a payload over
    the limit (an app catching it missed `frame_too_large`), whatever made it large."""
    if method == "publish" and error.get("code") == Code.FRAME_TOO_LARGE:
        return RpcError(Code.PAYLOAD_TOO_LARGE, f"publish: the request of {sent} bytes is larger than"
                        " the daemon reads (flashlex.thing.mqtt.maxPayloadBytes bounds the payload;"
                        " topic and properties add to it); nothing was queued", method)
    return _rpc_error(error, method, whole_connection=True)
