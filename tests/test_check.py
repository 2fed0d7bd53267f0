"""`flashlexd check`, run as the real command against the real mutual-TLS broker: every step
passing, and each way a device can be not ready failing at its own step with its reason."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flashlexd.checkcerts import certificate_validity
from flashlexd.config import load
from flashlexd.probemark import PROBE_KEY, probe_topic
from tests.broker import (INGRESS_TOPIC, THING, Broker, Certs, Identity, free_port, open_store, wait_for,
                          write_config)

STEPS = ["config", "keys", "broker", "mqtt", "probe", "store"]
LINE = re.compile(r"^(ok|FAIL|skip) +(\w+): (.*)$")


def run_check(config: Path, *extra: str, timeout: str = "5") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlexd", "check", "--config", str(config),
                           "--timeout", timeout, *extra], capture_output=True, text=True, timeout=60)


def parse(result: subprocess.CompletedProcess) -> Tuple[Dict[str, Tuple[str, str]], str]:
    """{step: (status, detail)} from the lines, in order, and the verdict line."""
    lines = result.stdout.splitlines()
    steps = {}
    for line in lines[:-1]:
        match = LINE.match(line)
        assert match, f"not a step line: {line!r}\n{result.stdout}{result.stderr}"
        steps[match.group(2)] = (match.group(1), match.group(3))
    assert list(steps) == STEPS, result.stdout
    return steps, lines[-1]


def statuses(steps: Dict[str, Tuple[str, str]]) -> List[str]:
    return [steps[name][0] for name in STEPS]


def assert_no_key_material(result: subprocess.CompletedProcess, *keys: Path) -> None:
    output = result.stdout + result.stderr
    assert "PRIVATE KEY" not in output
    for key in keys:
        body = "".join(key.read_text().splitlines()[1:-1])
        assert body[:40] not in output.replace("\n", "")


# -- everything in place ------------------------------------------------------------------------

def test_every_step_passes_against_the_real_broker(broker: Broker, tmp_path: Path) -> None:
    config = write_config(tmp_path / "thing", broker)
    result = run_check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    steps, verdict = parse(result)
    assert statuses(steps) == ["ok"] * 6
    assert verdict.startswith("READY")
    assert "client certificate accepted" in steps["broker"][1]
    assert f"'{THING}-check'" in steps["mqtt"][1]
    rtt = re.search(r'\{"flashlexd-check": "[0-9a-f-]{36}"\} published to (\S+) came back in ([0-9.]+) ms',
                    steps["probe"][1])
    assert rtt and rtt.group(1) == INGRESS_TOPIC and float(rtt.group(2)) > 0, steps["probe"]
    data_dir = load(str(config)).store.data_dir
    # nothing made: run as root (sudo) before the service, it left a data dir the service's
    # user could not open (outside /var/lib systemd does not chown it)
    assert steps["store"][1] == (f"store in {data_dir} does not exist yet: flashlexd run creates it"
                                 f" ({tmp_path / 'thing'} is writable)") and not data_dir.exists()
    assert_no_key_material(result, tmp_path / "thing" / f"{THING}-keypair-private.pem")
    # its own client id, MQTT 5 (protocol auto, the default), with a clean session (c1):
    # nothing of it stays on the broker
    assert "over MQTT 5 for client id" in steps["mqtt"][1]
    assert f"as {THING}-check (p5, c1," in broker.log_text()
    assert f"Client {THING}-check disconnected." in broker.log_text()
    # a store that exists is opened, not written: the probe is not in it
    open_store(config).close()
    steps, _ = parse(run_check(config))
    assert steps["store"][1].startswith(f"store in {data_dir} opens: 0 messages in the inbox")


def test_a_store_the_service_user_owns_passes_a_check_run_as_root(broker: Broker, tmp_path: Path) -> None:
    """`sudo flashlexd check` judged the data dir against root's own uid: a healthy install run
    by a service user failed, "owned by uid 1004, not by root or the daemon's user (uid 0)"
    (review "security"). The data dir's owner is the daemon's user, as for the config step."""
    config = write_config(tmp_path / "thing", broker)
    open_store(config).close()
    data_dir = load(str(config)).store.data_dir
    for path in (data_dir, *data_dir.iterdir()):
        os.chown(path, 4321, 4321)
    steps, _ = parse(run_check(config))
    assert steps["store"][0] == "ok", steps["store"]
    # run as root it would be refused: said (re-read 31)
    assert "judged for uid 4321, its owner: the service must run as that user" in steps["store"][1]


def test_the_store_of_a_running_daemon_is_opened_but_its_pages_not_walked(broker: Broker,
                                                                          tmp_path: Path) -> None:
    """`check` walked every page of data.mdb by reading the file, with no reader slot, while a
    running daemon's commits free and reuse pages: a live store could read as damaged."""
    from tests.daemon import Daemon
    config = write_config(tmp_path / "thing", broker)
    daemon = Daemon(config, tmp_path / "run").start()
    try:
        data_dir = load(str(config)).store.data_dir
        wait_for(lambda: (data_dir / "data.mdb").exists() and daemon.socket_path.exists(), 20,
                 "the daemon's store and socket")
        steps, _ = parse(run_check(config))
        assert steps["store"][0] == "ok", steps["store"]
        assert f"flashlexd (pid {daemon.pid}) is running it: pages not walked" in steps["store"][1]
    finally:
        daemon.stop()
    steps, _ = parse(run_check(config))  # stopped: walked, as before
    assert steps["store"][0] == "ok" and "is running" not in steps["store"][1], steps["store"]


def test_a_running_daemon_acknowledges_checks_probe_and_keeps_it_from_the_apps(broker: Broker,
                                                                               tmp_path: Path) -> None:
    """Review "compat": the running daemon stored the probe like any message, and an app
    written for the FlashLex SDK crashed on it at every pass (`payload["message"]`)."""
    from flashlexd.client import connect
    from tests.daemon import Daemon
    config = write_config(tmp_path / "thing", broker)
    daemon = Daemon(config, tmp_path / "run").start()
    try:
        daemon.wait_api()
        with connect(str(daemon.socket_path)) as fx:
            wait_for(lambda: fx.status()["mqtt"]["ingress"].get("subscriptions"), 20, "the ingress subscribed")
            steps, _ = parse(run_check(config))
            assert steps["probe"][0] == "ok" and "does not store it" in steps["probe"][1], steps["probe"]
            wait_for(lambda: fx.status()["mqtt"]["ingress"].get("received"), 20, "the probe received")
            assert fx.status()["mqtt"]["ingress"]["check_probes"] == 1
            assert fx.messages() == [] and fx.status()["inbox"]["count"] == 0
    finally:
        daemon.stop()


def test_the_old_sdks_store_in_the_data_dir_is_named_by_check_and_run(broker: Broker,
                                                                        tmp_path: Path) -> None:
    """Found by review: pointed at the FlashLex SDK's data dir, `check` said "0 messages in the
    inbox" and `run` started empty beside a 20,000-message subscription.json, with nothing
    saying that flashlexd does not read it (the migration's first step: drain it)."""
    from tests.daemon import Daemon
    config = write_config(tmp_path / "thing", broker)
    data_dir = load(str(config)).store.data_dir
    data_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    old = data_dir / "subscription.json"
    old.write_text(json.dumps({str(n): {"message": {"topic": "t", "payload": "x"}} for n in range(100)}))
    note = f"{old} ({old.stat().st_size} bytes) is the FlashLex SDK's store: flashlexd does not read it"
    steps, _ = parse(run_check(config))
    assert steps["store"][0] == "ok" and note in steps["store"][1], steps["store"]
    daemon = Daemon(config, tmp_path / "run").start()
    try:
        wait_for(lambda: note in daemon.output(), 20, "the daemon's warning")
    finally:
        daemon.stop()
    old.write_text("{}")  # drained: nothing to say
    steps, _ = parse(run_check(config))
    assert "FlashLex SDK" not in steps["store"][1]
    renamed = data_dir / "mydata.json"  # flashlex.app.db.subscriptionData: mydata.json
    renamed.write_text('{"1": {}}')
    steps, _ = parse(run_check(config))
    assert f"{renamed} (9 bytes) is the FlashLex SDK's store" in steps["store"][1], steps["store"]


def test_a_store_of_an_earlier_schema_is_named_not_migrated(broker: Broker, tmp_path: Path) -> None:
    """Found by review: `check` opened the store as the daemon does, migrating one of an
    earlier schema in place: run after an upgrade's `pip install` and before the restart (the
    install guide's step), it left the daemon still running the earlier release unable to
    open its store at its next worker restart (every worker crash-looped, the daemon stopped)."""
    import lmdb
    import struct
    from flashlexd.storebase import SCHEMA_VERSION
    config = write_config(tmp_path / "thing", broker)
    open_store(config).close()
    data_dir = load(str(config)).store.data_dir
    env = lmdb.open(str(data_dir), max_dbs=16)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"schema", struct.pack(">Q", SCHEMA_VERSION - 1), db=meta)
    env.close()
    result = run_check(config)
    steps, _ = parse(result)
    assert steps["store"] == ("ok", f"store in {data_dir} has schema {SCHEMA_VERSION - 1}, written by"
                              f" an earlier flashlexd; this one ({SCHEMA_VERSION}) migrates it at its"
                              f" start (the earlier one cannot open it from then on); not opened here")
    env = lmdb.open(str(data_dir), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:
        assert struct.unpack(">Q", txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False)))[0] \
            == SCHEMA_VERSION - 1
    env.close()


def test_the_check_speaks_the_configured_protocol(broker: Broker, tmp_path: Path) -> None:
    result = run_check(write_config(tmp_path / "thing", broker, mqtt={"protocol": "3.1.1"}))
    assert result.returncode == 0, result.stdout + result.stderr
    steps, _ = parse(result)
    assert "over MQTT 3.1.1 for client id" in steps["mqtt"][1]
    assert f"as {THING}-check (p2, c1," in broker.log_text()


def test_auto_falls_back_on_a_broker_without_mqtt5_as_the_daemon_does(rabbitmq, tmp_path: Path) -> None:
    result = run_check(write_config(tmp_path / "thing", rabbitmq, mqtt={"protocol": "auto"}))
    assert result.returncode == 0, result.stdout + result.stderr
    steps, _ = parse(result)
    assert statuses(steps) == ["ok"] * 6
    assert "over MQTT 3.1.1 (the broker does not speak MQTT 5: " in steps["mqtt"][1]


def test_mqtt5_only_on_a_broker_without_it_fails_at_the_mqtt_step(rabbitmq, tmp_path: Path) -> None:
    result = run_check(write_config(tmp_path / "thing", rabbitmq, mqtt={"protocol": "5"}))
    assert result.returncode == 1, result.stdout + result.stderr
    steps, _ = parse(result)
    assert statuses(steps)[:4] == ["ok", "ok", "ok", "FAIL"]
    assert "MQTT 5" in steps["mqtt"][1], steps["mqtt"]


def test_json_output(broker: Broker, tmp_path: Path) -> None:
    result = run_check(write_config(tmp_path / "thing", broker), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"ok", "steps"} and report["ok"] is True
    assert [step["name"] for step in report["steps"]] == STEPS
    assert all(set(step) == {"name", "status", "detail"} for step in report["steps"])
    assert all(step["status"] == "ok" and step["detail"] for step in report["steps"])


def test_json_output_of_a_failure(broker: Broker, tmp_path: Path) -> None:
    result = run_check(write_config(tmp_path / "thing", broker, port=free_port()), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [step["status"] for step in report["steps"]] == ["ok", "ok", "fail", "skip", "skip", "ok"]


# -- each way to be not ready -------------------------------------------------------------------

def test_certificate_from_another_ca_is_refused(broker: Broker, certs: Certs, tmp_path: Path) -> None:
    result = run_check(write_config(tmp_path / "thing", broker, identity=certs.stranger))
    assert result.returncode == 1
    steps, verdict = parse(result)
    failed = [name for name in STEPS if steps[name][0] == "FAIL"]
    assert failed in (["broker"], ["mqtt"]), result.stdout  # mqtt when the alert comes late
    assert "refused the client certificate" in steps[failed[0]][1]
    assert steps["probe"][0] == "skip" and steps["store"][0] == "ok"
    assert verdict.startswith("NOT READY")


def test_broker_certificate_not_signed_by_root_ca(broker: Broker, certs: Certs, tmp_path: Path) -> None:
    result = run_check(write_config(tmp_path / "thing", broker, root_ca=certs.other_ca))
    steps, _ = parse(result)
    assert result.returncode == 1
    assert statuses(steps) == ["ok", "ok", "FAIL", "skip", "skip", "ok"]
    assert steps["broker"][1].startswith("TLS: the broker's certificate") and "not trusted" in steps["broker"][1]


def test_broker_certificate_for_another_host(certs: Certs, tmp_path: Path) -> None:
    elsewhere = Broker(certs, tmp_path / "elsewhere", server=certs.wrong_host).start()
    try:
        result = run_check(write_config(tmp_path / "thing", elsewhere))
    finally:
        elsewhere.kill()
    steps, _ = parse(result)
    assert statuses(steps) == ["ok", "ok", "FAIL", "skip", "skip", "ok"]
    assert steps["broker"][1].startswith("TLS: the broker's certificate is not valid for host 127.0.0.1")


def test_closed_port_is_connection_refused(broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    result = run_check(write_config(tmp_path / "thing", broker, port=port))
    steps, _ = parse(result)
    assert result.returncode == 1
    assert statuses(steps) == ["ok", "ok", "FAIL", "skip", "skip", "ok"]
    assert steps["broker"][1].startswith(f"TCP: connection refused to 127.0.0.1:{port}")


def test_unknown_host_fails_dns(broker: Broker, tmp_path: Path) -> None:
    result = run_check(write_config(tmp_path / "thing", broker, endpoint="no-such-host.invalid"), timeout="3")
    steps, _ = parse(result)
    assert result.returncode == 1
    assert statuses(steps) == ["ok", "ok", "FAIL", "skip", "skip", "ok"]
    assert steps["broker"][1].startswith("DNS: ") and "no-such-host.invalid" in steps["broker"][1]


def test_private_key_readable_by_others(broker: Broker, tmp_path: Path) -> None:
    config = write_config(tmp_path / "thing", broker)
    key = tmp_path / "thing" / f"{THING}-keypair-private.pem"
    key.chmod(0o644)
    result = run_check(config)
    steps, _ = parse(result)
    assert result.returncode == 1
    assert steps["keys"][0] == "FAIL" and "mode 0644" in steps["keys"][1] and f"chmod 600 {key}" in steps["keys"][1]
    assert "warning: " in steps["config"][1]  # the config loader's warning, shown as detail
    # the key still works: the other steps run and pass
    assert statuses(steps) == ["ok", "FAIL", "ok", "ok", "ok", "ok"]
    assert_no_key_material(result, key)


def test_certificate_and_key_that_do_not_match(broker: Broker, certs: Certs, tmp_path: Path) -> None:
    mixed = Identity(cert=certs.thing.cert, key=certs.stranger.key)
    result = run_check(write_config(tmp_path / "thing", broker, identity=mixed))
    steps, _ = parse(result)
    assert result.returncode == 1
    assert statuses(steps) == ["ok", "FAIL", "skip", "skip", "skip", "ok"]
    assert "does not match private key" in steps["keys"][1]


def test_expired_certificate(broker: Broker, tmp_path: Path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    expired = _self_signed(directory, not_after=datetime.datetime(2021, 6, 1, 12, 0, tzinfo=datetime.timezone.utc))
    result = run_check(write_config(tmp_path / "thing", broker, identity=expired))
    steps, _ = parse(result)
    assert result.returncode == 1
    assert steps["keys"][0] == "FAIL" and "expired on 2021-06-01 12:00:00 UTC (now is " in steps["keys"][1]
    assert "unless the system clock is wrong" in steps["keys"][1]  # review "clock": a clock 50 years on


def test_bad_config_skips_everything_after_it(tmp_path: Path) -> None:
    config = tmp_path / "flashlex.yml"
    config.write_text("flashlex:\n  thing:\n    name: x\n")
    result = run_check(config)
    steps, verdict = parse(result)
    assert result.returncode == 1
    assert statuses(steps) == ["FAIL", "skip", "skip", "skip", "skip", "skip"]
    assert steps["config"][1] == "flashlex.thing.endpoint: missing required key"
    assert "6 checks failed (config), 5 skipped" in verdict


@pytest.mark.parametrize("command, code", [(["check", "--config"], 1), (["check", "--json", "--config"], 1),
                                           (["service", "--rsyslog", "--dir"], 0)])
def test_a_reader_that_went_is_no_traceback_and_keeps_the_exit_code(tmp_path: Path, command: List[str],
                                                                    code: int) -> None:
    """`flashlexd check | head -1`, `flashlexd service ... | head` printed a BrokenPipeError
    traceback (found by reviews); then the check of a bad config exited 0 into such a reader, as
    if it passed (found by review)."""
    config = tmp_path / "flashlex.yml"
    config.write_text("flashlex:\n  thing:\n    name: x\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    where = str(config) if command[0] == "check" else str(tmp_path)
    try:
        result = subprocess.run([sys.executable, "-m", "flashlexd", *command, where],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == code and result.stderr == "", result.stderr


def test_missing_key_file_is_a_config_failure(broker: Broker, tmp_path: Path) -> None:
    config = write_config(tmp_path / "thing", broker)
    (tmp_path / "thing" / f"{THING}-certificate.pem").unlink()
    steps, _ = parse(run_check(config))
    assert steps["config"][0] == "FAIL" and "flashlex.thing.keys.cert" in steps["config"][1]
    assert "is missing" in steps["config"][1]


def test_data_dir_that_cannot_be_created(broker: Broker, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_check(write_config(tmp_path / "thing", broker, db={"dataPath": str(blocker / "data")}))
    steps, _ = parse(result)
    assert result.returncode == 1
    assert statuses(steps) == ["ok", "ok", "ok", "ok", "ok", "FAIL"]
    assert steps["store"][1].startswith(f"cannot open store in {blocker / 'data'}")


@pytest.mark.parametrize("argv", [
    ["check"],                            # no --config
    ["check", "--config", "x.yml", "--timeout", "0"],
    ["check", "--config", "x.yml", "--timeout", "soon"],
    # found by review: inf was a traceback, -1 sent SIGHUP and then said the reload failed
    *(["reload", "1", "--config", "x.yml", "--timeout", bad] for bad in ("inf", "-1", "0", "nan", "1e9")),
])
def test_bad_command_line_exits_2(argv: List[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "flashlexd", *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr and "Traceback" not in result.stderr, result.stderr


# -- the pieces ---------------------------------------------------------------------------------

def test_certificate_dates_agree_with_cryptography(certs: Certs, tmp_path: Path) -> None:
    late = _self_signed(tmp_path, not_after=datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc))
    for path in (certs.thing.cert, certs.ca, late.cert):  # UTCTime, and GeneralizedTime from 2050 on
        parsed = x509.load_pem_x509_certificate(path.read_bytes())
        assert certificate_validity(path.read_bytes()) == (parsed.not_valid_before_utc,
                                                           parsed.not_valid_after_utc)


def test_probe_topic_fills_in_wildcards() -> None:
    assert probe_topic("ingress/thing") == "ingress/thing"
    assert probe_topic("ingress/+/in") == f"ingress/{PROBE_KEY}/in"
    assert probe_topic("ingress/#") == f"ingress/{PROBE_KEY}"


def test_only_a_probe_on_the_probes_topic_is_kept_from_the_store() -> None:
    """Re-read 36: a payload of the probe's shape on an app's own topic was dropped too."""
    from flashlexd.probemark import is_probe, probe_payload
    probe = probe_payload()
    assert is_probe(probe, "ingress/thing", probe_topic("ingress/thing"))
    assert is_probe(probe, "ingress/thing.v1", "ingress/thing/v1")  # RabbitMQ's dots
    assert not is_probe(probe, "apps/thing", probe_topic("ingress/thing"))
    assert not is_probe(probe[:-3] + b'"}', "ingress/thing", "ingress/thing")


def _self_signed(directory: Path, not_after: datetime.datetime) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, THING)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
            .not_valid_after(not_after).sign(key, hashes.SHA256()))
    identity = Identity(directory / "self.pem", directory / "self.key")
    identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    identity.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    identity.key.chmod(0o600)
    return identity


def test_output_to_a_full_disk_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`flashlexd check --json > /var/tmp/check.json` on a device whose disk is full: OSError
    ENOSPC came out as a traceback (found by review)."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "flashlexd", "check", "--json", "--config",
                               str(tmp_path / "missing.yml")], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    assert done.returncode == 1 and done.stderr == "flashlexd: cannot write the output: No space left on device\n", \
        done.stderr


def test_the_store_step_says_its_filesystems_room_and_fails_on_a_full_one(broker: Broker, tmp_path: Path) -> None:
    """Review "diskfull": on a disk 100 % full (the daemon degraded) `check` said READY, with
    "18.7 MB of 256.0 MB used" and no word of the disk."""
    from tests.tmpfs import fill, mounted_tmpfs
    with mounted_tmpfs(tmp_path / "disk", 8) as disk:
        config = write_config(tmp_path / "thing", broker, db={"dataPath": str(disk / "data")})
        open_store(config).close()
        steps, _ = parse(run_check(config))
        assert steps["store"][0] == "ok" and "; its filesystem has " in steps["store"][1], steps["store"]
        assert "free of 8.0 MB (the cap is over the filesystem's size: the disk fills first)" in steps["store"][1]
        fill(disk, 0)
        result = run_check(config)
        steps, _ = parse(result)
        assert result.returncode == 1 and steps["store"][0] == "FAIL", steps["store"]
        assert "its filesystem is full (0.0 MB free of 8.0 MB): the store cannot grow" in steps["store"][1]
