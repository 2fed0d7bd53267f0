"""A paho-mqtt 2.x client built from the FlashLex config: mutual TLS (ALPN on 443, websockets),
and the one-line reasons a connection failed. Shared by the workers' `mqtt.Connection`,
`flashlexd check` and the benchmarks.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import Any, Dict, Optional, Tuple

from paho.mqtt.enums import CallbackAPIVersion

from flashlexd.config import ConfigError, Keys, Thing
from flashlexd.credentials import ALLOW_INSECURE_KEY_ENV, insecure_key_problem, refuse_passphrase, stamp
from flashlexd.dialer import DialedClient
from flashlexd.pahoimport import paho
from flashlexd.mqttv5 import V5, V311, session_properties
from flashlexd.quotas import ALPN_PORT, ALPN_PROTOCOL, is_aws_endpoint
from flashlexd.timesync import clock_problem, dates_problem

WEBSOCKET_PATH = "/mqtt"
# An alert the broker sends when it does not accept our client certificate.
_REFUSED_CERT_ALERTS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_REQUIRED",
                        "ACCESS_DENIED", "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_EXPIRED",
                        "CERTIFICATE_REVOKED")
_HOST_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH (64 is the IP address twin)
_ABRUPT_CLOSE = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)


# Python 3.13's default context adds these: X509_STRICT refuses a broker (or CA) certificate
# without an Authority Key Identifier, which 3.9-3.12 accept; PARTIAL_CHAIN trusts an
# intermediate put in rootCA as an anchor. Cleared, so an OS upgrade (Bookworm's 3.11 to
# Trixie's 3.13) does not change which brokers the daemon trusts: it did, and every link failed.
_NEWER_PYTHONS_VERIFY_FLAGS = (getattr(ssl, "VERIFY_X509_STRICT", 0)
                               | getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0))
# (keys, alpn) -> (the stamp of the files before the build, the context): see prepare_tls_context
_PREPARED: Dict[Tuple[Keys, bool], Tuple[str, ssl.SSLContext]] = {}
log = logging.getLogger(__name__)


def prepare_tls_context(keys: Keys, alpn: bool) -> None:
    """In the fork server: build the context that the workers forked next use, so they share
    its pages (and OpenSSL's one-time set-up, ~2 MB a process) instead of each loading the CA,
    certificate and key again. Built from the files as they are now (a rotated certificate
    takes effect at a worker's restart, or at a link's next attempt: `LinkCredentials`); when
    they cannot be read (a rotation half done, or files a reload was refused for), the last
    context built stays, and a restarted worker goes on with the credentials the daemon runs
    with instead of crash-looping the service down (one WARNING). With none built yet, the
    worker reports the error. The files' stamp is taken before the build and kept with it."""
    before = stamp(keys)
    try:
        context = _new_tls_context(keys, alpn)
    except ConfigError as exc:
        if (keys, alpn) in _PREPARED:
            log.warning("%s; the workers started from now on keep the credentials loaded before", exc)
        return
    _PREPARED.clear()
    _PREPARED[(keys, alpn)] = (before, context)


def tls_context(keys: Keys, alpn: bool = False) -> ssl.SSLContext:
    """Mutual TLS: trust only `rootCA`, verify the broker's certificate and host name, present
    the thing's certificate (the prepared context of the same files, if any)."""
    prepared = _PREPARED.get((keys, alpn))
    return prepared[1] if prepared is not None else _new_tls_context(keys, alpn)


class LinkCredentials:
    """A link's TLS context and the stamp of the key files it came from. A certificate renewed
    in place (new files at the same paths) is loaded at the link's next attempt: a broker that
    revoked the old one refused it at every reconnect until a reload. New files that do not load
    (a renewal half copied), or a new key readable by other users (which a restart would
    refuse), leave the context as it was, with one WARNING per change. The stamp is that of the
    files the context was built from: the fork server's (taken before its build, kept with it
    even when a later build failed), so files changed since are loaded at the first attempt."""

    def __init__(self, keys: Keys, alpn: bool):
        self.keys, self.alpn = keys, alpn
        self.insecure_allowed = os.environ.get(ALLOW_INSECURE_KEY_ENV) == "1"  # run's flag
        prepared = _PREPARED.get((keys, alpn))
        if prepared is not None:
            self.stamp, self.context = prepared
        else:
            self.stamp = stamp(keys)
            self.context = _new_tls_context(keys, alpn)

    def renewed(self) -> bool:
        """Load the key files again if they changed since the last load; True when they did."""
        now = stamp(self.keys)
        if now == self.stamp:
            return False
        self.stamp = now
        try:
            problem = None if self.insecure_allowed else insecure_key_problem(self.keys)
            if problem:
                raise ConfigError(f"{problem} (a restart or reload would refuse it too)")
            self.context = _new_tls_context(self.keys, self.alpn)
        except (ConfigError, OSError) as exc:
            log.warning("the key files changed, but %s; this link keeps the credentials loaded before",
                        exc if isinstance(exc, ConfigError) else f"cannot read them: {exc}")
            return False
        log.info("the key files changed: connecting with them from now on")
        return True


def _new_tls_context(keys: Keys, alpn: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(keys.root_ca))
    except ssl.SSLError as exc:
        raise ConfigError(f"flashlex.thing.keys.rootCA: cannot load {keys.root_ca}:"
                          f" {exc.reason or 'not a PEM certificate'}") from None
    except OSError as exc:
        raise ConfigError(f"flashlex.thing.keys.rootCA: cannot read {keys.root_ca}: {exc.strerror}") from None
    try:
        context.load_cert_chain(str(keys.cert), str(keys.private_key), password=refuse_passphrase)
    except ValueError:  # refuse_passphrase's
        raise ConfigError(f"flashlex.thing.keys.privateKey: {keys.private_key} is encrypted with a"
                          f" passphrase: flashlexd needs it unencrypted") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"flashlex.thing.keys: cannot load certificate {keys.cert} with key"
                          f" {keys.private_key}: {exc.reason or 'not a PEM certificate/key'}") from None
    except OSError as exc:
        raise ConfigError(f"flashlex.thing.keys: cannot read certificate {keys.cert} or key"
                          f" {keys.private_key}: {exc.strerror}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_flags &= ~_NEWER_PYTHONS_VERIFY_FLAGS
    # Python 3.9's default context takes a peer's end without TLS's close for a clean one; the
    # poison search tells a broker's close from the path's by it (flashlexd/dialer.py)
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if alpn:
        context.set_alpn_protocols([ALPN_PROTOCOL])
    return context


def build_client(thing: Thing, client_id: str, connect_timeout: float,
                 clean_session: bool = False, context: Optional[ssl.SSLContext] = None,
                 dialed: bool = False, protocol: str = V311, max_packet: Optional[int] = None) -> paho.Client:
    """A paho client for `thing`, not yet connected. `connect_timeout` bounds paho's own
    blocking TCP connect and TLS handshake (benchmarks); a `dialed` client instead takes
    the socket a non-blocking `Dialer` made (`Connection`, `check`). The daemon's sessions are
    persistent; `flashlexd check` asks for a clean one that leaves nothing on the broker.
    `protocol` is "5" or "3.1.1". Under MQTT 5 a persistent session is a Session Expiry
    Interval (`sessionExpirySeconds`) and never Clean Start, not even on a store's first
    connection (paho's MQTT_CLEAN_START_FIRST_ONLY included): the broker would discard the QoS 1
    messages it queued for the thing, and say nothing of it (session present 0). `max_packet`:
    MQTT 5's Maximum Packet Size for what the broker sends (None: none)."""
    mqtt = thing.mqtt
    v5 = protocol == V5
    client = (DialedClient if dialed else paho.Client)(CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=None if v5 else clean_session,
                         protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                         transport="websockets" if mqtt.use_websocket else "tcp",
                         reconnect_on_failure=False)  # no silent MQTT 3.1 downgrade-and-retry
    client.tls_set_context(context or tls_context(thing.keys, alpn=uses_alpn(thing)))
    if mqtt.use_websocket:
        client.ws_set_options(path=WEBSOCKET_PATH)
    client.max_inflight_messages_set(mqtt.max_inflight)
    client.max_queued_messages_set(0)
    client.connect_timeout = connect_timeout
    if v5:  # records where; no I/O
        client.connect_async(thing.endpoint, mqtt.port, mqtt.keepalive, clean_start=clean_session,
                             properties=session_properties(0 if clean_session else mqtt.session_expiry,
                                                           max_packet))
    else:
        client.connect_async(thing.endpoint, mqtt.port, mqtt.keepalive)
    return client


def uses_alpn(thing: Thing) -> bool:
    return thing.mqtt.port == ALPN_PORT and not thing.mqtt.use_websocket


MQTT_TLS_PORT = 8883


def websocket_hint(thing: Thing) -> str:
    """What a close before CONNACK may also mean: a websockets listener (mosquitto's closes an
    MQTT CONNECT without a word, as a broker refusing our certificate does). Not said for
    8883, MQTT over TLS's own port, nor for AWS IoT Core, which has none with a certificate."""
    mqtt = thing.mqtt
    if mqtt.use_websocket or mqtt.port == MQTT_TLS_PORT or is_aws_endpoint(thing.endpoint):
        return ""
    return f" (or port {mqtt.port} is a websockets listener: see useWebsocket)"


def describe_error(exc: BaseException, thing: Thing, timeout: float) -> str:
    """One line saying why a connection failed, naming the file or setting to look at."""
    where = f"{thing.endpoint}:{thing.mqtt.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        clock = clock_problem(exc, thing, timeout) or dates_problem(exc, where)  # by the clock
        if clock:
            return clock
        if exc.verify_code in (_HOST_MISMATCH, _HOST_MISMATCH + 2):
            return (f"TLS: the broker's certificate is not valid for host {thing.endpoint}"
                    f" ({exc.verify_message})")
        return (f"TLS: the broker's certificate at {where} is not trusted by rootCA"
                f" {thing.keys.root_ca} ({exc.verify_message})")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if "ALERT" in reason and reason.endswith(_REFUSED_CERT_ALERTS):
            alert = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
            return f"TLS: the broker at {where} refused the client certificate {thing.keys.cert} ({alert})"
        return f"TLS error with {where}: {reason}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {thing.endpoint}: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where} (broker down or wrong port?)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"connecting to {where} timed out after {timeout:g}s"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}: {exc}"


class LastError(logging.Logger):
    """The logger handed to paho while connecting: paho reports socket and TLS errors only to
    its logger, so this keeps the last warning or error (and its exception) for the one-line
    reason, and drops the rest."""

    def __init__(self) -> None:
        super().__init__("flashlexd.paho")
        self.exc: Optional[BaseException] = None
        self.message: Optional[str] = None

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if level >= logging.WARNING:
            self.exc = next((a for a in args if isinstance(a, BaseException)), None)
            self.message = str(msg) % args if args else str(msg)

    def take(self) -> Tuple[Optional[BaseException], Optional[str]]:
        taken = self.exc, self.message
        self.exc = self.message = None
        return taken
