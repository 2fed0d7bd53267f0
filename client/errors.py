"""Typed errors of the client: catch `FlashlexError` for all of them."""
from __future__ import annotations


class FlashlexError(Exception):
    """Base class of every error `flashlexd.client` raises."""


class DaemonNotRunning(FlashlexError):
    """Nothing answers on the socket (flashlexd stopped, or another socket path)."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


class ConnectionLost(DaemonNotRunning):
    """The daemon closed the connection in the middle of a call (it stopped or restarted).
    The next call reconnects; whether the interrupted call took effect is unknown. `method`:
    the call cut off (a read changed nothing), when known."""

    def __init__(self, message: str, path: str = "", method: str = ""):
        super().__init__(message, path)
        self.method = method


class PermissionDenied(FlashlexError):
    """This user may not use the daemon: the socket's mode shuts it out (see the socket's
    group), or the daemon refused its uid (`Forbidden`)."""


class ProtocolError(FlashlexError):
    """The peer sent something that is not a valid response (not a flashlexd socket?)."""


class RpcTimeout(FlashlexError):
    """The daemon did not answer in time; the connection is dropped and remade on next use. The
    request was sent: a daemon that was only stalled may still carry it out (queue a publish).
    `method`: the call unanswered (a read changed nothing)."""

    def __init__(self, message: str, method: str = ""):
        super().__init__(message)
        self.method = method


class RpcError(FlashlexError):
    """The daemon refused a call; `code` is a stable string such as 'bad_params'."""

    def __init__(self, code: str, message: str, method: str = ""):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.method = code, message, method


class Forbidden(RpcError, PermissionDenied):
    """The daemon refused this user's connection (its uid is neither in allowUids nor in the
    socket's group): an RpcError 'forbidden' as ever, and a PermissionDenied as the socket's
    mode refusing it is, so both are caught as one case."""
