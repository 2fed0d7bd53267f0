"""The wire format and request parsing, without sockets."""
import struct
import tracemalloc

import msgpack
import pytest

from flashlexd.client import wire
from flashlexd.ipc import protocol
from flashlexd.ipc.protocol import Code, Limits, RpcFailure, parse_request

MAX = wire.DEFAULT_MAX_FRAME


def body(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def request(**fields):
    base = {"v": wire.PROTOCOL_VERSION, "id": 7, "method": "status", "params": {}}
    base.update(fields)
    return body({k: v for k, v in base.items() if v is not ...})


def failure(raw: bytes) -> RpcFailure:
    with pytest.raises(RpcFailure) as info:
        parse_request(raw, MAX)
    return info.value


def test_one_source_of_truth_for_wire_constants():
    assert protocol.HEADER is wire.HEADER
    assert protocol.PROTOCOL_VERSION == wire.PROTOCOL_VERSION
    assert protocol.Code is wire.Code


def test_frame_is_big_endian_length_then_msgpack():
    frame = wire.encode_frame({"id": 1, "result": b"\x00\xff"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:], raw=False) == {"id": 1, "result": b"\x00\xff"}


def test_valid_request_parses():
    parsed = parse_request(request(params={"limit": 3}), MAX)
    assert (parsed.id, parsed.method, parsed.params) == (7, "status", {"limit": 3})


def test_params_may_be_missing_or_nil():
    assert parse_request(request(params=...), MAX).params == {}
    assert parse_request(request(params=None), MAX).params == {}


@pytest.mark.parametrize("raw, fragment", [
    (b"\xc1", "not a msgpack request"),               # reserved byte: FormatError
    (b"\x92\x01", "not a msgpack request"),           # truncated array
    (body([1, 2]), "a request is a map"),
    (body({"v": 1, "method": "status"}), "'id' must be an integer"),
    (body({"v": 1, "id": True, "method": "status"}), "'id' must be an integer"),
    (body({"v": 1, "id": "1", "method": "status"}), "'id' must be an integer"),
    (body({"v": 1, "id": 1, "method": 5}), "'method' must be a string"),
    (body({"v": 1, "id": 1, "method": "status", "params": [1]}), "'params' must be a map"),
    (body({"id": 1, "method": "status"}), "no protocol version"),
    (body({"v": 1, "id": 1}) + b"\x00", "ExtraData"),
    (b"\xa2\xff\xfe", "not a msgpack request"),       # invalid UTF-8 str
])
def test_malformed_requests_are_bad_request(raw, fragment):
    error = failure(raw)
    assert error.code in (Code.BAD_REQUEST,)
    assert fragment in error.message


def test_request_id_is_kept_when_known():
    assert failure(body({"v": 1, "id": 9, "method": 1})).request_id == 9


def test_newer_client_is_told_to_upgrade_the_daemon():
    error = failure(request(v=2))
    assert error.code == Code.UNSUPPORTED_VERSION and error.request_id == 7
    assert error.message.startswith("client speaks protocol 2, daemon speaks 1: upgrade flashlexd")


def test_older_client_is_told_to_upgrade_the_client():
    error = failure(request(v=0))
    assert "client speaks protocol 0, daemon speaks 1: upgrade the flashlexd client" in error.message


def test_true_is_not_version_one():
    assert failure(request(v=True)).code == Code.UNSUPPORTED_VERSION


def test_deep_nesting_is_refused_not_a_recursion_error():
    deep = b"\x91" * 5000 + b"\xc0"
    assert failure(deep).message == "request nested too deeply"


@pytest.mark.parametrize("size", [protocol.SMALL_BODY, protocol.SMALL_BODY + 1, 5000])
def test_nested_wide_headers_cost_little_to_refuse_checked_or_not(size):
    """Up to SMALL_BODY bytes a request is unpacked without the nesting check: the worst such
    body (nested 1024-element array headers) must still be cheap to refuse."""
    body = (b"\xdc\x04\x00" * size)[:size]
    tracemalloc.start()
    try:
        assert failure(body).code == Code.BAD_REQUEST
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes held to refuse a {size}-byte request"


@pytest.mark.parametrize("header", [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                    b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                                    b"\xc9\xff\xff\xff\xff\x01"])
def test_huge_container_headers_are_refused(header):
    assert failure(header).code == Code.BAD_REQUEST


def test_array_limit_bounds_the_allocation():
    assert failure(body(list(range(wire.MAX_ARRAY_LEN + 1)))).code == Code.BAD_REQUEST
    parse_request(body({"v": 1, "id": 1, "method": "ack",
                        "params": {"ids": list(range(wire.MAX_ARRAY_LEN))}}), MAX)


@pytest.mark.parametrize("params", [
    {"payload": b"x", "properties": {"user_properties": [["k", "v"]] * (wire.MAX_ARRAY_LEN + 76)}},
    {"ids": list(range(2 * wire.MAX_ARRAY_LEN))},
])
def test_a_list_over_the_unpack_limit_is_named(params):
    """Found by review: a valid request with a list over the unpack limit (1,100 MQTT user
    properties, a raw `ack` of 2,000 ids) was told "not a msgpack request: ValueError", as if
    its bytes were garbage; the error now names the limit."""
    error = failure(request(method="publish", params=params))
    assert error.code == Code.BAD_REQUEST
    assert f"max_array_len({wire.MAX_ARRAY_LEN})" in error.message, error.message


def test_ext_types_are_refused():
    assert failure(body(msgpack.ExtType(5, b"x"))).code == Code.BAD_REQUEST


def test_responses_encode_bytes_as_bin():
    frame = protocol.encode_result(3, {"payload": b"\xff"})
    assert msgpack.unpackb(frame[4:], raw=False) == {"id": 3, "result": {"payload": b"\xff"}}
    error = msgpack.unpackb(protocol.encode_error(None, Code.BUSY, "x")[4:], raw=False)
    assert error == {"id": None, "error": {"code": "busy", "message": "x"}}


def test_limits_fit_the_largest_payload():
    limits = Limits.for_payload(4 * 1024 * 1024)
    assert limits.max_frame == wire.REQUEST_OVERHEAD + 4 * 1024 * 1024
    assert limits.max_write_buffer >= limits.max_frame
    with pytest.raises(ValueError):
        Limits(max_frame=10)
