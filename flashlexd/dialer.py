"""A TCP connect and TLS handshake that never block the worker's loop.

paho's `reconnect()` resolves, connects and shakes hands in one blocking call (up to its
connect timeout: a black-holed broker froze a worker's loop, and its heartbeat, for seconds).
A `Dialer` does the same steps one at a time from the loop: the name lookup in a helper
thread (getaddrinfo has no non-blocking form), then a non-blocking connect and handshake that
the worker's select() waits on. The finished TLS socket is handed to paho (`DialedClient`),
which then only writes CONNECT.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import ssl
import sys
import termios
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from flashlexd.pahoimport import paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties, VariableByteIntegers  # also where paho 2.2 defines it: exception
from paho.mqtt.reasoncodes import ReasonCode
from flashlexd.publishread import Publish, parse_publishes
from flashlexd.tlsend import ragged_end
from flashlexd.wsupgrade import UpgradedWebsocket, WebsocketUpgrade

# Linux's SIOCOUTQ (the same number as TIOCOUTQ): bytes written to a TCP socket that its peer
# has not acknowledged yet; None where the platform has no such request
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", None)
RESOLVE_POLL = 0.05  # seconds between looks at a pending name lookup
READ_CHUNK = 16384  # bytes per socket read: a TLS record's worth
ENDING_READS = 8  # reads at a close to find how the link ended (`ended_abruptly`)


class DialedClient(paho.Client):
    """A paho client that takes the socket a `Dialer` made instead of connecting itself."""

    dialed: Union[None, ssl.SSLSocket, UpgradedWebsocket] = None
    _read = b""  # what the last socket read brought, from _read_at on not yet taken by paho
    _read_at = 0
    # what a read by take_publishes met, kept for paho's next read: an error, or b"" (the end)
    _held: Union[None, bytes, OSError] = None
    _received_at = "_last_bytes_received"  # paho's keepalive clock of the last packet in
    unacknowledged_at_close = 0  # our bytes the peer had not acknowledged when the link closed
    # the link ended without the broker's TLS close (close_notify): a reset, a path or a proxy
    # ended it, or the broker died; a broker that closes a link (mosquitto refusing a publish,
    # whatever its size) sends one first. False: it sent one, or it is not known
    cut_abruptly = False

    def _create_socket(self) -> Any:
        """The Dialer's socket as it is: it made the TLS handshake and any websocket upgrade."""
        sock, self.dialed = self.dialed, None
        if sock is None:
            raise ConnectionError("no connected socket to hand over")
        self._read, self._read_at, self._held = b"", 0, None  # nothing of an earlier connection
        self.unacknowledged_at_close = 0
        self.cut_abruptly = False
        if not hasattr(self, self._received_at):
            self._received_at = "_last_msg_in"  # paho 2.0 and 2.1 name it so
        return sock

    def _sock_close(self) -> None:
        """Note, while the socket is still there, how far the peer had got with our bytes: a
        link cut mid-upload is the path's doing, not the entry's (`mqtt.Connection`). Once per
        link, not per packet."""
        if self._sock is not None:
            self.unacknowledged_at_close = unacknowledged(self._sock)
            if not self.cut_abruptly and self._held is None:  # a write failed first, say
                self.cut_abruptly = ended_abruptly(getattr(self._sock, "_socket", self._sock))
        super()._sock_close()

    def inside_packet(self) -> bool:
        """Whether paho has read part of a packet and waits for the rest of it."""
        return bool(self._in_packet["command"])

    def buffered(self) -> bool:
        """Bytes already read from the socket that paho has not taken: select() cannot see them."""
        return self._read_at < len(self._read) or self._held is not None

    def _sock_recv(self, bufsize: int) -> bytes:
        """paho reads a packet as its first byte, then its length byte by byte, then its body,
        one socket (TLS) read each: ~20% of the ingress worker's CPU. One read of up to
        READ_CHUNK bytes serves them all; paho's errors (BlockingIOError, EOF as b"") are
        paho's own, from that one read."""
        if self._read_at >= len(self._read):
            self._read, self._read_at = self._recv(), 0
        data = self._read[self._read_at:self._read_at + bufsize]
        self._read_at += len(data)
        return data

    def _recv(self) -> bytes:
        held, self._held = self._held, None
        if held is None:
            try:
                return super()._sock_recv(READ_CHUNK)
            except ssl.SSLError as exc:  # the socket is made with suppress_ragged_eofs=False
                if not ragged_end(exc):
                    raise
                self.cut_abruptly = True
                return b""  # the end, as paho takes it
            except ConnectionResetError:
                self.cut_abruptly = True
                raise
        if isinstance(held, OSError):
            raise held
        return held

    def take_publishes(self, limit: int) -> Optional[List[Publish]]:
        """Up to `limit` whole QoS 0/1 PUBLISH packets from what was read, reading on while the
        socket has more (publishread.py), with paho's keepalive clock kept as paho's own reads
        keep it. Only between two of paho's packets: [] when the next packet is paho's
        (another kind, or cut by the end of a read; an error or the end of the connection
        waits for paho's next read), None when the socket has nothing now."""
        if self._in_packet["command"]:
            return []  # paho is inside a packet
        found: List[Publish] = []
        v5 = self._protocol == paho.MQTTv5
        while len(found) < limit:
            if self._read_at >= len(self._read):
                try:
                    self._read, self._read_at = self._recv(), 0
                except BlockingIOError:
                    if not found:
                        return None
                    break
                except OSError as exc:
                    self._held = exc
                    break
                if not self._read:
                    self._held = b""
                    break
            self._read_at = parse_publishes(self._read, self._read_at, v5, limit - len(found), found,
                                            self.properties_limit if self.on_oversize_publish else None)
            if self._read_at < len(self._read):
                break  # the limit, or a packet for paho
        if found:
            with self._msgtime_mutex:
                setattr(self, self._received_at, paho.time_func())
        return found

    # on_malformed_publish(mid, qos, topic, why): a PUBLISH paho calls malformed, whose packet
    # id could be read (0 for QoS 0); set by the ingress, which acknowledges it in order
    on_malformed_publish: Optional[Callable[[int, int, bytes, str], None]] = None
    # on_oversize_publish(mid, qos, topic, size): an MQTT 5 PUBLISH whose property block is
    # over `properties_limit` bytes, left undecoded; set by the ingress with its maxPayloadBytes
    on_oversize_publish: Optional[Callable[[int, int, bytes, int], None]] = None
    properties_limit: Optional[int] = None

    def _handle_publish(self) -> MQTTErrorCode:
        """paho's, except that a malformed PUBLISH does not drop the link: paho closes it, and
        a broker keeping our session resends that same PUBLISH first on every new connection,
        so one bad message stopped all ingest. Its remaining length framed it, so the stream
        is intact: it is handed to `on_malformed_publish` (acknowledged there when its packet
        id can be read; else left unacknowledged, costing one slot of the broker's window).
        An MQTT 5 PUBLISH with an empty topic is one too: it names its topic by a Topic Alias,
        which our CONNECT allows none of (paho would hand it on with the topic '')."""
        qos = (self._in_packet["command"] >> 1) & 3
        packet = self._in_packet["packet"]  # paho reads it without changing it
        if qos == 3:
            why = "QoS 3"
        elif self._protocol == paho.MQTTv5 and packet[:2] == b"\0\0":
            why = "empty topic (a Topic Alias, and we allow none)"
        elif self._oversize_properties(qos, packet):
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        else:
            try:
                return super()._handle_publish()
            except MalformedPacket as exc:
                why = str(exc) or "malformed"
        if self.on_malformed_publish is None:
            raise MalformedPacket(why)
        packet = bytes(packet)
        size = int.from_bytes(packet[:2], "big") if len(packet) >= 2 else len(packet)
        topic = packet[2:2 + size]
        mid = -1  # unreadable: not acknowledged
        if qos == 0:
            mid = 0
        elif qos == 1 and len(packet) >= 4 + size:
            mid = int.from_bytes(packet[2 + size:4 + size], "big")
        self.on_malformed_publish(mid, qos, topic, why)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _oversize_properties(self, qos: int, packet: bytes) -> bool:
        """Whether this MQTT 5 PUBLISH's property block is over `properties_limit` bytes, then
        handed to `on_oversize_publish` undecoded: decoding takes time with the number of
        properties (~7 µs each here), and 10 MB of empty user properties would keep the
        ingress from its heartbeat until it was aborted as hung, the broker sending the
        message first again at each link."""
        if self._protocol != paho.MQTTv5 or self.properties_limit is None or self.on_oversize_publish is None:
            return False
        size = int.from_bytes(packet[:2], "big")
        at = 2 + size + (2 if qos else 0)
        try:
            length, used = VariableByteIntegers.decode(bytes(packet[at:at + 4]))
        except MalformedPacket:
            return False  # paho says so next
        if length <= self.properties_limit:
            return False
        mid = int.from_bytes(packet[2 + size:4 + size], "big") if qos else 0
        self.on_oversize_publish(mid, qos, bytes(packet[2:2 + size]), len(packet) - at - used)
        return True

    def _handle_connack(self) -> MQTTErrorCode:
        """paho's, except that a 3.1.1 CONNACK "unacceptable protocol version" (return code 1)
        reaches on_connect as the refusal it is: paho, not allowed to downgrade to MQTT 3.1
        (reconnect_on_failure False), returns a protocol error without calling on_connect,
        and the close before CONNACK was then reported as a refused client certificate."""
        packet = self._in_packet["packet"]
        if self._protocol == paho.MQTTv311 and len(packet) == 2 and packet[1] == 1:
            if self.on_connect is not None:
                self.on_connect(self, self._userdata, paho.ConnectFlags(session_present=False),
                                ReasonCode(PacketTypes.CONNACK, aName="Unsupported protocol version"),
                                Properties(PacketTypes.CONNACK))
            return MQTTErrorCode.MQTT_ERR_CONN_REFUSED
        return super()._handle_connack()

    _per_topic_callbacks = False

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._per_topic_callbacks = True
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        """paho's dispatch without its topic matcher while no per-topic callback exists (the
        daemon adds none): matching every message against an empty tree was ~5% of ingress."""
        if self._per_topic_callbacks:
            super()._handle_on_message(message)
        elif self.on_message is not None:
            with self._in_callback_mutex:
                self.on_message(self, self._userdata, message)


def ended_abruptly(tls: Any) -> bool:
    """Whether what is left to read on a TLS socket being closed ends without the peer's TLS
    close (close_notify): read without waiting, a few records at most; False when that cannot
    be known (nothing there yet, the socket already gone)."""
    for _ in range(ENDING_READS):
        try:
            if not tls.recv(READ_CHUNK):
                return False
        except ConnectionResetError:
            return True
        except (OSError, ValueError) as exc:  # SSLWantReadError, BlockingIOError: nothing there yet
            return ragged_end(exc)
    return False


def unacknowledged(sock: Any) -> int:
    """Bytes written to `sock` that the peer's TCP has not acknowledged (SIOCOUTQ); 0 where that
    cannot be known (another platform, a closed socket). A TLS record only partly written is
    still in paho's queue (`want_write`), not counted here."""
    if _SIOCOUTQ is None:
        return 0
    try:
        raw = fcntl.ioctl(getattr(sock, "_socket", sock).fileno(), _SIOCOUTQ, b"\0" * 4)
    except (OSError, ValueError):
        return 0
    return int.from_bytes(raw, sys.byteorder)


class Lookup:
    """getaddrinfo in a thread of its own, which ends with the lookup (no resolver thread, nor
    concurrent.futures, kept in every MQTT worker for the next reconnect)."""

    def __init__(self, host: str, port: int):
        self._answer: List[Tuple[Any, ...]] = []
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(host, port), daemon=True,
                                        name="flashlexd-resolve")
        self._thread.start()

    def _run(self, host: str, port: int) -> None:
        try:
            self._answer = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop by result()
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> List[Tuple[Any, ...]]:
        """The addresses; raises what getaddrinfo raised (socket.gaierror)."""
        if self._error is not None:
            raise self._error
        return self._answer


class Dialer:
    """One connect attempt to `host:port`, advanced by `step()` until it returns the TLS
    socket, or with a `websocket_path` the websocket upgraded over it; it raises what failed
    (OSError, ssl.SSLError, socket.timeout past `timeout`)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float,
                 clock: Callable[[], float] = time.monotonic, websocket_path: Optional[str] = None):
        self.host, self.port, self.context = host, port, context
        self.websocket_path = websocket_path
        self.upgrade: Optional[WebsocketUpgrade] = None
        self.clock = clock
        self.deadline = clock() + timeout
        self.timeout = timeout
        self.lookup: Optional[Lookup] = Lookup(host, port)
        self.addresses: List[Tuple[Any, ...]] = []
        self.sock: Optional[socket.socket] = None
        self.tls: Optional[ssl.SSLSocket] = None
        self.want_write = True
        self.last_error: Optional[BaseException] = None
        self.address_deadline = self.deadline  # the next address is tried too from then
        self.earlier: List[socket.socket] = []  # connects to earlier addresses, still pending

    def wait_fds(self) -> Tuple[Sequence[Any], Sequence[Any]]:
        if self.upgrade is not None:
            tls = self.upgrade.tls
            return ((), (tls,)) if self.upgrade.want_write else ((tls,), ())
        if self.tls is not None:
            return ((), (self.tls,)) if self.want_write else ((self.tls,), ())
        pending = self.earlier + ([self.sock] if self.sock is not None else [])
        return (), pending

    def next_wait(self) -> float:
        """Seconds until `step()` should run even if no socket is ready."""
        remaining = max(0.0, self.deadline - self.clock())
        if self.lookup is not None:
            return min(RESOLVE_POLL, remaining)
        if self.sock is not None and self.addresses:
            return min(remaining, max(0.0, self.address_deadline - self.clock()))
        return remaining

    def step(self) -> Union[None, ssl.SSLSocket, UpgradedWebsocket]:
        if self.clock() >= self.deadline:
            upgrade = self.upgrade  # TCP and TLS were done: the HTTP upgrade was not answered
            self.close()
            if self.lookup is not None:  # the name lookup, not the broker, did not answer
                raise socket.gaierror(socket.EAI_AGAIN, f"no answer from the name lookup within {self.timeout:g}s")
            if upgrade is not None:
                raise upgrade.error(f"no answer within {self.timeout:g}s", transport=True)
            raise socket.timeout(f"timed out after {self.timeout:g}s")
        if self.upgrade is None:
            tls = self._tls_step()
            if tls is None or self.websocket_path is None:
                return tls
            self.upgrade = WebsocketUpgrade(tls, self.host, self.port, self.websocket_path)
        try:
            return self.upgrade.step()
        except Exception:
            self.close()
            raise

    def _tls_step(self) -> Optional[ssl.SSLSocket]:
        if self.lookup is not None:
            if not self.lookup.done():
                return None
            self.addresses, self.lookup = list(self.lookup.result()), None  # raises gaierror
            return self._next_address()
        if self.tls is None:
            for earlier in list(self.earlier):  # the first of them to answer wins
                tls = self._connected(earlier)
                if tls is not None or self.tls is not None:
                    return tls
            if self.sock is not None and self.addresses and self.clock() >= self.address_deadline:
                # no answer from this address yet (SYNs dropped: a broken IPv6 route, a dead A
                # record, or a slow link): the next address is tried too, this one left
                # pending (as Happy Eyeballs does): it may still answer first
                self.earlier.append(self.sock)
                self.sock = None
                return self._next_address()
            if self.sock is None:
                return None
            return self._connected(self.sock)
        return self._handshake()

    def close(self) -> None:
        if self.upgrade is not None:
            self.upgrade.tls.close()
            self.upgrade = None
        for sock in (self.tls, self.sock, *self.earlier):
            if sock is not None:
                sock.close()
        self.tls = self.sock = None
        self.earlier = []

    def _next_address(self) -> Optional[ssl.SSLSocket]:
        if not self.addresses:
            if self.earlier:
                return None  # an earlier address may still answer
            raise self.last_error or OSError(f"no address for {self.host}")
        family, kind, proto, _, address = self.addresses.pop(0)
        # after an equal share of what is left of the attempt, the next address is tried too
        # (this one left pending: the first to answer wins)
        now = self.clock()
        self.address_deadline = now + max(0.0, self.deadline - now) / (len(self.addresses) + 1)
        self.sock = socket.socket(family, kind, proto)
        self.sock.setblocking(False)
        self.want_write = True
        self.sock.connect_ex(address)  # EINPROGRESS: select() says when it is done
        return None

    def _connected(self, sock: socket.socket) -> Optional[ssl.SSLSocket]:
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            sock.close()
            if sock is self.sock:
                self.sock = None
            else:
                self.earlier.remove(sock)
            kind = ConnectionRefusedError if error == errno.ECONNREFUSED else OSError
            self.last_error = kind(error, os.strerror(error))
            if self.sock is None:
                return self._next_address()
            return None
        try:
            sock.getpeername()
        except OSError:
            return None  # not connected yet: a spurious wake-up
        for other in (self.sock, *self.earlier):  # the others are given up
            if other is not None and other is not sock:
                other.close()
        self.sock, self.earlier, self.addresses = None, [], []
        # a peer's end without its TLS close raises SSLEOFError (not b""): the path's, not the broker's
        self.tls = self.context.wrap_socket(sock, server_hostname=self.host,
                                            do_handshake_on_connect=False, suppress_ragged_eofs=False)
        return self._handshake()

    def _handshake(self) -> Optional[ssl.SSLSocket]:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.want_write = False
            return None
        except ssl.SSLWantWriteError:
            self.want_write = True
            return None
        except Exception:
            self.close()
            raise
        tls, self.tls = self.tls, None
        return tls

