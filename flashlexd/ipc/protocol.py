"""Daemon side of the wire protocol: limits, request parsing, response encoding.

The frame format and constants live in `flashlexd.wire` (one source of truth shared
with the light client package); this module adds what only the daemon needs: turning an
untrusted frame body into a `Request` or a precise error, and the `Pending` marker a method
returns to park a long-poll.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import msgpack

from flashlexd.ipc.walk import Steps, Walk
from flashlexd.wire import (DEFAULT_MAX_FRAME, HEADER, PROTOCOL_VERSION, REQUEST_OVERHEAD, RESENDS,
                                   Code, encode_frame, request_unpack_options, version_mismatch)

DEFAULT_MAX_BUFFERED = 8 * 1024 * 1024
SMALL_BODY = 96  # request bytes up to which parse_request skips its nesting check (32 headers)

__all__ = ["Code", "HEADER", "Limits", "Pending", "PROTOCOL_VERSION", "Request", "RpcFailure",
           "encode_error", "encode_result", "parse_request"]


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client can make the daemon hold or do."""
    max_frame: int = DEFAULT_MAX_FRAME       # largest request body accepted
    max_connections: int = 1024
    idle_timeout: float = 300.0              # seconds without traffic before a connection closes
    max_write_buffer: int = 8 * 1024 * 1024  # unsent response bytes before a reader is dropped
    max_unsent: int = 16 * 1024 * 1024       # unsent response bytes all connections hold together
    write_timeout: float = 30.0              # seconds a reader may take nothing while owed data
    pipeline_high_water: int = 256 * 1024    # stop handling a connection's requests above this
    max_buffered: int = DEFAULT_MAX_BUFFERED  # incoming frame bytes all connections hold together
    frame_timeout: float = 10.0              # seconds from a frame's first byte to its last

    def __post_init__(self) -> None:
        if self.max_frame < 1024 or self.max_connections < 1 or self.idle_timeout <= 0 \
                or self.write_timeout <= 0 or self.max_write_buffer < self.max_frame \
                or self.max_buffered < self.max_frame or self.max_unsent < self.max_frame \
                or self.frame_timeout <= 0:
            raise ValueError(f"invalid IPC limits: {self}")

    @classmethod
    def for_payload(cls, max_payload_bytes: int, **overrides: Any) -> "Limits":
        """Limits whose frame size fits the largest publishable payload plus the envelope."""
        max_frame = REQUEST_OVERHEAD + max_payload_bytes
        overrides.setdefault("max_write_buffer", max(8 * 1024 * 1024, 2 * max_frame))
        overrides.setdefault("max_unsent", max(16 * 1024 * 1024, 2 * max_frame))
        if overrides.get("max_buffered") is None:
            overrides["max_buffered"] = default_max_buffered(max_payload_bytes)
        return cls(max_frame=max_frame, **overrides)


def default_max_buffered(max_payload_bytes: int) -> int:
    """The default read budget: DEFAULT_MAX_BUFFERED, or two of the largest frames if more."""
    return max(DEFAULT_MAX_BUFFERED, 2 * (REQUEST_OVERHEAD + max_payload_bytes))


class RpcFailure(Exception):
    """A request that gets an error response; `request_id` is None when it is unknown."""

    def __init__(self, code: str, message: str, request_id: Any = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


def store_busy(exc: Exception) -> RpcFailure:
    """`busy` for a write that did not get the store's write lock in time (StoreBusy): nothing
    was written, so the client asks again (flashlexd.client retries `busy` within its timeout)."""
    return RpcFailure(Code.BUSY, f"{exc}; nothing was written: retry")


@dataclass
class Pending:
    """Returned by a method to park the request (long-poll) instead of answering now.

    The server calls `poll()` whenever the inbox may have changed (`notify_inbox`): a result
    that is not None completes the request. At `deadline` (time.monotonic) the request is
    answered with `timeout_result`, or with what `resolve()` returns when it is set (a write
    that shares one commit with others: sharedcommit.py; it may raise RpcFailure). Nothing polls
    the store on a timer. `walk` (walk.py): a read still walking the inbox, a page at a time in
    turns of the server's loop it shares with the other walks, or a write going in steps; its
    deadline counts only once it stopped walking."""
    deadline: float
    poll: Callable[[], Optional[Any]]
    timeout_result: Any = None
    resolve: Optional[Callable[[], Any]] = None
    walk: Optional[Union[Walk, Steps]] = None

    @property
    def walking(self) -> bool:
        return self.walk is not None and self.walk.walking


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    params: Dict[str, Any]
    resends: bool = False  # the client sends it again when answered `stopping` (wire.RESENDS)


@functools.lru_cache(maxsize=8)
def _unpack_options(max_frame: int) -> Dict[str, int]:
    return request_unpack_options(max_frame)


def _not_unpacked(exc: Exception) -> RpcFailure:
    """Why a body did not unpack. Valid msgpack over an unpack limit (1,100 user properties:
    "1100 exceeds max_array_len(1024)") is named, since its sender can fix that."""
    text = str(exc)
    if isinstance(exc, ValueError) and " exceeds max_" in text:
        return RpcFailure(Code.BAD_REQUEST, f"request over an unpack limit: {text[:80]}")
    return RpcFailure(Code.BAD_REQUEST, f"not a msgpack request: {type(exc).__name__}")


def parse_request(body: bytes, max_frame: int) -> Request:
    """A request from an untrusted frame body, or RpcFailure naming what is wrong."""
    options = _unpack_options(max_frame)
    try:
        # Walk the structure first without building anything: unpackb preallocates every
        # container a header declares, so 5 KB of nested array headers (1024 levels of
        # 1024-element arrays) would cost ~8 ms of CPU and 8 MiB per frame, a free way for
        # a local client to keep this loop busy. skip() refuses that in microseconds. A
        # body of SMALL_BODY bytes holds too few headers to matter (0.1 ms, 0.3 MB at
        # worst), and most calls are that small: they skip the check, whose Unpacker costs
        # more than their unpacking.
        if len(body) > SMALL_BODY:
            checker = msgpack.Unpacker(raw=False, max_buffer_size=len(body), **options)
            checker.feed(body)
            checker.skip()
        obj = msgpack.unpackb(body, raw=False, **options)
    except msgpack.StackError:
        raise RpcFailure(Code.BAD_REQUEST, "request nested too deeply") from None
    except Exception as exc:  # untrusted bytes: FormatError, ExtraData, ValueError, UnicodeError...
        raise _not_unpacked(exc) from None
    if not isinstance(obj, dict):
        raise RpcFailure(Code.BAD_REQUEST, f"a request is a map, got {type(obj).__name__}")
    request_id = obj.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int):
        raise RpcFailure(Code.BAD_REQUEST, "request 'id' must be an integer")
    version = obj.get("v")
    if version is None:
        raise RpcFailure(Code.BAD_REQUEST, "request has no protocol version 'v'", request_id)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise RpcFailure(Code.UNSUPPORTED_VERSION, version_mismatch(version), request_id)
    method = obj.get("method")
    if not isinstance(method, str):
        raise RpcFailure(Code.BAD_REQUEST, "request 'method' must be a string", request_id)
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcFailure(Code.BAD_REQUEST, "request 'params' must be a map", request_id)
    return Request(request_id, method, params, obj.get(RESENDS) is True)


def encode_result(request_id: Any, result: Any) -> bytes:
    return encode_frame({"id": request_id, "result": result})


def encode_error(request_id: Any, code: str, message: str) -> bytes:
    return encode_frame({"id": request_id, "error": {"code": code, "message": message}})
