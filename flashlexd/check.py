"""`flashlexd check`: is this device ready to run flashlexd? The FlashLex SDK 1.4 `bootstrap.py`,
done step by step, each step saying what it saw or, in one line, why it failed.

1. config  the config file loads and validates (its warnings are shown as the detail);
2. keys    certificate and private key are PEM, match each other, the certificate is within
           its validity period, the private key is not readable by group or others;
3. broker  DNS resolves the endpoint, TCP reaches the port, the TLS handshake verifies the
           broker's certificate against rootCA and host name, and the broker accepts ours (with
           TLS 1.3 it says so only after the handshake: this step waits up to VERDICT_WAIT for
           its session ticket or alert; a broker that sends neither leaves it to step 4);
4. mqtt    the broker accepts an MQTT CONNECT, under client id `<thing name>-check` and a clean
           session, so a running daemon (other ids) is not disturbed and nothing stays behind;
5. probe   subscribe to the ingress topic at QoS 1, publish `{"flashlexd-check": "<uuid>"}` to
           it at QoS 1 and time its return. A running flashlexd (or its persistent session on
           the broker) receives the probe too and stores it in its inbox, like any message;
6. store   the data directory is writable and the store opens (nothing is written to it; a store
           that does not exist yet is created, as `flashlexd run` would).

A step that cannot run because one it needs failed is skipped. `--timeout` bounds each network
step. No key material is ever printed: only file names, dates and modes.

Certificate dates come from a small DER walk over the certificate (stdlib only: the
`cryptography` package is a test dependency, `ssl` has no public decoder for a local
certificate, and `SSLContext.get_ca_certs()` lists CA certificates only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import select
import socket
import ssl
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from flashlexd import config as config_module
from flashlexd.config import Config, ConfigError, Thing
from flashlexd.ratelimit import describe_rate

if TYPE_CHECKING:
    import paho.mqtt.client as paho

PROBE_KEY = "flashlexd-check"
EXPIRY_WARNING_DAYS = 30
VERDICT_WAIT = 1.0  # the longest the broker step waits for a TLS 1.3 broker's verdict on our certificate
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)
_PEM_KEY = re.compile(rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----")


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # "ok", "fail" or "skip"
    detail: str

    def line(self) -> str:
        label = {"ok": "ok", "fail": "FAIL", "skip": "skip"}[self.status]
        return f"{label:<4} {self.name}: {self.detail}"

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail}


class Failed(Exception):
    """A step failed; the message is its one-line reason. `result` is what later steps may
    still use (the keys step's TLS context when only the key file's mode is wrong)."""

    def __init__(self, reason: str, result: Any = None):
        super().__init__(reason)
        self.result = result


# -- the command line ---------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    printer: Optional[Callable[[Step], None]] = None
    if not args.json:
        printer = lambda step: print(step.line(), flush=True)  # noqa: E731
    steps = check(args.config, keys_dir=args.keys_dir, data_dir=args.data_dir,
                  timeout=args.timeout, on_step=printer)
    ok = all(step.status == "ok" for step in steps)
    if args.json:
        print(json.dumps({"ok": ok, "steps": [step.to_dict() for step in steps]}, indent=2))
    else:
        print(verdict(steps))
    return 0 if ok else 1


def verdict(steps: List[Step]) -> str:
    failed = [step.name for step in steps if step.status == "fail"]
    skipped = [step.name for step in steps if step.status == "skip"]
    if not failed and not skipped:
        return f"READY: all {len(steps)} checks passed"
    text = f"NOT READY: {len(failed)} of {len(steps)} checks failed ({', '.join(failed)})"
    if skipped:
        text += f", {len(skipped)} skipped ({', '.join(skipped)})"
    return text


# -- the steps ----------------------------------------------------------------------------------

def check(config_path: str, timeout: float, keys_dir: Optional[str] = None,
          data_dir: Optional[str] = None, on_step: Optional[Callable[[Step], None]] = None) -> List[Step]:
    """Run every step in order; `on_step` sees each one as soon as it is done."""
    steps: List[Step] = []

    def record(name: str, work: Optional[Callable[[], Tuple[str, Any]]], skip_reason: str = "") -> Any:
        result = None
        if work is None:
            step = Step(name, "skip", skip_reason)
        else:
            try:
                detail, result = work()
                step = Step(name, "ok", detail)
            except Failed as exc:
                step = Step(name, "fail", str(exc))
                result = exc.result
        steps.append(step)
        if on_step is not None:
            on_step(step)
        return result

    config: Optional[Config] = record("config", lambda: check_config(config_path, keys_dir, data_dir))
    context: Optional[ssl.SSLContext] = None
    if config is None:
        record("keys", None, "needs the config step to pass")
    else:
        context = record("keys", lambda: check_keys(config.thing))

    reachable = connected = None
    if config is None or context is None:
        record("broker", None, "needs the config step to pass" if config is None
               else "needs a certificate and private key that load")
    else:
        reachable = record("broker", lambda: check_broker(config.thing, context, timeout))  # type: ignore[arg-type]
    session: Optional[_Session] = None

    def connect() -> Tuple[str, bool]:
        nonlocal session
        try:
            session = _Session(config.thing, timeout)  # type: ignore[union-attr]
        except ConfigError as exc:
            raise Failed(str(exc)) from None
        return session.connect()

    try:
        if reachable:
            connected = record("mqtt", connect)
        else:
            record("mqtt", None, "needs the broker step to pass")
        if connected:
            record("probe", session.probe)  # type: ignore[union-attr]
        else:
            record("probe", None, "needs the mqtt step to pass")
    finally:
        if session is not None:
            session.close()

    if config is None:
        record("store", None, "needs the config step to pass")
    else:
        record("store", lambda: check_store(config))
    return steps


def check_config(path: str, keys_dir: Optional[str], data_dir: Optional[str]) -> Tuple[str, Config]:
    try:
        config = config_module.load(path, data_dir=data_dir, keys_dir=keys_dir)
    except ConfigError as exc:
        raise Failed(str(exc)) from None
    thing = config.thing
    mqtt = thing.mqtt
    detail = (f"{path}: thing {thing.name!r}, broker {thing.endpoint}:{thing.mqtt.port}; egress rate"
              f" {describe_rate(mqtt.publish_rate, mqtt.publish_bytes_rate, mqtt.rate_source, mqtt.max_inflight)}")
    if config.warnings:
        detail += "; warning: " + "; warning: ".join(config.warnings)
    return detail, config


def check_keys(thing: Thing, now: Optional[datetime.datetime] = None) -> Tuple[str, Optional[ssl.SSLContext]]:
    """Every key problem, in one line. Returns the TLS context for the broker step when the
    certificate and key load (an expired certificate or a too-open key still lets the broker
    step run: its answer says more)."""
    from flashlexd.mqtt import ALPN_PORT, tls_context

    keys = thing.keys
    now = now or datetime.datetime.now(datetime.timezone.utc)
    problems: List[str] = []
    notes: List[str] = []
    validity = None
    try:
        validity = certificate_validity(_read(keys.cert))
    except Failed as exc:
        problems.append(f"certificate {keys.cert}: {exc}")
    key_problem = _private_key_problem(keys.private_key)
    if key_problem:
        problems.append(key_problem)

    context = None
    if not problems:  # never hand an encrypted key to OpenSSL: it would prompt on the terminal
        try:
            context = tls_context(keys, alpn=thing.mqtt.port == ALPN_PORT and not thing.mqtt.use_websocket)
            notes.append("certificate matches the private key")
        except ConfigError as exc:
            message = str(exc)
            if "KEY_VALUES_MISMATCH" in message:
                message = f"certificate {keys.cert} does not match private key {keys.private_key}"
            problems.append(message)

    if validity is not None:
        not_before, not_after = validity
        if now < not_before:
            problems.append(f"certificate {keys.cert} is not valid before {_utc(not_before)} (now is"
                            f" {_utc(now)}: is the system clock right?)")
        elif now >= not_after:
            problems.append(f"certificate {keys.cert} expired on {_utc(not_after)}")
        else:
            days = (not_after - now).days
            soon = f" (expires in {days} day{'' if days == 1 else 's'}: renew it)" \
                if days < EXPIRY_WARNING_DAYS else ""
            notes.append(f"valid until {_utc(not_after)}{soon}")

    mode = stat.S_IMODE(keys.private_key.stat().st_mode)
    if mode & 0o077:
        problems.append(f"private key {keys.private_key} is readable by other users (mode {mode:04o}):"
                        f" run: chmod 600 {keys.private_key}")
    else:
        notes.append(f"private key mode {mode:04o}")
    if problems:
        raise Failed("; ".join(problems), result=context)
    return f"{keys.cert.name}: " + ", ".join(notes), context


def check_broker(thing: Thing, context: ssl.SSLContext, timeout: float) -> Tuple[str, bool]:
    """DNS, then TCP, then the TLS handshake, as the daemon does them, each failure named."""
    from flashlexd.mqtt import describe_error

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
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
        raise Failed(f"{closed} during the TLS handshake (is it a TLS port? does it accept the client"
                     f" certificate {thing.keys.cert}?)") from None
    except _ClosedAfterHandshake:
        raise Failed(f"{closed} right after the TLS handshake: it refused the client certificate"
                     f" {thing.keys.cert}") from None
    except ssl.SSLError as exc:
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


def check_store(config: Config) -> Tuple[str, bool]:
    from flashlexd import paths
    from flashlexd.store import Store, StoreError

    directory = config.store.data_dir
    if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
        raise Failed(f"data dir {directory} is not writable by uid {os.geteuid()}"
                     f" (use --data-dir or flashlex.app.db.dataPath)")
    if directory.is_dir():  # what `run` refuses, `check` fails on
        try:
            paths.check_dir(directory, "data dir")
        except paths.UnsafePath as exc:
            raise Failed(str(exc)) from None
    existed = (directory / "data.mdb").exists()
    try:
        store = Store.from_config(config.store, check_pages=True)
    except StoreError as exc:
        raise Failed(str(exc)) from None
    try:
        stats = store.stats()
    except StoreError as exc:
        raise Failed(str(exc)) from None
    finally:
        store.close()
    what = "opens" if existed else "created (empty)"
    return (f"store in {directory} {what}: {stats['inbox_count']} messages in the inbox,"
            f" {stats['outbox_count']} queued for the cloud, {_megabytes(stats['used_bytes'])}"
            f" of {_megabytes(stats['cap_bytes'])} used"), True


# -- MQTT ---------------------------------------------------------------------------------------

class _Session:
    """The check's own short MQTT session: `build_client` from the daemon, with the client id
    `<thing name>-check` and a clean session, driven by paho's `loop()` (no fork here)."""

    def __init__(self, thing: Thing, timeout: float):
        from flashlexd.mqtt import LastError, build_client

        self.thing, self.timeout = thing, timeout
        self.where = f"{thing.endpoint}:{thing.mqtt.port}"
        self.client_id = f"{thing.name}-check"
        # a clean session: nothing left on the broker to queue ingress messages for nobody
        self.client: "paho.Client" = build_client(thing, self.client_id, timeout, clean_session=True)
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

    def _loop_until(self, done: Callable[[], bool], deadline: float) -> bool:
        while not done() and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.client.loop(min(0.1, remaining))
        return done()

    def _why_closed(self, when: str, hint: str) -> str:
        """Why paho lost the connection: the TLS alert paho logged (e.g. the broker refused our
        certificate), else `hint`, the likeliest cause at this point."""
        exc = self.errors.exc
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            from flashlexd.mqtt import describe_error
            return describe_error(exc, self.thing, self.timeout)
        return f"the broker at {self.where} closed the connection {when}: {hint}"

    def connect(self) -> Tuple[str, bool]:
        started = time.monotonic()
        try:
            self.client.reconnect()  # DNS, TCP, TLS handshake (bounded by the timeout), CONNECT
        except (OSError, ssl.CertificateError, ValueError) as exc:
            from flashlexd.mqtt import describe_error
            raise Failed(describe_error(exc, self.thing, self.timeout)) from None
        if not self._loop_until(lambda: self.connack is not None, started + self.timeout):
            if self.closed:
                raise Failed(self._why_closed(
                    "before CONNACK", f"it refused the client certificate {self.thing.keys.cert}"
                    f" (TLS 1.3 brokers check it after the handshake) or does not allow client id"
                    f" {self.client_id!r}"))
            raise Failed(f"no CONNACK from {self.where} within {self.timeout:g}s")
        if self.connack.is_failure:
            raise Failed(f"the broker at {self.where} refused the connection of client id"
                         f" {self.client_id!r}: {self.connack}")
        ms = (time.monotonic() - started) * 1000
        return (f"CONNACK in {ms:.0f} ms for client id {self.client_id!r} (clean session;"
                f" a running flashlexd uses other ids)"), True

    def probe(self) -> Tuple[str, bool]:
        ingress = self.thing.mqtt.ingress_topic
        topic = probe_topic(ingress)
        self.probe_payload = json.dumps({PROBE_KEY: str(uuid.uuid4())}).encode()
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
                f" (QoS 1; a running flashlexd receives and stores it too)"), True

    def close(self) -> None:
        """DISCONNECT (the clean session ends with it) and wait briefly for it to be written."""
        if self.client.socket() is None:
            return
        self.client.disconnect()
        self._loop_until(lambda: self.client.socket() is None, time.monotonic() + min(1.0, self.timeout))


def probe_topic(topic_filter: str) -> str:
    """A topic the ingress filter matches: its wildcards, if any, filled in."""
    levels = topic_filter.split("/")
    return "/".join(PROBE_KEY if level in ("+", "#") else level for level in levels)


# -- helpers ------------------------------------------------------------------------------------

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


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Failed(f"cannot read: {exc.strerror}") from None


def _private_key_problem(path: Path) -> Optional[str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"private key {path}: cannot read: {exc.strerror}"
    match = _PEM_KEY.search(data)
    if match is None:
        return f"private key {path}: no PEM private key in it"
    if match.group(1).startswith(b"ENCRYPTED") or b"Proc-Type: 4,ENCRYPTED" in data:
        return f"private key {path} is encrypted with a passphrase: flashlexd needs it unencrypted"
    return None


def certificate_validity(pem: bytes) -> Tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter), in UTC, of the first PEM certificate in `pem`.

    The stdlib decodes certificates only for a TLS peer (`getpeercert`), so this walks the DER
    itself (RFC 5280): Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    OPTIONAL, serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE, validity SEQUENCE {
    notBefore Time, notAfter Time }, ... }, ... }. `ssl.PEM_cert_to_DER_cert` does the base64.
    Raises `Failed` for anything that is not such a certificate."""
    match = _PEM_CERT.search(pem)
    if match is None:
        raise Failed("no PEM certificate in it")
    block = ssl.PEM_HEADER + "\n" + match.group(1).decode("ascii", "replace") + "\n" + ssl.PEM_FOOTER
    try:
        der = ssl.PEM_cert_to_DER_cert(block)
        tag, start, _ = _der_item(der, 0)
        _expect(tag, 0x30)
        tag, pos, _ = _der_item(der, start)  # tbsCertificate
        _expect(tag, 0x30)
        tag, _, end = _der_item(der, pos)
        if tag == 0xA0:  # [0] EXPLICIT version
            pos = end
        for expected in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
            tag, _, pos = _der_item(der, pos)
            _expect(tag, expected)
        tag, pos, _ = _der_item(der, pos)  # validity
        _expect(tag, 0x30)
        not_before, pos = _der_time(der, pos)
        not_after, _ = _der_time(der, pos)
    except (ValueError, IndexError):
        raise Failed("not a valid X.509 certificate (PEM/DER decoding failed)") from None
    return not_before, not_after


def _der_item(der: bytes, offset: int) -> Tuple[int, int, int]:
    """(tag, content start, content end) of the DER item at `offset`."""
    tag, length = der[offset], der[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or offset + count > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[offset:offset + count], "big")
        offset += count
    if offset + length > len(der):
        raise ValueError("DER item runs past the end")
    return tag, offset, offset + length


def _expect(tag: int, expected: int) -> None:
    if tag != expected:
        raise ValueError(f"DER tag {tag:#x}, expected {expected:#x}")


def _der_time(der: bytes, offset: int) -> Tuple[datetime.datetime, int]:
    """A UTCTime (YYMMDDHHMMSSZ, 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    tag, start, end = _der_item(der, offset)
    text = der[start:end].decode("ascii")
    if tag == 0x17 and len(text) == 13:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tag == 0x18 and len(text) == 15):
        raise ValueError("not an RFC 5280 time")
    if not text.endswith("Z") or not text[:-1].isdigit():
        raise ValueError("not an RFC 5280 time")
    moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    return moment, end


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _megabytes(count: Any) -> str:
    return f"{int(count) / (1024 * 1024):.1f} MB"
