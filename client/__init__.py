"""flashlexd.client: talk to the local flashlexd daemon (stdlib + msgpack only).

    from flashlexd.client import connect
    with connect() as fx:                  # $FLASHLEXD_SOCKET or /run/flashlexd/flashlexd.sock
        batch = fx.wait(timeout=30)        # [Message], oldest first; [] on timeout
        for msg in batch:
            handle(msg.topic, msg.payload, msg.json())
        fx.ack(batch)                      # Messages, ids or pk strings
        fx.publish({"temp": 21.5})         # to the egress topic; dict -> JSON

One `Client` per thread is the simple rule: a Client is thread-safe (a lock serialises its
calls) but a thread blocked in `wait` holds the others up. Errors are `FlashlexError`s:
`DaemonNotRunning` (names the socket path), `RpcError` (with `.code`), `ProtocolError`,
`PermissionDenied`, `RpcTimeout`, `ConnectionLost` (the daemon went away during a call; its
`.method` says which).
"""
from __future__ import annotations

from typing import Optional

from flashlexd import __version__
from flashlexd.client.connection import Client, socket_path
from flashlexd.client.errors import (ConnectionLost, DaemonNotRunning, FlashlexError,
                                     PermissionDenied, ProtocolError, RpcError, RpcTimeout)
from flashlexd.client.message import Message, OutboxEntry
from flashlexd.client.wire import DEFAULT_SOCKET, PROTOCOL_VERSION, Code

__all__ = ["Client", "Code", "ConnectionLost", "DaemonNotRunning", "DEFAULT_SOCKET",
           "FlashlexError", "Message", "OutboxEntry", "PermissionDenied", "PROTOCOL_VERSION",
           "ProtocolError", "RpcError", "RpcTimeout", "__version__", "connect", "socket_path"]


def connect(path: Optional[str] = None, timeout: float = 10.0,
            consumer: Optional[str] = None) -> Client:
    """Connect to flashlexd; raises DaemonNotRunning when nothing listens on the socket.
    `consumer` names this app's own cursor (every message matching its filter, its own acks);
    None is the shared inbox of apps that predate consumers."""
    return Client(path, timeout, consumer)
