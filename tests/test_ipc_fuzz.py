"""Hostile input over a real socket: the server answers or closes, never crashes or stalls,
and a bystander client on another connection is served throughout."""
import resource
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashlexd.client import Client
from flashlexd.client.wire import HEADER, PROTOCOL_VERSION, Code, encode_frame

try:
    from test_ipc_server import Harness, raw_connect, read_frame, until
except ImportError:  # tests run as a package
    from tests.test_ipc_server import Harness, raw_connect, read_frame, until

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
METHODS = ["status", "messages", "ack", "wait", "publish", "outbox", "purge", "consumers", "reset",
           "remove_consumer"]
EXPECTED_CODES = {Code.BAD_REQUEST, Code.BAD_PARAMS, Code.UNKNOWN_METHOD, Code.UNSUPPORTED_VERSION,
                  Code.CONFIRM_REQUIRED, Code.PAYLOAD_TOO_LARGE, Code.OUTBOX_FULL}

scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats()
           | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)
param_names = st.sampled_from(["limit", "topic", "after", "ids", "timeout", "payload", "qos",
                               "retain", "confirm"]) | st.text(max_size=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("fuzz")).start()
    h.ingest(("fuzz/1", b"one"), ("fuzz/2", b"two"))
    bystander = Client(h.path, timeout=5)
    h.bystander = bystander
    yield h
    bystander.close()
    h.stop()


def still_serving(h) -> None:
    assert h.bystander.status()["version"] == "0.1.0"


def exchange(h, frame: bytes):
    sock = raw_connect(h.path)
    try:
        sock.sendall(frame)
        return read_frame(sock)
    finally:
        sock.close()


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(server, data):
    sock = raw_connect(server.path)
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server may already have closed on a bad length prefix
    finally:
        sock.close()
    still_serving(server)


@FUZZ
@given(body=st.binary(max_size=2048))
def test_random_frame_bodies_get_an_error(server, body):
    response = exchange(server, HEADER.pack(len(body)) + body)
    assert set(response) in ({"id", "error"}, {"id", "result"})
    if "error" in response:
        assert response["error"]["code"] in EXPECTED_CODES
    still_serving(server)


@FUZZ
@given(method=st.sampled_from(METHODS) | st.text(max_size=10),
       params=st.dictionaries(param_names, values, max_size=4))
def test_wrong_param_types_never_crash(server, method, params):
    if method == "wait":
        params["timeout"] = 0  # keep the example from parking
    frame = encode_frame({"v": PROTOCOL_VERSION, "id": 42, "method": method, "params": params})
    response = exchange(server, frame)
    assert response["id"] == 42
    if "error" in response:
        assert response["error"]["code"] in EXPECTED_CODES, response
        assert response["error"]["message"] and "\n" not in response["error"]["message"], response
    still_serving(server)


def test_an_unknown_param_name_is_quoted_in_its_one_line_error(server):
    """Every other param error quoted what it names (repr); the unknown name went out raw, so a
    newline in it made a second, forged-looking line wherever the error is shown."""
    frame = encode_frame({"v": PROTOCOL_VERSION, "id": 7, "method": "status",
                          "params": {"x\n<0>forged": 1}})
    message = exchange(server, frame)["error"]["message"]
    assert message.startswith("status: unknown param 'x\\n<0>forged'") and "\n" not in message


@FUZZ
@given(envelope=st.dictionaries(st.sampled_from(["v", "id", "method", "params"]) | st.text(max_size=5),
                                values, max_size=5))
def test_random_envelopes(server, envelope):
    if envelope.get("method") == "wait" and isinstance(envelope.get("params"), dict):
        envelope["params"]["timeout"] = 0
    response = exchange(server, encode_frame(envelope))
    if "error" in response:
        assert response["error"]["code"] in EXPECTED_CODES, response
    still_serving(server)


@FUZZ
@given(cut=st.integers(0, 60))
def test_truncated_frames(server, cut):
    frame = encode_frame({"v": PROTOCOL_VERSION, "id": 1, "method": "messages", "params": {"limit": 5}})
    sock = raw_connect(server.path)
    sock.sendall(frame[:min(cut, len(frame) - 1)])
    sock.close()
    still_serving(server)


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x7FFFFFFF, 64 * 1024 * 1024])
def test_huge_length_prefix_is_refused_without_allocating(server, length):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sock = raw_connect(server.path)
    try:
        sock.sendall(HEADER.pack(length) + b"\0" * 65536)
        assert read_frame(sock)["error"]["code"] == Code.FRAME_TOO_LARGE
        assert sock.recv(1) == b""  # closed
    finally:
        sock.close()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 32 * 1024
    still_serving(server)


@pytest.mark.parametrize("body", [
    b"\x91" * 100_000 + b"\xc0",                                   # 100k levels deep
    (b"\xdd" + struct.pack(">I", 1024)) * 1100,                   # deep and wide headers
    b"\xdd\xff\xff\xff\xff",                                      # 4G-element array header
    b"\xdf\xff\xff\xff\xff",                                      # 4G-entry map header
    b"\xc6\x7f\xff\xff\xff",                                      # 2 GiB bin header
    msgpack.packb({"v": 1, "id": 1, "method": "ack", "params": {"ids": list(range(5000))}}),
])
def test_hostile_msgpack_is_a_bad_request(server, body):
    sock = raw_connect(server.path)
    try:
        sock.sendall(HEADER.pack(len(body)) + body)
        assert read_frame(sock)["error"]["code"] == Code.BAD_REQUEST
        sock.sendall(encode_frame({"v": 1, "id": 2, "method": "status"}))  # still usable
        assert "result" in read_frame(sock)
    finally:
        sock.close()


def test_no_connection_is_leaked(server):
    until(lambda: server.call(lambda: server.server.connection_count) == 1, what="only the bystander left")
    assert server.call(lambda: server.server.parked_count) == 0
    still_serving(server)
