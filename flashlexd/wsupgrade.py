"""The HTTP upgrade that starts MQTT over websockets, done without blocking the worker's loop.

paho shakes hands in its `_WebsocketWrapper`, one blocking byte at a time, inside `reconnect()`.
Bounded by paho's connect timeout it froze the worker's loop (and its heartbeat) that long; the
worker held it to 1 s, so a path whose round trip is longer (a cellular link) never connected,
and the failure was told as a timeout of `connectDisconnectTimeout`. A `WebsocketUpgrade` sends
the same request and reads the answer from the worker's select loop, within the attempt's
deadline, and says in one line why an answer is not an upgrade (a plain MQTT port, a refused
path). paho then gets a wrapper that has already shaken hands (`UpgradedWebsocket`).
"""
from __future__ import annotations

import base64
import hashlib
import os
import ssl
from typing import Any, Dict, Optional

from flashlexd.tlsend import ragged_end
from paho.mqtt.client import WebsocketConnectionError, _WebsocketWrapper

ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
ANSWER_LIMIT = 16384  # bytes of an answer's head: past this it is no upgrade
HTTPS_PORT = 443


class UpgradedWebsocket(_WebsocketWrapper):
    """paho's websocket framing over a socket whose upgrade a `WebsocketUpgrade` made."""

    def _do_handshake(self, extra_headers: Any) -> None:
        self.connected = True


class WebsocketUpgrade:
    """The upgrade on a TLS socket, advanced by `step()` until it returns paho's wrapper; it
    raises WebsocketConnectionError (a ConnectionError) with the reason."""

    def __init__(self, tls: ssl.SSLSocket, host: str, port: int, path: str):
        self.tls, self.host, self.port, self.path = tls, host, port, path
        self.key = base64.b64encode(os.urandom(16))
        self.request = self._request()
        self.answer = b""
        self.want_write = True

    def _request(self) -> bytes:
        """The request paho's wrapper sends (the same headers), for a broker that checks them."""
        host = self.host if self.port == HTTPS_PORT else f"{self.host}:{self.port}"
        headers = {"Host": host, "Upgrade": "websocket", "Connection": "Upgrade",
                   "Origin": f"https://{host}", "Sec-WebSocket-Key": self.key.decode(),
                   "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "mqtt"}
        lines = [f"GET {self.path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def step(self) -> Optional[UpgradedWebsocket]:
        try:
            while self.request:
                self.request = self.request[self.tls.send(self.request):]
            self.want_write = False
            while b"\r\n\r\n" not in self.answer:
                try:
                    data = self.tls.recv(ANSWER_LIMIT)
                except ssl.SSLError as exc:
                    if not ragged_end(exc):
                        raise
                    data = b""  # closed without a TLS close: the same to us here
                if not data:
                    raise self.error("the connection closed before an answer", transport=True)
                self.answer += data
                if len(self.answer) > ANSWER_LIMIT and b"\r\n\r\n" not in self.answer:
                    raise self.error(f"an answer over {ANSWER_LIMIT} bytes without an end of its head")
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            self.want_write = True
            return None
        self._check()
        return UpgradedWebsocket(socket=self.tls, host=self.host, port=self.port, is_ssl=True,
                                 path=self.path, extra_headers=None)

    def _check(self) -> None:
        head, _, rest = self.answer.partition(b"\r\n\r\n")
        if rest:  # a broker speaks MQTT only after our CONNECT
            raise self.error(f"{len(rest)} bytes after the answer, before our CONNECT")
        status, *lines = head.decode("latin-1").split("\r\n")
        if not status.startswith("HTTP/"):
            raise self.error("the answer is not HTTP", transport=True)
        if status.split(" ", 2)[1:2] != ["101"]:
            raise self.error(f"refused: {status.strip()} (path {self.path})")
        fields: Dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if fields.get("upgrade", "").lower() != "websocket":
            raise self.error("the answer does not upgrade to websocket")
        expected = base64.b64encode(hashlib.sha1(self.key + ACCEPT_GUID).digest()).decode()  # noqa: S324 - RFC 6455's
        if fields.get("sec-websocket-accept") != expected:
            raise self.error("the answer's Sec-WebSocket-Accept does not match our key")

    def error(self, why: str, transport: bool = False) -> WebsocketConnectionError:
        """The reason in one line; naming the transport where a plain MQTT port would answer so."""
        hint = f" (is port {self.port} a websockets listener? useWebsocket is true)" if transport else ""
        return WebsocketConnectionError(f"websocket upgrade: {why}{hint}")
