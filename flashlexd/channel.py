"""The supervisor <-> worker link: one SOCK_SEQPACKET socketpair per worker, msgpack messages,
and the validated config text handed over as an inherited file.

SEQPACKET keeps message boundaries, so each send is one whole message and a dead peer reads as
end-of-file. What the messages are is `linkmsg`'s business; this module only moves them.

The config does not travel as a message: a datagram is bounded by the socket buffer (a config
over ~64 KiB never arrived). The supervisor writes the text it validated once into a sealed
memfd (`ConfigFile`), and every worker inherits it on CONFIG_FD: whatever its size, a worker
runs exactly what the supervisor checked, even if the file on disk was edited since.
"""
from __future__ import annotations

import fcntl
import os
import socket
from typing import Any, Dict, List, Optional, Tuple

import msgpack

from flashlexd.linkmsg import LinkMessage, encode

MAX_MESSAGE = 64 * 1024
CHANNEL_FD = 3  # where a worker finds its end after exec
CONFIG_FD = 4   # where a worker finds the config text after exec
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class ConfigFile:
    """The validated config text in a sealed (read-only) memfd, close-on-exec in the
    supervisor, placed on CONFIG_FD in a worker."""

    def __init__(self, text: str):
        self.fd = os.memfd_create("flashlexd-config", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.pwrite(self.fd, text.encode("utf-8"), 0)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)  # no worker can change it
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        os.close(self.fd)


def place_child_fds(channel_fd: int, config_fd: int) -> None:
    """In a forked child before exec: put the link on CHANNEL_FD and the config on CONFIG_FD
    (inheritable), whatever numbers they had, without one overwriting the other."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, CONFIG_FD + 1) for fd in (channel_fd, config_fd)]
    os.dup2(high[0], CHANNEL_FD)
    os.dup2(high[1], CONFIG_FD)


def read_inherited_config(limit: int, fd: int = CONFIG_FD, close: bool = True) -> str:
    """The config text the supervisor validated (a worker's side of `ConfigFile`)."""
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ValueError(f"the inherited config is {size} bytes, over the limit of {limit}")
        data = os.pread(fd, size, 0)  # pread: the file offset is shared with the other workers
    finally:
        if close:
            try:
                os.close(fd)
            except OSError:
                pass
    return data.decode("utf-8")


class Channel:
    """One end of the link. Non-blocking: a full buffer drops the message (heartbeats are
    repeated, state is resent with each heartbeat) rather than stall either side."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setblocking(False)

    @classmethod
    def pair(cls) -> Tuple["Channel", socket.socket]:
        """The supervisor's Channel and the raw socket to hand to the child."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(mine), theirs

    @classmethod
    def inherited(cls, fd: int = CHANNEL_FD) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: LinkMessage) -> bool:
        try:
            self.sock.send(msgpack.packb(encode(message), use_bin_type=True))
            return True
        except (BlockingIOError, BrokenPipeError, ConnectionError, OSError):
            return False

    def receive(self) -> Optional[List[Dict[str, Any]]]:
        """Every message waiting now, as wire maps (`linkmsg.decode` types them); None when the
        peer has gone."""
        messages: List[Dict[str, Any]] = []
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return messages
            except (ConnectionError, OSError):
                return None
            if not data:
                return None if not messages else messages
            try:
                message = msgpack.unpackb(data, raw=False)
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                continue  # a torn message from a killed peer; the next heartbeat repeats it
            if isinstance(message, dict):
                messages.append(message)

    def close(self) -> None:
        self.sock.close()
