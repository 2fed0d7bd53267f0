"""The supervisor <-> worker link: one SOCK_SEQPACKET socketpair per worker, msgpack messages.

SEQPACKET keeps message boundaries, so each send is one whole message and a dead peer reads as
end-of-file. Messages are small dicts with a type field `t`:
  worker -> supervisor: hb (heartbeat + counters), state, mqtt (connection state), committed
  supervisor -> worker: stop, outbox (something was queued for egress)
"""
from __future__ import annotations

import socket
from typing import Any, Dict, List, Optional, Tuple

import msgpack

MAX_MESSAGE = 64 * 1024
CHANNEL_FD = 3  # where a worker finds its end after exec


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

    def send(self, kind: str, **fields: Any) -> bool:
        fields["t"] = kind
        try:
            self.sock.send(msgpack.packb(fields, use_bin_type=True))
            return True
        except (BlockingIOError, BrokenPipeError, ConnectionError, OSError):
            return False

    def receive(self) -> Optional[List[Dict[str, Any]]]:
        """Every message waiting now; None when the peer has gone."""
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
