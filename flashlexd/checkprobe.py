"""`flashlexd check`'s network steps: DNS, TCP and TLS to the broker (`check_broker`), then a
short MQTT session of its own (`ProbeSession`: connect, subscribe to the ingress topic, publish a
probe and time its return), each failure named in one line.
"""
from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from flashlexd.checkcerts import Failed
from flashlexd.config import Thing
from flashlexd.probemark import probe_payload, probe_topic
from flashlexd.tlsend import ragged_end

if TYPE_CHECKING:
    import paho.mqtt.client as paho

VERDICT_WAIT = 1.0  # the longest the broker step waits for a TLS 1.3 broker's verdict on our certificate


def check_broker(thing: Thing, context: ssl.SSLContext, timeout: float) -> Tuple[str, bool]:
    """DNS, then TCP, then the TLS handshake, as the daemon does them, each failure named."""
    from flashlexd.mqttclient import describe_error

    host, port = thing.endpoint, thing.mqtt.port
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout

    try:
        addresses = _resolve(host, port, timeout)
    except socket.gaierror as exc:
        raise Failed(f"DNS: cannot resolve {host}: {exc.strerror}") from None
    except TimeoutError:
        raise Failed(f"DNS: resolving {host} timed out after {timeout:g}s") from None
    if not addresses:
        raise Failed(f"DNS: {host} resolves to no address")

    started = time.monotonic()
    sock, address, error = None, None, None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(address)
            break
        except OSError as exc:
            sock.close()
            sock, error = None, exc
    if sock is None:
        ip = address[0] if address else host
        via = f" ({ip})" if ip != host else ""
        if isinstance(error, ConnectionRefusedError):
            raise Failed(f"TCP: connection refused to {where}{via} (broker down or wrong port?)")
        if isinstance(error, (socket.timeout, TimeoutError)):
            raise Failed(f"TCP: no answer from {where}{via} within {timeout:g}s (firewall? wrong port?)")
        raise Failed(f"TCP: cannot connect to {where}{via}: {getattr(error, 'strerror', None) or error}")
    tcp_ms = (time.monotonic() - started) * 1000

    started = time.monotonic()
    closed = f"TLS: the broker at {where} closed the connection"
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        with context.wrap_socket(sock, server_hostname=host) as tls:
            version = tls.version()
            tls_ms = (time.monotonic() - started) * 1000
            accepted = True if version != "TLSv1.3" else \
                _client_certificate_verdict(tls, min(deadline, time.monotonic() + VERDICT_WAIT))
    except (socket.timeout, TimeoutError):
        raise Failed(f"TLS: no handshake answer from {where} within {timeout:g}s") from None
    except _ClosedAfterHandshake:
        raise Failed(f"{closed} right after the TLS handshake: it refused the client certificate"
                     f" {thing.keys.cert}") from None
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        if isinstance(exc, (ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)) or ragged_end(exc):
            raise Failed(f"{closed} during the TLS handshake (is it a TLS port? does it accept the client"
                         f" certificate {thing.keys.cert}?)") from None
        message = describe_error(exc, thing, timeout)
        raise Failed(message if message.startswith("TLS") else f"TLS: {message}") from None
    except OSError as exc:
        raise Failed(f"TLS: {describe_error(exc, thing, timeout)}") from None
    finally:
        sock.close()
    ip = address[0] if address else host
    ours = {True: "client certificate accepted",
            None: "no word yet on the client certificate (the mqtt step tells)"}[accepted]
    return (f"{where}{'' if ip == host else f' ({ip})'}: TCP connect {tcp_ms:.0f} ms, {version} handshake"
            f" {tls_ms:.0f} ms, broker certificate verified for {host}, {ours}"), True


class _ClosedAfterHandshake(Exception):
    pass


def _client_certificate_verdict(tls: ssl.SSLSocket, deadline: float) -> Optional[bool]:
    """Did a TLS 1.3 broker accept our certificate? In TLS 1.3 the client's side of the
    handshake is over before the server has checked the client certificate: a refusal comes as
    an alert (raised here as `ssl.SSLError`) or a close (`_ClosedAfterHandshake`), an acceptance
    as session tickets (OpenSSL-based brokers such as mosquitto send them once the client
    Finished, certificate included, is verified). True when a ticket arrived, None when the
    broker said nothing either way before `deadline` (then the MQTT connect tells)."""
    tls.setblocking(False)
    while True:
        session = tls.session
        if session is not None and session.has_ticket:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        select.select([tls], [], [], remaining)
        try:
            if tls.recv(1) == b"":
                raise _ClosedAfterHandshake()
            return True  # the broker spoke (an MQTT broker never speaks first): it let us in
        except ssl.SSLWantReadError:
            continue
        except ssl.SSLError as exc:  # closed without TLS's close (our context no longer hides it)
            if ragged_end(exc):
                raise _ClosedAfterHandshake() from None
            raise


class ProbeSession:
    """The check's own short MQTT session: `build_client` from the daemon, with the client id
    `<thing name>-check` and a clean session, driven by paho's `loop()` (no fork here). It
    speaks what the daemon would (`thing.mqtt.protocol`), falling back from MQTT 5 to 3.1.1
    under `auto` by the daemon's own rules (`mqttv5.ProtocolChoice`)."""

    def __init__(self, thing: Thing, timeout: float, context: ssl.SSLContext):
        """`context`: the keys step's TLS context (ALPN on 443), for every attempt."""
        from flashlexd.mqttv5 import ProtocolChoice

        self.thing, self.timeout, self.context = thing, timeout, context
        self.where = f"{thing.endpoint}:{thing.mqtt.port}"
        self.client_id = f"{thing.name}-check"
        self.choice = ProtocolChoice(thing.mqtt.protocol)
        self.fell_back: Optional[str] = None  # why `auto` fell back to 3.1.1
        self._new_client()

    def _new_client(self) -> None:
        """A client for `self.choice.current`, and the state of one connection attempt."""
        from flashlexd.mqttclient import LastError, build_client

        # a clean session: nothing left on the broker to queue ingress messages for nobody;
        # connected by the daemon's own Dialer (TLS, the websocket upgrade: `_dial`)
        self.client: "paho.Client" = build_client(self.thing, self.client_id, self.timeout, clean_session=True,
                                                  context=self.context, dialed=True,
                                                  protocol=self.choice.current)
        self.errors = LastError()
        self.client.enable_logger(self.errors)
        self.connack: Any = None
        self.closed = False
        self.granted: Optional[List[Any]] = None
        self.subscribe_mid: Optional[int] = None
        self.received: Optional[float] = None
        self.probe_payload = b""
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # paho callbacks (VERSION2 signatures)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connack = reason

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.closed = True

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if mid == self.subscribe_mid:
            self.granted = list(reasons)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self.received is None and message.payload == self.probe_payload:
            self.received = time.monotonic()  # anything else on the ingress topic is ignored

    def _dial(self) -> Any:
        """DNS, TCP, TLS and (`useWebsocket`) the websocket upgrade, as the daemon makes them,
        within the timeout: paho's own upgrade said "WebSocket handshake error" for a refused
        path and a plain MQTT port alike."""
        from flashlexd.dialer import Dialer
        from flashlexd.mqttclient import WEBSOCKET_PATH

        mqtt = self.thing.mqtt
        dialer = Dialer(self.thing.endpoint, mqtt.port, self.context, self.timeout,
                        websocket_path=WEBSOCKET_PATH if mqtt.use_websocket else None)
        while True:
            sock = dialer.step()
            if sock is not None:
                return sock
            reads, writes = dialer.wait_fds()
            select.select(reads, writes, [], dialer.next_wait())

    def _loop_until(self, done: Callable[[], bool], deadline: float) -> bool:
        while not done() and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.client.buffered():  # type: ignore[attr-defined]  # read, not seen by select()
                self.client.loop_read()
            else:
                self.client.loop(min(0.1, remaining))
        return done()

    def _why_closed(self, when: str, hint: str) -> str:
        """Why paho lost the connection: the TLS alert paho logged (e.g. the broker refused our
        certificate), else `hint`, the likeliest cause at this point."""
        exc = self.errors.exc
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            from flashlexd.mqttclient import describe_error
            return describe_error(exc, self.thing, self.timeout)
        return f"the broker at {self.where} closed the connection {when}: {hint}"

    def connect(self) -> Tuple[str, bool]:
        started = time.monotonic()
        while not self._connected():  # once more, on 3.1.1, when `auto` falls back
            self._new_client()
        ms = (time.monotonic() - started) * 1000
        spoken = f"MQTT {self.choice.current}"
        if self.fell_back is not None:
            spoken += (f" (the broker does not speak MQTT 5: {self.fell_back}; the daemon falls"
                       f" back the same way under protocol auto)")
        return (f"CONNACK in {ms:.0f} ms over {spoken} for client id {self.client_id!r} (clean"
                f" session; a running flashlexd uses other ids)"), True

    def _connected(self) -> bool:
        """One CONNECT: True once accepted, False when `auto` falls back and tries 3.1.1 next."""
        from flashlexd.mqttv5 import UNSUPPORTED_PROTOCOL

        started = time.monotonic()
        try:
            self.client.dialed = self._dial()  # type: ignore[attr-defined]
            self.client.reconnect()  # CONNECT
        except (OSError, ssl.CertificateError, ValueError) as exc:
            from flashlexd.mqttclient import describe_error
            raise Failed(describe_error(exc, self.thing, self.timeout)) from None
        if not self._loop_until(lambda: self.connack is not None, started + self.timeout):
            if self.closed:
                if self.choice.closed_before_connack():
                    return False
                from flashlexd.mqttclient import websocket_hint

                v5 = " (or does not speak MQTT 5: see `protocol`)" if self.choice.unproven_v5 else ""
                raise Failed(self._why_closed(
                    "before CONNACK", f"it refused the client certificate {self.thing.keys.cert}"
                    f" (TLS 1.3 brokers check it after the handshake) or does not allow client id"
                    f" {self.client_id!r}{v5}{websocket_hint(self.thing)}"))
            raise Failed(f"no CONNACK from {self.where} within {self.timeout:g}s")
        if self.connack.is_failure:
            self.fell_back = self.choice.refused(self.connack)
            if self.fell_back is not None:
                return False
            hint = (" (the broker does not speak MQTT 5: set protocol to auto or 3.1.1)"
                    if str(self.connack) == UNSUPPORTED_PROTOCOL else "")
            raise Failed(f"the broker at {self.where} refused the connection of client id"
                         f" {self.client_id!r}: {self.connack}{hint}")
        self.fell_back = self.choice.connected() or self.fell_back
        return True

    def probe(self) -> Tuple[str, bool]:
        ingress = self.thing.mqtt.ingress_topic
        topic = probe_topic(ingress)
        self.probe_payload = probe_payload()
        deadline = time.monotonic() + self.timeout
        _, self.subscribe_mid = self.client.subscribe(ingress, qos=1)
        if not self._loop_until(lambda: self.granted is not None, deadline):
            if self.closed:
                raise Failed(self._why_closed(f"after SUBSCRIBE {ingress}",
                                              "its policy may not allow this thing to subscribe to it"))
            raise Failed(f"no SUBACK for {ingress} within {self.timeout:g}s")
        if self.granted[0].is_failure:  # type: ignore[index]
            raise Failed(f"the broker refused the subscription to {ingress}: {self.granted[0]}"  # type: ignore[index]
                         f" (does its policy allow this thing to subscribe to it?)")
        started = time.monotonic()
        self.client.publish(topic, self.probe_payload, qos=1)
        if not self._loop_until(lambda: self.received is not None, deadline):
            if self.closed:
                raise Failed(self._why_closed(f"after the probe PUBLISH to {topic}",
                                              "its policy may not allow this thing to publish to it"))
            raise Failed(f"the probe published to {topic} did not come back within {self.timeout:g}s")
        rtt = (self.received - started) * 1000  # type: ignore[operator]
        return (f"probe {self.probe_payload.decode()} published to {topic} came back in {rtt:.1f} ms"
                f" (QoS 1; a running flashlexd receives it too: from 0.3.0 on it does not store it,"
                f" an earlier one does)"), True

    def close(self) -> None:
        """DISCONNECT (the clean session ends with it) and wait briefly for it to be written."""
        if self.client.socket() is None:
            return
        self.client.disconnect()
        self._loop_until(lambda: self.client.socket() is None, time.monotonic() + min(1.0, self.timeout))


def _resolve(host: str, port: int, timeout: float) -> List[Tuple[Any, ...]]:
    """getaddrinfo with a time limit: the lookup runs in a daemon thread that is abandoned if
    the resolver hangs (getaddrinfo itself cannot be interrupted)."""
    result: dict = {}

    def lookup() -> None:
        try:
            result["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=lookup, name="flashlexd-check-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(host)
    if "error" in result:
        raise result["error"]
    return result["addresses"]
