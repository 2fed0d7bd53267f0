"""The local API server, hosted by the supervisor's single-threaded selector loop.

Nothing here blocks: the listening socket and each connection are registered on the selector
the host gives us, with `key.data` pointing back here (`owns(key)`). The host calls
`dispatch(key, mask)` for our keys, `tick()` at least by `next_deadline()` (idle connections,
stalled readers, long-poll deadlines), `notify_inbox()` after ingress committed messages (it
completes parked `wait` calls) and `close()` at shutdown.

Each connection has a bounded read buffer (one frame) and write buffer; it is answered in
request order, and a parked `wait` holds back its later requests. A peer that sends a frame
larger than the limit gets one error and is closed, before anything is allocated for it.
"""
from __future__ import annotations

import grp
import logging
import os
import selectors
import socket
import stat
import struct
import time
from typing import Any, Dict, Iterable, Optional, Protocol, Set, Tuple

from flashlexd.ipc.protocol import (HEADER, Code, Limits, Pending, RpcFailure, encode_error,
                                    encode_result, parse_request)

log = logging.getLogger("flashlexd.ipc")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_ACCEPT_BATCH = 64
_RECV_CHUNK = 256 * 1024


class ServerError(Exception):
    """A reason the API socket cannot be served, worded as one line for the operator."""


class Handler(Protocol):
    def handle(self, method: str, params: Dict[str, Any]) -> Any:
        """The result, a `Pending` to park the request, or raise RpcFailure."""


class _Conn:
    __slots__ = ("server", "sock", "uid", "pid", "rbuf", "wbuf", "events", "parked",
                 "parked_id", "closing", "closed", "last_active", "last_write")

    def __init__(self, server: "RpcServer", sock: socket.socket, uid: int, pid: int, now: float):
        self.server, self.sock, self.uid, self.pid = server, sock, uid, pid
        self.rbuf, self.wbuf = bytearray(), bytearray()
        self.events = selectors.EVENT_READ
        self.parked: Optional[Pending] = None
        self.parked_id: Any = None
        self.closing = self.closed = False  # closing: close once the write buffer is flushed
        self.last_active = self.last_write = now


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ServerError(f"socket group {group!r} does not exist (flashlex.app.socket.group)") from None


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody answers on; refuse if a live daemon does."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket: remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)  # stale: left by a daemon that died without cleaning up
        except FileNotFoundError:
            pass
        log.info("removed stale socket %s", path)
        return
    except (socket.timeout, BlockingIOError):
        pass  # a listener with a full backlog is alive
    except OSError as exc:
        raise ServerError(f"cannot check existing socket {path}: {exc}") from None
    finally:
        probe.close()
    raise ServerError(f"another flashlexd is running on {path} (stop it first, or use another --socket)")


def bind_socket(path: str, mode: int = 0o660, group: Optional[str] = None) -> Tuple[socket.socket, int]:
    """A non-blocking listening socket at `path` created with `mode` (umask, so there is no
    window with wider permissions) and owned by `group`; returns it and the file's inode."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
            os.chmod(parent, 0o755)
        except OSError as exc:
            raise ServerError(f"cannot create socket directory {parent}: {exc.strerror}") from None
    gid = _group_id(group) if group else None
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        reason = "another flashlexd is running there" if exc.errno == 98 else (exc.strerror or str(exc))
        raise ServerError(f"cannot bind API socket {path}: {reason}") from None
    finally:
        os.umask(old_umask)
    try:
        if gid is not None and os.stat(path).st_gid != gid:  # under the unit, Group= already did it
            os.chown(path, -1, gid)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        inode = os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot set up API socket {path}: {exc.strerror or exc}") from None
    return sock, inode


class RpcServer:
    """Serves `methods.handle(name, params)` on a Unix socket from the host's selector loop."""

    def __init__(self, path: str, methods: Handler, limits: Optional[Limits] = None,
                 selector: Optional[selectors.BaseSelector] = None, *, mode: int = 0o660,
                 group: Optional[str] = None, allow_uids: Iterable[int] = ()):
        self.path = path
        self.limits = limits or Limits()
        self._methods = methods
        self._own_selector = selector is None
        self.selector = selector or selectors.DefaultSelector()
        self._allowed = frozenset({0, os.geteuid(), *allow_uids})
        self._listener, self._inode = bind_socket(path, mode, group)
        self.selector.register(self._listener, selectors.EVENT_READ, self)
        self._conns: Set[_Conn] = set()
        self._parked: Set[_Conn] = set()
        self._accept_paused_until: Optional[float] = None
        self._sweep_every = max(0.01, min(1.0, self.limits.idle_timeout / 4, self.limits.write_timeout / 4))
        self._next_sweep = time.monotonic() + self._sweep_every
        self.counters = {"accepted": 0, "refused": 0, "requests": 0, "errors": 0, "dropped_slow": 0}
        self.closed = False

    @classmethod
    def from_config(cls, api: Any, methods: Handler, selector: selectors.BaseSelector,
                    max_payload_bytes: int) -> "RpcServer":
        """From `config.Api` and the store's maxPayloadBytes (which sizes the frame limit)."""
        limits = Limits.for_payload(max_payload_bytes, max_connections=api.max_connections,
                                    idle_timeout=api.idle_timeout)
        # allowUids are users outside the socket's group: they need the socket itself to be
        # connectable (0666); who may talk is then decided by SO_PEERCRED on every connection
        return cls(api.socket_path, methods, limits, selector, group=api.socket_group,
                   allow_uids=api.allow_uids, mode=0o666 if api.allow_uids else 0o660)

    # -- what the host loop calls -------------------------------------------------------------

    def owns(self, key: selectors.SelectorKey) -> bool:
        data = key.data
        return data is self or (isinstance(data, _Conn) and data.server is self)

    def dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data is self:
            self._accept()
            return
        conn: _Conn = key.data
        if conn.closed:  # closed earlier in the same select batch
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read(conn)
        if not conn.closed:
            self._pump(conn)

    def next_deadline(self) -> float:
        """The time.monotonic() by which `tick()` must run again."""
        deadline = self._next_sweep
        if self._accept_paused_until is not None:
            deadline = min(deadline, self._accept_paused_until)
        for conn in self._parked:
            deadline = min(deadline, conn.parked.deadline)  # type: ignore[union-attr]
        return deadline

    def tick(self, now: Optional[float] = None) -> None:
        """Time-driven work; cheap when nothing is due, so the host may call it every turn."""
        now = time.monotonic() if now is None else now
        if self._parked:
            for conn in [c for c in self._parked if c.parked.deadline <= now]:  # type: ignore[union-attr]
                self._complete(conn, conn.parked.timeout_result)  # type: ignore[union-attr]
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self.selector.register(self._listener, selectors.EVENT_READ, self)
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every
        for conn in list(self._conns):
            if conn.wbuf and now - conn.last_write > self.limits.write_timeout:
                log.warning("API: dropping uid %d pid %d: it read nothing for %.0fs",
                            conn.uid, conn.pid, self.limits.write_timeout)
                self.counters["dropped_slow"] += 1
                self._close_conn(conn)
            elif conn.parked is None and now - conn.last_active > self.limits.idle_timeout:
                self._close_conn(conn)

    def notify_inbox(self) -> None:
        """New messages were committed: complete every parked wait that now has some."""
        for conn in list(self._parked):
            try:
                result = conn.parked.poll()  # type: ignore[union-attr]
            except RpcFailure as failure:
                self._complete_error(conn, failure.code, failure.message)
                continue
            except Exception as exc:  # a store failure must not take the loop down
                log.exception("API: wait failed")
                self._complete_error(conn, Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
                continue
            if result is not None:
                self._complete(conn, result)

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def parked_count(self) -> int:
        return len(self._parked)

    def close(self) -> None:
        """Close every connection and the listener; remove the socket file if it is still ours."""
        if self.closed:
            return
        self.closed = True
        for conn in list(self._conns):
            self._close_conn(conn)
        if self._accept_paused_until is None:
            self.selector.unregister(self._listener)
        self._listener.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        if self._own_selector:
            self.selector.close()

    # -- connections --------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: pause instead of spinning on readiness
                log.warning("API: cannot accept connections: %s; pausing 1s", exc.strerror or exc)
                self.selector.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + 1.0
                return
            sock.setblocking(False)
            try:
                pid, uid, _gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            except OSError:
                sock.close()
                continue
            if uid not in self._allowed:
                log.warning("API: refused connection from uid %d (pid %d): not in allowUids", uid, pid)
                self._refuse(sock, Code.FORBIDDEN, f"uid {uid} may not use flashlexd: ask the "
                             "administrator to add it to flashlex.app.socket.allowUids")
            elif len(self._conns) >= self.limits.max_connections:
                log.warning("API: refused connection from pid %d: %d connections open", pid, len(self._conns))
                self._refuse(sock, Code.BUSY, f"too many connections ({self.limits.max_connections})")
            else:
                conn = _Conn(self, sock, uid, pid, time.monotonic())
                self._conns.add(conn)
                self.selector.register(sock, selectors.EVENT_READ, conn)
                self.counters["accepted"] += 1

    def _refuse(self, sock: socket.socket, code: str, message: str) -> None:
        self.counters["refused"] += 1
        try:
            sock.send(encode_error(None, code, message))  # small: fits the empty socket buffer
        except OSError:
            pass
        sock.close()

    def _read(self, conn: _Conn) -> None:
        room = self.limits.max_frame + HEADER.size - len(conn.rbuf)
        if room <= 0:
            return
        try:
            data = conn.sock.recv(min(room, _RECV_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_conn(conn)
            return
        conn.rbuf += data
        conn.last_active = time.monotonic()

    def _pump(self, conn: _Conn) -> None:
        """Answer buffered requests in order while the peer keeps reading; then set interest."""
        while not conn.closed:
            handled = self._handle_frames(conn)
            self._flush(conn)
            if not handled or conn.wbuf:
                break
        if not conn.closed:
            self._update_interest(conn)

    def _handle_frames(self, conn: _Conn) -> int:
        handled = 0
        max_frame = self.limits.max_frame
        while (conn.parked is None and not conn.closing and not conn.closed and len(conn.rbuf) >= HEADER.size
               and len(conn.wbuf) < self.limits.pipeline_high_water):
            (length,) = HEADER.unpack_from(conn.rbuf)
            if length > max_frame:
                self._send(conn, encode_error(None, Code.FRAME_TOO_LARGE,
                                              f"frame of {length} bytes exceeds the limit of {max_frame}"))
                conn.rbuf.clear()
                conn.closing = True
                return handled + 1
            if len(conn.rbuf) < HEADER.size + length:
                break
            body = bytes(conn.rbuf[HEADER.size:HEADER.size + length])
            del conn.rbuf[:HEADER.size + length]
            self._handle(conn, body)
            handled += 1
        return handled

    def _handle(self, conn: _Conn, body: bytes) -> None:
        self.counters["requests"] += 1
        request_id, method = None, "request"
        try:
            request = parse_request(body, self.limits.max_frame)
            request_id, method = request.id, request.method
            result = self._methods.handle(method, request.params)
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
            conn.parked, conn.parked_id = result, request_id
            self._parked.add(conn)
        else:
            self._send_result(conn, request_id, result)

    def _send_result(self, conn: _Conn, request_id: Any, result: Any) -> None:
        try:
            frame = encode_result(request_id, result)
        except Exception as exc:  # an unencodable result is a bug in a method, not the peer's
            log.exception("API: cannot encode a result")
            frame = encode_error(request_id, Code.INTERNAL, f"internal error: {type(exc).__name__}")
        self._send(conn, frame)

    def _send(self, conn: _Conn, frame: bytes) -> None:
        """Queue a frame. One response always fits; unread ones piling up past the cap do not."""
        if conn.closed:
            return
        if not conn.wbuf:
            conn.last_write = time.monotonic()  # the stall clock starts when data is owed
        elif len(conn.wbuf) + len(frame) > self.limits.max_write_buffer:
            log.warning("API: dropping uid %d pid %d: %d unread response bytes",
                        conn.uid, conn.pid, len(conn.wbuf) + len(frame))
            self.counters["dropped_slow"] += 1
            self._close_conn(conn)
            return
        conn.wbuf += frame

    def _flush(self, conn: _Conn) -> None:
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
            conn.last_write = conn.last_active = time.monotonic()
        if not conn.wbuf and conn.closing:
            self._close_conn(conn)

    def _complete(self, conn: _Conn, result: Any) -> None:
        self._unpark(conn)
        self._send_result(conn, conn.parked_id, result)
        if not conn.closed:
            self._pump(conn)

    def _complete_error(self, conn: _Conn, code: str, message: str) -> None:
        self._unpark(conn)
        self._send(conn, encode_error(conn.parked_id, code, message))
        if not conn.closed:
            self._pump(conn)

    def _unpark(self, conn: _Conn) -> None:
        conn.parked = None
        conn.last_active = time.monotonic()
        self._parked.discard(conn)

    def _update_interest(self, conn: _Conn) -> None:
        events = 0
        if not conn.closing and len(conn.rbuf) < self.limits.max_frame + HEADER.size:
            events |= selectors.EVENT_READ
        if conn.wbuf:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        if conn.events and events:
            self.selector.modify(conn.sock, events, conn)
        elif events:
            self.selector.register(conn.sock, events, conn)
        else:
            self.selector.unregister(conn.sock)  # nothing to do until a parked wait completes
        conn.events = events

    def _close_conn(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        self._parked.discard(conn)
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()
