"""A real RabbitMQ 3.10 node (Debian's rabbitmq-server, its MQTT plugin) with mutual TLS and
the certificate's CN as the user: the suite's second broker. Unlike mosquitto it redelivers
unacknowledged messages under NEW packet ids, and after its own crash it may send again
(DUP=0) messages whose PUBACK it had acknowledged but not yet persisted.

One node per test session (it takes ~5-10 s to start): everything in a temp dir, on free
loopback ports, started in its own session and stopped by PID, its `epmd` too (found by the
ERL_EPMD_ADDRESS we gave it, never by name). Between tests `forget()` drops the thing's
session (a clean-session connect deletes its queue), so no test sees another's messages.
It offers the parts of tests.broker.Broker that the broker-neutral tests use.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from typing import List, Optional

import paho.mqtt.client as mqtt

from tests.broker import HOST, THING, Certs, Identity, free_port, wait_for

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
PREFETCH = 10  # the MQTT plugin's default window of unacknowledged deliveries


def available() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists()


class RabbitBroker:
    name = "rabbitmq"

    def __init__(self, certs: Certs, workdir: Path):
        self.certs = certs
        self.workdir = workdir
        self.port = free_port()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.node = f"flashlexd{os.getpid()}@localhost"
        self.log_dir = workdir / "log"
        self.process: Optional[subprocess.Popen] = None
        self.peers: List[subprocess.Popen] = []
        self.epmd_pid: Optional[int] = None
        self._write_conf()

    def _write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "home").mkdir(exist_ok=True)
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.workdir / "advanced.config").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = {HOST}:{self.amqp_port}",
            "loopback_users = none",
            "mqtt.listeners.tcp = none",
            f"mqtt.listeners.ssl.default = {HOST}:{self.port}",
            f"ssl_options.cacertfile = {self.certs.ca}",
            f"ssl_options.certfile = {self.certs.server.cert}",
            f"ssl_options.keyfile = {self.certs.server.key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "ssl_cert_login_from = common_name",
            "mqtt.ssl_cert_login = true",
            "mqtt.allow_anonymous = false",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "log.file.level = warning",
        ]) + "\n")

    def _env(self) -> dict:
        w = self.workdir
        return dict(os.environ, HOME=str(w / "home"), RABBITMQ_NODENAME=self.node,
                    RABBITMQ_NODE_IP_ADDRESS=HOST, RABBITMQ_NODE_PORT=str(self.amqp_port),
                    RABBITMQ_DIST_PORT=str(self.dist_port), ERL_EPMD_ADDRESS=HOST,
                    RABBITMQ_CONFIG_FILE=str(w / "rabbitmq.conf"),
                    RABBITMQ_ENABLED_PLUGINS_FILE=str(w / "enabled_plugins"),
                    RABBITMQ_ADVANCED_CONFIG_FILE=str(w / "advanced.config"),
                    RABBITMQ_MNESIA_BASE=str(w / "mnesia"), RABBITMQ_LOG_BASE=str(self.log_dir),
                    RABBITMQ_PID_FILE=str(w / "rabbit.pid"))

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "RabbitBroker":
        for attempt in (1, 2):
            with open(self.workdir / "server.out", "ab") as out:
                self.process = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self._env(),
                                                stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)
            try:
                wait_for(lambda: self._listening(self.amqp_port), timeout, "RabbitMQ's AMQP port")
                break
            except AssertionError as exc:
                # Erlang's distribution found no epmd to register with: another node's epmd on
                # 4369 was going away as ours started (seen once, with other test runs beside)
                if attempt == 2 or "nodistribution" not in str(exc):
                    raise
        # the CLI may not find the node for a moment after the port opens: retried
        wait_for(self._user_ready, timeout, "the thing's user on RabbitMQ", interval=0.2)
        self._find_epmd()
        wait_for(lambda: self._listening(self.port), timeout, "RabbitMQ's MQTT TLS port")
        return self

    def _listening(self, port: int) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"rabbitmq-server exited; see {self.workdir / 'server.out'}:\n"
                                 + (self.workdir / "server.out").read_text(errors="replace")[-2000:])
        with socket.socket() as sock:
            return sock.connect_ex((HOST, port)) == 0

    def _user_ready(self) -> bool:
        """The certificate's CN is a user with every permission (kept across restarts)."""
        if self.ctl("set_permissions", "-p", "/", THING, ".*", ".*", ".*", check=False) is not None:
            return True
        self.ctl("add_user", THING, "unused", check=False)  # no user yet, or no node yet
        return False

    def ctl(self, *args: str, check: bool = True) -> Optional[str]:
        """rabbitmqctl's output; None when it failed and `check` is off."""
        done = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args],
                              env=self._env(), capture_output=True, text=True, timeout=60)
        if done.returncode:
            if check:
                raise AssertionError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
            return None
        return done.stdout

    def _find_epmd(self) -> None:
        """The epmd our node started: the one with our ERL_EPMD_ADDRESS and HOME."""
        home = f"HOME={self.workdir / 'home'}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() != "epmd":
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"ERL_EPMD_ADDRESS={HOST}".encode() in environ and home in environ:
                self.epmd_pid = int(entry.name)
                return

    def _beam_pid(self) -> Optional[int]:
        try:
            return int((self.workdir / "rabbit.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """A crash: SIGKILL to the node (beam), whatever it had not persisted is gone."""
        if not self.running:
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)  # the start script and its beam, one session
        self.process.wait(30)

    def stop(self) -> None:
        if self.running:
            self.ctl("stop", check=False)
            assert self.process is not None
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, kill: bool = False) -> None:
        (self.kill if kill else self.stop)()
        self.start()

    def close(self) -> None:
        """End of the session: peers, the node, then its epmd, each by PID."""
        self.end_peers()
        self.kill()
        if self.epmd_pid is not None:
            try:
                os.kill(self.epmd_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.workdir / "mnesia", ignore_errors=True)

    def end_peers(self) -> None:
        for peer in self.peers:
            if peer.poll() is None:
                peer.kill()
                peer.wait(10)
        self.peers.clear()

    def forget(self, client_ids: List[str]) -> None:
        """Drop these clients' sessions (and queues): a clean-session connect and disconnect."""
        for client_id in client_ids:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                 clean_session=True)
            client.tls_set(ca_certs=str(self.certs.ca), certfile=str(self.certs.thing.cert),
                           keyfile=str(self.certs.thing.key), cert_reqs=ssl.CERT_REQUIRED)
            client.connect(HOST, self.port, keepalive=30)
            client.loop_start()
            wait_for(client.is_connected, 15, f"{client_id} to connect to RabbitMQ")
            client.disconnect()
            client.loop_stop()

    # -- what tests.broker.Broker offers ------------------------------------------------------

    def client_args(self, identity: Optional[Identity] = None, plain: bool = False) -> List[str]:
        assert not plain, "the RabbitMQ node has no plain listener"
        identity = identity or self.certs.thing
        return ["-h", HOST, "-p", str(self.port), "--cafile", str(self.certs.ca),
                "--cert", str(identity.cert), "--key", str(identity.key)]

    def subscriptions(self, client_id: str, topic: str) -> int:
        """1 when `client_id`'s QoS 1 session queue is bound to `topic`, else 0 (RabbitMQ keeps
        no count of SUBSCRIBEs; the suite uses it once per session)."""
        queue = f"mqtt-subscription-{client_id}qos1"
        key = topic.replace("/", ".")
        out = self.ctl("list_bindings", "-q", "--no-table-headers", "destination_name", "routing_key",
                       check=False) or ""
        return int(any(line.split("\t") == [queue, key] for line in out.splitlines()))

    def log_text(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.log_dir.glob("*.log")))

