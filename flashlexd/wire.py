"""The local API's wire format: the one place both the daemon and the client read it from.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. Requests are
`{"v": PROTOCOL_VERSION, "id": int, "method": str, "params": dict}`; responses are
`{"id": id, "result": ...}` or `{"id": id, "error": {"code": str, "message": str}}`. An error
about the connection itself (a frame too large, a refused peer) carries `"id": None`.

It lives in the daemon's package, so the daemon runs from a source checkout (where `client/`
is not yet `flashlexd.client`), and `flashlexd.client.wire` re-exports it for the client. It is
stdlib + msgpack only, because `flashlexd.client` must stay light (no paho, no lmdb); the
daemon's `flashlexd.ipc.protocol` imports from here, never the other way round. The defaults
both sides name (socket path, payload limit, store-full policies) are defined here once.
"""
from __future__ import annotations

import re
import struct
from typing import Any, Dict

import msgpack

__all__ = ["PROTOCOL_VERSION", "HEADER", "DEFAULT_SOCKET", "SOCKET_ENV", "FULL_POLICIES", "MIB",
           "REQUEST_OVERHEAD", "RESENDS", "DEFAULT_MAX_PAYLOAD", "DEFAULT_MAX_FRAME", "MAX_RESPONSE_FRAME",
           "MAX_ARRAY_LEN", "MAX_MAP_LEN", "MAX_IDS_PER_ACK", "MAX_LIMIT", "MAX_WAIT_SECONDS",
           "ID_LIMIT", "PUBACK_STALLED", "READS", "CONSUMER_NAME_RULE", "Code", "encode_frame", "request_unpack_options",
           "valid_consumer_name", "version_mismatch"]

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
_CONSUMER_NAME = re.compile(r"[a-z0-9_-]{1,64}\Z")  # also a config key's rule
CONSUMER_NAME_RULE = "a consumer name: 1 to 64 of a-z 0-9 _ -"


def valid_consumer_name(name: object) -> bool:
    """The daemon's rule, checked by the client too (`connect(consumer=)`)."""
    return isinstance(name, str) and _CONSUMER_NAME.match(name) is not None


DEFAULT_SOCKET = "/run/flashlexd/flashlexd.sock"
SOCKET_ENV = "FLASHLEXD_SOCKET"
FULL_POLICIES = ("reject", "dropOldest")  # flashlex.app.db.whenFull: what a full store does

MIB = 1024 * 1024
REQUEST_OVERHEAD = MIB            # frame room beyond the largest payload a request may carry
DEFAULT_MAX_PAYLOAD = 256 * 1024  # the config default of flashlex.app.db.maxPayloadBytes
DEFAULT_MAX_FRAME = REQUEST_OVERHEAD + DEFAULT_MAX_PAYLOAD
MAX_RESPONSE_FRAME = 512 * MIB    # the client's sanity bound on a length prefix it reads

# Unpack limits for requests. Small on purpose: msgpack preallocates a container from its
# header, so at the fixed nesting limit (1024 levels, StackError beyond) the worst transient
# allocation of a hostile frame is about 1024 * MAX_ARRAY_LEN * 8 bytes = 8 MiB.
MAX_ARRAY_LEN = 1024
MAX_MAP_LEN = 64
MAX_IDS_PER_ACK = 1000            # the client splits larger acks into several calls
MAX_LIMIT = 1000                  # most messages/outbox entries one call returns
READS = frozenset({"status", "messages", "wait", "outbox", "consumers"})  # API methods that change nothing
MAX_WAIT_SECONDS = 3600.0
ID_LIMIT = 2 ** 63  # ids are 8-byte keys, never near this: the store packs `after + 1` and `to - 1`
PUBACK_STALLED = 5.0  # seconds the egress has had entries in flight and no PUBACK: no drain estimate


class Code:
    """Error codes (strings, so a log line or a script can match them)."""
    BAD_REQUEST = "bad_request"            # not a request at all (bad msgpack, missing fields)
    BAD_PARAMS = "bad_params"              # a param is missing, unknown or of the wrong type
    UNKNOWN_METHOD = "unknown_method"
    UNSUPPORTED_VERSION = "unsupported_version"
    FRAME_TOO_LARGE = "frame_too_large"    # the connection is closed after this one
    FRAME_TIMEOUT = "frame_timeout"        # a frame did not arrive whole in time; closed
    FORBIDDEN = "forbidden"                # the peer's uid is not allowed; closed
    BUSY = "busy"                          # too many connections, or incoming bytes; closed
    OUTBOX_FULL = "outbox_full"
    EGRESS_OFFLINE = "egress_offline"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    CONFIRM_REQUIRED = "confirm_required"
    STORE_ERROR = "store_error"
    STOPPING = "stopping"                  # the daemon is stopping: the request was not carried out
                                           # (only to a request with RESENDS; others are cut off)
    INTERNAL = "internal"


# a request's key (beside "v", "id"...) saying its client sends it again when answered `stopping`:
# an older client took that code for a failure (a `stream()` ended at every restart), so it is
# cut off instead, as before, and a `wait` (whose timeout would be stale) is not sent with it
RESENDS = "resends"


def encode_frame(obj: Any) -> bytes:
    """One frame: length prefix + msgpack (bytes travel as bin, str as str)."""
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def request_unpack_options(max_frame: int) -> Dict[str, int]:
    """msgpack limits for an untrusted request body of at most `max_frame` bytes. The frame
    length check is the max_buffer_size: a body is only unpacked once it is whole and in bounds."""
    return {"max_str_len": max_frame, "max_bin_len": max_frame, "max_array_len": MAX_ARRAY_LEN,
            "max_map_len": MAX_MAP_LEN, "max_ext_len": 0}


def version_mismatch(client_version: Any, daemon_version: int = PROTOCOL_VERSION) -> str:
    """The one-line explanation for a request in a protocol version the daemon does not speak."""
    if isinstance(client_version, int) and not isinstance(client_version, bool) \
            and client_version > daemon_version:
        advice = "upgrade flashlexd, or use a flashlexd.client as old as the daemon"
    else:
        advice = "upgrade the flashlexd client package (pip install -U flashlexd)"
    return f"client speaks protocol {client_version!r}, daemon speaks {daemon_version}: {advice}"
