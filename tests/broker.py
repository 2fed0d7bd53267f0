"""A real mutual-TLS mosquitto for tests and benchmarks, the certificates it needs, and FlashLex
config files that point a worker at it.

Everything is a real process started and stopped by PID: mosquitto itself, and the independent
peers (`mosquitto_pub`, `mosquitto_sub`, from libmosquitto, not paho) that check the daemon from
the outside. The broker persists sessions in its work dir but only saves when told to
(`save()`, SIGUSR1) or on a clean stop, so a test knows exactly what survives `kill()`.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flashlexd import config as config_module
from flashlexd.store import Store

THING = "ecd13b11-mything"
INGRESS_TOPIC = f"ingress/{THING}"
PUBSUB_TOPIC = f"pubsub/{THING}"
EGRESS_TOPIC = "flashlex/collect"
HOST = "127.0.0.1"
BROKER_INFLIGHT = 20  # QoS 1 messages the broker sends a client ahead of its PUBACKs (its default)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A port nothing is bound to, below the kernel's ephemeral range. One the kernel hands out
    (bind to port 0) comes from that range, from which every outgoing connection of the suite's
    other workers takes its local port too: RabbitMQ, seconds from start to listen, lost 15
    tests' broker to `eaddrinuse` that way in a loaded CI run."""
    lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, lowest_ephemeral)
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port


# -- certificates -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    ca: Path                  # trusted by the broker and by the thing
    server: Identity          # the broker's, for localhost and 127.0.0.1
    wrong_host: Identity      # signed by `ca` but for another host name
    thing: Identity           # signed by `ca`: the broker accepts it
    other_ca: Path            # an unrelated CA
    stranger: Identity        # a client identity signed by `other_ca`: the broker refuses it


class _Authority:
    def __init__(self, name: str, valid_since: datetime.timedelta = datetime.timedelta(hours=1)):
        self.valid_since = valid_since
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._builder(self.name, self.key.public_key()) \
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True) \
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True) \
            .sign(self.key, hashes.SHA256())

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - self.valid_since)
                .not_valid_after(now + datetime.timedelta(days=2)))

    def issue(self, directory: Path, stem: str, common_name: str,
              server_names: Sequence[str] = ()) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = self._builder(subject, key.public_key()) \
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True) \
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server_names:
            names = x509.SubjectAlternativeName([_general_name(n) for n in server_names])
            builder = builder.add_extension(names, critical=False)
        identity = Identity(directory / f"{stem}.pem", directory / f"{stem}.key")
        cert = builder.sign(self.key, hashes.SHA256())
        identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(identity.key, key)
        return identity

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_certs(directory: Path, valid_since: datetime.timedelta = datetime.timedelta(hours=1)) -> Certs:
    """A throw-away CA with server and thing certificates, and a stranger from another CA; all
    valid from `valid_since` ago (clock-step tests need certificates valid days back)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = _Authority("flashlexd-test-ca", valid_since), _Authority("someone-else-ca", valid_since)
    return Certs(
        ca=ca.write(directory / "ca.pem"),
        server=ca.issue(directory, "server", "localhost", ("localhost", HOST)),
        wrong_host=ca.issue(directory, "wrong-host", "elsewhere.invalid", ("elsewhere.invalid",)),
        thing=ca.issue(directory, "thing", THING),
        other_ca=other.write(directory / "other-ca.pem"),
        stranger=other.issue(directory, "stranger", THING),
    )


# -- the broker -------------------------------------------------------------------------------

class Broker:
    """mosquitto with a mutual-TLS listener (like AWS IoT on 8883) on a free loopback port, an
    optional plain listener (for benchmarks), persistence in `workdir`, unlimited queues."""
    name = "mosquitto"

    def __init__(self, certs: Certs, workdir: Path, *, server: Optional[Identity] = None,
                 plain: bool = False, extra: Sequence[str] = (), acl: Optional[str] = None,
                 websockets: bool = False, listener: Sequence[str] = ()):
        self.certs = certs
        self.extra = list(extra)  # more mosquitto.conf lines (global settings, e.g. max_packet_size)
        self.listener = list(listener)  # the TLS listener's own settings (e.g. max_qos)
        self.acl = acl  # the TLS listener's ACL file text (mosquitto's acl_file format)
        self.workdir = workdir
        self.server = server or certs.server
        self.port = free_port()
        self.plain_port = free_port() if plain else None
        self.ws_port = free_port() if websockets else None  # MQTT over websockets, the same mutual TLS
        self.conf = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.process: Optional[subprocess.Popen] = None
        self.peers: List[subprocess.Popen] = []  # clients started against it, killed by close()
        (workdir / "state").mkdir(parents=True, exist_ok=True)

    def _write_conf(self) -> None:
        lines = [
            "per_listener_settings true",
            "persistence true",
            f"persistence_location {self.workdir / 'state'}/",
            "autosave_interval 0",  # saved only by save() (SIGUSR1) and a clean stop
            "max_queued_messages 0",
            f"max_inflight_messages {BROKER_INFLIGHT}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "log_type subscribe",
            "connection_messages true",
            *self.extra,
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto becomes `mosquitto` and cannot read 0600 keys
        mutual_tls = [f"cafile {self.certs.ca}", f"certfile {self.server.cert}", f"keyfile {self.server.key}",
                      "require_certificate true", "use_identity_as_username true", "allow_anonymous false"]
        lines += [f"listener {self.port} {HOST}", *mutual_tls, *self.listener]
        if self.ws_port:
            lines += [f"listener {self.ws_port} {HOST}", "protocol websockets", *mutual_tls]
        if self.acl is not None:
            (self.workdir / "acl").write_text(self.acl)
            lines.append(f"acl_file {self.workdir / 'acl'}")
        if self.plain_port:
            lines += [f"listener {self.plain_port} {HOST}", "allow_anonymous true"]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10) -> "Broker":
        self._write_conf()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._listening, timeout, f"mosquitto on port {self.port}")
        return self

    def _listening(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"mosquitto exited; log:\n{self.log_text()[-2000:]}")
        with socket.socket() as sock:
            return sock.connect_ex((HOST, self.port)) == 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal_and_wait(self, signum: int, timeout: float = 10) -> None:
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signum)
            self.process.wait(timeout)

    def stop(self) -> None:
        """Clean stop: mosquitto saves its sessions and queues first."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """A crash: whatever was not saved is gone."""
        self._signal_and_wait(signal.SIGKILL)

    def close(self) -> None:
        """The end of a test: the broker and every peer still running (a mosquitto_pub -l
        retries forever when its broker is gone)."""
        for peer in self.peers:
            if peer.poll() is None:
                peer.kill()
                peer.wait(10)
        self.kill()

    def freeze(self) -> None:
        """SIGSTOP: the broker keeps its sockets open and answers nothing (a half-open link)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def restart(self, kill: bool = False) -> None:
        (self.kill if kill else self.stop)()
        self.start()

    def save(self, timeout: float = 10) -> None:
        """Write the persistence file now (SIGUSR1) and wait until it is on disk."""
        assert self.process is not None
        before = self.log_text().count("Saving in-memory database")
        os.kill(self.process.pid, signal.SIGUSR1)
        db = self.workdir / "state" / "mosquitto.db"
        wait_for(lambda: self.log_text().count("Saving in-memory database") > before
                 and db.exists() and not db.with_suffix(".db.new").exists(), timeout, "mosquitto save")

    def subscriptions(self, client_id: str, topic: str) -> int:
        """How many times `client_id` has subscribed to `topic` (at QoS 1) in this broker's log."""
        return self.log_text().count(f": {client_id} 1 {topic}\n")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client_args(self, identity: Optional[Identity] = None, plain: bool = False) -> List[str]:
        """Connection arguments for mosquitto_pub/mosquitto_sub: mutual TLS, or the plain
        listener (`plain`, when started with one)."""
        if plain:
            assert self.plain_port, "broker started without a plain listener"
            return ["-h", HOST, "-p", str(self.plain_port)]
        identity = identity or self.certs.thing
        return ["-h", HOST, "-p", str(self.port), "--cafile", str(self.certs.ca),
                "--cert", str(identity.cert), "--key", str(identity.key)]


# -- a lossy path to the broker ----------------------------------------------------------------

_RATE_CHUNK = 4096  # what a rate-limited Proxy passes at a time


class Proxy:
    """A TCP relay in front of the broker (TLS passes through untouched) that a test can make
    lossy: `swallow("up")` silently drops client -> broker bytes (our PUBACKs never arrive),
    `swallow("down")` drops broker -> client bytes, `cut()` closes every relayed connection and
    makes the path healthy again for the reconnect. `slow["down"] = 1.0` passes each broker ->
    client read on a second late (a SUBSCRIBE reaches the broker long before its SUBACK us).
    `stall_up(links, after)`: each of the next `links` connections passes `after` client ->
    broker bytes, then reads no more of them (an upload stuck mid-way: the client's TCP keeps
    the rest unacknowledged); `stalled` counts the links so stuck. `rate["down"] = 65536`
    passes broker -> client bytes at that many a second (a slow cellular link). It relays to
    the broker's mutual-TLS listener, or to `port` (its websockets listener)."""

    def __init__(self, broker: Broker, port: Optional[int] = None):
        self.broker = broker
        self.upstream_port = port or broker.port
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.swallowing = {"up": False, "down": False}
        self.swallowed = {"up": 0, "down": 0}  # bytes dropped so far, by direction
        self.slow = {"up": 0.0, "down": 0.0}  # seconds each read waits before it is passed on
        self.rate: Dict[str, Optional[int]] = {"up": None, "down": None}  # bytes a second, None: as fast as it goes
        self._peer: Dict[socket.socket, socket.socket] = {}
        self._up: set = set()  # sockets whose bytes travel client -> broker
        self._up_left: Dict[socket.socket, int] = {}  # client -> broker bytes a stalling link still passes
        self._stalls, self._stall_after, self.stalled = 0, 0, 0
        self._cut = threading.Event()
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def swallow(self, direction: str) -> None:
        self.swallowing[direction] = True

    def cut(self, timeout: float = 5) -> None:
        self._cut.set()
        wait_for(lambda: not self._cut.is_set(), timeout, "proxy cut")

    def stall_up(self, links: int, after: int) -> None:
        self._stall_after, self._stalls = after, links

    def close(self) -> None:
        self._closed = True

    def _serve(self) -> None:
        while not self._closed:
            reading = [sock for sock in self._peer if self._up_left.get(sock) != 0]
            ready, _, _ = select.select([self.listener, *reading], [], [], 0.01)
            if self._cut.is_set():
                for sock in self._peer:
                    sock.close()
                self._peer.clear()
                self._up.clear()
                self._up_left.clear()
                self.swallowing = {"up": False, "down": False}
                self._cut.clear()
                continue
            for sock in ready:
                if sock is self.listener:
                    self._accept()
                elif sock in self._peer:
                    self._relay(sock)
        self.listener.close()
        for sock in self._peer:
            sock.close()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        try:
            upstream = socket.create_connection((HOST, self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        self._peer[client], self._peer[upstream] = upstream, client
        self._up.add(client)
        if self._stalls:
            self._stalls -= 1
            self._up_left[client] = self._stall_after

    def _relay(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(min(65536, self._up_left.get(sock, 65536)))
        except OSError:
            data = b""
        other = self._peer[sock]
        if not data:
            for end in (sock, other):
                self._peer.pop(end, None)
                self._up.discard(end)
                self._up_left.pop(end, None)
                end.close()
            return
        if sock in self._up_left:
            self._up_left[sock] -= len(data)
            if not self._up_left[sock]:
                self.stalled += 1
        direction = "up" if sock in self._up else "down"
        if self.swallowing[direction]:
            self.swallowed[direction] += len(data)
        elif self.rate[direction]:
            for at in range(0, len(data), _RATE_CHUNK):
                time.sleep(_RATE_CHUNK / self.rate[direction])  # type: ignore[operator]
                other.sendall(data[at:at + _RATE_CHUNK])
        else:
            time.sleep(self.slow[direction])
            other.sendall(data)


def serve_each(listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept on `listener` until it is closed, each connection handled in a thread of its own
    (the tests' small servers and proxies)."""
    def accept() -> None:
        while True:
            try:
                peer, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(peer,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()


# -- independent peers ------------------------------------------------------------------------

PUB_LINES_MAX = 65_535  # lines one mosquitto_pub -l run is trusted with: one packet id each


def publish_lines(broker: Broker, topic: str, lines_file: Path, client_id: str = "test-pub",
                  max_inflight: int = 100, plain: bool = False) -> subprocess.Popen:
    """Start mosquitto_pub publishing each line of `lines_file` at QoS 1; returns the process.
    It exits when all are acknowledged; if the broker dies, it waits for it to come back.
    One `mosquitto_pub -l` run silently loses lines once its packet ids wrap (100k lines: 34,511
    delivered once), so a larger file is refused: publish chunks of at most PUB_LINES_MAX lines."""
    with open(lines_file, "rb") as counted:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: counted.read(1 << 20), b""))
    if lines > PUB_LINES_MAX:
        raise ValueError(f"{lines_file} has {lines} lines: mosquitto_pub -l loses lines past its 65,535"
                         f" packet ids; publish chunks of <= {PUB_LINES_MAX}")
    argv = ["mosquitto_pub", *broker.client_args(plain=plain), "-i", client_id, "-q", "1",
            "-M", str(max_inflight), "-t", topic, "-l"]
    with open(lines_file, "rb") as stdin:
        process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    broker.peers.append(process)
    return process


def publish(broker: Broker, topic: str, payload: bytes, qos: int = 1) -> None:
    """Publish one message (any bytes, empty included) and wait for mosquitto_pub to finish."""
    body = ["-n"] if not payload else ["-s"]
    subprocess.run(["mosquitto_pub", *broker.client_args(), "-q", str(qos), "-t", topic, *body],
                   input=payload, check=True, timeout=20, capture_output=True)


def write_lines(path: Path, count: int, width: int = 0, start: int = 0) -> List[bytes]:
    """`count` numbered lines ("000042 xxx...", `width` bytes when given); returns them."""
    lines = [f"{i:06d} ".encode().ljust(width, b"x") for i in range(start, start + count)]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return lines


class Subscriber:
    """mosquitto_sub with a persistent session (-c, fixed id) at QoS 1, one line per message
    (`fmt`, mosquitto_sub's -F: %p payload, %t topic, %q qos, %r retain) into a file. It
    reconnects by itself after a broker restart."""

    def __init__(self, broker: Broker, topic: str, out: Path, client_id: str = "test-sub",
                 fmt: str = "%p"):
        self.broker, self.topic, self.out, self.client_id, self.fmt = broker, topic, out, client_id, fmt
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "Subscriber":
        before = self.broker.subscriptions(self.client_id, self.topic)
        with open(self.out, "ab") as out:
            self.process = subprocess.Popen(
                ["mosquitto_sub", *self.broker.client_args(), "-c", "-i", self.client_id, "-q", "1",
                 "-t", self.topic, "-F", self.fmt],
                stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
        self.broker.peers.append(self.process)
        wait_for(lambda: self.broker.subscriptions(self.client_id, self.topic) > before, 10,
                 f"{self.client_id} subscribed to {self.topic}")
        return self

    def lines(self) -> List[bytes]:
        data = self.out.read_bytes() if self.out.exists() else b""
        return data.split(b"\n")[:-1]  # the last, possibly partial, line is not complete yet

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


# -- FlashLex config --------------------------------------------------------------------------

def write_config(directory: Path, broker: Broker, *, identity: Optional[Identity] = None,
                 root_ca: Optional[Path] = None, endpoint: str = HOST, port: Optional[int] = None,
                 mqtt: Optional[Dict[str, Any]] = None, db: Optional[Dict[str, Any]] = None) -> Path:
    """A FlashLex-format config (like the seed config) for `broker`, its key files copied next to
    it under their FlashLex names, test-sized backoffs, the store in `directory/data`.
    `mqtt` and `db` entries override or add keys of flashlex.thing.mqtt / flashlex.app.db."""
    directory.mkdir(parents=True, exist_ok=True)
    identity = identity or broker.certs.thing
    keys = {"rootCA": "root-ca-cert.pem", "cert": f"{THING}-certificate.pem",
            "privateKey": f"{THING}-keypair-private.pem"}
    shutil.copyfile(root_ca or broker.certs.ca, directory / keys["rootCA"])
    shutil.copyfile(identity.cert, directory / keys["cert"])
    shutil.copyfile(identity.key, directory / keys["privateKey"])
    (directory / keys["privateKey"]).chmod(0o600)
    mqtt_section: Dict[str, Any] = {
        "pubsub": {"topic": PUBSUB_TOPIC},
        "ingress": {"topic": INGRESS_TOPIC},
        "egress": {"topic": EGRESS_TOPIC},
        "useWebsocket": False,
        "port": port or broker.port,
        "autoReconnectBackoffTime": {"baseReconnectQuietTimeSecond": 0.2,
                                     "maxReconnectQuietTimeSecond": 1,
                                     "stableConnectionTimeSecond": 2},
        "offlinePublishQueueing": -1,
        "publishRatePerSecond": 0,   # mosquitto has no quotas: drain as fast as it acknowledges
        "publishBytesPerSecond": 0,
        "connectDisconnectTimeout": 5,
        "mqttOperationTimeout": 5,
    }
    if getattr(broker, "name", None) == "rabbitmq":  # 3.1.1 only: `auto` (the default) spends ~2 s a start on the
        mqtt_section["protocol"] = "3.1.1"  # fallback; its tests ask for `auto` (test_mqtt5)
    mqtt_section.update(mqtt or {})
    db_section: Dict[str, Any] = {"subscriptionData": "subscription.json",
                                  "dataPath": str(directory / "data")}
    # a whole run under other store settings, e.g. FLASHLEXD_TEST_DB='{"ingestCommitMs": 2000,
    # "ingestCommitBatch": 16}' (the SD-card setting, docs/WEAR.md); a test's own `db` still wins
    db_section.update(json.loads(os.environ.get("FLASHLEXD_TEST_DB") or "{}"))
    db_section.update(db or {})
    document = {"flashlex": {
        "app": {"db": db_section, "socket": {"path": str(directory / "flashlexd.sock")},
                "supervisor": {"heartbeatSeconds": 0.2, "heartbeatTimeoutSeconds": 5}},
        "thing": {"name": THING, "endpoint": endpoint, "keys": keys, "mqtt": mqtt_section},
    }}
    path = directory / "flashlex.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def open_store(config_path: Path) -> Store:
    """The store a worker run with `config_path` uses, opened in this (the test's) process."""
    return Store.from_config(config_module.load(str(config_path)).store)
