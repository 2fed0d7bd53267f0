"""The MQTT connection: reconnect pacing (fake clock), and real TLS against a real broker, with
the one-line reason for each way a connection fails."""
from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlexd import config as config_module
from flashlexd.config import ConfigError, Keys, ReconnectPolicy
from flashlexd.reconnect import JITTER, MIN_CONNECT_INTERVAL, ReconnectBackoff
from flashlexd.mqtt import Connection
from flashlexd.mqttclient import build_client, tls_context
from flashlexd.quotas import ALPN_PROTOCOL
from tests.broker import HOST, THING, Broker, Certs, Identity, free_port, wait_for, write_config

# -- the backoff, with a fake clock --------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failing_waits(backoff: ReconnectBackoff, clock: FakeClock, attempts: int) -> List[float]:
    waits = []
    for _ in range(attempts):
        clock.now += backoff.wait()
        backoff.attempted()
        backoff.lost()
        waits.append(backoff.wait())
    return waits


def test_first_connect_is_immediate() -> None:
    assert ReconnectBackoff(ReconnectPolicy(1, 30, 10), FakeClock()).wait() == 0


def test_quiet_time_doubles_up_to_the_maximum() -> None:
    clock = FakeClock()
    backoff = ReconnectBackoff(ReconnectPolicy(1, 8, 10), clock, rand=lambda: 0.0)
    assert failing_waits(backoff, clock, 6) == [1, 2, 4, 8, 8, 8]


def test_jitter_shortens_by_at_most_a_quarter_and_stays_inside_the_cap() -> None:
    clock = FakeClock()
    backoff = ReconnectBackoff(ReconnectPolicy(2, 8, 10), clock, rand=lambda: 1.0)
    assert failing_waits(backoff, clock, 4) == [2 * (1 - JITTER), 4 * (1 - JITTER), 8 * (1 - JITTER),
                                                8 * (1 - JITTER)]
    no_jitter = ReconnectBackoff(ReconnectPolicy(2, 30, 10), clock, rand=lambda: 0.0)
    assert max(failing_waits(no_jitter, clock, 10)) == 30  # the cap itself, never beyond


def test_a_drop_caused_by_one_of_our_entries_does_not_grow_the_quiet_time() -> None:
    clock = FakeClock()
    backoff = ReconnectBackoff(ReconnectPolicy(2, 30, 10), clock, rand=lambda: 0.0)
    failing_waits(backoff, clock, 3)  # the broker's fault: 2, 4, 8, next 16
    for _ in range(3):
        clock.now += backoff.wait()
        backoff.attempted()
        backoff.connected()
        backoff.lost(broker_fault=False)
        assert backoff.wait() == 2  # the base, each time, and the growth is kept for the broker
    backoff.lost()
    assert backoff.wait() == 16


def test_never_two_connects_within_a_second() -> None:
    clock = FakeClock()
    backoff = ReconnectBackoff(ReconnectPolicy(0.1, 0.2, 10), clock, rand=lambda: 0.0)
    assert failing_waits(backoff, clock, 3) == [MIN_CONNECT_INTERVAL] * 3


def test_a_stable_connection_resets_the_quiet_time() -> None:
    clock = FakeClock()
    backoff = ReconnectBackoff(ReconnectPolicy(1, 16, 10), clock, rand=lambda: 0.0)
    failing_waits(backoff, clock, 4)  # quiet time is now 16
    clock.now += backoff.wait()
    backoff.attempted()
    backoff.connected()
    clock.now += 10
    backoff.lost()
    assert backoff.wait() == 1


def test_a_short_connection_keeps_backing_off() -> None:
    clock = FakeClock()
    backoff = ReconnectBackoff(ReconnectPolicy(1, 16, 10), clock, rand=lambda: 0.0)
    failing_waits(backoff, clock, 2)  # waited 1, 2; next quiet time 4
    clock.now += backoff.wait()
    backoff.attempted()
    backoff.connected()
    clock.now += 3
    backoff.lost()
    assert backoff.wait() == 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 60), st.floats(0, 1)), max_size=30),
       st.floats(0.05, 5), st.floats(1, 4))
def test_backoff_bounds_hold_for_any_history(history: List[Tuple[bool, float, float]], base: float,
                                             factor: float) -> None:
    """Whatever happens: CONNECTs at least a second apart, never a wait beyond the cap."""
    clock, rand = FakeClock(), [0.0]
    backoff = ReconnectBackoff(ReconnectPolicy(base, base * factor, 5), clock, rand=lambda: rand[0])
    last: Optional[float] = None
    for connects, uptime, jitter in history:
        rand[0] = jitter
        clock.now += backoff.wait()
        if last is not None:
            assert clock.now - last >= MIN_CONNECT_INTERVAL - 1e-9
        last = clock.now
        backoff.attempted()
        if connects:
            backoff.connected()
            clock.now += uptime
        backoff.lost()
        assert backoff.wait() <= max(base * factor, MIN_CONNECT_INTERVAL) + 1e-9


# -- real connections, driven like the worker loop drives them ----------------------------------

class Probe:
    """A Connection plus the loop that drives it and the (connected, error) changes it reported."""

    def __init__(self, config_path: Path):
        self.changes: List[Tuple[bool, Optional[str]]] = []
        self.config = config_module.load(str(config_path))
        self.connection = Connection(self.config, f"{THING}-probe",
                                     lambda up, error: self.changes.append((up, error)))

    def run_until(self, predicate, timeout: float, what: str) -> None:
        def step() -> bool:
            wait = min(self.connection.service(), 0.02)  # as the worker loop: service, then wait
            reads, writes = self.connection.wait_fds()
            ready_r, ready_w, _ = select.select(list(reads), list(writes), [], wait)
            self.connection.on_ready(ready_r, ready_w)
            return predicate()
        wait_for(step, timeout, what, interval=0)

    def first_error(self, timeout: float = 10) -> str:
        self.run_until(lambda: any(error for _, error in self.changes), timeout, "a connection error")
        return next(error for _, error in self.changes if error)


def probe(tmp_path: Path, broker: Broker, **overrides) -> Probe:
    return Probe(write_config(tmp_path / "config", broker, **overrides))


@pytest.mark.parametrize("protocol,version", [("auto", 5), ("5", 5), ("3.1.1", 2)])
def test_connects_with_the_thing_certificate(broker: Broker, tmp_path: Path, protocol: str,
                                             version: int) -> None:
    p = probe(tmp_path, broker, mqtt={"protocol": protocol})
    p.run_until(lambda: p.changes, 10, "connected")
    assert p.changes == [(True, None)]
    assert f"as {THING}-probe (p{version}, c0, k30, u'{THING}')" in broker.log_text()  # persistent
    p.connection.close(2)
    wait_for(lambda: f"Client {THING}-probe disconnected." in broker.log_text(), 5, "clean DISCONNECT")


def test_which_certificates_are_trusted_does_not_change_with_the_python_release(certs: Certs) -> None:
    """3.13's default context is stricter (X509_STRICT: the test CA's certificates, without an
    Authority Key Identifier, failed every link there) and trusts an intermediate in rootCA as
    an anchor (PARTIAL_CHAIN); the daemon verifies the same way on every release."""
    keys = Keys(certs.ca, certs.thing.cert, certs.thing.key)
    newer_only = getattr(ssl, "VERIFY_X509_STRICT", 0) | getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)
    assert tls_context(keys).verify_flags & newer_only == 0
    assert tls_context(keys).verify_mode == ssl.CERT_REQUIRED and tls_context(keys).check_hostname


def test_broker_refuses_a_certificate_from_another_ca(broker: Broker, certs: Certs, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    p = probe(tmp_path, broker, identity=certs.stranger)
    with caplog.at_level(logging.ERROR, logger="flashlexd.mqtt"):
        error = p.first_error()
    assert "refused the client certificate" in error and f"{THING}-certificate.pem" in error
    assert error in caplog.text and len(caplog.records) == 1


def test_broker_certificate_from_an_unknown_ca(broker: Broker, certs: Certs, tmp_path: Path) -> None:
    error = probe(tmp_path, broker, root_ca=certs.other_ca).first_error()
    assert "not trusted by rootCA" in error and "root-ca-cert.pem" in error


def test_broker_certificate_for_another_host(certs: Certs, tmp_path: Path) -> None:
    broker = Broker(certs, tmp_path / "broker", server=certs.wrong_host).start()
    try:
        error = probe(tmp_path, broker).first_error()
    finally:
        broker.close()
    assert f"not valid for host {HOST}" in error


def test_connection_refused(broker: Broker, tmp_path: Path) -> None:
    error = probe(tmp_path, broker, port=free_port()).first_error()
    assert error.startswith("connection refused by 127.0.0.1:")


def test_unresolvable_endpoint(broker: Broker, tmp_path: Path) -> None:
    error = probe(tmp_path, broker, endpoint="broker.invalid").first_error()
    assert error.startswith("cannot resolve broker.invalid")


def server_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.server.cert), str(certs.server.key))
    context.set_alpn_protocols([ALPN_PROTOCOL])
    return context


@pytest.fixture
def silent_tls_server(certs: Certs) -> Iterator[int]:
    """A TLS server that completes handshakes and never answers MQTT; yields its port."""
    context = server_context(certs)
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen()
    held: List[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
                held.append(context.wrap_socket(conn, server_side=True))
            except OSError:  # the listener was closed, or a handshake failed
                if listener.fileno() < 0:
                    return

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for tls in held:
        tls.close()


def test_no_connack_within_connect_timeout(broker: Broker, silent_tls_server: int, tmp_path: Path) -> None:
    port = silent_tls_server
    p = probe(tmp_path, broker, port=port, mqtt={"connectDisconnectTimeout": 1})
    started = time.monotonic()
    assert p.first_error().startswith(f"no CONNACK from 127.0.0.1:{port} within 1s")
    assert time.monotonic() - started < 3


def test_a_black_holed_endpoint_times_out(broker: Broker, tmp_path: Path) -> None:
    with socket.socket() as hole:  # listening, never accepting: TCP connects, TLS never answers
        hole.bind((HOST, 0))
        hole.listen()
        p = probe(tmp_path, broker, port=hole.getsockname()[1], mqtt={"connectDisconnectTimeout": 1})
        assert "timed out after 1s" in p.first_error()


def test_port_443_offers_the_aws_alpn(broker: Broker, certs: Certs, tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((HOST, 443))
        except OSError as exc:  # not root, or another run has it
            pytest.skip(f"cannot bind port 443 here: {exc}")
        listener.listen()
        listener.settimeout(10)
        p = probe(tmp_path, broker, port=443)
        shaken = threading.Event()
        attempt = threading.Thread(target=p.run_until, args=(shaken.is_set, 10, "the handshake"),
                                   daemon=True)  # the loop drives the non-blocking handshake
        attempt.start()
        conn, _ = listener.accept()
        with server_context(certs).wrap_socket(conn, server_side=True) as tls:
            assert tls.selected_alpn_protocol() == ALPN_PROTOCOL
        shaken.set()
        attempt.join(10)


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(broker: Broker, certs: Certs,
                                                                     tmp_path: Path) -> None:
    mismatched = Identity(certs.thing.cert, certs.stranger.key)
    config = config_module.load(str(write_config(tmp_path, broker, identity=mismatched)))
    with pytest.raises(ConfigError, match=r"keys: cannot load certificate .*KEY_VALUES_MISMATCH"):
        build_client(config.thing, THING, 5)


def test_websocket_transport_is_chosen_by_the_config(broker: Broker, tmp_path: Path) -> None:
    config = config_module.load(str(write_config(tmp_path, broker, mqtt={"useWebsocket": True})))
    assert build_client(config.thing, THING, 5).transport == "websockets"


# -- the worker, as a process --------------------------------------------------------------------

def test_worker_keeps_retrying_a_refused_certificate_at_most_once_a_second(
        broker: Broker, certs: Certs, tmp_path: Path, start_worker) -> None:
    config = write_config(tmp_path / "config", broker, identity=certs.stranger)
    worker = start_worker("ingress", config)
    started = time.monotonic()
    worker.wait(lambda w: len(w.reports("mqtt")) >= 3, 15, "three failed attempts")
    elapsed = time.monotonic() - started
    assert worker.alive()
    errors = [m["error"] for m in worker.reports("mqtt")]
    assert all(not m["connected"] for m in worker.reports("mqtt"))
    assert all("refused the client certificate" in e for e in errors)
    assert len(errors) <= elapsed / MIN_CONNECT_INTERVAL + 1  # one report per failed attempt
    log = worker.log_text()
    assert "refused the client certificate" in log and "Traceback" not in log
    key_body = certs.stranger.key.read_text().splitlines()[1]
    assert key_body not in log
    assert worker.stop() == 0
