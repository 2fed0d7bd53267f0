"""Hand-made MQTT 3.1.1 pieces for what real brokers and clients refuse to do: a broker that
passes any topic bytes on (`LaxBroker`), and the packet helpers a raw client needs."""
from __future__ import annotations

import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, List, Optional, Set, Tuple

from tests.broker import HOST

_PUSH_EVERY = 0.05  # seconds a LaxBroker connection waits for a packet before sending pushed ones


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def mqtt_string(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def read_mqtt_packet(sock: socket.socket) -> Optional[Tuple[int, bytes]]:
    """(first byte, body), or None when the peer closed."""
    def exact(n: int) -> Optional[bytes]:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data
    head = exact(1)
    if head is None:
        return None
    length, shift = 0, 0
    while True:
        byte = exact(1)
        if byte is None:
            return None
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    body = exact(length) if length else b""
    return None if body is None else (head[0], body)



def close_tls(tls: ssl.SSLSocket) -> None:
    """Send TLS's close (close_notify), as a broker closing a link does (mosquitto, RabbitMQ):
    a link ended without one is taken for the path's doing (flashlexd/dialer.py)."""
    try:
        tls.settimeout(1)
        tls.unwrap()
    except (OSError, ValueError):
        pass


class TlsTestBroker:
    """A listener over mutual TLS (the test CA's server certificate, client certificates
    required) serving each connection in a thread with `_serve`; what it saw is recorded in
    `connects`, `acked` (PUBACKed packet ids) and `sent` (packet ids delivered once)."""

    def __init__(self, certs: Any):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certs.server.cert), str(certs.server.key))
        self.context.load_verify_locations(str(certs.ca))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.connects = 0
        self.acked: List[int] = []
        self.sent: Set[int] = set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Each packet of connection number `number` (0 first) to `answer`, until it says
        False or the peer closes."""
        number = None
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                while True:
                    packet = read_mqtt_packet(tls)
                    if packet is None:
                        return
                    if packet[0] >> 4 == 1:  # CONNECT
                        number = self.connects
                        self.connects += 1
                    if not self.answer(tls, packet[0], packet[1], number):
                        close_tls(tls)
                        return
        except (OSError, ssl.SSLError):
            return

    def answer(self, tls: ssl.SSLSocket, first: int, body: bytes, number: Optional[int]) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True
        self.listener.close()


class LaxBroker(TlsTestBroker):
    """Just enough of an MQTT 3.1.1 broker over mutual TLS, one that does NOT validate topics:
    to each client that subscribes it delivers `deliveries` (raw topic bytes, payload) at QoS 1,
    and it records the CONNECTs and PUBACKs it gets. A client that subscribes again (it lost
    its link, as a loaded machine's worker may) gets only what it has not PUBACKed, with DUP
    set, as a broker keeping its session does (all of them again stored each twice). With
    `resend_after`, what is still not PUBACKed that many seconds after the last packet came is
    sent once more on the same connection, with DUP set (MQTT 3.1.1 allows it; some brokers
    retry on a timer). It never answers an UNSUBSCRIBE. `push` (topic, payload) sends a QoS 0
    message to the connected client within 0.05 s, from the connection's own thread."""

    def __init__(self, certs: Any, deliveries: List[Tuple[bytes, bytes]],
                 resend_after: Optional[float] = None):
        self.deliveries = deliveries
        self.resend_after = resend_after
        self.pushed: "queue.Queue[Tuple[bytes, bytes]]" = queue.Queue()
        super().__init__(certs)

    def push(self, topic: bytes, payload: bytes) -> None:
        self.pushed.put((topic, payload))

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                quiet_since, resent = time.monotonic(), False
                while True:
                    if not tls.pending() and not select.select([tls], [], [], _PUSH_EVERY)[0]:
                        while not self.pushed.empty():
                            topic, payload = self.pushed.get()
                            tls.sendall(mqtt_packet(0x30, mqtt_string(topic) + payload))
                        if self.resend_after is not None and not resent \
                                and time.monotonic() - quiet_since >= self.resend_after:
                            self._deliver(tls)
                            resent = True
                        continue
                    packet = read_mqtt_packet(tls)
                    quiet_since = time.monotonic()
                    if packet is None:
                        return
                    kind, body = packet[0] >> 4, packet[1]
                    if kind == 1:  # CONNECT
                        self.connects += 1
                        tls.sendall(mqtt_packet(0x20, b"\0\0"))
                    elif kind == 8:  # SUBSCRIBE: grant QoS 1 to each filter, then deliver
                        filters, at = 0, 2
                        while at < len(body):
                            at += 2 + struct.unpack_from(">H", body, at)[0] + 1
                            filters += 1
                        tls.sendall(mqtt_packet(0x90, body[:2] + b"\1" * filters))
                        self._deliver(tls)
                    elif kind == 4:  # PUBACK
                        self.acked.append(struct.unpack(">H", body[:2])[0])
                    elif kind == 12:  # PINGREQ
                        tls.sendall(mqtt_packet(0xD0, b""))
                    elif kind == 14:  # DISCONNECT
                        return
        except (OSError, ssl.SSLError):
            return

    def _deliver(self, tls: ssl.SSLSocket) -> None:
        """Every delivery not PUBACKed yet, DUP set on those sent before."""
        for mid, (topic, payload) in enumerate(self.deliveries, 1):
            if mid in self.acked:
                continue
            publish_body = mqtt_string(topic) + struct.pack(">H", mid) + payload
            tls.sendall(mqtt_packet(0x3A if mid in self.sent else 0x32, publish_body))
            self.sent.add(mid)
