"""The fork server: a clean copy of the supervisor, made before it opens the store, that forks
the workers.

Why: forked (not exec'd) workers share the code the supervisor imported instead of loading it
four times (see `forkworker`). But the supervisor holds an open LMDB environment, and py-lmdb
refuses a second open of the same files in a process that inherited one; closing the
inherited one would clear the supervisor's reader slots. So the supervisor forks this server
once, after `forkworker.preload` and before `Store.from_config`: the server holds no
environment, no API socket, no thread, and every worker is forked from it.

The workers stay the supervisor's children: the supervisor is a child subreaper
(PR_SET_CHILD_SUBREAPER) and the server forks twice (the middle process exits at once), so a
worker is re-parented to the supervisor, which reaps it, signals it and sees it die exactly as
before. A request carries the worker's name and, as SCM_RIGHTS, its end of the link and the
config memfd; the answer is the worker's pid or the fork's error.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
from typing import Optional

import msgpack

from flashlexd.forkworker import WorkerMaker, close_inherited_fds, flush_stdio, reset_signals

PR_SET_CHILD_SUBREAPER = 36
ANSWER_WAIT = 5.0  # seconds the supervisor waits for a pid; the server answers in milliseconds
MAX_REQUEST = 4096


class ForkServerGone(OSError):
    """The fork server is not there to answer, or stuck: no worker can be started any more.
    Its one argument is the line (no errno: it was said as "[Errno 32]" for a timeout)."""


def become_subreaper() -> None:
    """Orphaned descendants (the forked workers) are re-parented to this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class ForkServer:
    """The supervisor's handle on the server process."""

    def __init__(self, maker: WorkerMaker):
        """Fork the server now; it makes workers with `maker`."""
        become_subreaper()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        flush_stdio()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                mine.close()
                code = _serve(theirs, maker)
            finally:
                os._exit(code)
        theirs.close()
        self.pid: Optional[int] = pid
        self.stuck = False  # it did not answer in time: closing its link would not end it
        self.sock = mine
        self.sock.settimeout(ANSWER_WAIT)

    def spawn(self, name: str, link_fd: int, config_fd: int) -> int:
        """The pid of a new worker `name`; raises OSError (the fork's errno) when none could be
        made, ForkServerGone when the server cannot answer."""
        try:
            socket.send_fds(self.sock, [msgpack.packb(name)], [link_fd, config_fd])
            answer = msgpack.unpackb(self.sock.recv(MAX_REQUEST))
        except socket.timeout:
            self.stuck = True
            raise ForkServerGone(f"the fork server (pid {self.pid}) did not answer within {ANSWER_WAIT:g}s"
                                 " (stuck?)") from None
        except (OSError, ValueError) as exc:
            raise ForkServerGone(f"the fork server (pid {self.pid}) is gone: {exc}") from None
        if not isinstance(answer, list) or len(answer) != 2:
            raise ForkServerGone(f"the fork server (pid {self.pid}) answered garbage")
        pid, error = answer
        if pid is None:
            raise OSError(error[0], error[1])
        return int(pid)

    def close(self) -> None:
        """The server exits when its link closes (and is reaped like any child); a stuck one
        (stopped, say) is killed, or it outlived the daemon (found by re-read)."""
        self.sock.close()
        if self.stuck and self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid = None


def _serve(sock: socket.socket, maker: WorkerMaker) -> int:
    """The server's loop: one worker per request until the supervisor closes the link."""
    reset_signals()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)  # stops when the supervisor's link closes
    close_inherited_fds(keep={sock.fileno()})
    try:
        from setproctitle import setproctitle
        setproctitle("flashlexd: forkserver")
    except ImportError:
        pass
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 2)
        except InterruptedError:
            continue
        if not data:
            return 0
        try:
            name = msgpack.unpackb(data)
            answer = _fork_worker(maker, str(name), *fds) if len(fds) == 2 else \
                [None, [errno.EINVAL, "a request without its two descriptors"]]
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(msgpack.packb(answer))


def _fork_worker(maker: WorkerMaker, name: str, link_fd: int, config_fd: int) -> list:
    """Fork twice: the middle process forks the worker, sends its pid and exits, so the
    worker is re-parented to the supervisor (the subreaper). [pid, None] or [None, error]."""
    maker.prepare(config_fd)  # parsed here, shared by every worker forked with it
    reading, writing = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(reading)
        os.close(writing)
        return [None, [exc.errno, exc.strerror]]
    if middle == 0:
        code = 0
        try:
            os.close(reading)
            worker = os.fork()
            if worker == 0:
                try:
                    os.close(writing)
                    maker.become(name, link_fd)
                finally:
                    os._exit(127)
            os.write(writing, msgpack.packb([worker, None]))
        except OSError as exc:
            os.write(writing, msgpack.packb([None, [exc.errno, exc.strerror]]))
        finally:
            os._exit(code)
    os.close(writing)
    try:
        answer = _read_all(reading)
    finally:
        os.close(reading)
        os.waitpid(middle, 0)
    try:
        return list(msgpack.unpackb(answer))
    except (ValueError, TypeError):
        return [None, [errno.ECHILD, "the fork server's middle process died"]]


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)

