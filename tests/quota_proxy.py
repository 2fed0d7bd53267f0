"""A broker with AWS IoT Core's publish quota, for tests and benchmarks.

A TLS-terminating proxy (mutual TLS, like AWS IoT on 8883) in front of mosquitto's plain
listener that reads the MQTT packets each client sends and drops every PUBLISH past `rate` per
second on that connection, silently: no PUBACK, the connection stays up, which is what AWS IoT
Core does over its 100 publishes/s quota. The quota is a token bucket of `rate` tokens a second
holding at most `rate` (a second's worth). Everything else (CONNECT, PINGREQ, PUBACK, ...) and
everything the broker sends are forwarded untouched. `over_quota` counts the dropped publishes
(with `enforce=False` they are forwarded and only counted: how far over the quota a client is).
With `answer=True` (MQTT 5 clients) a publish over the quota is answered instead, by a PUBACK
with reason 0x97 Quota exceeded. With `filters_per_request=N`, a SUBSCRIBE or UNSUBSCRIBE
naming more than N topic filters closes the connection, as AWS IoT Core does over its 8
(`refused_requests` counts them, `largest_request` is the most filters one named). With
`uplink=N` the client's packets wait in a queue that lets N PUBLISHes a second through to the
quota and the broker, as a slow cellular uplink's buffer does.
"""
from __future__ import annotations

import collections
import select
import socket
import ssl
import threading
import time
from typing import Deque, Dict, List, Optional, Tuple

from tests.broker import HOST, Broker, wait_for
from tests.lax_broker import close_tls

CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE = 1, 3, 8, 10
QUOTA_EXCEEDED_PUBACK = bytes([0x40, 3])  # + packet id + reason 0x97, no properties


class _Link:
    """One client connection: its TLS side, its plain side to the broker, its quota."""
    mqtt5 = False  # its CONNECT's protocol level was 5

    def __init__(self, tls: ssl.SSLSocket, plain: socket.socket, rate: float):
        self.tls, self.plain, self.rate = tls, plain, rate
        self.tokens, self.stamp = rate, time.monotonic()
        self.pending = b""  # client bytes not yet a whole packet

    def allow_publish(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def split_packets(data: bytes) -> Tuple[List[bytes], bytes]:
    """Whole MQTT packets at the start of `data`, and the incomplete rest."""
    packets, at = [], 0
    while at + 2 <= len(data):
        length, multiplier, pos = 0, 1, at + 1
        while True:
            if pos >= len(data):
                return packets, data[at:]
            byte = data[pos]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            pos += 1
            if not byte & 0x80:
                break
        end = pos + length
        if end > len(data):
            break
        packets.append(data[at:end])
        at = end
    return packets, data[at:]


def _varint(data: bytes, at: int) -> Tuple[int, int]:
    """The variable byte integer at `at`, and the offset after it."""
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _filters_named(packet: bytes, mqtt5: bool) -> int:
    """How many topic filters a SUBSCRIBE (each with an options byte) or UNSUBSCRIBE names."""
    _, at = _varint(packet, 1)  # past the fixed header
    at += 2  # the packet id
    if mqtt5:
        length, at = _varint(packet, at)
        at += length  # the properties
    options = 1 if packet[0] >> 4 == SUBSCRIBE else 0
    count = 0
    while at < len(packet):
        at += 2 + int.from_bytes(packet[at:at + 2], "big") + options
        count += 1
    return count


def _packet_id(publish: bytes) -> bytes:
    """The packet id of a QoS 1 PUBLISH: after the fixed header and the topic."""
    pos = 1
    while publish[pos] & 0x80:
        pos += 1
    topic_at = pos + 1
    topic_length = int.from_bytes(publish[topic_at:topic_at + 2], "big")
    at = topic_at + 2 + topic_length
    return publish[at:at + 2]


class QuotaProxy:
    def __init__(self, broker: Broker, rate: float, enforce: bool = True, answer: bool = False,
                 filters_per_request: Optional[int] = None, uplink: Optional[float] = None):
        assert broker.plain_port, "the broker needs its plain listener (Broker(..., plain=True))"
        self.broker, self.rate, self.enforce = broker, rate, enforce  # not enforced: only counted
        self.answer, self.filters_per_request = answer, filters_per_request
        self.refused_requests = self.largest_request = 0
        self.uplink = uplink  # PUBLISHes a second the client's side carries, queued (None: at once)
        self._uplink_queue: Deque[Tuple[float, _Link, bytes]] = collections.deque()
        self._uplink_free = 0.0
        # a plain server context, as mosquitto's OpenSSL verifies (3.13's default one is stricter
        # and refused the test CA's client certificates)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(broker.server.cert), str(broker.server.key))
        self.context.load_verify_locations(str(broker.certs.ca))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.over_quota = 0
        self.forwarded_publishes = 0
        self._links: Dict[socket.socket, _Link] = {}
        self._closed = False
        self._cut = threading.Event()
        self._cut_reason: Optional[int] = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)

    def _serve(self) -> None:
        while not self._closed:
            ready, _, _ = select.select([self.listener, *self._links], [], [],
                                        0.002 if self._uplink_queue else 0.05)
            self._release()
            if self._cut.is_set():
                for link in {id(v): v for v in self._links.values()}.values():
                    if self._cut_reason is not None:
                        self._say_disconnect(link, self._cut_reason)
                    self._drop(link)
                self._cut.clear()
                continue
            for sock in ready:
                if sock is self.listener:
                    self._accept()
                elif sock in self._links:
                    self._relay(sock)
        self.listener.close()
        for sock in list(self._links):
            sock.close()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        client.settimeout(5)
        try:
            tls = self.context.wrap_socket(client, server_side=True)
            plain = socket.create_connection((HOST, self.broker.plain_port), timeout=5)
        except OSError:
            client.close()
            return
        link = _Link(tls, plain, self.rate)
        self._links[tls] = self._links[plain] = link

    def _relay(self, sock: socket.socket) -> None:
        link = self._links[sock]
        try:
            data = sock.recv(65536)
            if sock is link.tls:
                while link.tls.pending():
                    data += link.tls.recv(65536)
        except (OSError, ssl.SSLError):
            data = b""
        if not data:  # the broker's close is passed on with TLS's close, as the broker would
            self._drop(link, graceful=sock is link.plain)
            return
        try:
            if sock is link.plain:
                link.tls.sendall(data)
            else:
                link.plain.sendall(self._filter(link, data))
        except OSError:
            self._drop(link)

    def _filter(self, link: _Link, data: bytes) -> bytes:
        packets, link.pending = split_packets(link.pending + data)
        if self.uplink is not None:  # through the slow uplink's queue first (_release)
            for packet in packets:
                if packet[0] >> 4 == PUBLISH:
                    self._uplink_free = max(self._uplink_free, time.monotonic()) + 1 / self.uplink
                self._uplink_queue.append((max(self._uplink_free, time.monotonic()), link, packet))
            return b""
        kept = []
        for packet in packets:
            verdict = self._judge(link, packet)
            if verdict is None:
                return b""
            if verdict:
                kept.append(packet)
        return b"".join(kept)

    def _judge(self, link: _Link, packet: bytes) -> Optional[bool]:
        """Whether `packet` goes on to the broker; None: the link was dropped over it."""
        kind = packet[0] >> 4
        if kind == CONNECT:
            _, at = _varint(packet, 1)
            link.mqtt5 = packet[at + 2 + int.from_bytes(packet[at:at + 2], "big")] == 5
        if kind in (SUBSCRIBE, UNSUBSCRIBE) and self.filters_per_request is not None:
            named = _filters_named(packet, link.mqtt5)
            self.largest_request = max(self.largest_request, named)
            if named > self.filters_per_request:
                self.refused_requests += 1
                self._drop(link)
                return None
        if kind == PUBLISH:
            if not link.allow_publish():
                self.over_quota += 1
                if self.answer:
                    link.tls.sendall(QUOTA_EXCEEDED_PUBACK + _packet_id(packet) + b"\x97")
                if self.enforce:
                    return False
            self.forwarded_publishes += 1
        return True

    def _release(self) -> None:
        """The slow uplink: the client's packets queued in `_filter` reach the quota and the
        broker in order, PUBLISHes at `uplink` a second (a cellular link's buffer)."""
        now = time.monotonic()
        while self._uplink_queue and self._uplink_queue[0][0] <= now:
            _, link, packet = self._uplink_queue.popleft()
            if link.tls not in self._links:
                continue
            try:
                if self._judge(link, packet):
                    link.plain.sendall(packet)
            except OSError:
                self._drop(link)

    def _drop(self, link: _Link, graceful: bool = False) -> None:
        """Close both ends; `graceful`: with TLS's close, as a broker closes a link (without
        it, a reset or a path's end, flashlexd/dialer.py)."""
        if graceful:
            close_tls(link.tls)
        for end in (link.tls, link.plain):
            self._links.pop(end, None)
            end.close()

    @staticmethod
    def _say_disconnect(link: _Link, reason: int) -> None:
        try:
            link.tls.sendall(bytes([0xE0, 1, reason]))  # MQTT 5 DISCONNECT, no properties
        except OSError:
            pass

    def drop_connections(self, timeout: float = 5, reason: Optional[int] = None) -> None:
        """Cut every client connection (as a network outage would), from the proxy's thread;
        with `reason`, after an MQTT 5 DISCONNECT naming it, as a broker closes a link."""
        self._cut_reason = reason
        self._cut.set()
        wait_for(lambda: not self._cut.is_set(), timeout, "quota proxy cut")

    def link_count(self) -> int:
        return len(self._links) // 2
